"""The built-in template library: packing and loading.

The library that ``afpx rank`` uses without ``--cube`` ships inside the
package as two files in ``afpx/data/``:

* ``default_library.npz`` — plain numeric and fixed-width string arrays,
  written with :func:`numpy.savez_compressed` and read with
  ``numpy.load(allow_pickle=False)`` (never unpickles anything);
* ``default_library.json`` — the manifest: format version, the SHA-256 and
  size of the npz (verified before every load), how the likelihoods are
  quantised, counts, the library's provenance (model, cube, parameters) and
  the rank check made when packing. The manifest carries the SHA-256 of its
  own canonical JSON (``manifest_sha256``, see :func:`manifest_digest`),
  verified before every load too, so that an edited layout (a ``dtype``)
  cannot turn the arrays into garbage silently.

Likelihoods are stored as log-likelihoods, either losslessly (``float32``) or
quantised: ``float16`` (half-precision log: relative precision 2^-11 of the
log, so finest for likelihoods near 1, where the top of a ranking lives —
about 5e-6 in log at a likelihood of 0.99, 1e-2 at 1e-9), ``uint16`` (65 536
levels evenly spaced in log between the log of ``floor`` and 0: ±1.05e-4 in
log with the default floor 1e-6) or ``uint8`` (256 levels). Likelihoods below
``floor`` are stored as ``floor``; clamping, more than the step, is what
reorders the tail of a ranking, so a quantised packing wants a low floor.
Numeric arrays are byte-shuffled before compression (bytes of equal
significance stored together), which deflate compresses much better.
:func:`pack_library` re-ranks a sample of element sets with the packed
library and records how far every rank moved.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from afpx import AfpxError, __version__, schema
from afpx.datasets import sha256_of
from afpx.templates import LIKELIHOOD_FLOOR, TemplateGeometry, TemplateLibrary
from afpx.templates.library import LazyLogLikelihood

__all__ = [
    "DEFAULT_NAME",
    "QUANTISATIONS",
    "compare_rankings",
    "default_data_dir",
    "default_model_dir",
    "load_default_library",
    "load_library",
    "pack_default_library",
    "pack_default_model",
    "pack_library",
    "repack_library",
]

DEFAULT_NAME: Final = "default_library"
FORMAT: Final = "afpx-template-library"
FORMAT_VERSION: Final = 2
#: npz member holding the log-likelihood column of atomic number z (format 2).
COLUMN_NAME: Final = "log_likelihood_z{z:03d}"
QUANTISATIONS: Final = ("float32", "float16", "uint16", "uint8")
_REINSTALL: Final = "reinstall afpx (pip install --force-reinstall afpx)"
#: Folder (inside the data folder) of the packed default model.
MODEL_DIR: Final = "default_model"
#: Files of a model folder that ship: weights (torch ``state_dict``, loadable
#: with ``weights_only=True``), configuration and the training log.
MODEL_FILES: Final = ("model.pt", "config.json", "metrics.csv", "metrics.json")
MODEL_MANIFEST: Final = "manifest.json"


def default_data_dir() -> Path:
    """Folder of the package data (``afpx/data``)."""
    return Path(__file__).resolve().parent / "data"


# =============================================================================
# packing
# =============================================================================
def _shuffle(a: np.ndarray) -> np.ndarray:
    """(itemsize, n) uint8 planes: byte j of every element together."""
    a = np.ascontiguousarray(a)
    return a.reshape(-1).view(np.uint8).reshape(-1, a.dtype.itemsize).T.copy()


def _unshuffle(planes: np.ndarray, dtype: str, shape: Sequence[int]) -> np.ndarray:
    return np.ascontiguousarray(planes.T).view(np.dtype(dtype)).reshape(tuple(shape))


def _strings(values: np.ndarray) -> np.ndarray:
    # fixed-width unicode: loadable without pickle
    return np.asarray([str(v) for v in values], dtype=str)


def _round_mantissa(x: np.ndarray, bits: int) -> np.ndarray:
    """float16 values rounded (half up in magnitude) to ``bits`` of their 10 mantissa bits."""
    drop = 10 - bits
    if drop == 0:
        return x
    u = x.view(np.uint16).astype(np.uint32)
    rounded = ((u + np.uint32(1 << (drop - 1))) >> np.uint32(drop)) << np.uint32(drop)
    return rounded.astype(np.uint16).view(np.float16)


def _quantise(
    logl: np.ndarray, kind: str, floor: float, mantissa_bits: int = 10
) -> tuple[np.ndarray, dict[str, Any]]:
    if kind == "float32":
        return np.asarray(logl, dtype=np.float32), {"kind": kind}
    if kind == "float16":
        x = np.maximum(np.asarray(logl, dtype=np.float32), np.float32(math.log(floor)))
        x16 = _round_mantissa(x.astype(np.float16), mantissa_bits)
        return x16, {"kind": kind, "floor": floor, "mantissa_bits": mantissa_bits}
    levels = {"uint16": 65535, "uint8": 255}[kind]
    lo = math.log(floor)
    x = np.clip(np.asarray(logl, dtype=np.float64), lo, 0.0)
    q = np.rint((x - lo) / (0.0 - lo) * levels).astype(np.uint16 if kind == "uint16" else np.uint8)
    return q, {"kind": kind, "log_floor": lo, "levels": levels, "floor": floor}


def _dequantise(q: np.ndarray, info: dict[str, Any]) -> np.ndarray:
    if info["kind"] == "float16":
        # kept as stored: the engine reads a few columns into float64, exactly the
        # same values as through float32, without converting 20 M entries at load
        return np.asarray(q, dtype=np.float16)
    if info["kind"] == "float32":
        return np.asarray(q, dtype=np.float32)
    lo, levels = float(info["log_floor"]), int(info["levels"])
    out = q.astype(np.float32)
    out *= np.float32(-lo / levels)
    out += np.float32(lo)
    return out


def _library_arrays(
    library: TemplateLibrary, *, quantise: str, floor: float, mantissa_bits: int = 10
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays to store and the layout recorded in the manifest."""
    arrays: dict[str, np.ndarray] = {}
    layout: dict[str, Any] = {}

    def put(name: str, a: np.ndarray, *, shuffle: bool = False) -> None:
        a = np.asarray(a)
        if shuffle and a.dtype.itemsize > 1:
            arrays[name] = _shuffle(a)
            layout[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "shuffled": True}
        else:
            arrays[name] = a
            layout[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "shuffled": False}

    n_sites = library.n_unique_sites
    if n_sites.size and n_sites.max() > np.iinfo(np.uint16).max:
        raise AfpxError("a template has more than 65535 unique sites; cannot pack it")
    put("n_unique_sites", n_sites.astype(np.uint16), shuffle=True)
    put("multiplicity", library.multiplicity.astype(np.int32), shuffle=True)
    put("z", library.z.astype(np.uint8))
    q, qinfo = _quantise(np.asarray(library.log_likelihood), quantise, floor, mantissa_bits)
    qinfo.update(_put_columns(arrays, q))
    put("structure_id", _strings(library.structure_id))
    put("formula", _strings(library.formula))
    put("spacegroup", np.asarray(library.spacegroup).astype(np.int16), shuffle=True)
    put("source", _strings(library.source))
    if library.split is not None:
        put("split", _strings(library.split))
    if library.wyckoff is not None:
        put("wyckoff", _strings(library.wyckoff))
    if library.site_index is not None:
        put("site_index", library.site_index.astype(np.int32), shuffle=True)
    geo = library.geometry
    if geo is not None:
        put("geometry_lattice", geo.lattice.astype(np.float32), shuffle=True)
        put("geometry_n_atoms", np.diff(geo.atom_start).astype(np.int32), shuffle=True)
        put("geometry_frac_coords", geo.frac_coords.astype(np.float32), shuffle=True)
        put("geometry_numbers", geo.numbers.astype(np.uint8))
    return arrays, {"arrays": layout, "log_likelihood": qinfo}


