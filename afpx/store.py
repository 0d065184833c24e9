"""Writing zarr stores that are never half there: publish, resume, append, verify.

A store is built in a hidden sibling of its target, ``.NAME.partial-XXXXXXXX``,
and published by one rename that never replaces what appeared at the target
meanwhile. Inside the partial:

* its sibling ``.NAME.partial-XXXXXXXX.owner.json``, written before the
  partial, names the process writing it (host, pid), a key of everything the
  build writes besides the lazy chunks (attributes, the in-memory variables,
  shapes and chunking of the lazy ones) and whether the metadata and
  in-memory variables are complete (``template``);
* ``.afpx-chunks/NAME/I`` records that chunk ``I`` (along the first dimension)
  of lazy variable ``NAME`` is written, with its file's size and sha256.

A build killed at any point leaves a partial whose completed chunks a resumed
build (same key) keeps; a partial whose process is gone is *stale*: reported
and removed by the next build of the target. When every chunk is written,
:func:`finish` records the size and sha256 of every chunk file (metadata
excluded) in the attributes of the group ``afpx_checksums``, removes the
bookkeeping, and the caller sets its completion attribute and publishes.

Readers check the recorded sizes on open (:func:`check_chunks`, stat calls
only) and the checksums on demand (:func:`verify_chunks`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from afpx import AfpxError
from afpx.datasets import sha256_of

if TYPE_CHECKING:
    import xarray as xr

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKSUMS_GROUP",
    "CHECKSUMS_RECORDS",
    "RECORD_CHUNK",
    "build_key",
    "check_chunks",
    "check_writable_folder",
    "chunk_waves",
    "claim",
    "done_chunks",
    "exchange",
    "exists",
    "filesystem",
    "finish",
    "group_attrs",
    "is_lazy",
    "is_url",
    "let_go",
    "link_chunks",
    "new_partial",
    "new_spill",
    "open_group",
    "partials",
    "pending_chunks",
    "pick",
    "publish",
    "recorded_chunks",
    "release",
    "remove",
    "remove_partial",
    "remove_stale_spills",
    "rename_noreplace",
    "stale_partial",
    "start_store",
    "verify_chunks",
]

#: A zarr group of the store that records the size and sha256 of every chunk file
#: (metadata excluded): a group, so that zarr and xarray read past it silently.
CHECKSUMS_GROUP: Final = "afpx_checksums"
#: The array of :data:`CHECKSUMS_GROUP` holding the record: the UTF-8 bytes of one JSON
#: line ``[file, size, sha256]`` per chunk file, in text order of the files. Data, not
#: metadata: zarr parses a group's attributes whenever a store's members are listed
#: (every open), and a record of ~70,000 files in them cost ~30 MB at each open.
CHECKSUMS_RECORDS: Final = "records"
#: Bytes per chunk of :data:`CHECKSUMS_RECORDS` (and read at a time).
RECORD_CHUNK: Final = 1 << 20
_OWNER_SUFFIX: Final = ".owner.json"
_MARKS: Final = ".afpx-chunks"
_RENAME_NOREPLACE: Final = 1
_RENAME_EXCHANGE: Final = 2
_AT_FDCWD: Final = -100
_ZARR_TEMPORARY: Final = re.compile(r"\.[0-9a-f]{32}\.partial$")
#: Partials this process is writing now (a failed write of this process is stale).
_ACTIVE: set[Path] = set()


# -- renames that never replace ------------------------------------------------------------
def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2``; False where the system lacks it (then the caller falls back)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    function = getattr(libc, "renameat2", None)
    if function is None:
        return False
    result = function(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):  # kernel or filesystem without the flag
        return False
    raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; raise FileExistsError if ``dst`` exists, even one created now.

    Atomic on Linux (``renameat2(RENAME_NOREPLACE)``); elsewhere a check and a
    rename, which still never replaces a non-empty folder.
    """
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from exc
        raise
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    os.rename(src, dst)


def exchange(a: Path, b: Path) -> None:
    """Swap two existing paths in one step where the system allows (Linux), else in two."""
    if _renameat2(a, b, _RENAME_EXCHANGE):
        return
    aside = b.with_name(f"{b.name}.swap-{uuid.uuid4().hex[:8]}")
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


