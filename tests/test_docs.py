"""The documentation stays true: CLI reference, site navigation, figures."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from afpx.cli import cli_reference

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_cli_reference_is_the_live_help() -> None:
    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert page == cli_reference(), (
        "docs/cli.md differs from the live --help: run python scripts/make_cli_docs.py"
    )


def test_cli_reference_covers_every_command_and_subcommand() -> None:
    from afpx.cli import main

    text = cli_reference()
    for name in main.commands:
        assert f"## `afpx {name}`" in text
    for sub in ("afp", "confusion", "tsne", "elements", "training", "likelihood", "test2"):
        assert f"## `afpx plot {sub}`" in text


def test_site_navigation_lists_every_page() -> None:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))

    def pages(nav: object) -> list[str]:
        if isinstance(nav, str):
            return [nav]
        if isinstance(nav, dict):
            return [p for v in nav.values() for p in pages(v)]
        if isinstance(nav, list):
            return [p for v in nav for p in pages(v)]
        return []

    listed = set(pages(config["nav"]))
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert listed == on_disk


def test_figures_page_shows_only_figures_that_exist() -> None:
    text = (DOCS / "figures.md").read_text(encoding="utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) >= 6
    for image in images:
        assert (DOCS / image).is_file(), image
    total = sum(p.stat().st_size for p in (DOCS / "figures").glob("*"))
    assert total < 2_000_000  # figures stay small in the repository


def test_readme_opens_with_exactly_two_commands_that_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", readme, flags=re.S)
    assert block is not None and readme.index(block.group(0)) < readme.index("afpx predicts")
    commands = [line.split("  #")[0].strip() for line in block.group(1).strip().splitlines()]
    assert commands == [
        "pip install -e . && afpx rank --elements Li,Mn,Ge",
        'pip install -e ".[test]" && pytest',
    ]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert all(command in ci for command in commands)
    # the first command runs before torch is installed: the light install is what CI checks
    assert ci.index(commands[0]) < ci.index("pip install -q torch==2.13.0") < ci.index(commands[1])
