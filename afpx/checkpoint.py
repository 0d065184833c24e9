"""Model folders: save, verify and load a trained model; no training code.

Inference (``afpx likelihood``, ``afpx evaluate --model``, scoring of user
structures) imports this module and :mod:`afpx.model`, never the training loop
of :mod:`afpx.train`. A model folder::

    MODEL/
      model.pt       state_dict of the network kept for inference (the best
                     holdout epoch, or the last one); torch.load(weights_only=True)
      state.pt       everything --resume needs, as ONE file: the last epoch's
                     weights, optimiser state, step, epoch, RNG states
      config.json    model and training configuration, the cube's fingerprint parameters
      metrics.csv    one row per epoch: every loss term, train_* and val_*
      metrics.json   the same rows as a JSON list
      manifest.json  SHA-256 and size of every file above, written last

Every file is written to a temporary name and renamed into place; the
manifest is written after the files it covers, so a folder whose files do not
match their manifest was interrupted or altered, and :func:`load_model`
refuses it. ``--resume`` reads only ``state.pt`` and ``config.json``: a kill
between two files can never pair the weights of one epoch with the optimiser
of another.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from afpx import AfpxError
from afpx.datasets import sha256_of

if TYPE_CHECKING:
    from torch import nn

    from afpx.model import ModelConfig

MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
MANIFEST_FILE = "manifest.json"
FORMAT = "afpx-model/1"
MANIFEST_FORMAT = "afpx-model-package"


def open_store(path: str | os.PathLike[str]) -> Any:
    """Open a cube's zarr group read-only (plain zarr, no dask: safe in workers).

    ``path`` is a local path or a URL (``s3://bucket/cube.zarr``).
    """
    import zarr

    from afpx.store import exists

    where = os.fspath(path)
    if not exists(where):
        raise AfpxError(f"cube {where!r} does not exist; build it with `afpx build-cube`")
    try:
        return zarr.open_group(where, mode="r")
    except Exception as exc:  # zarr raises several kinds for a non-store
        raise AfpxError(f"{str(path)!r} is not a zarr store: {exc}") from exc


# -- fingerprint compatibility -------------------------------------------------


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def fingerprint_differences(model_params: dict[str, Any], cube_params: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two fingerprint parameter dicts (sorted)."""
    keys = sorted(set(model_params) | set(cube_params))
    return [k for k in keys if _jsonable(model_params.get(k)) != _jsonable(cube_params.get(k))]


def check_fingerprint(
    model_params: dict[str, Any], cube_params: dict[str, Any], *, cube: str = "cube"
) -> None:
    """Raise :class:`AfpxError` naming the keys where the model's and the cube's differ."""
    diff = fingerprint_differences(model_params, cube_params)
    if diff:
        detail = "; ".join(
            f"{k}: model {model_params.get(k, '<absent>')!r}, "
            f"cube {cube_params.get(k, '<absent>')!r}"
            for k in diff
        )
        raise AfpxError(
            f"the fingerprint parameters of {cube} differ from the model's in "
            f"{', '.join(diff)} ({detail}); use a cube built with the model's parameters "
            "or train a model on this cube"
        )


# -- files ---------------------------------------------------------------------


def atomic_write_bytes(data: bytes, path: Path) -> None:
    """Write ``data`` to a temporary sibling, flush it to disk, rename it to ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise AfpxError(f"cannot write {os.fspath(path)!r}: {exc.strerror or exc}") from exc


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` through a temporary file and a rename."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(buf.getvalue(), path)


def atomic_text(text: str, path: Path) -> None:
    """Write a text file through a temporary file and a rename."""
    atomic_write_bytes(text.encode(), path)


def write_manifest(folder: Path, names: Iterable[str]) -> dict[str, Any]:
    """Write ``manifest.json`` with the SHA-256 and size of each named file present."""
    files = {
        name: {"sha256": sha256_of(folder / name), "bytes": (folder / name).stat().st_size}
        for name in names
        if (folder / name).is_file()
    }
    manifest = {"format": MANIFEST_FORMAT, "format_version": 1, "files": files}
    atomic_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", folder / MANIFEST_FILE)
    return manifest


def verify_manifest(folder: Path) -> dict[str, Any]:
    """Check every file listed in ``folder/manifest.json`` against its SHA-256.

    Returns the manifest; raises :class:`AfpxError` naming the first file that
    is missing or differs. A folder without a manifest raises too.
    """
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise AfpxError(
            f"{os.fspath(folder)!r} has no {MANIFEST_FILE}: it was not written completely by "
            "`afpx train` (or was altered); train it again or restore the folder"
        )
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        expected = {name: str(info["sha256"]) for name, info in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AfpxError(f"{os.fspath(path)!r} is not a valid model manifest: {exc}") from exc
    for name, digest in expected.items():
        f = folder / name
        if not f.is_file():
            raise AfpxError(f"{os.fspath(f)!r}, listed in {MANIFEST_FILE}, is missing")
        if sha256_of(f) != digest:
            raise AfpxError(
                f"{os.fspath(f)!r} differs from its SHA-256 in {MANIFEST_FILE}: the model folder "
                "is corrupt or was altered; train it again or restore it"
            )
    return dict(manifest)


def read_config(folder: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a model folder (clear error when corrupt)."""
    path = folder / CONFIG_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AfpxError(f"cannot read the model configuration {os.fspath(path)!r}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise AfpxError(f"{os.fspath(path)} has format {got!r}, expected {FORMAT!r}")
    return meta


def load_weights(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with one clear error for any unreadable file.

    The zip records' CRC-32 checksums are checked first: ``torch.load`` does not,
    so a flipped bit in a tensor would load silently (``state.pt``, which
    ``--resume`` reads without the manifest, relies on this).
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, ValueError):
        damaged = None  # not a zip: torch.load below names the problem
    except Exception as exc:  # zipfile raises several kinds for damaged headers
        damaged = f"{type(exc).__name__}: {exc}"
    if damaged is not None:
        raise AfpxError(
            f"{os.fspath(path)!r} is corrupt: {damaged} fails its CRC-32 check; "
            "restore the folder or train again"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds (pickle, zip, runtime)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AfpxError(
            f"cannot load {os.fspath(path)!r} as afpx weights ({first}); "
            "it is corrupt or not written by afpx (pickled objects are refused)"
        ) from exc
    if not isinstance(obj, dict):
        raise AfpxError(f"{os.fspath(path)!r} does not hold a state dict")
    return obj


def torch_device(device: str) -> torch.device:
    """The torch device for ``cpu`` or ``cuda`` (clear error when CUDA is absent)."""
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise AfpxError("device 'cuda': torch sees no CUDA device; use --device cpu")
        return torch.device("cuda")
    raise AfpxError(f"unknown device {device!r}; choose one of cpu, cuda")


# -- loading -------------------------------------------------------------------


@dataclass
class TrainedModel:
    """A loaded model and what was saved with it.

    Attributes
    ----------
    net : torch.nn.Module
        The network (:func:`afpx.model.build_net`), in eval mode.
    config : ModelConfig
    train_config : dict
        The training configuration as saved (``config.json["train"]``).
    fingerprint : dict
        Fingerprint parameters of the cube it was trained on.
    path : Path
        The model folder.
    weights_sha256 : str
        SHA-256 of ``model.pt``: the model's identity.
    meta : dict
        The whole ``config.json``.
    """

    net: nn.Module
    config: ModelConfig
    train_config: dict[str, Any]
    fingerprint: dict[str, Any]
    path: Path
    weights_sha256: str
    meta: dict[str, Any]

    @property
    def needs_context(self) -> bool:
        """Whether the network reads the template context (:mod:`afpx.features`)."""
        from afpx.model import needs_context

        return needs_context(self.net)

    @property
    def needs_shell(self) -> bool:
        """Whether that context includes the coordination shell (``context_shell``)."""
        from afpx.model import needs_shell

        return needs_shell(self.net)

    def identity(self) -> dict[str, Any]:
        """JSON-able attributes that identify the model (for artefacts it produces)."""
        return {
            "model_path": str(self.path.resolve()),
            "model_sha256": self.weights_sha256,
            "model_preset": self.config.preset,
            "model_config": self.config.to_dict(),
            "afpx_version": self.meta.get("afpx_version", ""),
        }


def load_model(path: str | os.PathLike[str], *, device: str = "cpu") -> TrainedModel:
    """Load a model folder written by ``afpx train``, after verifying its checksums.

    Parameters
    ----------
    path : str or PathLike
        The model folder (``model.pt``, ``config.json``, ``manifest.json``).
    device : {"cpu", "cuda"}

    Returns
    -------
    TrainedModel
        With the network in eval mode on ``device``.
    """
    from afpx.model import ModelConfig, build_net

    folder = Path(path)
    if not (folder / CONFIG_FILE).is_file() or not (folder / MODEL_FILE).is_file():
        raise AfpxError(
            f"{str(path)!r} is not an afpx model folder (needs {CONFIG_FILE} and {MODEL_FILE}); "
            "train one with `afpx train CUBE -o MODEL`"
        )
    verify_manifest(folder)
    meta = read_config(folder)
    try:
        config = ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError) as exc:
        raise AfpxError(f"{folder / CONFIG_FILE} has no valid model configuration: {exc}") from exc
    net = build_net(config)
    state = load_weights(folder / MODEL_FILE)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise AfpxError(
            f"{folder / MODEL_FILE} does not fit the network of {folder / CONFIG_FILE}: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    net.to(torch_device(device)).eval()
    return TrainedModel(
        net=net,
        config=config,
        train_config=dict(meta.get("train", {})),
        fingerprint=dict(meta.get("fingerprint", {})),
        path=folder,
        weights_sha256=sha256_of(folder / MODEL_FILE),
        meta=meta,
    )
