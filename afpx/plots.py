"""Figures of the paper and of afpx's own reports (matplotlib, no pyplot state).

Two layers, as elsewhere in afpx:

* **figures** take arrays (numpy, pandas, plain mappings) and return a
  :class:`matplotlib.figure.Figure`; they read no file and keep no global
  state (no ``pyplot``), so they work on any backend and in threads:
  :func:`afp_figure` (paper Figure 2), :func:`confusion_figure` (Figure 4),
  :func:`tsne_figure` (Figure 5), :func:`element_histogram_figure` (S1),
  :func:`training_curves_figure` (S2), :func:`likelihood_histogram_figure`
  (S5), :func:`rank_curve_figure` (Test 1) and :func:`test2_figure` (Test 2);
* **readers** turn afpx artefacts into those arrays: the model folder
  (``metrics.csv``/``metrics.json``, ``model.pt``), the ``afpx evaluate``
  folder (``metrics.json``, ``arrays.zarr``) and the cube; each missing piece
  is an :class:`afpx.AfpxError` naming the file and the command that makes it.

:func:`save_figure` writes PNG, SVG or PDF by the file's suffix. The CLI is
``afpx plot`` (:mod:`afpx.commands.plot`); ``scripts/make_figures.py`` makes
the figures of the shipped default for the documentation.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from afpx import AfpxError

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "FORMATS",
    "PAPER_TEST1",
    "TEST2_METRICS",
    "afp_figure",
    "check_output",
    "confusion_figure",
    "cube_element_counts",
    "element_histogram_figure",
    "element_weights",
    "evaluation_confusion",
    "evaluation_likelihood_histogram",
    "likelihood_histogram_figure",
    "rank_curve_figure",
    "rank_curves",
    "read_evaluation_arrays",
    "read_evaluation_metrics",
    "read_training_metrics",
    "rocksalt_fingerprints",
    "save_figure",
    "test2_figure",
    "test2_summaries",
    "training_curves_figure",
    "tsne_embedding",
    "tsne_figure",
]

#: File suffixes :func:`save_figure` writes, and the matplotlib format of each.
FORMATS: Final = {".png": "png", ".svg": "svg", ".pdf": "pdf"}

#: Test 1 of the paper (ICSD + COD, their network): fraction with rank <= k.
PAPER_TEST1: Final = {1: 0.27, 10: 0.59}

# Names in the files written by ``afpx evaluate`` (docs/evaluation.md) and ``afpx train``.
_METRICS_JSON: Final = "metrics.json"
_ARRAYS_ZARR: Final = "arrays.zarr"
_MODEL_WEIGHTS: Final = "model.pt"
_TRAIN_METRICS: Final = ("metrics.csv", "metrics.json")
_SET_SIZES: Final = {2: "binary", 3: "ternary"}

_BLOCK_COLOURS: Final = {"s": "#d62728", "p": "#1f77b4", "d": "#2ca02c", "f": "#9467bd"}


# -- output ------------------------------------------------------------------------------


def check_output(path: str | os.PathLike[str]) -> Path:
    """The output path of a figure, checked before any work.

    Parameters
    ----------
    path : path
        ``*.png``, ``*.svg`` or ``*.pdf``; its folder must exist.

    Returns
    -------
    Path

    Raises
    ------
    AfpxError
        For another suffix or a missing folder.
    """
    out = Path(path)
    if out.suffix.lower() not in FORMATS:
        raise AfpxError(
            f"{os.fspath(path)}: unknown figure format {out.suffix!r}; "
            f"name the file *{', *'.join(FORMATS)}"
        )
    if not out.parent.is_dir():
        raise AfpxError(f"{os.fspath(path)}: folder {os.fspath(out.parent)} does not exist")
    return out


def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: int = 150) -> Path:
    """Write a figure as PNG, SVG or PDF, chosen by the suffix of ``path``.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
    path : path
        See :func:`check_output`.
    dpi : int
        Resolution of PNG files.

    Returns
    -------
    Path
        The file written.
    """
    out = check_output(path)
    # metadata without a date keeps SVG/PDF output reproducible
    meta: dict[str, Any] = {"Software": None} if out.suffix.lower() == ".png" else {"Date": None}
    fig.savefig(out, format=FORMATS[out.suffix.lower()], dpi=dpi, metadata=meta)
    return out


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _title(fig: Figure, title: str, source: str) -> None:
    fig.suptitle(f"{title}\n{source}", fontsize=10)


def _symbols() -> list[str]:
    from afpx import schema

    return [str(s) for s in schema.element_coords()[schema.SYMBOL][1]]


# -- Figure 2: AFPs of rock-salt NaCl and LaAs ---------------------------------------------


def rocksalt_fingerprints(
    lattice_constants: Mapping[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Fingerprints of the two sites of rock-salt NaCl and LaAs (paper Figure 2).

    The structures are built with pymatgen (space group Fm-3m, cations at 4a,
    anions at 4b) and fingerprinted by :func:`afpx.cube.fingerprint_structures`
    with the default parameters, without rotation or jitter.

    Parameters
    ----------
    lattice_constants : mapping of formula to float, optional
        Cubic lattice constants in Å; default NaCl 5.640 Å and LaAs 6.137 Å.

    Returns
    -------
    dict of str to ndarray
        ``afp`` of shape (4, n_perspectives, n_bins), ``r0`` (4,) in Å,
        ``r`` (n_bins,) in units of ``r0`` and ``label`` (4,), e.g. ``"Na in NaCl"``.
    """
    from pymatgen.core import Lattice, Structure

    from afpx.cube import fingerprint_structures
    from afpx.kernels import FingerprintParams, output_positions

    constants = dict(lattice_constants or {"NaCl": 5.640, "LaAs": 6.137})
    structures, labels = [], []
    for formula, a in constants.items():
        cation, anion = re.findall(r"[A-Z][a-z]?", formula)
        structures.append(
            Structure.from_spacegroup(
                "Fm-3m", Lattice.cubic(a), [cation, anion], [[0, 0, 0], [0.5, 0.5, 0.5]]
            )
        )
        labels += [f"{cation} in {formula}", f"{anion} in {formula}"]
    fp = fingerprint_structures(structures, deterministic=True)
    return {
        "afp": np.asarray(fp["afp"]),
        "r0": np.asarray(fp["r0"], dtype=np.float64),
        "r": output_positions(FingerprintParams()),
        "label": np.asarray(labels),
    }


