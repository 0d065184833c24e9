"""Pure array kernels of the multi-perspective atomic fingerprint (AFP).

Everything here takes arrays and returns arrays, written against an array
namespace ``xp`` (numpy or CuPy, see :mod:`afpx._array`), with no xarray, Dask,
zarr or pymatgen. Random numbers are drawn on the host from a
:class:`numpy.random.Generator` by :func:`draw_augmentation` so that a seed gives
the same fingerprints on every device.

The fingerprint of one site, for one augmentation draw (see docs/fingerprint.md):

1. Neighbour displacements ``v`` (Å, neighbour minus site, the site itself
   excluded) get Gaussian jitter ``e`` (σ in Å), are rotated by a uniformly
   random rotation ``R`` and divided by ``r0``: ``w = R (v + e) / r0``.
2. Twelve perspective origins ``o_p`` sit at the vertices of three nested,
   equally oriented regular tetrahedra of radii 0.05, 0.10 and 0.15 (units of
   ``r0``) around the site.
3. For each origin the distances ``|w - o_p|`` below ``r_max`` are counted into
   ``n_fine_bins`` bins over ``[0, r_max)``.
4. The counts are smeared by a Kaiser window (``kaiser_width`` bins, shape
   ``kaiser_beta``, normalised to sum 1) and reduced to ``n_bins`` samples by
   keeping only the low Fourier terms; both happen in one Fourier-space product
   of the zero-padded histogram (:func:`smear_truncate`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from afpx import AfpxError
from afpx._array import get_array_namespace

#: Largest number of (neighbour, perspective) distances handled in one pass of
#: :func:`afp_kernel`: bounds the distances' temporary memory (~3 MB) and keeps
#: passes in cache.
MAX_DISTANCES_PER_PASS = 1 << 17

#: Largest number of fine-histogram values (rows × perspectives × ``pad_length``)
#: in one pass of :func:`afp_kernel`. The histograms and their spectra dominate a
#: pass's memory (~28 bytes per value: int64 counts, float32 copy, complex64
#: spectrum): 2**19 values, 37 rows at the default parameters, keep a pass near
#: 14 MB. Without this bound a pass held up to 256 rows (~80 MB) when neighbours
#: were few.
MAX_HISTOGRAM_VALUES = 1 << 19

#: On a GPU (CuPy) a pass is ~30 kernel launches whatever its size, so passes
#: are this many times larger (2**21 distances and 2**23 histogram values: ~0.3 GB
#: of device memory at most). With the CPU's bounds an H200 took 2.1 s for
#: 4,096 rows of 1,000 neighbours, which 16 CPU cores did in 0.94 s
#: (``scripts/gpu_check.py``).
DEVICE_PASS_SCALE = 16

#: Jitter displacements larger than this many σ are vanishingly rare
#: (P ≈ 1e-7 in 3D); the neighbour query reaches this far past ``r_max``.
JITTER_MARGIN_SIGMAS = 6.0


@dataclass(frozen=True)
class FingerprintParams:
    """Parameters of the multi-perspective atomic fingerprint (paper defaults).

    Parameters
    ----------
    perspective_distances : tuple of float
        Radii of the nested regular tetrahedra whose vertices are the
        perspective origins, in units of ``r0``. Four perspectives per radius.
    jitter : float
        Standard deviation (Å) of the Gaussian noise added to every neighbour
        position in augmented (non-deterministic) draws.
    r_max : float
        Largest distance counted from each origin, in units of ``r0``.
    n_fine_bins : int
        Histogram bins over ``[0, r_max)`` before smearing.
    kaiser_width : int
        Length of the Kaiser smearing window, in fine bins.
    kaiser_beta : float
        Shape parameter of the window (the ``beta`` of :func:`numpy.kaiser`).
    n_bins : int
        Samples kept after Fourier truncation; must divide ``n_fine_bins``.
    coordination_factor : float
        ``coordination`` counts neighbours closer than this times ``r0``.
    """

    perspective_distances: tuple[float, ...] = (0.05, 0.10, 0.15)
    jitter: float = 0.01
    r_max: float = 6.0
    n_fine_bins: int = 1024
    kaiser_width: int = 128
    kaiser_beta: float = 14.0
    n_bins: int = 256
    coordination_factor: float = 1.2

    def __post_init__(self) -> None:
        if not self.perspective_distances or any(
            not (0.0 <= d < 1.0) for d in self.perspective_distances
        ):
            raise AfpxError(
                f"perspective_distances {self.perspective_distances} must be a non-empty "
                "list of radii in [0, 1) (units of r0)"
            )
        if self.jitter < 0 or not math.isfinite(self.jitter):
            raise AfpxError(f"jitter must be a finite σ >= 0 Å, got {self.jitter}")
        if not self.r_max > 0:
            raise AfpxError(f"r_max must be positive, got {self.r_max}")
        if self.n_bins < 2 or self.n_fine_bins % self.n_bins:
            raise AfpxError(
                f"n_bins ({self.n_bins}) must be >= 2 and divide n_fine_bins ({self.n_fine_bins})"
            )
        if not (1 <= self.kaiser_width <= self.n_fine_bins):
            raise AfpxError(f"kaiser_width ({self.kaiser_width}) must lie in [1, n_fine_bins]")
        if not self.coordination_factor > 0:
            raise AfpxError(f"coordination_factor must be positive, got {self.coordination_factor}")
        # frozen dataclass: normalise a list given by the user into a tuple
        object.__setattr__(
            self, "perspective_distances", tuple(float(d) for d in self.perspective_distances)
        )

    # -- derived sizes -------------------------------------------------------------
    @property
    def n_perspectives(self) -> int:
        """Number of perspective origins (4 per tetrahedron)."""
        return 4 * len(self.perspective_distances)

    @property
    def fine_bin_width(self) -> float:
        """Width of one histogram bin, in units of ``r0``."""
        return self.r_max / self.n_fine_bins

    @property
    def downsample(self) -> int:
        """Fine bins per output bin."""
        return self.n_fine_bins // self.n_bins

    @property
    def pad_length(self) -> int:
        """Length of the zero-padded signal: holds the full linear convolution.

        ``n_fine_bins + kaiser_width - 1`` rounded up to a multiple of twice
        :attr:`downsample`, so that the truncated grid has an even length.
        """
        step = 2 * self.downsample
        return -(-(self.n_fine_bins + self.kaiser_width - 1) // step) * step

    @property
    def n_fourier_terms(self) -> int:
        """Low Fourier terms kept (0 .. n-1); the Nyquist term is dropped."""
        return self.pad_length // self.downsample // 2

    def query_radius(self, r0: float, *, deterministic: bool) -> float:
        """Radius (Å) of the neighbour query around a site with nearest distance ``r0``.

        ``(r_max + largest perspective distance) * r0``, plus
        :data:`JITTER_MARGIN_SIGMAS` σ for augmented draws, plus a relative
        1e-9 so that rounding never loses a neighbour.
        """
        reach = (self.r_max + max(self.perspective_distances)) * r0
        if not deterministic:
            reach += JITTER_MARGIN_SIGMAS * self.jitter
        return reach * (1.0 + 1e-9)

    def to_attrs(self) -> dict[str, Any]:
        """JSON-able record of the parameters: ``FingerprintParams(**attrs)`` rebuilds them.

        The conventions they imply are in :func:`conventions`.
        """
        out: dict[str, Any] = dataclasses.asdict(self)
        out["perspective_distances"] = list(self.perspective_distances)
        return out

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> FingerprintParams:
        """Inverse of :meth:`to_attrs` (extra keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in attrs.items() if k in names}
        if "perspective_distances" in kwargs:
            kwargs["perspective_distances"] = tuple(kwargs["perspective_distances"])
        return cls(**kwargs)


