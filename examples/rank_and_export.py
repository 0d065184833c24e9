"""Rank the compositions of an element set and export the best candidates as CIFs.

    python examples/rank_and_export.py Li,Mn,Ge [OUT_DIR]

Uses the built-in default templates and likelihoods (no torch needed).
"""

from __future__ import annotations

import sys
from pathlib import Path

import afpx
from afpx.default import load_default_library
from afpx.rank import export_cifs, to_frame

if __name__ == "__main__":
    elements = sys.argv[1] if len(sys.argv) > 1 else "Li,Mn,Ge"
    library = load_default_library()
    ranked = afpx.rank(elements, library=library, top=10, known=True)
    print(to_frame(ranked).to_string(index=False))
    if len(sys.argv) > 2:
        written = export_cifs(ranked, library, Path(sys.argv[2]))
        print(f"wrote {len(written)} CIF files to {sys.argv[2]}")