def afp_figure(
    afp: np.ndarray,
    r0: np.ndarray,
    r: np.ndarray,
    labels: Sequence[str],
    *,
    source: str = "rock-salt structures built with pymatgen; afpx default fingerprint",
) -> Figure:
    """AFPs against distance in Å (raw) and in units of ``r0`` (normalised).

    Parameters
    ----------
    afp : ndarray of shape (n_sites, n_perspectives, n_bins)
    r0 : ndarray of shape (n_sites,)
        Nearest-neighbour distance of each site, Å.
    r : ndarray of shape (n_bins,)
        Bin positions in units of ``r0``.
    labels : sequence of str
        One legend entry per site.
    source : str
        Caption line naming the data.

    Returns
    -------
    matplotlib.figure.Figure
        Left: each site's mean over perspectives against R in Å (the same
        structure type at another scale shifts); right: against R / r0, where
        sites of one structure type coincide. Bands: min to max over the
        perspectives.
    """
    afp = np.asarray(afp, dtype=np.float64)
    if afp.ndim != 3 or afp.shape[0] != len(labels) or afp.shape[2] != len(r):
        raise AfpxError(
            f"afp of shape {afp.shape} does not match {len(labels)} labels and {len(r)} bins"
        )
    fig = _figure(10, 4)
    raw, norm = fig.subplots(1, 2, sharey=True)
    styles = ["-", "--", "-.", ":"]
    for i, label in enumerate(labels):
        mean, lo, hi = afp[i].mean(axis=0), afp[i].min(axis=0), afp[i].max(axis=0)
        style = styles[i % len(styles)]
        for ax, x in ((raw, r * r0[i]), (norm, r)):
            (line,) = ax.plot(x, mean, style, lw=1.2, label=f"{label} (r0 = {r0[i]:.3f} Å)")
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    raw.set_xlabel("distance R from the site (Å)")
    raw.set_ylabel("AFP (smeared neighbour count per bin)")
    raw.set_title("raw: distance in Å", fontsize=9)
    norm.set_xlabel("R / r0 (r0 = nearest-neighbour distance)")
    norm.set_title("normalised: one curve per structure type", fontsize=9)
    norm.legend(fontsize=7, loc="upper left")
    for ax in (raw, norm):
        ax.set_xlim(0, None)
        ax.grid(alpha=0.3)
    _title(fig, "Multi-perspective atomic fingerprints (paper Fig. 2)", source)
    return fig