# -- partial stores ------------------------------------------------------------------------
def _owner_file(partial: Path) -> Path:
    return partial.with_name(partial.name + _OWNER_SUFFIX)


def new_partial(target: Path, key: str) -> Path:
    """A fresh hidden sibling of ``target`` to build in; its owner file is written, not it."""
    partial = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "key": key, "template": False}
    _write_atomic(_owner_file(partial), json.dumps(owner))
    _ACTIVE.add(partial)
    return partial


def new_spill(target: Path) -> Path:
    """A fresh hidden folder next to ``target`` for a build's temporary files.

    ``.NAME.spill-XXXXXXXX``, owned like a partial (its owner file is
    written first): removed with :func:`remove_partial` and :func:`let_go`
    when the build ends, or by :func:`remove_stale_spills` once its process
    is gone.
    """
    spill = target.with_name(f".{target.name}.spill-{uuid.uuid4().hex[:8]}")
    owner = {"host": socket.gethostname(), "pid": os.getpid()}
    _write_atomic(_owner_file(spill), json.dumps(owner))
    _ACTIVE.add(spill)
    spill.mkdir()
    return spill


def remove_stale_spills(target: Path) -> None:
    """Remove the spill folders of ``target`` whose builds are gone (see :func:`new_spill`)."""
    if not target.parent.is_dir():
        return
    found = {
        p.with_name(p.name.removesuffix(_OWNER_SUFFIX))
        for p in target.parent.glob(f".{target.name}.spill-*")
        if ".tmp-" not in p.name
    }
    for spill in sorted(found):
        if stale_partial(spill):
            remove_partial(spill)


def let_go(partial: Path) -> None:
    """This process no longer writes ``partial`` (it failed, or it was published)."""
    _ACTIVE.discard(partial)


def partials(target: Path) -> list[Path]:
    """Hidden partial builds of ``target`` (from this or earlier runs), by name."""
    if not target.parent.is_dir():
        return []
    found = {
        p.with_name(p.name.removesuffix(_OWNER_SUFFIX))
        for p in target.parent.glob(f".{target.name}.partial-*")
        if ".tmp-" not in p.name
    }
    return sorted(found)


def release(partial: Path) -> None:
    """Drop the owner file of a partial that was published (renamed away)."""
    _owner_file(partial).unlink(missing_ok=True)


def remove_partial(partial: Path) -> None:
    """Remove a partial build and its owner file."""
    shutil.rmtree(partial, ignore_errors=True)
    _owner_file(partial).unlink(missing_ok=True)


