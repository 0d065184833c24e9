"""Regenerate docs/cli.md from the live ``--help`` of every command.

Usage::

    python scripts/make_cli_docs.py          # write docs/cli.md
    python scripts/make_cli_docs.py --check  # exit 1 when docs/cli.md is stale
"""

from __future__ import annotations

import sys
from pathlib import Path

from afpx.cli import cli_reference

PAGE = Path(__file__).resolve().parent.parent / "docs" / "cli.md"

if __name__ == "__main__":
    text = cli_reference()
    if "--check" in sys.argv[1:]:
        stale = not PAGE.is_file() or PAGE.read_text(encoding="utf-8") != text
        if stale:
            print(f"{PAGE} differs from the live --help: run python scripts/make_cli_docs.py")
        sys.exit(int(stale))
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE}")