# -- Figure 4: confusion matrix ---------------------------------------------------------


def confusion_figure(
    counts: np.ndarray,
    symbols: Sequence[str] | None = None,
    *,
    source: str,
    min_sites: int = 1,
) -> Figure:
    """Row-normalised confusion matrix of the softmax classifier (paper Figure 4).

    Parameters
    ----------
    counts : ndarray of shape (n_elements, n_elements)
        Sites by true (rows) and predicted (columns) element.
    symbols : sequence of str, optional
        Element symbols of the rows; default H..Og.
    source : str
        Caption line naming the data.
    min_sites : int
        Elements with fewer true sites are left out (rows and columns).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.colors import LogNorm

    counts = np.asarray(counts, dtype=np.float64)
    names = list(symbols) if symbols is not None else _symbols()
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] != len(names):
        raise AfpxError(f"confusion counts of shape {counts.shape} for {len(names)} elements")
    rows = counts.sum(axis=1)
    keep = np.flatnonzero(rows >= max(min_sites, 1))
    if keep.size == 0:
        raise AfpxError(f"no element has {max(min_sites, 1)} or more sites in the confusion matrix")
    frac = counts[np.ix_(keep, keep)] / rows[keep, None]
    n = keep.size
    size = min(12.0, 3.0 + 0.09 * n)
    fig = _figure(max(6.5, size + 1.2), max(5.0, size))
    ax = fig.subplots()
    shown = np.where(frac > 0, frac, np.nan)
    image = ax.imshow(shown, cmap="viridis", norm=LogNorm(vmin=1e-3, vmax=1.0), aspect="equal")
    ticks = np.arange(n)
    font = 8 if n <= 30 else max(3.5, 8 - 0.05 * n)
    ax.set_xticks(ticks, [names[i] for i in keep], rotation=90, fontsize=font)
    ax.set_yticks(ticks, [names[i] for i in keep], fontsize=font)
    ax.set_xlabel("predicted element (softmax classifier)")
    ax.set_ylabel("true element")
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true element's sites")
    accuracy = float(np.trace(counts) / counts.sum()) if counts.sum() else math.nan
    _title(
        fig,
        "Element confusion matrix (paper Fig. 4)",
        f"{source}\n{int(counts.sum())} sites, error rate {1 - accuracy:.3f}",
    )
    return fig


# -- Figure 5: t-SNE of the sigmoid classifier's element weights ----------------------------


def element_weights(model_dir: str | os.PathLike[str]) -> np.ndarray:
    """Weights of the layer that gives the site likelihoods: one vector per element.

    The last linear layer of the paper network's sigmoid classifier, or the
    likelihood head of an MLP (``context``) network: its sigmoid head, or its
    softmax head when the likelihoods are the softmax probabilities.

    Reads ``model.pt`` (a torch ``state_dict``) of a model folder written by
    ``afpx train``; needs torch.

    Parameters
    ----------
    model_dir : path
        Model folder.

    Returns
    -------
    ndarray of shape (n_elements, n_hidden), float64

    Raises
    ------
    AfpxError
        When the folder has no ``model.pt`` or no ``sigmoid_classifier`` layer.
    """
    import torch

    path = Path(model_dir) / _MODEL_WEIGHTS
    if not path.is_file():
        raise AfpxError(f"{os.fspath(path)} not found: give a model folder written by `afpx train`")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for head in ("sigmoid_head.weight", "softmax_head.weight"):
        if head in state:  # MLP network: its likelihood head
            return np.asarray(state[head].detach().cpu().numpy(), dtype=np.float64)
    layers = {
        int(m.group(1)): key
        for key in state
        if (m := re.fullmatch(r"sigmoid_classifier\.(\d+)\.weight", key))
    }
    if not layers:
        raise AfpxError(f"{os.fspath(path)} has no sigmoid_classifier layer; not an afpx model")
    return np.asarray(state[layers[max(layers)]].detach().cpu().numpy(), dtype=np.float64)


def tsne_embedding(weights: np.ndarray, *, perplexity: float = 15.0, seed: int = 0) -> np.ndarray:
    """Two-dimensional t-SNE map of element weight vectors (scikit-learn).

    Parameters
    ----------
    weights : ndarray of shape (n_elements, n_features)
    perplexity : float
        t-SNE perplexity (clipped below the number of points).
    seed : int
        Seed of the embedding.

    Returns
    -------
    ndarray of shape (n_elements, 2)
    """
    from sklearn.manifold import TSNE

    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[0] < 3:
        raise AfpxError(f"t-SNE needs at least 3 weight vectors, got shape {weights.shape}")
    perplexity = min(perplexity, (weights.shape[0] - 1) / 3)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return np.asarray(tsne.fit_transform(weights))


def tsne_figure(
    xy: np.ndarray,
    symbols: Sequence[str] | None = None,
    *,
    source: str,
) -> Figure:
    """The t-SNE map of the elements, coloured by block (paper Figure 5).

    Parameters
    ----------
    xy : ndarray of shape (n_elements, 2)
        From :func:`tsne_embedding`.
    symbols : sequence of str, optional
        Element symbols of the rows; default H..Og.
    source : str
        Caption line naming the model.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from pymatgen.core import Element

    xy = np.asarray(xy, dtype=np.float64)
    names = list(symbols) if symbols is not None else _symbols()
    if xy.shape != (len(names), 2):
        raise AfpxError(f"t-SNE coordinates of shape {xy.shape} for {len(names)} elements")
    fig = _figure(8, 7)
    ax = fig.subplots()
    blocks = [Element(s).block for s in names]
    for block, colour in _BLOCK_COLOURS.items():
        idx = [i for i, b in enumerate(blocks) if b == block]
        ax.scatter(xy[idx, 0], xy[idx, 1], s=14, color=colour, label=f"{block} block", alpha=0.8)
    for i, s in enumerate(names):
        ax.annotate(s, xy[i], fontsize=6.5, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("t-SNE 1 (arbitrary units)")
    ax.set_ylabel("t-SNE 2 (arbitrary units)")
    ax.legend(fontsize=8, loc="best")
    _title(
        fig,
        "Elements by the likelihood layer's weights (t-SNE; paper Fig. 5)",
        source,
    )
    return fig


# -- S1: element histogram of the cube ------------------------------------------------------


def cube_element_counts(cube: str | os.PathLike[str]) -> np.ndarray:
    """Unique sites per element in a cube (first augmentation draw only).

    Parameters
    ----------
    cube : path
        A cube written by ``afpx build-cube``.

    Returns
    -------
    ndarray of shape (n_elements,), int64
        Index ``z - 1``.
    """
    from afpx import schema
    from afpx.cube import open_cube

    ds = open_cube(cube)
    z = np.asarray(ds[schema.Z].values, dtype=np.int64)
    if schema.DRAW in ds.variables:
        z = z[np.asarray(ds[schema.DRAW].values) == 0]
    return np.bincount(z - 1, minlength=schema.N_ELEMENTS)[: schema.N_ELEMENTS]


def element_histogram_figure(
    counts: np.ndarray, symbols: Sequence[str] | None = None, *, source: str
) -> Figure:
    """Unique sites per element, by atomic number, on a log scale (paper S1).

    Parameters
    ----------
    counts : ndarray of shape (n_elements,)
        Sites per element, index ``z - 1``.
    symbols : sequence of str, optional
        Default H..Og.
    source : str
        Caption line naming the cube.

    Returns
    -------
    matplotlib.figure.Figure
    """
    counts = np.asarray(counts, dtype=np.int64)
    names = list(symbols) if symbols is not None else _symbols()
    if counts.shape != (len(names),):
        raise AfpxError(f"element counts of shape {counts.shape} for {len(names)} elements")
    if counts.sum() == 0:
        raise AfpxError("no sites to histogram")
    fig = _figure(13, 4)
    ax = fig.subplots()
    z = np.arange(1, len(names) + 1)
    ax.bar(z, np.where(counts > 0, counts, np.nan), width=0.8, color="#1f77b4")
    ax.set_yscale("log")
    ax.set_xticks(z, names, rotation=90, fontsize=5.5)
    ax.set_xlim(0.3, len(names) + 0.7)
    ax.set_xlabel("element (by atomic number)")
    ax.set_ylabel("unique sites (count)")
    ax.grid(axis="y", alpha=0.3)
    _title(
        fig,
        f"Element histogram (paper S1): {int(counts.sum())} unique sites, "
        f"{int((counts > 0).sum())} elements",
        source,
    )
    return fig


# -- S2: training curves --------------------------------------------------------------------


def read_training_metrics(model_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Per-epoch metrics of a model folder (``metrics.csv``, else ``metrics.json``).

    Raises
    ------
    AfpxError
        When neither file exists, or they have no ``epoch`` column.
    """
    import pandas as pd

    folder = Path(model_dir)
    csv, js = (folder / name for name in _TRAIN_METRICS)
    if csv.is_file():
        frame = pd.read_csv(csv)
    elif js.is_file():
        frame = pd.DataFrame(json.loads(js.read_text()))
    else:
        raise AfpxError(
            f"{os.fspath(folder)} has no {' or '.join(_TRAIN_METRICS)}: "
            "give a model folder written by `afpx train`"
        )
    if "epoch" not in frame or frame.empty:
        raise AfpxError(f"{os.fspath(folder)}: training metrics have no epochs")
    return frame


def training_curves_figure(metrics: pd.DataFrame, *, source: str) -> Figure:
    """Losses, error rates and schedules per epoch (paper S2).

    Parameters
    ----------
    metrics : pandas.DataFrame
        One row per epoch, columns as written by ``afpx train``
        (``train_*``/``val_*`` losses and errors, ``lr``, ``kl_weight``).
    source : str
        Caption line naming the model folder.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if "epoch" not in metrics or metrics.empty:
        raise AfpxError("training metrics need an 'epoch' column and at least one row")
    epoch = metrics["epoch"].to_numpy()
    panels: list[tuple[str, str, list[tuple[str, str]], bool]] = [
        (
            "loss per example",
            "loss (nats)",
            [
                ("train_total", "train total"),
                ("val_total", "holdout total"),
                ("train_reconstruction", "train reconstruction"),
                ("train_sigmoid_bce", "train sigmoid BCE"),
                ("val_sigmoid_bce", "holdout BCE"),
            ],
            True,
        ),
        (
            "error rates",
            "fraction of sites",
            [
                ("train_softmax_error", "train softmax"),
                ("val_softmax_error", "holdout softmax"),
                ("val_sigmoid_error", "holdout sigmoid top-1"),
                ("val_sigmoid_top5_error", "holdout sigmoid top-5"),
                ("val_softmax_balanced_error", "holdout softmax, balanced"),
            ],
            False,
        ),
        ("learning rate", "learning rate", [("lr", "lr")], False),
        ("KL weight", "KL weight", [("kl_weight", "KL weight")], False),
    ]

    def recorded(column: str) -> bool:
        # a loss term the network does not have is logged as zeros: not a curve
        if column not in metrics:
            return False
        values = metrics[column].to_numpy(dtype=np.float64)
        return bool(np.any(np.isfinite(values) & (values != 0)))

    has_kl = recorded("train_kl") or "train_kl" not in metrics
    fig = _figure(11, 7)
    axes = fig.subplots(2, 2, sharex=True).ravel()
    for ax, (title, ylabel, series, log) in zip(axes, panels, strict=True):
        drawn = False
        for column, label in series:
            if column == "kl_weight" and not has_kl:
                continue  # the schedule of a term the network does not have
            if recorded(column):
                values = metrics[column].to_numpy(dtype=np.float64)
                style = "--" if column.startswith("val_") else "-"
                ax.plot(epoch, values, style, marker=".", label=label)
                drawn = True
        if not drawn:
            no_kl = title == "KL weight" and not has_kl
            note = "no KL term (not a VAE)" if no_kl else "not recorded"
            ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center")
        if log and drawn:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1 and drawn:
            ax.legend(fontsize=7)
    for ax in axes[2:]:
        ax.set_xlabel("epoch")
    _title(fig, f"Training curves (paper S2): {len(epoch)} epochs", source)
    return fig


# -- evaluation output ------------------------------------------------------------------


def read_evaluation_metrics(eval_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``metrics.json`` of an ``afpx evaluate`` folder or the file itself (a path or URL)."""
    from afpx.store import filesystem

    path = os.fspath(eval_dir).rstrip("/")
    fs, inner = filesystem(path)  # fsspec's local filesystem for a path
    if not fs.isfile(inner):
        path, inner = f"{path}/{_METRICS_JSON}", f"{inner}/{_METRICS_JSON}"
    if not fs.isfile(inner):
        raise AfpxError(f"{path} not found: give the folder written by `afpx evaluate CUBE -o DIR`")
    try:
        metrics: dict[str, Any] = json.loads(fs.cat_file(inner).decode())
    except ValueError as exc:
        raise AfpxError(f"{path} is not JSON: {exc}") from exc
    if "models" not in metrics:
        raise AfpxError(f"{path} is not an `afpx evaluate` metrics file (no 'models')")
    return metrics


def read_evaluation_arrays(eval_dir: str | os.PathLike[str], *names: str) -> Any:
    """The arrays of an ``afpx evaluate`` output folder, loaded (``arrays.zarr``).

    Parameters
    ----------
    eval_dir : str or path
        The evaluation folder (a path or a URL).
    *names : str
        Variables that must be present.

    Returns
    -------
    xarray.Dataset

    Raises
    ------
    AfpxError
        When the store or a variable is missing.
    """
    import xarray as xr

    from afpx.store import exists

    path = f"{os.fspath(eval_dir).rstrip('/')}/{_ARRAYS_ZARR}"
    if not exists(path):
        raise AfpxError(f"{path} not found: give the folder written by `afpx evaluate CUBE -o DIR`")
    ds = xr.open_zarr(path, consolidated=False)
    missing = [n for n in names if n not in ds.variables]
    if missing:
        raise AfpxError(f"{path} has no {', '.join(missing)}; rerun `afpx evaluate`")
    return ds[list(names)].load() if names else ds.load()


def _split_index(ds: Any, split: str) -> Any:
    splits = [str(s) for s in ds["split"].values]
    if split not in splits:
        raise AfpxError(f"split {split!r} not in the evaluation; choose from {', '.join(splits)}")
    return ds.sel(split=split)


def evaluation_confusion(eval_dir: str | os.PathLike[str], split: str) -> np.ndarray:
    """Confusion counts (true × predicted element) of one split of an evaluation."""
    ds = _split_index(read_evaluation_arrays(eval_dir, "confusion"), split)
    return np.asarray(ds["confusion"].values)


def evaluation_likelihood_histogram(
    eval_dir: str | os.PathLike[str], split: str
) -> tuple[np.ndarray, np.ndarray]:
    """Likelihood histograms (``true``, ``other``) × bins and the bin edges of one split."""
    ds = _split_index(read_evaluation_arrays(eval_dir, "likelihood_histogram"), split)
    hist = ds["likelihood_histogram"].sel(kind=["true", "other"]).values
    edges = np.append(ds["bin_lower"].values, ds["bin_upper"].values[-1])
    return np.asarray(hist), np.asarray(edges, dtype=np.float64)


# -- S5: likelihood histograms --------------------------------------------------------------


def likelihood_histogram_figure(
    hist: np.ndarray, edges: np.ndarray, *, source: str, split: str = "test"
) -> Figure:
    """Sigmoid likelihoods of the true element and of every other element (paper S5).

    Parameters
    ----------
    hist : ndarray of shape (2, n_bins)
        Counts for the true element of each site (row 0) and for all other
        elements (row 1).
    edges : ndarray of shape (n_bins + 1,)
        Bin edges over [0, 1].
    source : str
        Caption line naming the evaluation.
    split : str
        Shown in the title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    hist = np.asarray(hist, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    if hist.ndim != 2 or hist.shape[0] != 2 or edges.shape != (hist.shape[1] + 1,):
        raise AfpxError(f"histogram of shape {hist.shape} does not fit {edges.shape[0]} edges")
    if (hist.sum(axis=1) == 0).any():
        raise AfpxError("a likelihood histogram is empty (no sites in this split?)")
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    widths = np.diff(edges)
    for row, label, colour in ((0, "true element", "#2ca02c"), (1, "other elements", "#7f7f7f")):
        density = hist[row] / hist[row].sum() / widths
        ax.stairs(density, edges, label=f"{label} ({int(hist[row].sum())} pairs)", color=colour)
    ax.set_yscale("log")
    ax.set_xlim(0, 1)
    ax.set_xlabel("sigmoid likelihood of the element on the site")
    ax.set_ylabel("probability density (per unit likelihood)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _title(fig, f"Site likelihoods, {split} split (paper S5)", source)
    return fig


# -- Test 1 and Test 2 ----------------------------------------------------------------------


def rank_curves(
    eval_dir: str | os.PathLike[str],
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], bool]:
    """Fraction of Test 1 structures with rank <= k, per model.

    Exact from ``arrays.zarr`` (``test1_rank``, censored ranks beyond every k)
    when the folder has it, else at the bin edges of ``metrics.json``'s
    ``rank_distribution``.

    Returns
    -------
    curves : dict of str to (k, fraction)
        Per model (the network first, then the baselines).
    exact : bool
        Whether the curves come from the per-structure ranks.
    """
    metrics = read_evaluation_metrics(eval_dir)
    models = list(metrics["models"])
    if (Path(eval_dir) / _ARRAYS_ZARR).is_dir():
        ds = read_evaluation_arrays(eval_dir, "test1_rank")
        curves = {}
        for m in models:
            ranks = np.nan_to_num(ds["test1_rank"].sel(model=m).values, nan=np.inf)
            if ranks.size == 0:
                raise AfpxError(f"{os.fspath(eval_dir)}: Test 1 has no structures")
            finite = np.sort(ranks[np.isfinite(ranks)])
            k = np.unique(np.concatenate([[1.0], np.ceil(finite)]))
            curves[m] = (k, np.searchsorted(finite, k, side="right") / ranks.size)
        return curves, True
    curves = {}
    for m in models:
        dist = metrics.get("test1", {}).get(m, {}).get("rank_distribution")
        if not dist:
            raise AfpxError(f"{os.fspath(eval_dir)}: no Test 1 rank distribution for {m!r}")
        total = sum(dist.values())
        ks, frac, cum = [], [], 0
        for label, n in dist.items():
            if label.startswith(">"):
                continue
            cum += n
            ks.append(float(label.split("-")[-1]))
            frac.append(cum / total)
        curves[m] = (np.asarray(ks), np.asarray(frac))
    return curves, False


def rank_curve_figure(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    source: str,
    exact: bool = True,
    paper: Mapping[int, float] | None = PAPER_TEST1,
) -> Figure:
    """Test 1: fraction of structures whose true candidate ranks <= k (model vs baselines).

    Parameters
    ----------
    curves : mapping of str to (k, fraction)
        Per model; the first is drawn as the network, the rest as baselines.
    source : str
        Caption line naming the evaluation.
    exact : bool
        Steps (per-structure ranks) or points at bin edges.
    paper : mapping of int to float, optional
        The paper's top-k values, drawn as crosses.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if not curves:
        raise AfpxError("no Test 1 curves to plot")
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    for i, (name, (k, frac)) in enumerate(curves.items()):
        kw: dict[str, Any] = {"lw": 2.2, "color": "black"} if i == 0 else {"lw": 1.1}
        label = f"{name} (top-1 {frac[0]:.2f})" if len(frac) else name
        if exact:
            ax.step(k, frac, where="post", label=label, **kw)
        else:
            ax.plot(k, frac, marker="o", ms=3, label=label, **kw)
    if paper:
        ax.plot(list(paper), list(paper.values()), "x", ms=9, mew=2, color="#d62728",
                label="paper (ICSD + COD)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("k (rank of the true candidate among its composition's candidates)")
    ax.set_ylabel("fraction of test structures with rank ≤ k")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    _title(fig, "Test 1: rank of each structure's own candidate", source)
    return fig


#: Test 2 summaries drawn by :func:`test2_figure`: key in metrics.json and axis label.
TEST2_METRICS: Final = {
    "hit@1": "hit@1",
    "hit@10": "hit@10",
    "mean_reciprocal_rank": "MRR",
    "os_mean": "mean OS",
}


def test2_summaries(
    metrics: Mapping[str, Any], *, variant: str = "all_templates"
) -> dict[str, dict[str, dict[str, float]]]:
    """Test 2 summaries per set size and model, from ``metrics.json``.

    Returns
    -------
    dict
        ``{"binary"|"ternary": {model: {key: value}}}`` for the keys of
        :data:`TEST2_METRICS` and ``n_sets``.
    """
    section = metrics.get("test2", {}).get(variant)
    if not section:
        raise AfpxError(f"the evaluation has no Test 2 results for variant {variant!r}")
    out: dict[str, dict[str, dict[str, float]]] = {}
    for size in _SET_SIZES.values():
        per_model = {}
        for m in metrics["models"]:
            row = section.get(m, {}).get(size)
            if row and row.get("n_sets"):
                per_model[m] = {k: float(row.get(k, math.nan)) for k in [*TEST2_METRICS, "n_sets"]}
        if per_model:
            out[size] = per_model
    if not out:
        raise AfpxError("the evaluation has no Test 2 element sets")
    return out


def test2_figure(
    summaries: Mapping[str, Mapping[str, Mapping[str, float]]], *, source: str
) -> Figure:
    """Test 2: how high the known compositions of each element set rank, model vs baselines.

    Parameters
    ----------
    summaries : mapping
        From :func:`test2_summaries`.
    source : str
        Caption line naming the evaluation.

    Returns
    -------
    matplotlib.figure.Figure
        One panel per set size; bars: hit@1 and hit@10 (a known composition
        among the top k), mean reciprocal rank of the first known composition,
        mean optimality score (1 = all known compositions on top, 0 = random).
    """
    if not summaries:
        raise AfpxError("no Test 2 summaries to plot")
    fig = _figure(5.5 * len(summaries), 4.5)
    axes: list[Axes] = list(np.atleast_1d(fig.subplots(1, len(summaries), sharey=True)))
    keys = list(TEST2_METRICS)
    x = np.arange(len(keys))
    for ax, (size, per_model) in zip(axes, summaries.items(), strict=True):
        width = 0.8 / len(per_model)
        n_sets = 0
        for i, (name, values) in enumerate(per_model.items()):
            heights = [values[k] for k in keys]
            kw: dict[str, Any] = {"color": "black"} if i == 0 else {}
            ax.bar(x + (i - (len(per_model) - 1) / 2) * width, heights, width, label=name, **kw)
            n_sets = int(values["n_sets"])
        ax.set_xticks(x, [TEST2_METRICS[k] for k in keys])
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{size} element sets (n = {n_sets})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("mean over element sets (fraction)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8)
    _title(fig, "Test 2: rank of the known compositions of each element set", source)
    return fig
