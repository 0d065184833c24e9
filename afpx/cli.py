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
    """Turn :class:`afpx.AfpxError` into a one-line error with exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except AfpxError as exc:
            raise AfpxUsageError(str(exc)) from exc

    return wrapper  # type: ignore[return-value]


#: How to add PyTorch; the CPU build avoids a multi-gigabyte CUDA download.
TORCH_INSTALL = (
    "pip install 'afpx[train]' (on a CPU-only machine first: "
    "pip install torch --index-url https://download.pytorch.org/whl/cpu)"
)


def require_torch(what: str) -> None:
    """Fail with one line naming the install command when PyTorch is missing.

    Ranking, inspecting, building cubes, exporting CIFs and plotting need no
    torch; training, ``afpx likelihood`` and ``afpx evaluate --model`` do (the
    ``train`` extra).

    Parameters
    ----------
    what : str
        The command that needs torch, as the user typed it (``"afpx train"``).

    Raises
    ------
    AfpxUsageError
        When ``import torch`` fails.
    """
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        message = f"{what} needs PyTorch, which is not installed: {TORCH_INSTALL}"
        raise AfpxUsageError(message) from exc


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
      afpx evaluate cube.zarr                  # the paper's tests
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _register() -> None:
    import importlib
    import pkgutil

    import afpx.commands

    for info in sorted(pkgutil.iter_modules(afpx.commands.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"afpx.commands.{info.name}")
        for command in getattr(module, "COMMANDS", ()):
            main.add_command(command)


_register()