def _owner(partial: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(_owner_file(partial).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def stale_partial(partial: Path) -> bool:
    """Whether no live process builds ``partial`` (its process on this host is gone)."""
    owner = _owner(partial)
    if owner is None:
        return True
    if owner.get("host") != socket.gethostname():
        return False  # another machine's build: it cannot be checked from here
    pid = int(owner.get("pid", -1))
    if pid == os.getpid():
        return partial not in _ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# -- the build key ---------------------------------------------------------------------------
def is_lazy(data: Any) -> bool:
    """Whether ``data`` is a Dask array (written chunk by chunk, not up front)."""
    return hasattr(data, "dask") and hasattr(data, "chunks")


def lazy_names(ds: xr.Dataset) -> list[str]:
    """Variables of ``ds`` backed by Dask, sorted."""
    return sorted(str(n) for n, v in ds.variables.items() if is_lazy(v.data))


#: Values of a text variable hashed at a time by :func:`build_key`.
_KEY_SLICE = 4096


def build_key(ds: xr.Dataset, *, extra: str = "") -> str:
    """sha256 of what a build writes besides the lazy chunks: attrs, small arrays, layout.

    ``extra``: what else the build depends on, where that is not in memory (the
    digest of the structures read to disk, whose labels are lazy variables).
    """
    h = hashlib.sha256(json.dumps(ds.attrs, sort_keys=True, default=str).encode())
    if extra:
        h.update(f"\0extra\0{extra}".encode())
    for name in sorted(str(n) for n in ds.variables):
        var = ds.variables[name]
        h.update(f"\0{name}\0{var.dims}\0{var.shape}\0{var.dtype}\0".encode())
        if is_lazy(var.data):
            h.update(repr(var.data.chunks).encode())
            continue
        values = np.asarray(var.values)
        if values.dtype.kind in "OTU":
            # the text joined by NULs, a slice at a time: no string per value for all at once
            flat = values.ravel()
            for lo in range(0, flat.size, _KEY_SLICE):
                text = "\0".join(map(str, flat[lo : lo + _KEY_SLICE].tolist()))
                h.update((("\0" if lo else "") + text).encode())
        else:
            h.update(np.ascontiguousarray(values).tobytes())
    return h.hexdigest()


def start_store(ds: xr.Dataset, partial: Path, encoding: dict[str, dict[str, Any]]) -> None:
    """Write the metadata and the in-memory variables, then say so in the owner file.

    Each lazy variable must have its zarr chunks in ``encoding``: xarray
    sees a one-chunk stand-in of it, so that no graph of its chunks is made
    here (``to_zarr(compute=False)`` would build one, to be thrown away).
    """
    import dask.array as da

    stand_ins = {
        name: ds[name].copy(data=da.empty(ds[name].shape, dtype=ds[name].dtype, chunks=-1))
        for name in lazy_names(ds)
    }
    ds.assign(stand_ins).to_zarr(
        partial,
        mode="w-",
        zarr_format=3,
        consolidated=False,
        encoding=encoding,
        compute=False,
        write_empty_chunks=True,
        safe_chunks=False,
    )
    (partial / _MARKS).mkdir()
    owner = _owner(partial) or {}
    owner["template"] = True
    _write_atomic(_owner_file(partial), json.dumps(owner))


def claim(partial: Path, key: str) -> bool:
    """Take over a stale partial for a resumed build; False if it cannot be resumed.

    It can when its key equals ``key`` and its template was complete.
    """
    owner = _owner(partial)
    if owner is None or owner.get("key") != key or not owner.get("template"):
        return False
    if not (partial / _MARKS).is_dir():
        return False
    owner.update(host=socket.gethostname(), pid=os.getpid())
    _write_atomic(_owner_file(partial), json.dumps(owner))
    _ACTIVE.add(partial)
    return True


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- chunks ------------------------------------------------------------------------------------
def _chunk_file(store: Path, name: str, index: int, ndim: int) -> Path:
    # zarr v3 default chunk keys: NAME/c/i/0/0 (one chunk along every other dim)
    return store / name / "c" / "/".join([str(index)] + ["0"] * (ndim - 1))


def done_chunks(partial: Path) -> set[tuple[str, int]]:
    """(variable, chunk) pairs recorded as written whose files still have their size."""
    done: set[tuple[str, int]] = set()
    marks = partial / _MARKS
    if not marks.is_dir():
        return done
    for mark in marks.glob("*/*"):
        if not mark.name.isdigit():
            continue  # a temporary file of a write that was killed
        try:
            record = json.loads(mark.read_text())
            chunk = partial / record["file"]
            if chunk.stat().st_size == int(record["size"]):
                done.add((mark.parent.name, int(mark.name)))
        except (OSError, ValueError, KeyError):
            continue
    return done


def pick(result: dict[str, Any], key: str) -> Any:
    """Item ``key`` of a task's result: a chunk of one of several variables computed together.

    A Dask array whose chunk ``i`` is the task ``(pick, source, key)`` is
    written by :func:`chunk_waves` straight from ``source``: the picks never
    become tasks of their own.
    """
    return result[key]


def _write_chunks(
    store: str,
    index: int,
    names: tuple[str, ...],
    rows: tuple[int, int],
    keys: tuple[str | None, ...],
    *values: Any,
) -> None:
    """Write chunk ``index`` (rows ``rows[0]:rows[1]``) of each variable, each then marked done.

    ``values[k]`` is the chunk of ``names[k]``, or, where ``keys[k]`` is not
    None, the result its chunk is picked from (see :func:`pick`).
    """
    import zarr

    root = Path(store)
    lo, hi = rows
    values = tuple(v if k is None else pick(v, k) for k, v in zip(keys, values, strict=True))
    for name, value in zip(names, values, strict=True):
        if value.shape[0] != hi - lo:  # pragma: no cover - Dask hands whole chunks
            raise RuntimeError(f"chunk {index} of {name} has {value.shape[0]} rows, not {hi - lo}")
        # open_array drops a config for an existing array: a chunk equal to the fill value
        # (all draws 0) would not be written, and the cube would differ from one written at once
        array = zarr.open_array(root / name, mode="r+").with_config({"write_empty_chunks": True})
        array[lo:hi] = value
        chunk = _chunk_file(root, name, index, value.ndim)
        record = {
            "file": chunk.relative_to(root).as_posix(),
            "size": chunk.stat().st_size,
            "sha256": sha256_of(chunk),
        }
        (root / _MARKS / name).mkdir(parents=True, exist_ok=True)
        _write_atomic(root / _MARKS / name / str(index), json.dumps(record))


def _written(*done: None) -> None:
    return None


def chunk_waves(
    ds: xr.Dataset, partial: Path, done: set[tuple[str, int]], per_wave: int
) -> Iterator[tuple[Any, int]]:
    """Delayed writes of every chunk of every lazy variable not in ``done``, a wave at a time.

    Chunks are along the first dimension; a lazy variable must be in one
    chunk along every other dimension (as the stores afpx writes are). One
    task writes chunk ``i`` of every variable chunked alike along the first
    dimension: Dask's own state costs about 3 KB per task while it computes,
    and a task per variable and chunk (as ``dask.array.store`` makes) would
    more than double that on a large cube. Each wave (one
    :class:`dask.delayed.Delayed`, to compute before asking for the next)
    writes at most ``per_wave`` chunks of such variables, and its graph is
    made only when it is asked for: what Dask holds while it computes is
    bounded by ``per_wave``, not by the size of the cube.

    Parameters
    ----------
    ds : xarray.Dataset
    partial : pathlib.Path
        The store being written (see :func:`start_store`).
    done : set of (str, int)
        Chunks already written (:func:`done_chunks`).
    per_wave : int
        Most chunks along the first dimension per wave (positive).

    Yields
    ------
    (dask.delayed.Delayed, int)
        A wave (computing it writes its chunks and marks them done) and how
        many chunk writes it makes.
    """
    from dask.highlevelgraph import HighLevelGraph

    for rows, members in _alike(ds).items():
        pending = _pending(members, len(rows), done)
        if not pending:
            continue
        bounds = np.concatenate([[0], np.cumsum(rows)]).astype(int)
        graph = HighLevelGraph.merge(*(a.dask for _, a in members))
        for lo in range(0, len(pending), per_wave):
            indices = pending[lo : lo + per_wave]
            yield _wave(partial, graph, members, bounds, indices, done), len(indices)


def pending_chunks(ds: xr.Dataset, done: set[tuple[str, int]]) -> int:
    """How many chunk writes :func:`chunk_waves` makes: its waves' sizes add up to it."""
    return sum(len(_pending(m, len(rows), done)) for rows, m in _alike(ds).items())


def _alike(ds: xr.Dataset) -> dict[tuple[int, ...], list[tuple[str, Any]]]:
    """The lazy variables of ``ds`` by their chunks along the first dimension."""
    alike: dict[tuple[int, ...], list[tuple[str, Any]]] = {}
    for name in lazy_names(ds):
        array = ds[name].data
        if any(len(c) > 1 for c in array.chunks[1:]):
            array = array.rechunk(dict.fromkeys(range(1, array.ndim), -1))
        alike.setdefault(tuple(array.chunks[0]), []).append((name, array))
    return alike


def _pending(members: list[tuple[str, Any]], n: int, done: set[tuple[str, int]]) -> list[int]:
    return [i for i in range(n) if any((var, i) not in done for var, _ in members)]


def _wave(
    partial: Path,
    graph: Any,
    members: list[tuple[str, Any]],
    bounds: np.ndarray,
    indices: list[int],
    done: set[tuple[str, int]],
) -> Any:
    """The writes of chunks ``indices`` of ``members`` (whose graphs ``graph`` merges)."""
    import functools

    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    name = f"afpx-write-{uuid.uuid4().hex}"
    layer: dict[Any, Any] = {}
    for i in indices:
        todo = [(var, array) for var, array in members if (var, i) not in done]
        sources = [_source(a, (a.name, i) + (0,) * (a.ndim - 1)) for _, a in todo]
        write = functools.partial(
            _write_chunks,
            str(partial),
            i,
            tuple(var for var, _ in todo),
            (int(bounds[i]), int(bounds[i + 1])),
            tuple(key for _, key in sources),
        )
        layer[(name, i)] = (write, *(source for source, _ in sources))
    needed = {source for task in layer.values() for source in task[1:]}
    layer[name] = (_written, *layer)
    # only the tasks that the writes need: not the picks, which Dask would otherwise
    # convert, one task object each, before culling them, nor the other waves' tasks;
    # culled from the layers they are in (and those these depend on) alone, since
    # culling lists the keys of every layer it is given
    names = {key[0] for key in needed}
    if not names <= graph.layers.keys():  # keys named otherwise than their layers
        names = set(graph.layers)
    todo = list(names)
    while todo:
        for dependency in graph.dependencies.get(todo.pop(), ()):
            if dependency not in names:
                names.add(dependency)
                todo.append(dependency)
    base = HighLevelGraph(
        {n: graph.layers[n] for n in names}, {n: graph.dependencies[n] & names for n in names}
    ).cull(needed)
    culled = HighLevelGraph(
        {**base.layers, name: MaterializedLayer(layer)},
        {**base.dependencies, name: set(base.layers)},
    )
    return Delayed(name, culled)


def _source(array: Any, key: tuple[Any, ...]) -> tuple[Any, str | None]:
    """The key to write chunk ``key`` of ``array`` from, and what to pick from its result.

    A chunk made by :func:`pick` is written from the task it picks from; any
    other chunk from itself (None: nothing to pick).
    """
    from dask.highlevelgraph import MaterializedLayer

    layer = array.dask.layers.get(array.name)
    task = layer.mapping.get(key) if isinstance(layer, MaterializedLayer) else None
    if isinstance(task, tuple) and len(task) == 3 and task[0] is pick:
        return task[1], task[2]
    return key, None


def link_chunks(old: Path, partial: Path, name: str, ndim: int, indices: Iterable[int]) -> None:
    """Hard-link (or copy) finished chunks of ``old`` into ``partial`` and mark them done.

    Chunks so taken are never written again (they are marked done), so the
    old store's files stay as they are whatever happens to the new one.
    """
    recorded = {rel: (size, digest) for rel, size, digest in recorded_chunks(old, under=name)}
    for index in indices:
        source = _chunk_file(old, name, index, ndim)
        target = _chunk_file(partial, name, index, ndim)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
        rel = target.relative_to(partial).as_posix()
        size, digest = recorded.get(rel) or (target.stat().st_size, sha256_of(target))
        record = {"file": rel, "size": size, "sha256": digest}
        (partial / _MARKS / name).mkdir(parents=True, exist_ok=True)
        _write_atomic(partial / _MARKS / name / str(index), json.dumps(record))


# -- finishing and checking --------------------------------------------------------------------
def recorded_chunks(store: Path, *, under: str | None = None) -> Iterator[tuple[str, int, str]]:
    """(file, size, sha256) of every chunk file recorded in ``store``, in text order of the files.

    Read :data:`RECORD_CHUNK` bytes at a time: what is held is one chunk of
    the record, not the record. Stores of earlier versions, whose record is
    in the group's attributes, are read whole. Nothing for a store without a
    record. ``under``: only the files of that variable.
    """
    import zarr

    folder = store / CHECKSUMS_GROUP
    try:
        meta = json.loads((folder / "zarr.json").read_text())
        attributes = meta["attributes"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    prefix = None if under is None else under + "/"
    if "files" in attributes:  # the record in the attributes (before this version)
        for rel, (size, digest) in sorted(attributes["files"].items()):
            if prefix is None or rel.startswith(prefix):
                yield rel, int(size), str(digest)
        return
    # a line of ``under``'s files begins with this text ("[" and the file's JSON string)
    head = None if prefix is None else json.dumps([prefix])[:-2]
    records = zarr.open_array(folder / CHECKSUMS_RECORDS, mode="r")
    rest = b""
    for lo in range(0, records.shape[0], RECORD_CHUNK):
        piece = np.asarray(records[lo : lo + RECORD_CHUNK], dtype=np.uint8)
        lines = (rest + piece.tobytes()).split(b"\n")
        rest = lines.pop()
        for line in lines:
            if head is None or line.startswith(head.encode()):
                try:
                    rel, size, digest = json.loads(line)
                except ValueError:
                    raise AfpxError(
                        f"{folder} is damaged: unreadable record line {line[:80]!r};"
                        " rebuild the cube (afpx build-cube)"
                    ) from None
                yield str(rel), int(size), str(digest)
    if rest:
        raise AfpxError(
            f"{folder} is damaged: its record ends in an unfinished line;"
            " rebuild the cube (afpx build-cube)"
        )


def finish(partial: Path) -> None:
    """Record sizes and sha256 of every chunk file, then drop the build bookkeeping.

    The record (:data:`CHECKSUMS_RECORDS`) is written as it is gathered, one
    variable at a time, to a temporary file, and then copied into its array
    :data:`RECORD_CHUNK` bytes at a time: what is held is one variable's
    chunks, not the cube's.
    """
    import zarr

    folder = partial / CHECKSUMS_GROUP
    building = partial / f".{CHECKSUMS_GROUP}.tmp"
    shutil.rmtree(building, ignore_errors=True)  # left by a killed finish
    lines = partial / f".{CHECKSUMS_GROUP}.jsonl.tmp"
    with lines.open("wb") as out:
        # "NAME/..." in text order: names ordered as NAME + "/" (a name may hold "-" or ".")
        tops = sorted(
            (p for p in partial.iterdir() if not p.name.startswith(".") and p != folder),
            key=_key_order,
        )
        for top in tops:
            for rel, size, digest in _chunk_records(partial, top):
                out.write(json.dumps([rel, size, digest]).encode() + b"\n")
    group = zarr.open_group(building, mode="w", zarr_format=3)
    group.attrs.update({"algorithm": "sha256", "format": "json-lines"})
    nbytes = lines.stat().st_size
    records = group.create_array(
        CHECKSUMS_RECORDS, shape=(nbytes,), chunks=(RECORD_CHUNK,), dtype="uint8"
    )
    with lines.open("rb") as text:
        for lo in range(0, nbytes, RECORD_CHUNK):
            records[lo : lo + RECORD_CHUNK] = np.frombuffer(text.read(RECORD_CHUNK), np.uint8)
    lines.unlink()
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(building, folder)
    shutil.rmtree(partial / _MARKS, ignore_errors=True)


def _key_order(top: Path) -> str:
    return top.name + "/"


def _chunk_records(partial: Path, top: Path) -> list[tuple[str, int, str]]:
    """(file, size, sha256) of the chunk files under ``top``, in text order.

    Sizes and digests recorded as the chunks were written (marks) are taken
    as they are; other chunks (written up front) are hashed here. zarr's
    temporary files of a killed write are removed.
    """
    if not top.is_dir():
        return []
    marked: dict[str, tuple[int, str]] = {}
    marks = partial / _MARKS / top.name
    if marks.is_dir():
        for mark in marks.iterdir():
            if not mark.name.isdigit():
                continue
            record = json.loads(mark.read_text())
            marked[record["file"]] = (int(record["size"]), str(record["sha256"]))
    files: list[str] = []
    for path in top.rglob("*"):
        if _ZARR_TEMPORARY.search(path.name):
            path.unlink()  # zarr writes a chunk to NAME.<uuid>.partial and renames it
            continue
        if not path.is_file() or path.name == "zarr.json":
            continue
        rel = path.relative_to(partial).as_posix()
        if "/c/" in f"/{rel}":
            files.append(rel)
    records = []
    for rel in sorted(files):
        size, digest = marked.get(rel) or ((partial / rel).stat().st_size, sha256_of(partial / rel))
        records.append((rel, size, digest))
    return records


def check_chunks(store: Path) -> None:
    """Raise :class:`AfpxError` if a recorded chunk file is missing or has another size.

    Stat calls only; a store without recorded checksums passes.
    """
    for rel, size, _ in recorded_chunks(store):
        path = store / rel
        try:
            actual = path.stat().st_size
        except OSError:
            raise AfpxError(
                f"{store} is damaged: chunk {rel} is missing; rebuild it (afpx build-cube)"
            ) from None
        if actual != size:
            raise AfpxError(
                f"{store} is damaged: chunk {rel} has {actual} bytes, {size} were written;"
                " rebuild it (afpx build-cube)"
            )


def verify_chunks(store: Path) -> tuple[int, list[str]]:
    """Number of chunk files checked and the problems found (sha256 of every chunk).

    Raises
    ------
    AfpxError
        If the store records no checksums (written before they were recorded).
    """
    n = 0
    problems = []
    for rel, size, digest in recorded_chunks(store):
        n += 1
        path = store / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != size:
            problems.append(f"{rel}: {path.stat().st_size} bytes, {size} were written")
        elif sha256_of(path) != digest:
            problems.append(f"{rel}: sha256 differs from the one recorded at write time")
    if not n:
        raise AfpxError(
            f"{store} records no checksums ({CHECKSUMS_GROUP}); rebuild it to verify it"
        )
    return n, problems


# -- any fsspec/zarr store -------------------------------------------------------------------
def is_url(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a store by URL (``s3://``, ``gs://``, ``memory://``, ...).

    Local paths (``file://`` aside) get the partial-and-rename machinery of this
    module; URLs are written in place, with a completion attribute set last.
    """
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def filesystem(path: str | os.PathLike[str]) -> tuple[Any, str]:
    """The fsspec filesystem of ``path`` and the path within it.

    Options come from fsspec's configuration (for S3, the usual ``AWS_*``
    environment variables, ``AWS_ENDPOINT_URL`` included).

    Raises
    ------
    AfpxError
        When no fsspec implementation handles the protocol (e.g. ``s3://``
        without s3fs).
    """
    import fsspec

    try:
        return fsspec.core.url_to_fs(os.fspath(path))
    except (ImportError, ValueError) as exc:
        raise AfpxError(
            f"cannot open {os.fspath(path)}: {exc}; for s3:// install afpx[s3]"
        ) from exc


def exists(path: str | os.PathLike[str]) -> bool:
    """Whether anything is stored at ``path`` (a local path or a URL)."""
    if not is_url(path):
        return Path(path).exists() or Path(path).is_symlink()
    fs, where = filesystem(path)
    return bool(fs.exists(where))


def open_group(path: str | os.PathLike[str], *, mode: str = "r") -> Any:
    """Open the zarr (v3) group at a local path or URL.

    Parameters
    ----------
    path : str or path
        A local folder or a URL that fsspec can open.
    mode : {"r", "r+"}

    Raises
    ------
    AfpxError
        When nothing is there or it is not a zarr group.
    """
    import zarr

    where = os.fspath(path)
    if not exists(where):
        raise AfpxError(f"no zarr store at {where}")
    try:
        return zarr.open_group(where, mode=mode, zarr_format=3)  # type: ignore[arg-type]
    except Exception as exc:  # zarr raises several kinds for a non-store
        raise AfpxError(f"{where} is not a readable zarr (v3) group: {exc}") from exc


def group_attrs(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The root attributes of the zarr group at ``path``, or None if there is none."""
    try:
        return dict(open_group(path).attrs)
    except AfpxError:
        return None


def remove(path: str | os.PathLike[str]) -> None:
    """Remove the store at ``path`` (a local folder or everything under a URL)."""
    if not is_url(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, where = filesystem(path)
    if fs.exists(where):
        fs.rm(where, recursive=True)
    fs.invalidate_cache(where)


def check_writable_folder(path: str | os.PathLike[str], *, what: str = "the output folder") -> str:
    """Make sure files can be written into the folder ``path``, before any work is done.

    Nothing is created: a probe file is written and removed in the folder, or,
    when it does not exist yet, in its nearest existing parent folder; at a
    URL (``s3://bucket/report``, any fsspec protocol) the probe is written
    under the URL. Commands that work for minutes call this first, so that an
    output that cannot be written fails them at the start rather than at the
    end, and a command that fails leaves no empty folder behind.

    Parameters
    ----------
    path : str or path
        A local folder or a URL.
    what : str
        How the error message names the folder (``"the report folder"``).

    Returns
    -------
    str
        ``path`` as a string.

    Raises
    ------
    AfpxError
        When the folder could not be created or written, naming it and the reason.
    """
    where = os.fspath(path)
    probe_name = f".afpx-write-probe-{uuid.uuid4().hex[:8]}"
    if is_url(where):
        fs, root = filesystem(where)
        probe = f"{root.rstrip('/')}/{probe_name}"
        try:
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
        except Exception as exc:  # each filesystem raises its own kinds
            raise AfpxError(
                f"cannot write {what} to {where}: {exc}; check that the bucket or folder "
                "exists and that you may write to it, or give a local folder"
            ) from exc
        return where
    out = Path(where).absolute()
    if out.exists() and not out.is_dir():
        raise AfpxError(f"{what} {where} is a file: give a folder")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise AfpxError(f"cannot write {what} {where}: {existing} is a file, not a folder")
    try:
        (existing / probe_name).write_bytes(b"")
        (existing / probe_name).unlink()
    except OSError as exc:
        raise AfpxError(
            f"cannot write {what} {where}: {exc.strerror or exc} in {existing}; "
            "choose a folder you may write to"
        ) from exc
    return where


def publish(
    ds: xr.Dataset,
    target: str | os.PathLike[str],
    *,
    complete_attr: str,
    overwrite: bool = False,
    encoding: dict[str, dict[str, Any]] | None = None,
    progress: bool = False,
) -> str:
    """Write a (lazy) Dataset to a local path or URL so that it is never taken half-written.

    The Dask variables are computed on the current scheduler
    (:func:`afpx.scheduler.compute`) and written chunk by chunk (each Dask
    chunk one zarr chunk); ``complete_attr`` is set to true in the root
    attributes last. A local target is written into a hidden sibling and
    renamed into place (never over something that appeared meanwhile); a URL
    (object stores have no rename) is written in place, and readers must
    check ``complete_attr``.

    Parameters
    ----------
    ds : xarray.Dataset
    target : str or path
    complete_attr : str
        Root attribute that says the store is complete.
    overwrite : bool
        Replace what is at ``target`` (after the new store is complete when
        local, before it is written when a URL).
    encoding : dict, optional
        Per-variable zarr encoding (chunks, compressors).
    progress : bool
        Progress bar while computing.

    Returns
    -------
    str
        ``target``.

    Raises
    ------
    AfpxError
        When ``target`` exists and not ``overwrite``, or its folder is missing.
    """
    import zarr

    from afpx.scheduler import compute

    where = os.fspath(target)
    if exists(where) and not overwrite:
        raise AfpxError(f"{where} exists; choose another path or overwrite it")
    if is_url(where):
        remove(where)
        write_to = where
    else:
        final = Path(where)
        if not final.parent.is_dir():
            raise AfpxError(f"the folder {final.parent} of {where} does not exist")
        write_to = str(final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:8]}"))
    try:
        delayed = ds.to_zarr(
            write_to,
            # a URL was checked (and cleared) above: listings may lag behind the removal
            mode="w" if is_url(where) else "w-",
            zarr_format=3,
            consolidated=False,
            encoding=encoding or {},
            compute=False,
            write_empty_chunks=True,
        )
        compute(delayed, progress=progress)
        zarr.open_group(write_to, mode="r+", zarr_format=3).attrs[complete_attr] = True
    except BaseException:
        if not is_url(where):
            shutil.rmtree(write_to, ignore_errors=True)
        raise
    if is_url(where):
        return where
    if overwrite and exists(where):
        exchange(Path(write_to), Path(where))
        shutil.rmtree(write_to, ignore_errors=True)
    else:
        try:
            rename_noreplace(Path(write_to), Path(where))
        except FileExistsError:
            raise AfpxError(
                f"{where} appeared while it was written; the new store is kept in {write_to}"
            ) from None
    return where
