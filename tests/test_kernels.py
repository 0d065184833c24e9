"""The fingerprint kernels against slow, obvious references, and their parameters."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from afpx import AfpxError
from afpx._array import cupy_available
from afpx.kernels import (
    FingerprintParams,
    afp_kernel,
    bin_counts,
    conventions,
    draw_augmentation,
    environment_frame,
    output_positions,
    perspective_offsets,
    random_rotation,
    row_generator,
    smear_truncate,
    tetrahedron,
    window_centre,
)

PARAMS = FingerprintParams()


def random_rows(seed: int, counts: list[int]) -> dict[str, Any]:
    """Random neighbour sets: distances 0.8-6.4 r0 (some beyond r_max), random rotations."""
    rng = np.random.default_rng(seed)
    n = int(sum(counts))
    r0 = rng.uniform(1.5, 3.5, len(counts))
    owner = np.repeat(np.arange(len(counts)), counts)
    direction = rng.standard_normal((n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    vectors = direction * (rng.uniform(0.8, 6.4, n) * r0[owner])[:, None]
    return {
        "vectors": vectors,
        "counts": np.asarray(counts, dtype=np.int64),
        "r0": r0,
        "rotations": np.stack([random_rotation(rng) for _ in counts]),
        "jitter": rng.normal(0.0, 0.01, (n, 3)),
    }


# -- slow references ------------------------------------------------------------------------
def reference_histogram(rows: dict[str, Any], params: FingerprintParams) -> np.ndarray:
    """Explicit loops: every neighbour, every origin, one count (float32 distances)."""
    origins = perspective_offsets(params).astype(np.float32)
    counts = rows["counts"]
    h = np.zeros((len(counts), params.n_perspectives, params.n_fine_bins))
    scale = np.float32(1.0 / params.fine_bin_width)
    start = 0
    for row, n in enumerate(counts):
        m = rows["rotations"][row] / rows["r0"][row]
        for k in range(start, start + n):
            v = rows["vectors"][k] + rows["jitter"][k]
            w = [
                float(m[i, 0] * v[0]) + float(m[i, 1] * v[1]) + float(m[i, 2] * v[2])
                for i in range(3)
            ]
            w32 = np.asarray(w, dtype=np.float32)
            for p in range(params.n_perspectives):
                d = w32 - origins[p]
                dist = np.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]) * scale
                j = int(np.floor(dist))
                if j < params.n_fine_bins:
                    h[row, p, j] += 1
        start += n
    return h


def reference_afp(h: np.ndarray, params: FingerprintParams) -> np.ndarray:
    """Direct convolution with the window, then FFT truncation (float64)."""
    w = np.kaiser(params.kaiser_width, params.kaiser_beta)
    w /= w.sum()
    length, c = params.pad_length, window_centre(params)
    out = np.zeros((*h.shape[:-1], params.n_bins))
    for idx in np.ndindex(*h.shape[:-1]):
        full = np.convolve(h[idx], w, mode="full")  # length n_fine + width - 1 <= pad_length
        circular = np.zeros(length)
        circular[(np.arange(len(full)) - c) % length] = full
        spectrum = np.fft.rfft(circular)[: params.n_fourier_terms]
        out[idx] = np.fft.irfft(spectrum, n=length // params.downsample)[: params.n_bins]
    return out


# -- parameters ---------------------------------------------------------------------------------
def test_paper_defaults_and_derived_sizes() -> None:
    p = FingerprintParams()
    assert p.perspective_distances == (0.05, 0.10, 0.15)
    assert (p.jitter, p.r_max, p.n_fine_bins, p.kaiser_width, p.kaiser_beta, p.n_bins) == (
        0.01,
        6.0,
        1024,
        128,
        14.0,
        256,
    )
    assert p.n_perspectives == 12
    assert p.pad_length == 1152 and p.pad_length >= p.n_fine_bins + p.kaiser_width - 1
    assert p.n_fourier_terms == 144 and p.downsample == 4
    assert output_positions(p)[[0, 1, -1]].tolist() == [0.0, 6 / 256, 6 - 6 / 256]


def test_attrs_round_trip_and_json() -> None:
    p = FingerprintParams(perspective_distances=[0.1, 0.2], jitter=0.02)  # type: ignore[arg-type]
    attrs = json.loads(json.dumps(p.to_attrs()))
    assert FingerprintParams(**attrs) == p
    assert FingerprintParams.from_attrs({**attrs, "extra": 1}) == p
    assert json.dumps(conventions(p))
    assert conventions(p)["pad_length"] == p.pad_length


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"perspective_distances": ()}, "perspective_distances"),
        ({"perspective_distances": (0.05, 1.5)}, "perspective_distances"),
        ({"jitter": -0.1}, "jitter"),
        ({"jitter": float("nan")}, "jitter"),
        ({"r_max": 0.0}, "r_max"),
        ({"n_bins": 300}, "n_bins"),
        ({"n_bins": 1}, "n_bins"),
        ({"kaiser_width": 0}, "kaiser_width"),
        ({"kaiser_width": 2000}, "kaiser_width"),
        ({"coordination_factor": 0.0}, "coordination_factor"),
    ],
)
def test_invalid_parameters_raise(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(AfpxError, match=match):
        FingerprintParams(**kwargs)


def test_query_radius_covers_every_perspective() -> None:
    p = FingerprintParams()
    assert p.query_radius(2.0, deterministic=True) == pytest.approx(2.0 * 6.15, rel=1e-8)
    assert p.query_radius(2.0, deterministic=True) >= 2.0 * 6.15
    assert p.query_radius(2.0, deterministic=False) == pytest.approx(2.0 * 6.15 + 0.06, rel=1e-8)


# -- geometry and randomness ---------------------------------------------------------------
def test_tetrahedron_is_regular_and_centred() -> None:
    t = tetrahedron()
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0)
    np.testing.assert_allclose(t.sum(axis=0), 0.0, atol=1e-15)
    dots = t @ t.T
    np.testing.assert_allclose(dots[~np.eye(4, dtype=bool)], -1 / 3)


def test_perspectives_are_three_scaled_tetrahedra() -> None:
    o = perspective_offsets(PARAMS)
    assert o.shape == (12, 3)
    np.testing.assert_allclose(np.linalg.norm(o, axis=1), np.repeat([0.05, 0.10, 0.15], 4))
    # shared orientation: the larger tetrahedra are scaled copies of the smallest
    np.testing.assert_allclose(o[4:8], 2 * o[:4])
    np.testing.assert_allclose(o[8:], 3 * o[:4])


def test_random_rotations_are_proper_and_seeded() -> None:
    rng = np.random.default_rng(1)
    rots = np.stack([random_rotation(rng) for _ in range(2000)])
    np.testing.assert_allclose(
        rots @ rots.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rots.shape), atol=1e-12
    )
    np.testing.assert_allclose(np.linalg.det(rots), 1.0)
    # uniform on SO(3): every matrix entry has mean 0 and variance 1/3
    np.testing.assert_allclose(rots.mean(axis=0), 0.0, atol=0.05)
    np.testing.assert_allclose((rots**2).mean(axis=0), 1 / 3, atol=0.03)
    a = draw_augmentation(row_generator(0, 3, 1, 2), 5, sigma=0.01)
    b = draw_augmentation(row_generator(0, 3, 1, 2), 5, sigma=0.01)
    c = draw_augmentation(row_generator(0, 3, 1, 3), 5, sigma=0.01)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert a[1].shape == (5, 3) and 0.001 < a[1].std() < 0.03


def test_environment_frame_rotates_and_scales() -> None:
    rows = random_rows(2, [4, 6])
    w = environment_frame(rows["vectors"], rows["counts"], rows["r0"], rotations=rows["rotations"])
    owner = np.repeat([0, 1], [4, 6])
    np.testing.assert_allclose(
        np.linalg.norm(w, axis=1), np.linalg.norm(rows["vectors"], axis=1) / rows["r0"][owner]
    )
    expected = (
        np.einsum("nij,nj->ni", rows["rotations"][owner], rows["vectors"]) / rows["r0"][owner, None]
    )
    np.testing.assert_allclose(w, expected, rtol=1e-13)
    plain = environment_frame(rows["vectors"], rows["counts"], rows["r0"])
    np.testing.assert_allclose(plain, rows["vectors"] / rows["r0"][owner, None], rtol=1e-15)


# -- oracles ---------------------------------------------------------------------------------
def test_binning_equals_explicit_loops() -> None:
    rows = random_rows(3, [40, 0, 75, 33])
    w = environment_frame(
        rows["vectors"],
        rows["counts"],
        rows["r0"],
        rotations=rows["rotations"],
        jitter=rows["jitter"],
    )
    h = bin_counts(w, rows["counts"], params=PARAMS)
    assert h.shape == (4, 12, PARAMS.pad_length)
    np.testing.assert_array_equal(h[..., PARAMS.n_fine_bins :], 0.0)
    np.testing.assert_array_equal(h[..., : PARAMS.n_fine_bins], reference_histogram(rows, PARAMS))


def test_fused_kernel_equals_slow_reference() -> None:
    rows = random_rows(4, [60, 0, 90, 17, 120])
    afp = afp_kernel(
        rows["vectors"],
        rows["counts"],
        rows["r0"],
        params=PARAMS,
        rotations=rows["rotations"],
        jitter=rows["jitter"],
    )
    assert afp.shape == (5, 12, 256) and afp.dtype == np.float32
    expected = reference_afp(reference_histogram(rows, PARAMS), PARAMS)
    np.testing.assert_allclose(afp, expected, atol=2e-5 * np.abs(expected).max())
    np.testing.assert_array_equal(afp[1], 0.0)  # a site without neighbours


@pytest.mark.parametrize(
    "params",
    [
        FingerprintParams(),
        FingerprintParams(n_fine_bins=512, n_bins=128, kaiser_width=33, kaiser_beta=8.0, r_max=4.0),
        FingerprintParams(perspective_distances=(0.0, 0.3), n_bins=512),
    ],
)
def test_fused_kernel_other_parameters(params: FingerprintParams) -> None:
    rows = random_rows(5, [50, 30])
    afp = afp_kernel(
        rows["vectors"], rows["counts"], rows["r0"], params=params, rotations=rows["rotations"]
    )
    rows["jitter"] = np.zeros_like(rows["jitter"])
    expected = reference_afp(reference_histogram(rows, params), params)
    assert afp.shape == (2, params.n_perspectives, params.n_bins)
    np.testing.assert_allclose(afp, expected, atol=2e-5 * np.abs(expected).max())


def test_truncation_samples_the_smeared_histogram() -> None:
    """Dropping high Fourier terms loses (almost) nothing: the window has none."""
    rng = np.random.default_rng(6)
    h = np.zeros((1, 1, PARAMS.pad_length))
    h[0, 0, : PARAMS.n_fine_bins] = rng.poisson(2.0, PARAMS.n_fine_bins)
    w = np.kaiser(PARAMS.kaiser_width, PARAMS.kaiser_beta)
    full = np.convolve(h[0, 0, : PARAMS.n_fine_bins], w / w.sum(), mode="full")
    sampled = PARAMS.downsample * full[window_centre(PARAMS) :: PARAMS.downsample][: PARAMS.n_bins]
    out = smear_truncate(h, params=PARAMS)[0, 0]
    np.testing.assert_allclose(out, sampled, atol=1e-4 * sampled.max())


def test_no_leak_from_the_far_edge_to_zero() -> None:
    """Counts just below r_max must not wrap around to R ≈ 0 (zero padding)."""
    v = np.array([[5.99, 0.0, 0.0]] * 50)
    afp = afp_kernel(
        v, np.array([50]), np.ones(1), params=FingerprintParams(perspective_distances=(0.0,))
    )
    assert afp[0, 0, :64].max() < 1e-5 * afp.max()
    assert afp[0, 0, -1] > 0.1 * afp.max()


def test_scaling_counts_neighbours_per_output_bin() -> None:
    """The sum over bins of a perspective is its number of neighbours (away from the edges)."""
    rng = np.random.default_rng(7)
    direction = rng.standard_normal((300, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    v = direction * rng.uniform(1.0, 4.5, (300, 1))
    afp = afp_kernel(v, np.array([300]), np.ones(1), params=PARAMS)
    np.testing.assert_allclose(afp.sum(axis=-1), 300.0, rtol=1e-5)
    # one neighbour straight on: a peak of the window's shape at R = 2, height = downsample * max(w)
    one = afp_kernel(
        np.array([[0.0, 0.0, 2.0 + 3 / 1024]]),
        np.array([1]),
        np.ones(1),
        params=FingerprintParams(perspective_distances=(0.0,)),
    )[0, 0]
    peak = int(np.argmax(one))
    assert output_positions(PARAMS)[peak] == pytest.approx(2.0, abs=6 / 256)


def test_a_row_does_not_depend_on_its_batch() -> None:
    rows = random_rows(8, [70, 5, 110, 0, 40, 90])
    batch = afp_kernel(
        rows["vectors"],
        rows["counts"],
        rows["r0"],
        params=PARAMS,
        rotations=rows["rotations"],
        jitter=rows["jitter"],
    )
    ends = np.cumsum(rows["counts"])
    for i, (lo, hi) in enumerate(zip(ends - rows["counts"], ends, strict=True)):
        alone = afp_kernel(
            rows["vectors"][lo:hi],
            rows["counts"][i : i + 1],
            rows["r0"][i : i + 1],
            params=PARAMS,
            rotations=rows["rotations"][i : i + 1],
            jitter=rows["jitter"][lo:hi],
        )
        np.testing.assert_array_equal(alone[0], batch[i])


def test_passes_do_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    import afpx.kernels

    rows = random_rows(9, [70, 50, 110, 40])
    one_pass = afp_kernel(
        rows["vectors"], rows["counts"], rows["r0"], params=PARAMS, rotations=rows["rotations"]
    )
    monkeypatch.setattr(afpx.kernels, "MAX_DISTANCES_PER_PASS", 12 * 60)
    many = afp_kernel(
        rows["vectors"], rows["counts"], rows["r0"], params=PARAMS, rotations=rows["rotations"]
    )
    np.testing.assert_array_equal(one_pass, many)


def test_histogram_bound_passes_do_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    import afpx.kernels

    rows = random_rows(11, [30, 0, 45, 20, 60])
    calls: list[int] = []
    real = afpx.kernels.bin_counts

    def counting(w: np.ndarray, counts: np.ndarray, *, params: FingerprintParams) -> np.ndarray:
        calls.append(len(counts))
        return real(w, counts, params=params)

    monkeypatch.setattr(afpx.kernels, "bin_counts", counting)
    one_pass = afp_kernel(rows["vectors"], rows["counts"], rows["r0"], params=PARAMS)
    assert calls == [5]
    calls.clear()
    # room for two rows' histograms per pass: 3 passes of 2, 2 and 1 rows
    monkeypatch.setattr(
        afpx.kernels, "MAX_HISTOGRAM_VALUES", 2 * PARAMS.n_perspectives * PARAMS.pad_length
    )
    bounded = afp_kernel(rows["vectors"], rows["counts"], rows["r0"], params=PARAMS)
    assert calls == [2, 2, 1]
    np.testing.assert_array_equal(one_pass, bounded)


def test_a_device_namespace_gets_larger_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off numpy (CuPy), passes are DEVICE_PASS_SCALE times larger; the result is the same."""
    import types

    import afpx.kernels

    rows = random_rows(12, [30, 0, 45, 20, 60, 25])
    device = types.ModuleType("device")  # a namespace that is not numpy, computing with numpy
    device.__dict__.update({k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    calls: list[int] = []
    real = afpx.kernels.bin_counts

    def counting(w: np.ndarray, counts: Any, *, params: FingerprintParams) -> np.ndarray:
        calls.append(len(counts))
        return real(w, counts, params=params)

    two_rows = 2 * PARAMS.n_perspectives * PARAMS.pad_length
    monkeypatch.setattr(afpx.kernels, "bin_counts", counting)
    monkeypatch.setattr(afpx.kernels, "MAX_HISTOGRAM_VALUES", two_rows)
    expected = afp_kernel(rows["vectors"], rows["counts"], rows["r0"], params=PARAMS)
    assert calls == [2, 2, 2]
    calls.clear()
    monkeypatch.setattr(afpx.kernels, "DEVICE_PASS_SCALE", 3)
    monkeypatch.setattr(afpx.kernels, "get_array_namespace", lambda *arrays: device)
    got = afp_kernel(rows["vectors"], rows["counts"], rows["r0"], params=PARAMS)
    assert calls == [6]
    # the device namespace transforms with its own (double-precision) FFT
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max())


def test_counts_must_match_vectors() -> None:
    with pytest.raises(AfpxError, match="counts sum to 3"):
        afp_kernel(np.zeros((2, 3)), np.array([3]), np.ones(1), params=PARAMS)


def test_empty_batch() -> None:
    afp = afp_kernel(np.zeros((0, 3)), np.zeros(0, dtype=np.int64), np.zeros(0), params=PARAMS)
    assert afp.shape == (0, 12, 256)


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a CUDA device")
def test_cupy_kernel_matches_numpy() -> None:  # pragma: no cover - no GPU in CI
    import cupy

    rows = random_rows(10, [80, 0, 120])
    expected = afp_kernel(
        rows["vectors"],
        rows["counts"],
        rows["r0"],
        params=PARAMS,
        rotations=rows["rotations"],
        jitter=rows["jitter"],
    )
    got = afp_kernel(
        cupy.asarray(rows["vectors"]),
        rows["counts"],
        cupy.asarray(rows["r0"]),
        params=PARAMS,
        rotations=cupy.asarray(rows["rotations"]),
        jitter=cupy.asarray(rows["jitter"]),
    )
    assert isinstance(got, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(got), expected, atol=1e-4 * np.abs(expected).max())
