"""The ``afpx`` command line: a click group of thin wrappers.

Each command parses its options, calls one library function and writes once.
Commands live in :mod:`afpx.commands` (one module per area) and import heavy
dependencies inside their bodies, so ``afpx --help`` stays fast.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import click

from afpx import AfpxError, __version__

F = TypeVar("F", bound=Callable[..., Any])


class AfpxUsageError(click.UsageError):
    """A library error shown as a one-line usage error (exit code 2)."""

    def show(self, file: Any = None) -> None:
        click.echo(f"Error: {self.format_message()}", err=True, file=file)


def library_errors(func: F) -> F:
    """Turn :class:`afpx.AfpxError` and :class:`OSError` into a one-line error with exit code 2.

    An operating-system error (no space left, permission denied, a read-only
    file system) is shown as its reason and the file it concerns; its
    traceback goes to the debug log (``-vv``).
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except AfpxError as exc:
            raise AfpxUsageError(str(exc)) from exc
        except OSError as exc:
            logging.getLogger("afpx").debug("operating-system error", exc_info=True)
            raise AfpxUsageError(os_error_message(exc)) from exc

    return wrapper  # type: ignore[return-value]


def os_error_message(exc: OSError) -> str:
    """One line for an operating-system error: its reason, and the file(s) it names."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    files = [f for f in (exc.filename, exc.filename2) if f is not None]
    where = " -> ".join(str(f) for f in files)
    return f"{reason}: {where}" if where else reason


#: How to add PyTorch; the CPU build avoids a multi-gigabyte CUDA download.
TORCH_INSTALL = (
    "pip install 'afpx[train]' (on a CPU-only machine first: "
    "pip install torch --index-url https://download.pytorch.org/whl/cpu)"
)


def require_modules(what: str, modules: tuple[str, ...], install: str) -> None:
    """Fail with one line naming the install command when an optional module is missing.

    Parameters
    ----------
    what : str
        The command that needs the modules, as the user typed it (``"afpx train"``).
    modules : tuple of str
        Importable names (``"torch"``, ``"matplotlib"``).
    install : str
        The command that installs them.

    Raises
    ------
    AfpxUsageError
        When one of the imports fails.
    """
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            message = f"{what} needs {module}, which is not installed: {install}"
            raise AfpxUsageError(message) from exc


def require_torch(what: str) -> None:
    """Fail with one line naming the install command when PyTorch is missing.

    Ranking, inspecting, building cubes and exporting CIFs need no torch;
    training, ``afpx likelihood``, ``afpx evaluate --model`` and
    ``afpx plot tsne`` do (the ``train`` extra).

    Parameters
    ----------
    what : str
        The command that needs torch, as the user typed it (``"afpx train"``).

    Raises
    ------
    AfpxUsageError
        When ``import torch`` fails.
    """
    require_modules(what, ("torch",), TORCH_INSTALL)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="afpx")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Crystal structure prediction from multi-perspective atomic fingerprints.

    \b
    Typical use:
      afpx rank --elements Li,Mn,Ge            # built-in model and templates
      afpx build-cube oqmd-icsd -o cube.zarr   # fingerprints of a dataset
      afpx train cube.zarr -o model/           # train the network
      afpx likelihood cube.zarr --model model/ # site x element likelihoods
      afpx evaluate cube.zarr -o report/       # the paper's tests
      afpx plot rank-curve report/ test1.png   # figures (afpx plot -h)
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def cli_reference(*, width: int = 88) -> str:
    """The command-line reference (``docs/cli.md``), made from the live ``--help`` texts.

    Parameters
    ----------
    width : int
        Terminal width the help texts are wrapped to (fixed, so the page is
        reproducible).

    Returns
    -------
    str
        Markdown: a short preamble, then one section per command and
        subcommand, depth first in alphabetical order, each with its help text.
    """
    lines = [
        "# Command line",
        "",
        "Generated from the live `--help` of every command by "
        "`python scripts/make_cli_docs.py`; a test fails when this page and the",
        "help differ. Every command prints the same text with `-h`. Library errors (bad input,",
        "missing data) are one-line messages with exit code 2, and so are operating-system",
        "errors (no space left, permission denied: the reason and the file; the traceback with",
        "`-vv`). Outputs that take long to make are checked for writing before the work starts.",
        "Other tracebacks mean a bug.",
    ]

    def walk(command: click.Command, parent: click.Context | None, name: str) -> None:
        # the command's own context settings (``-h``), as when it is invoked
        settings = {"terminal_width": width, "max_content_width": width}
        ctx = click.Context(
            command, info_name=name, parent=parent, **{**command.context_settings, **settings}
        )
        lines.extend(["", f"## `{ctx.command_path}`", "", "```text", command.get_help(ctx), "```"])
        if isinstance(command, click.Group):
            for sub in sorted(command.list_commands(ctx)):
                child = command.get_command(ctx, sub)
                if child is not None and not child.hidden:
                    walk(child, ctx, sub)

    walk(main, None, "afpx")
    return "\n".join(lines) + "\n"


def _register() -> None:
    import importlib
    import pkgutil

    import afpx.commands

    for info in sorted(pkgutil.iter_modules(afpx.commands.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"afpx.commands.{info.name}")
        for command in getattr(module, "COMMANDS", ()):
            main.add_command(command)


_register()