def _put_columns(arrays: dict[str, np.ndarray], q: np.ndarray) -> dict[str, Any]:
    """One byte-shuffled array per element column (format 2); its layout entries."""
    shuffled = q.dtype.itemsize > 1
    for z in range(1, schema.N_ELEMENTS + 1):
        col = np.ascontiguousarray(q[:, z - 1])
        arrays[COLUMN_NAME.format(z=z)] = _shuffle(col) if shuffled else col
    return {
        "columns": COLUMN_NAME,
        "dtype": q.dtype.str,
        "n_sites": int(q.shape[0]),
        "shuffled": shuffled,
    }


def pack_library(
    library: TemplateLibrary,
    directory: str | os.PathLike[str],
    *,
    name: str = DEFAULT_NAME,
    quantise: str = "uint16",
    floor: float = 1e-6,
    mantissa_bits: int = 10,
    check_sets: Sequence[Sequence[int]] | int | None = 40,
    seed: int = 0,
) -> dict[str, Any]:
    """Write a library as ``<name>.npz`` + ``<name>.json`` and check it.

    Parameters
    ----------
    library : TemplateLibrary
    directory : path
        Created if missing; existing files of that name are replaced.
    name : str
        Base name of the two files.
    quantise : {"float32", "uint16", "uint8"}
        Storage of the log-likelihoods (see the module notes).
    floor : float
        Likelihoods below this are stored as this (quantised kinds only).
    mantissa_bits : int
        ``float16`` only: keep this many of the 10 mantissa bits of the
        log-likelihood (relative precision 2^-(bits+1)); fewer bits compress
        better. The rank check below shows what it costs.
    check_sets : int, sequence of element sets, or None
        Element sets (atomic numbers) to rank with the original and the
        packed library; an int draws that many binary and ternary sets from
        the library's own structures (seeded). None skips the check.
    seed : int
        Seed of the drawn sets.

    Returns
    -------
    dict
        The manifest written (with ``rank_check``: sets compared, sets whose
        ranking changed, and the largest change of a mid-rank).
    """
    if quantise not in QUANTISATIONS:
        raise AfpxError(f"unknown quantisation {quantise!r}; choose one of {QUANTISATIONS}")
    if not 0 < floor < 1:
        raise AfpxError(f"floor must lie in (0, 1), got {floor}")
    if not 1 <= mantissa_bits <= 10:
        raise AfpxError(f"mantissa_bits must lie in 1..10 (float16 has 10), got {mantissa_bits}")
    if floor < LIKELIHOOD_FLOOR:
        floor = LIKELIHOOD_FLOOR
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    arrays, layout = _library_arrays(
        library, quantise=quantise, floor=floor, mantissa_bits=mantissa_bits
    )
    npz = out / f"{name}.npz"
    tmp = out / f".{name}.npz.tmp"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, npz)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "afpx_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {npz.name: {"sha256": sha256_of(npz), "bytes": npz.stat().st_size}},
        "n_templates": library.n_templates,
        "n_sites": library.n_sites,
        "has_geometry": library.geometry is not None,
        "layout": layout,
        "attrs": library.attrs,
    }
    if check_sets is not None:
        packed = _load(npz, manifest)
        sets = _draw_sets(library, check_sets, seed) if isinstance(check_sets, int) else check_sets
        manifest["rank_check"] = compare_rankings(library, packed, sets)
    manifest = json.loads(json.dumps(manifest))  # what the file will hold, tuples as lists
    manifest[MANIFEST_DIGEST_KEY] = manifest_digest(manifest)
    (out / f"{name}.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


#: Key of a library manifest holding the SHA-256 of the rest of the manifest.
MANIFEST_DIGEST_KEY: Final = "manifest_sha256"


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of a library manifest without its own digest, in canonical JSON.

    Canonical: keys sorted, no whitespace, ASCII (``json.dumps(...,
    sort_keys=True, separators=(",", ":"))``), so the file's indentation does
    not matter.
    """
    rest = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST_KEY}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def pack_default_library(
    library: TemplateLibrary, path: str | os.PathLike[str] | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Pack ``library`` as the built-in default (into ``afpx/data`` unless ``path`` is given).

    Keyword arguments go to :func:`pack_library`.
    """
    return pack_library(library, default_data_dir() if path is None else path, **kwargs)


def repack_library(
    manifest: str | os.PathLike[str], directory: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Rewrite a format-1 packed library in format 2, with the very same stored values.

    Format 1 held the log-likelihoods as one (n_sites, 118) array that every
    load decompressed whole; format 2 stores one array per element, so a
    ranking reads only its elements' columns. The quantised values, the other
    arrays, the provenance and the rank check are kept as they are; the
    manifest gains ``repacked_from`` (the old format and SHA-256).

    Parameters
    ----------
    manifest : path
        The format-1 manifest (``<name>.json``); checksums are verified first.
    directory : path, optional
        Where to write ``<name>.npz`` and ``<name>.json`` (default: in place).

    Returns
    -------
    dict
        The new manifest.
    """
    path = Path(manifest)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AfpxError(f"cannot read manifest {os.fspath(path)!r}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AfpxError(f"{os.fspath(path)!r} is not an afpx template library manifest")
    if meta.get("format_version") != 1:
        raise AfpxError(
            f"{os.fspath(path)!r} has format version {meta.get('format_version')}; "
            "only format 1 is repacked"
        )
    if meta.get(MANIFEST_DIGEST_KEY) != manifest_digest(meta):
        raise AfpxError(f"manifest {os.fspath(path)!r} was changed since it was packed")
    npz = _verified_npz(path, meta)
    with np.load(npz, allow_pickle=False) as data:
        raw = {k: data[k] for k in data.files}
    layout = dict(meta["layout"]["arrays"])
    lay = layout.pop("log_likelihood")
    q = raw.pop("log_likelihood")
    if lay["shuffled"]:
        q = _unshuffle(q, lay["dtype"], lay["shape"])
    qinfo = dict(meta["layout"]["log_likelihood"])
    qinfo.update(_put_columns(raw, q))
    out = path.parent if directory is None else Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    new_npz = out / npz.name
    tmp = out / f".{npz.name}.tmp"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **raw)
    os.replace(tmp, new_npz)
    old_sha = meta["files"][npz.name]["sha256"]
    new_meta = {k: v for k, v in meta.items() if k != MANIFEST_DIGEST_KEY}
    new_meta["format_version"] = FORMAT_VERSION
    new_meta["files"] = {
        new_npz.name: {"sha256": sha256_of(new_npz), "bytes": new_npz.stat().st_size}
    }
    new_meta["layout"] = {"arrays": layout, "log_likelihood": qinfo}
    new_meta["repacked_from"] = {"format_version": 1, "sha256": old_sha}
    new_meta[MANIFEST_DIGEST_KEY] = manifest_digest(new_meta)
    (out / path.name).write_text(json.dumps(new_meta, indent=1, sort_keys=True) + "\n")
    return new_meta


def _draw_sets(library: TemplateLibrary, n: int, seed: int) -> list[tuple[int, ...]]:
    """Up to ``n`` binary and ternary element sets of the library's own structures."""
    rng = np.random.default_rng(seed)
    start = library.site_start
    sets: set[tuple[int, ...]] = set()
    for t in range(library.n_templates):
        zs = tuple(sorted({int(z) for z in library.z[start[t] : start[t + 1]]}))
        if len(zs) in (2, 3):
            sets.add(zs)
    ordered = sorted(sets)
    if len(ordered) <= n:
        return ordered
    pick = rng.choice(len(ordered), size=n, replace=False)
    return [ordered[i] for i in sorted(pick.tolist())]


def compare_rankings(
    original: TemplateLibrary,
    other: TemplateLibrary,
    element_sets: Sequence[Sequence[int]],
    *,
    top: int = 20,
    head: int = 100,
) -> dict[str, Any]:
    """Compare the full composition rankings of two libraries on element sets.

    Returns a JSON-able dict: ``n_sets``; ``n_compositions`` (total compared);
    ``same_compositions`` (both produce the same compositions);
    ``n_sets_changed`` (sets where any composition's mid-rank differs);
    ``n_sets_top_changed`` (sets whose first ``top`` rows differ in formula or
    rank); ``n_compositions_moved``; ``max_rank_change`` (largest change of a
    mid-rank, in positions) and ``max_rank_change_head`` (the same among the
    compositions ranked within ``head`` by ``original``).
    """
    from afpx.rank import rank_rows
    from afpx.templates import (
        CandidateOptions,
        candidates,
        check_elements,
        element_symbol,
        reduce_compositions,
    )

    def ranking(lib: TemplateLibrary, zs: np.ndarray) -> dict[str, float]:
        res, _ = candidates(lib, zs, CandidateOptions(), assignments=False)
        if res.template.size == 0:
            return {}
        inv, uniq = reduce_compositions(res.counts)
        rows = rank_rows(
            res.template,
            inv,
            uniq,
            res.log_score,
            [element_symbol(int(z)) for z in zs],
            top=None,
            tie_tolerance=1e-9,
        )
        return {str(f): float(r) for f, r in zip(rows["formula"], rows["rank"], strict=True)}

    changed = top_changed = n_comp = n_moved = 0
    max_change = max_change_head = 0.0
    same_compositions = True
    for s in element_sets:
        zs = check_elements(list(s))
        a, b = ranking(original, zs), ranking(other, zs)
        n_comp += len(a)
        if set(a) != set(b):
            same_compositions = False
        if a != b:
            changed += 1
        for f, r in a.items():
            if f in b and b[f] != r:
                n_moved += 1
                max_change = max(max_change, abs(b[f] - r))
                if r <= head:
                    max_change_head = max(max_change_head, abs(b[f] - r))
        top_a = sorted(a.items(), key=lambda kv: (kv[1], kv[0]))[:top]
        top_b = sorted(b.items(), key=lambda kv: (kv[1], kv[0]))[:top]
        top_changed += top_a != top_b
    return {
        "n_sets": len(element_sets),
        "n_compositions": n_comp,
        "same_compositions": same_compositions,
        "n_sets_changed": changed,
        "n_sets_top_changed": top_changed,
        "top": top,
        "n_compositions_moved": n_moved,
        "max_rank_change": max_change,
        "head": head,
        "max_rank_change_head": max_change_head,
    }


# =============================================================================
# loading
# =============================================================================
def load_library(manifest: str | os.PathLike[str]) -> TemplateLibrary:
    """Load a packed library from its manifest (``<name>.json``), verifying checksums.

    Raises :class:`AfpxError` when a file is missing or its SHA-256 differs
    from the manifest's.
    """
    path = Path(manifest)
    if not path.is_file():
        raise AfpxError(f"packed library manifest {os.fspath(path)!r} does not exist")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AfpxError(f"cannot read manifest {os.fspath(path)!r}: {exc}; {_REINSTALL}") from exc
    if not isinstance(meta, dict):
        raise AfpxError(f"manifest {os.fspath(path)!r} is not a JSON object; {_REINSTALL}")
    if meta.get("format") == FORMAT and meta.get("format_version") == 1:
        raise AfpxError(
            f"{os.fspath(path)!r} is a template library of format version 1 (one likelihood "
            f"array, read whole); this afpx reads format {FORMAT_VERSION} (one array per "
            f'element). Repack it with the same data: python -c "import afpx.default; '
            f"afpx.default.repack_library('{os.fspath(path)}')\", or {_REINSTALL}"
        )
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise AfpxError(
            f"{os.fspath(path)!r} is not an afpx template library of format version "
            f"{FORMAT_VERSION}; {_REINSTALL}"
        )
    stated = meta.get(MANIFEST_DIGEST_KEY)
    if stated is None:
        raise AfpxError(
            f"manifest {os.fspath(path)!r} has no {MANIFEST_DIGEST_KEY} (packed before manifests"
            f" were checksummed); pack the library again, or {_REINSTALL}"
        )
    if stated != manifest_digest(meta):
        raise AfpxError(
            f"manifest {os.fspath(path)!r} was changed since it was packed (its"
            f" {MANIFEST_DIGEST_KEY} differs); {_REINSTALL}"
        )
    return _load(_verified_npz(path, meta), meta)


def _verified_npz(path: Path, meta: dict[str, Any]) -> Path:
    """The manifest's one data file, its SHA-256 checked."""
    files = meta.get("files", {})
    if len(files) != 1:
        raise AfpxError(f"manifest {os.fspath(path)!r} must list exactly one data file")
    ((fname, info),) = files.items()
    npz = path.parent / fname
    if not npz.is_file():
        raise AfpxError(f"packed library file {os.fspath(npz)!r} is missing; {_REINSTALL}")
    digest = sha256_of(npz)
    if digest != info.get("sha256"):
        raise AfpxError(
            f"checksum mismatch for {os.fspath(npz)!r} (sha256 {digest[:12]}…, manifest "
            f"{str(info.get('sha256'))[:12]}…): the file is corrupted or was changed; "
            f"{_REINSTALL}"
        )
    return npz


def _load(npz: Path, meta: dict[str, Any]) -> TemplateLibrary:
    layout = meta["layout"]["arrays"]
    qinfo = meta["layout"]["log_likelihood"]
    columns = [qinfo["columns"].format(z=z) for z in range(1, schema.N_ELEMENTS + 1)]
    try:
        with np.load(npz, allow_pickle=False) as data:
            present = set(data.files)
            # the likelihood columns are read when an element set needs them
            raw = {k: data[k] for k in layout if k in present}
    except Exception as exc:  # zipfile / numpy raise several types
        raise AfpxError(f"cannot read {os.fspath(npz)!r}: {exc}; {_REINSTALL}") from exc
    missing = (set(layout) | set(columns)) - present
    if missing:
        raise AfpxError(f"{os.fspath(npz)!r} lacks {sorted(missing)[:5]}; {_REINSTALL}")

    def get(name: str) -> np.ndarray:
        lay = layout[name]
        a = raw[name]
        if lay["shuffled"]:
            return _unshuffle(a, lay["dtype"], lay["shape"])
        return a

    def opt(name: str) -> np.ndarray | None:
        return get(name) if name in layout else None

    n = get("n_unique_sites").astype(np.int64)
    n_sites = int(n.sum())
    if int(qinfo["n_sites"]) != n_sites:
        raise AfpxError(
            f"{os.fspath(npz)!r}: log_likelihood columns have {qinfo['n_sites']} sites, "
            f"the templates {n_sites}; {_REINSTALL}"
        )

    dtype = np.float16 if qinfo["kind"] == "float16" else np.float32
    logl = LazyLogLikelihood(n_sites, _ColumnReader(os.fspath(npz), qinfo, n_sites), dtype=dtype)
    geometry = None
    if "geometry_lattice" in layout:
        counts = get("geometry_n_atoms").astype(np.int64)
        geometry = TemplateGeometry(
            lattice=get("geometry_lattice").astype(np.float64),
            atom_start=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            frac_coords=get("geometry_frac_coords").astype(np.float64),
            numbers=get("geometry_numbers").astype(np.int16),
        )
    wyckoff = opt("wyckoff")
    split = opt("split")
    site_index = opt("site_index")
    attrs = dict(meta.get("attrs", {}))
    return TemplateLibrary(
        site_template=np.repeat(np.arange(n.size, dtype=np.int64), n),
        multiplicity=get("multiplicity").astype(np.int32),
        z=get("z").astype(np.int16),
        log_likelihood=logl,  # type: ignore[arg-type]  # read per column, see LazyLogLikelihood
        structure_id=get("structure_id").astype(object),
        formula=get("formula").astype(object),
        spacegroup=get("spacegroup").astype(np.int64),
        source=get("source").astype(object),
        split=None if split is None else split.astype(object),
        wyckoff=None if wyckoff is None else wyckoff.astype(object),
        site_index=None if site_index is None else site_index.astype(np.int64),
        geometry=geometry,
        attrs=attrs,
    )


@dataclasses.dataclass(frozen=True)
class _ColumnReader:
    """Reads the log-likelihood column of one element from a format-2 archive (picklable)."""

    npz: str
    qinfo: dict[str, Any]
    n_sites: int

    def __call__(self, z: int) -> np.ndarray:
        try:
            with np.load(self.npz, allow_pickle=False) as data:
                q = data[self.qinfo["columns"].format(z=z)]
        except Exception as exc:  # zipfile / numpy raise several types
            raise AfpxError(f"cannot read {self.npz!r}: {exc}; {_REINSTALL}") from exc
        if self.qinfo["shuffled"]:
            q = _unshuffle(q, self.qinfo["dtype"], [self.n_sites])
        return _dequantise(q, self.qinfo)


@functools.lru_cache(maxsize=1)
def _load_default_cached(manifest: str, mtime: float) -> TemplateLibrary:
    lib = load_library(manifest)
    lib.attrs["default"] = Path(manifest).name
    return lib


def load_default_library() -> TemplateLibrary:
    """The built-in template library and likelihoods (package data).

    Loaded once per process (checksum verified). Raises :class:`AfpxError`
    with what to do when the package data is not there yet or is corrupted.
    """
    manifest = default_data_dir() / f"{DEFAULT_NAME}.json"
    if not manifest.is_file():
        raise AfpxError(
            "the built-in default template library is not installed (no "
            f"{manifest.name} in {os.fspath(manifest.parent)}); rank with a cube that has "
            "likelihoods instead: `afpx rank --elements ... --cube CUBE.zarr`, or build and "
            "pack the default (see docs/ranking.md)"
        )
    return _load_default_cached(os.fspath(manifest), manifest.stat().st_mtime)


# =============================================================================
# the default model
# =============================================================================
def pack_default_model(
    model: str | os.PathLike[str], directory: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Copy a trained model folder's shipping files and write their checksums.

    Parameters
    ----------
    model : path
        A model folder written by ``afpx train`` (``model.pt`` + ``config.json``).
    directory : path, optional
        Target folder (default ``afpx/data/default_model``); replaced files only.

    Returns
    -------
    dict
        The manifest: every file with its SHA-256 and size.
    """
    import shutil

    src = Path(model)
    out = default_data_dir() / MODEL_DIR if directory is None else Path(directory)
    missing = [f for f in MODEL_FILES[:2] if not (src / f).is_file()]
    if missing:
        raise AfpxError(f"{os.fspath(src)!r} is not a model folder: {', '.join(missing)} missing")
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    for name in MODEL_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            files[name] = {"sha256": sha256_of(out / name), "bytes": (out / name).stat().st_size}
    manifest = {"format": "afpx-model-package", "format_version": 1, "files": files}
    (out / MODEL_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def default_model_dir(directory: str | os.PathLike[str] | None = None) -> Path:
    """The packed default model folder, after verifying every file's SHA-256.

    Pass the returned folder to ``afpx.checkpoint.load_model`` or
    ``afpx.likelihood.score_structures``. Raises :class:`AfpxError` when the
    model is not installed or a file differs from its checksum.
    """
    folder = default_data_dir() / MODEL_DIR if directory is None else Path(directory)
    manifest = folder / MODEL_MANIFEST
    if not manifest.is_file():
        raise AfpxError(
            f"the built-in default model is not installed (no {os.fspath(manifest)!r}); "
            f"train one with `afpx train CUBE -o MODEL`, or {_REINSTALL}"
        )
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise AfpxError(f"cannot read {os.fspath(manifest)!r}: {exc}; {_REINSTALL}") from exc
    for name, info in files.items():
        path = folder / name
        if not path.is_file():
            raise AfpxError(f"default model file {os.fspath(path)!r} is missing; {_REINSTALL}")
        if sha256_of(path) != info.get("sha256"):
            raise AfpxError(
                f"default model file {os.fspath(path)!r} does not match its SHA-256 in "
                f"{manifest.name} (corrupted or modified); {_REINSTALL}"
            )
    return folder