def conventions(params: FingerprintParams) -> dict[str, Any]:
    """The conventions behind a parameter set, in words and derived sizes (JSON-able)."""
    out: dict[str, Any] = dict(CONVENTIONS)
    out["pad_length"] = params.pad_length
    out["n_fourier_terms"] = params.n_fourier_terms
    out["bin_positions"] = (
        f"afp[..., k] is the smeared density at R = k * {params.r_max} / {params.n_bins} "
        "(units of r0)"
    )
    return out


#: Conventions the paper leaves open, as decided here (also in docs/fingerprint.md).
CONVENTIONS: dict[str, str] = {
    "tetrahedron": "vertices (1,1,1), (1,-1,-1), (-1,1,-1), (-1,-1,1) / sqrt(3) times the radius",
    "tetrahedra_orientation": "shared: the three tetrahedra are scaled copies of one another",
    "perspective_order": "radius-major: 4 vertices of radius 0.05, then 0.10, then 0.15",
    "rotation": "uniform on SO(3) (normalised Gaussian quaternion), one per draw, "
    "applied to the jittered environment; identity in deterministic mode",
    "jitter": "isotropic Gaussian, sigma in angstrom, on neighbour positions (not the site "
    "nor r0); none in deterministic mode",
    "central_atom": "not counted; only the neighbours (all periodic images except the site)",
    "r0": "distance from the site's atom centre to its nearest neighbour in the unperturbed "
    "structure (not from each offset origin, not jittered)",
    "binning": "fine bin j counts distances/r0 in [j, j+1) * r_max/n_fine_bins; "
    "distances >= r_max are dropped",
    "window": "numpy.kaiser(kaiser_width, kaiser_beta) / its sum, linear (zero-padded) "
    "convolution, centred so that a count in fine bin j is smeared symmetrically about "
    "the bin centre",
    "truncation": "FFT of the zero-padded full convolution (pad_length samples), keep terms "
    "0..n_fourier_terms-1, inverse FFT on pad_length/downsample points, first n_bins kept",
    "scaling": "neighbours per output bin (width r_max/n_bins): the sum over bins of one "
    "perspective is the number of neighbours within r_max of its origin",
    "neighbour_query": "one periodic query per unique site, radius (r_max + max "
    "perspective distance) * r0 + 6 jitter sigmas",
    "coordination": "neighbours with distance < coordination_factor * r0 from the site centre",
}


# -- geometry -------------------------------------------------------------------------
def tetrahedron(xp: ModuleType = np) -> Any:
    """Unit vectors to the vertices of the reference regular tetrahedron.

    Returns
    -------
    ndarray of shape (4, 3), float64
    """
    v = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=np.float64)
    return xp.asarray(v / np.sqrt(3.0))


def perspective_offsets(params: FingerprintParams, xp: ModuleType = np) -> Any:
    """Perspective origins relative to the site, in units of ``r0``.

    Returns
    -------
    ndarray of shape (n_perspectives, 3), float64
        Radius-major: the four vertices of the smallest tetrahedron first.
    """
    t = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=np.float64)
    t /= np.sqrt(3.0)
    d = np.asarray(params.perspective_distances, dtype=np.float64)
    return xp.asarray((d[:, None, None] * t[None]).reshape(-1, 3))


def output_positions(params: FingerprintParams) -> np.ndarray:
    """R (units of ``r0``) of each output bin: ``k * r_max / n_bins``.

    Returns
    -------
    ndarray of shape (n_bins,), float64
    """
    return np.arange(params.n_bins, dtype=np.float64) * (params.r_max / params.n_bins)


# -- host-side randomness ----------------------------------------------------------------
def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """One rotation matrix drawn uniformly from SO(3).

    A Gaussian 4-vector normalised to unit length is a uniform unit quaternion.

    Returns
    -------
    ndarray of shape (3, 3), float64
    """
    q = rng.standard_normal(4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def draw_augmentation(
    rng: np.random.Generator, n_neighbours: int, *, sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """The rotation and jitter of one draw: first the rotation, then the jitter.

    Parameters
    ----------
    rng : numpy.random.Generator
        The generator of this (structure, unique site, draw).
    n_neighbours : int
        Neighbours of the site (rows of jitter).
    sigma : float
        Jitter standard deviation (Å).

    Returns
    -------
    rotation : ndarray of shape (3, 3)
    jitter : ndarray of shape (n_neighbours, 3), Å
    """
    rotation = random_rotation(rng)
    jitter = rng.standard_normal((n_neighbours, 3)) * sigma
    return rotation, jitter


def row_generator(seed: int, structure: int, unique_site: int, draw: int) -> np.random.Generator:
    """The generator keyed by (seed, structure index, unique site, draw).

    Independent of batching, chunking and workers: the same key always gives
    the same stream.
    """
    return np.random.default_rng([seed, structure, unique_site, draw])


# -- the kernels ----------------------------------------------------------------------------
def environment_frame(
    vectors: Any,
    counts: Any,
    r0: Any,
    *,
    rotations: Any | None = None,
    jitter: Any | None = None,
) -> Any:
    """Neighbour positions in the perspectives' frame, in units of ``r0``.

    ``w = R_row (v + e) / r0_row`` for every (row, neighbour) pair.

    Parameters
    ----------
    vectors : ndarray of shape (n_pairs, 3)
        Neighbour minus site (Å), grouped by row: the first ``counts[0]`` pairs
        belong to row 0, and so on.
    counts : ndarray of shape (n_rows,), int
        Neighbours of each row (site draw); sums to ``n_pairs``.
    r0 : ndarray of shape (n_rows,)
        Nearest-neighbour distance of each row (Å).
    rotations : ndarray of shape (n_rows, 3, 3), optional
        Rotation of each row; identity if omitted.
    jitter : ndarray of shape (n_pairs, 3), optional
        Displacement added to each neighbour (Å) before rotation.

    Returns
    -------
    ndarray of shape (n_pairs, 3), float64
    """
    xp = get_array_namespace(vectors, r0)
    v = xp.asarray(vectors, dtype=xp.float64)
    if jitter is not None:
        v = v + xp.asarray(jitter, dtype=xp.float64)
    scale = 1.0 / xp.asarray(r0, dtype=xp.float64)
    n_rows = scale.shape[0]
    if rotations is None:
        m = xp.zeros((n_rows, 3, 3), dtype=xp.float64)
        for i in range(3):
            m[:, i, i] = scale
    else:
        m = xp.asarray(rotations, dtype=xp.float64) * scale[:, None, None]
    # Elementwise products with per-row coefficients repeated along the pairs:
    # a pair's result never depends on which other rows share the batch (BLAS
    # blocking could), and repeating is cheaper than gathering (n, 3, 3).
    out = xp.empty_like(v)
    for i in range(3):
        acc = _per_pair(m[:, i, 0], counts, xp) * v[:, 0]
        acc += _per_pair(m[:, i, 1], counts, xp) * v[:, 1]
        acc += _per_pair(m[:, i, 2], counts, xp) * v[:, 2]
        out[:, i] = acc
    return out


def _per_pair(values: Any, counts: Any, xp: ModuleType) -> Any:
    """Repeat a per-row value for each of the row's pairs."""
    counts_host = _host(counts).astype(np.int64)
    if xp is np:
        return np.repeat(values, counts_host)
    # CuPy's repeat wants host repeats; a gather works everywhere
    owner = np.repeat(np.arange(len(counts_host)), counts_host)
    return values[xp.asarray(owner)]


def bin_counts(w: Any, counts: Any, *, params: FingerprintParams) -> Any:
    """Histograms of origin-to-neighbour distances, zero-padded for the FFT.

    Distances are computed in float32 (ample against a bin width of
    ``r_max / n_fine_bins``, and half the memory traffic).

    Parameters
    ----------
    w : ndarray of shape (n_pairs, 3)
        Neighbour positions in units of ``r0`` (see :func:`environment_frame`),
        grouped by row.
    counts : ndarray of shape (n_rows,), int
        Neighbours of each row.
    params : FingerprintParams

    Returns
    -------
    ndarray of shape (n_rows, n_perspectives, pad_length), float32
        Counts in fine bins ``0 .. n_fine_bins-1``, zeros beyond.
    """
    xp = get_array_namespace(w)
    origins = perspective_offsets(params, xp).astype(xp.float32)  # (P, 3)
    n_rows = int(counts.shape[0])
    n_p, length, n_fine = params.n_perspectives, params.pad_length, params.n_fine_bins
    # (perspective, pair) layout: the long axis innermost keeps every pass contiguous
    wt = xp.ascontiguousarray(xp.asarray(w, dtype=xp.float32).T)
    d = wt[None, 0, :] - origins[:, 0, None]
    d *= d
    t = xp.empty_like(d)
    for k in (1, 2):
        xp.subtract(wt[None, k, :], origins[:, k, None], out=t)
        t *= t
        d += t
    xp.sqrt(d, out=d)
    d *= xp.float32(1.0 / params.fine_bin_width)
    # everything at or beyond r_max lands in bin n_fine, a padding bin zeroed below
    xp.minimum(d, xp.float32(n_fine), out=d)
    idx = d.astype(xp.int64)  # truncation == floor for d >= 0
    idx += (xp.arange(n_p, dtype=xp.int64) * length)[:, None]
    idx += _per_pair(xp.arange(n_rows, dtype=xp.int64) * (n_p * length), counts, xp)[None, :]
    h = xp.bincount(idx.ravel(), minlength=n_rows * n_p * length)
    h = h.reshape(n_rows, n_p, length).astype(xp.float32)
    h[:, :, n_fine:] = 0.0
    return h


@functools.lru_cache(maxsize=8)
def _window_spectrum_host(params: FingerprintParams) -> np.ndarray:
    length = params.pad_length
    w = np.kaiser(params.kaiser_width, params.kaiser_beta)
    w = w / w.sum()
    padded = np.zeros(length)
    padded[: params.kaiser_width] = w
    # shift left by the centre so that output sample i holds full-convolution index i + centre
    padded = np.roll(padded, -window_centre(params))
    return np.fft.rfft(padded)[: params.n_fourier_terms]


def window_centre(params: FingerprintParams) -> int:
    """Index of the window sample aligned with an output sample: ``(width - 1) // 2``."""
    return (params.kaiser_width - 1) // 2


def window_spectrum(params: FingerprintParams, xp: ModuleType = np) -> Any:
    """Low Fourier terms of the centred, normalised Kaiser window.

    Returns
    -------
    ndarray of shape (n_fourier_terms,), complex128
    """
    return xp.asarray(_window_spectrum_host(params))


def _fft_module(xp: ModuleType) -> Any:
    # scipy.fft transforms float32 natively and is ~2x faster than numpy.fft here;
    # other namespaces (CuPy) bring their own
    if xp is np:
        import scipy.fft

        return scipy.fft
    return xp.fft


def smear_truncate(h: Any, *, params: FingerprintParams) -> Any:
    """Kaiser smearing and Fourier truncation in one product in Fourier space.

    Parameters
    ----------
    h : ndarray of shape (..., pad_length)
        Zero-padded fine histograms from :func:`bin_counts`.
    params : FingerprintParams

    Returns
    -------
    ndarray of shape (..., n_bins), float32
        Neighbours per output bin at ``R = k * r_max / n_bins``.

    Notes
    -----
    With ``L = pad_length`` (≥ ``n_fine_bins + kaiser_width - 1``) the circular
    convolution of the padded histogram equals the linear one, so counts near
    ``r_max`` cannot leak to ``R ≈ 0``. Multiplying the histogram's spectrum by
    the window's and keeping the terms below the new Nyquist frequency, the
    inverse FFT on ``L / downsample`` points samples the smeared signal every
    ``downsample`` fine bins; numpy's normalisation makes that
    ``downsample × (counts per fine bin)`` = counts per output bin.
    The transforms run in single precision (counts are exact in float32).
    """
    xp = get_array_namespace(h)
    fft = _fft_module(xp)
    h32 = xp.asarray(h, dtype=xp.float32)
    spectrum = fft.rfft(h32, n=params.pad_length, axis=-1)[..., : params.n_fourier_terms]
    spectrum *= window_spectrum(params, xp).astype(xp.complex64)
    out = fft.irfft(spectrum, n=params.pad_length // params.downsample, axis=-1)
    return xp.ascontiguousarray(out[..., : params.n_bins], dtype=xp.float32)


def afp_kernel(
    vectors: Any,
    counts: Any,
    r0: Any,
    *,
    params: FingerprintParams,
    rotations: Any | None = None,
    jitter: Any | None = None,
) -> Any:
    """Fingerprints of site draws (rows) from their neighbour displacements.

    Parameters
    ----------
    vectors : ndarray of shape (n_pairs, 3)
        Neighbour minus site (Å), the site itself excluded, grouped by row.
    counts : ndarray of shape (n_rows,), int
        Neighbours of each row; sums to ``n_pairs``.
    r0 : ndarray of shape (n_rows,)
        Nearest-neighbour distance of each row (Å).
    params : FingerprintParams
    rotations : ndarray of shape (n_rows, 3, 3), optional
        Random rotation of each row (identity if omitted).
    jitter : ndarray of shape (n_pairs, 3), optional
        Gaussian displacement of each neighbour (Å; none if omitted).

    Returns
    -------
    ndarray of shape (n_rows, n_perspectives, n_bins), float32

    Notes
    -----
    Rows are processed in passes of at most :data:`MAX_DISTANCES_PER_PASS`
    (neighbour, perspective) distances and :data:`MAX_HISTOGRAM_VALUES`
    histogram values (:data:`DEVICE_PASS_SCALE` times more off numpy). Every
    operation is elementwise per row, so a row's fingerprint does not depend
    on the batch it is in.

    Examples
    --------
    >>> import numpy as np
    >>> v = np.array([[1.0, 0, 0], [-1.0, 0, 0]])
    >>> afp = afp_kernel(v, np.array([2]), np.ones(1), params=FingerprintParams())
    >>> afp.shape, round(float(afp[0, 0].sum()), 3)
    ((1, 12, 256), 2.0)
    """
    xp = get_array_namespace(vectors, r0)
    counts_host = np.asarray(_host(counts), dtype=np.int64)
    n_rows = counts_host.shape[0]
    if counts_host.sum() != vectors.shape[0]:
        raise AfpxError(
            f"counts sum to {counts_host.sum()} but there are {vectors.shape[0]} neighbour vectors"
        )
    out = xp.zeros((n_rows, params.n_perspectives, params.n_bins), dtype=xp.float32)
    ends = np.cumsum(counts_host)
    starts = ends - counts_host
    scale = 1 if xp is np else DEVICE_PASS_SCALE
    per_pass = max(1, scale * MAX_DISTANCES_PER_PASS // params.n_perspectives)
    rows_per_pass = max(
        1, scale * MAX_HISTOGRAM_VALUES // (params.n_perspectives * params.pad_length)
    )
    row = 0
    while row < n_rows:
        stop = row + 1
        while stop < n_rows and stop - row < rows_per_pass and ends[stop] - starts[row] <= per_pass:
            stop += 1
        lo, hi = int(starts[row]), int(ends[stop - 1])
        c = counts_host[row:stop]  # on the host: the pairs' owners are made there
        w = environment_frame(
            vectors[lo:hi],
            c,
            r0[row:stop],
            rotations=None if rotations is None else rotations[row:stop],
            jitter=None if jitter is None else jitter[lo:hi],
        )
        out[row:stop] = smear_truncate(bin_counts(w, c, params=params), params=params)
        row = stop
    return out


def _host(a: Any) -> np.ndarray:
    from afpx._array import to_numpy

    return to_numpy(a)
