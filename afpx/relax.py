"""Relax the top candidates of a ranking with a universal potential and rank them by stability.

``afpx rank --relax N`` ends where chemists start: the best candidate structure
of each of the top ``N`` compositions is relaxed (positions and cell) with
CHGNet's pretrained universal potential (shipped inside the ``chgnet`` wheel;
no download at run time), and judged by energy:

* the **formation energy** per atom against the elements, each relaxed the
  same way (the lowest of a few of the library's elemental structures, or of
  fcc/bcc/hcp prototypes when the library has none);
* the **energy above the convex hull** of every relaxed candidate, the
  elemental references and (optionally) the library's known compounds of the
  chemical system, from :class:`pymatgen.analysis.phase_diagram.PhaseDiagram`;
* the **hull energy** used to order the candidates: the energy above the
  hull, or, for a candidate on the hull, minus its distance to the hull built
  without it (pymatgen's phase-separation energy), so that stable candidates
  are ordered too.

Relaxations run in parallel over candidates as ``dask.delayed`` tasks on the
current Dask scheduler (:func:`afpx.scheduler.compute`), with PyTorch held to
one thread per task. A relaxation that fails (an exception, NaN energies, a
volume change beyond ``max_volume_ratio``, more atoms than ``max_atoms``) is
reported on its row and never stops the run.

Nothing here imports ``chgnet`` or ``torch`` until a relaxation with the
default calculator runs; without the ``relax`` extra that raises
:class:`afpx.AfpxError` naming ``pip install "afpx[relax]"``.
"""

from __future__ import annotations

import contextlib
import io
import math
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np
from threadpoolctl import threadpool_limits

from afpx import AfpxError, schema
from afpx.templates import TEMPLATE, element_symbol

if TYPE_CHECKING:
    from ase import Atoms
    from ase.calculators.calculator import Calculator
    from pymatgen.core import Structure

    from afpx.rank import RankTable
    from afpx.templates import TemplateLibrary

__all__ = [
    "ORDERS",
    "RELAX_INSTALL",
    "STATUSES",
    "RelaxParams",
    "RelaxResult",
    "RelaxTable",
    "chgnet_calculator",
    "element_references",
    "relax_ranking",
    "relax_structures",
    "require_relax",
]

#: How to install what relaxation needs.
RELAX_INSTALL: Final = 'pip install "afpx[relax]"'

#: Orders of the relaxed table: afpx's likelihood rank, or the hull energy.
ORDERS: Final = ("likelihood", "hull")

#: Outcome of one relaxation.
STATUSES: Final = ("ok", "too_many_atoms", "error", "nan", "volume")

#: Hull energies closer than this (eV/atom) share a stability rank.
HULL_TIE_TOLERANCE: Final = 1e-6

#: Elemental prototypes used when the library holds no structure of an element.
_PROTOTYPES: Final = ("fcc", "bcc", "hcp")


@dataclass(frozen=True)
class RelaxParams:
    """How candidates are relaxed.

    Parameters
    ----------
    steps : int
        Most FIRE steps per structure.
    fmax : float
        Convergence: the largest force (eV/Å; stress is scaled alike by the
        cell filter) below which a relaxation has converged.
    max_volume_ratio : float
        A relaxation whose cell volume grows or shrinks by more than this
        factor is stopped and reported as ``volume`` (an explosion or a
        collapse).
    max_atoms : int
        Structures with more atoms in the cell are not relaxed
        (``too_many_atoms``): the cost grows with the atom count.
    model : str
        CHGNet's pretrained model (``"0.3.0"``, in the wheel).
    device : str
        Torch device of the potential.
    n_element_structures : int
        Elemental references: relax this many of the library's smallest
        structures of each element and keep the lowest energy per atom.
    """

    steps: int = 100
    fmax: float = 0.1
    max_volume_ratio: float = 2.0
    max_atoms: int = 48
    model: str = "0.3.0"
    device: str = "cpu"
    n_element_structures: int = 3

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise AfpxError(f"relaxation steps must be 0 or more, got {self.steps}")
        if not (self.fmax > 0 and math.isfinite(self.fmax)):
            raise AfpxError(f"fmax must be a positive number of eV/Å, got {self.fmax}")
        if not (self.max_volume_ratio > 1 and math.isfinite(self.max_volume_ratio)):
            raise AfpxError(
                f"max_volume_ratio must be a finite factor above 1, got {self.max_volume_ratio}"
            )
        if self.max_atoms < 1:
            raise AfpxError(f"max_atoms must be at least 1, got {self.max_atoms}")
        if self.n_element_structures < 1:
            raise AfpxError(
                f"n_element_structures must be at least 1, got {self.n_element_structures}"
            )


@dataclass
class RelaxResult:
    """The outcome of one relaxation.

    Attributes
    ----------
    status : str
        One of :data:`STATUSES`; only ``"ok"`` carries energies.
    message : str
        Why it failed (empty when ``ok``).
    n_atoms : int
    energy : float
        Final total energy (eV); NaN unless ``ok``.
    converged : bool
        Forces fell below ``fmax`` within ``steps``.
    n_steps : int
    volume_ratio : float
        Final over initial cell volume (NaN when not relaxed).
    seconds : float
        Wall time of the relaxation.
    structure : pymatgen Structure or None
        The relaxed structure (``ok`` only).
    """

    status: str
    message: str = ""
    n_atoms: int = 0
    energy: float = math.nan
    converged: bool = False
    n_steps: int = 0
    volume_ratio: float = math.nan
    seconds: float = 0.0
    structure: Structure | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def energy_per_atom(self) -> float:
        return self.energy / self.n_atoms if self.ok and self.n_atoms else math.nan


# =============================================================================
# the potential
# =============================================================================
def require_relax() -> None:
    """Raise :class:`AfpxError` naming the install command unless CHGNet is installed.

    Finds the package without importing it (importing it imports torch).
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec("chgnet")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise AfpxError(
            f"relaxing candidates needs CHGNet, which is not installed: {RELAX_INSTALL}"
        )


_MODELS: dict[tuple[str, str], Any] = {}
_MODELS_LOCK = threading.Lock()


def chgnet_calculator(params: RelaxParams | None = None) -> Calculator:
    """An ASE calculator of CHGNet's pretrained model (loaded once per process).

    Raises
    ------
    AfpxError
        Without the ``relax`` extra (names the install command).
    """
    params = params or RelaxParams()
    try:
        from chgnet.model import CHGNet
        from chgnet.model.dynamics import CHGNetCalculator
    except ImportError as exc:
        raise AfpxError(
            f"relaxing candidates needs CHGNet, which is not installed: {RELAX_INSTALL}"
        ) from exc
    # CHGNet 0.3 builds its cell volumes with torch.tensor(list of tensors), which torch
    # answers with a UserWarning on every structure; it says nothing about the result
    warnings.filterwarnings(
        "ignore",
        message="Converting a tensor with requires_grad=True to a scalar",
        category=UserWarning,
        module="chgnet",
    )
    key = (params.model, params.device)
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        # CHGNet prints its size and device on stdout, which may carry a CSV or JSON table
        with contextlib.redirect_stdout(io.StringIO()):
            if model is None:
                model = CHGNet.load(
                    model_name=params.model, use_device=params.device, verbose=False
                )
                _MODELS[key] = model
            return CHGNetCalculator(
                model=model, use_device=params.device, on_isolated_atoms="ignore"
            )


class _VolumeOutOfBounds(Exception):
    pass


def _relax_atoms(
    atoms: Atoms,
    params: RelaxParams,
    calculator: Callable[[], Calculator] | None,
) -> RelaxResult:
    """Relax one structure (positions and cell); every failure becomes a result."""
    t0 = time.perf_counter()
    n = len(atoms)
    if n > params.max_atoms:
        return RelaxResult(
            "too_many_atoms",
            f"{n} atoms in the cell, more than max_atoms={params.max_atoms}",
            n_atoms=n,
        )
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = atoms.copy()
    v0 = float(atoms.get_volume())
    lo, hi = 1.0 / params.max_volume_ratio, params.max_volume_ratio
    n_steps = 0
    try:
        if calculator is None:
            import torch

            # one thread per task: tasks run side by side (measured 3.5x faster on 2 cores)
            if torch.get_num_threads() != 1:
                torch.set_num_threads(1)
            atoms.calc = chgnet_calculator(params)
        else:
            atoms.calc = calculator()
        opt = FIRE(FrechetCellFilter(atoms), logfile=None)

        def check_volume() -> None:
            ratio = float(atoms.get_volume()) / v0
            if not (lo <= ratio <= hi):
                raise _VolumeOutOfBounds(f"volume ratio {ratio:.3g}")

        opt.attach(check_volume, interval=1)
        # BLAS threads on 3x3 cell algebra only oversubscribe the cores the tasks share
        with threadpool_limits(limits=1):
            converged = bool(opt.run(fmax=params.fmax, steps=params.steps))
        n_steps = int(opt.nsteps)
        energy = float(atoms.get_potential_energy())
    except _VolumeOutOfBounds as exc:
        return RelaxResult(
            "volume",
            f"stopped: {exc} beyond the bound {params.max_volume_ratio:g}",
            n_atoms=n,
            volume_ratio=float(atoms.get_volume()) / v0,
            seconds=time.perf_counter() - t0,
        )
    except Exception as exc:  # a failing candidate is reported, never stops the run
        return RelaxResult(
            "error", f"{type(exc).__name__}: {exc}", n_atoms=n, seconds=time.perf_counter() - t0
        )
    ratio = float(atoms.get_volume()) / v0
    seconds = time.perf_counter() - t0
    if not (math.isfinite(energy) and np.isfinite(atoms.get_positions()).all()):
        return RelaxResult("nan", "non-finite energy or positions", n_atoms=n, seconds=seconds)
    if not (lo <= ratio <= hi):
        return RelaxResult(
            "volume",
            f"volume ratio {ratio:.3g} beyond the bound {params.max_volume_ratio:g}",
            n_atoms=n,
            volume_ratio=ratio,
            seconds=seconds,
        )
    atoms.calc = None
    return RelaxResult(
        "ok",
        n_atoms=n,
        energy=energy,
        converged=converged,
        n_steps=n_steps,
        volume_ratio=ratio,
        seconds=seconds,
        structure=AseAtomsAdaptor.get_structure(atoms),
    )


def relax_structures(
    structures: Sequence[Structure],
    *,
    params: RelaxParams | None = None,
    calculator: Callable[[], Calculator] | None = None,
    progress: bool = False,
) -> list[RelaxResult]:
    """Relax structures in parallel (one Dask task each) on the current scheduler.

    Parameters
    ----------
    structures : sequence of pymatgen Structure
    params : RelaxParams, optional
    calculator : callable, optional
        Makes the ASE calculator of one task (default: :func:`chgnet_calculator`).
        Must be picklable for a process-based scheduler.
    progress : bool
        A progress bar on stderr.

    Returns
    -------
    list of RelaxResult
        In the order of ``structures``; failures are results too.
    """
    import dask
    from pymatgen.io.ase import AseAtomsAdaptor

    from afpx.scheduler import compute

    params = params or RelaxParams()
    if calculator is None:
        require_relax()
    tasks = [
        dask.delayed(_relax_atoms, pure=False)(AseAtomsAdaptor.get_atoms(s), params, calculator)
        for s in structures
    ]
    if not tasks:
        return []
    saved = None
    if calculator is None:
        import torch

        saved = torch.get_num_threads()
        torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            (results,) = compute(tasks, progress=progress)
    finally:
        if saved is not None:
            import torch

            torch.set_num_threads(saved)
    return list(results)


# =============================================================================
# references
# =============================================================================
def _template_structure(library: TemplateLibrary, template: int) -> Structure:
    """The known structure of a template, as stored in the library's geometry."""
    from pymatgen.core import Lattice, Structure

    geo = library.geometry
    if geo is None or not geo.has(template):
        raise AfpxError(f"template {library.structure_id[template]} has no geometry")
    a0, b0 = int(geo.atom_start[template]), int(geo.atom_start[template + 1])
    species = [element_symbol(int(z)) for z in geo.numbers[a0:b0]]
    return Structure(
        Lattice(np.asarray(geo.lattice[template], dtype=np.float64)),
        species,
        np.asarray(geo.frac_coords[a0:b0], dtype=np.float64),
    )


def _templates_within(
    library: TemplateLibrary, zs: Sequence[int]
) -> dict[tuple[int, ...], list[int]]:
    """Templates with geometry made of a subset of ``zs``, by their (sorted) element set."""
    allowed = {int(z) for z in zs}
    geo = library.geometry
    out: dict[tuple[int, ...], list[int]] = {}
    if geo is None:
        return out
    z = np.asarray(library.z, dtype=np.int64)
    start = np.asarray(library.site_start, dtype=np.int64)
    n_atoms = np.diff(np.asarray(geo.atom_start, dtype=np.int64))
    inside = np.isin(z, list(allowed))
    # templates with any site outside the set are out
    outside = np.zeros(library.n_templates, dtype=bool)
    outside[np.asarray(library.site_template)[~inside]] = True
    for t in np.flatnonzero(~outside & (n_atoms > 0)).tolist():
        key = tuple(sorted(set(z[start[t] : start[t + 1]].tolist())))
        if key and geo.has(t):
            out.setdefault(key, []).append(t)
    return out


def _prototype(z: int) -> list[Structure]:
    """fcc, bcc and hcp cells of an element, sized from its atomic radius."""
    from ase.build import bulk
    from pymatgen.core.periodic_table import Element
    from pymatgen.io.ase import AseAtomsAdaptor

    symbol = element_symbol(z)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        el = Element(symbol)
        r = el.atomic_radius if el.atomic_radius is not None else el.atomic_radius_calculated
    if r is None:
        raise AfpxError(f"no structure and no atomic radius for {symbol}: no elemental reference")
    r = float(r)
    cells = {
        "fcc": bulk(symbol, "fcc", a=2 * math.sqrt(2) * r),
        "bcc": bulk(symbol, "bcc", a=4 * r / math.sqrt(3)),
        "hcp": bulk(symbol, "hcp", a=2 * r, c=2 * r * math.sqrt(8 / 3)),
    }
    return [AseAtomsAdaptor.get_structure(cells[p]) for p in _PROTOTYPES]


def _element_candidates(
    library: TemplateLibrary, zs: Sequence[int], params: RelaxParams
) -> dict[int, tuple[list[Structure], list[str]]]:
    """Structures to relax for each element's reference, with labels."""
    within = _templates_within(library, zs)
    geo = library.geometry
    out: dict[int, tuple[list[Structure], list[str]]] = {}
    for z in zs:
        ts = within.get((int(z),), [])
        if geo is not None:
            n_atoms = np.diff(np.asarray(geo.atom_start, dtype=np.int64))
            ts = sorted((t for t in ts if n_atoms[t] <= params.max_atoms), key=lambda t: n_atoms[t])
        ts = ts[: params.n_element_structures]
        if ts:
            out[int(z)] = (
                [_template_structure(library, t) for t in ts],
                [str(library.structure_id[t]) for t in ts],
            )
        else:
            out[int(z)] = (_prototype(int(z)), [f"{p} prototype" for p in _PROTOTYPES])
    return out


def element_references(
    library: TemplateLibrary,
    elements: Sequence[int],
    *,
    params: RelaxParams | None = None,
    calculator: Callable[[], Calculator] | None = None,
) -> dict[str, dict[str, Any]]:
    """Relaxed energy per atom of each element (its lowest-energy reference).

    Returns
    -------
    dict
        ``symbol -> {"energy_per_atom", "reference", "n_relaxed", "n_failed"}``.

    Raises
    ------
    AfpxError
        When every reference structure of an element fails to relax.
    """
    params = params or RelaxParams()
    cand = _element_candidates(library, elements, params)
    flat = [s for structures, _ in cand.values() for s in structures]
    results = relax_structures(flat, params=params, calculator=calculator)
    return _pick_references(cand, results)


def _pick_references(
    cand: dict[int, tuple[list[Structure], list[str]]], results: list[RelaxResult]
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    i = 0
    for z, (structures, labels) in cand.items():
        mine = results[i : i + len(structures)]
        i += len(structures)
        ok = [(r.energy_per_atom, label) for r, label in zip(mine, labels, strict=True) if r.ok]
        symbol = element_symbol(z)
        if not ok:
            reasons = "; ".join(f"{lab}: {r.message}" for r, lab in zip(mine, labels, strict=True))
            raise AfpxError(f"no reference structure of {symbol} relaxed ({reasons})")
        e, label = min(ok)
        out[symbol] = {
            "energy_per_atom": float(e),
            "reference": label,
            "n_relaxed": len(ok),
            "n_failed": len(mine) - len(ok),
        }
    return out


# =============================================================================
# the relaxed ranking
# =============================================================================
#: Columns of a relaxed table, after the ranking's own.
RELAX_COLUMNS: Final = (
    "likelihood_rank",
    "stability_rank",
    "hull_energy",
    "e_above_hull",
    "formation_energy",
    "energy_per_atom",
    "volume_ratio",
    "converged",
    "n_steps",
    "n_atoms",
    "relax_seconds",
    "relax_status",
    "relax_message",
)


@dataclass
class RelaxTable:
    """The top rows of a ranking, relaxed, with energies and both ranks.

    Attributes
    ----------
    columns : dict of str to ndarray
        One value per row: the ranking's columns (``rank``, ``formula``,
        ``score``, template provenance, ``known`` when asked) and
        :data:`RELAX_COLUMNS`. ``hull_energy`` (eV/atom) is the energy above
        the hull, or minus the distance to the hull without the row for one
        on the hull; ``stability_rank`` ranks it (1 = most stable, mid-ranks
        for ties, NaN for failed relaxations).
    structures : list of pymatgen Structure or None
        The relaxed structures, None where the relaxation failed.
    order : str
        How rows are ordered (:data:`ORDERS`).
    references : dict
        Elemental references (see :func:`element_references`).
    known_references : list of dict
        The library's known compounds that entered the hull.
    attrs : dict
        Parameters, timing and the ranking's attributes.
    """

    columns: dict[str, np.ndarray]
    structures: list[Any]
    order: str
    references: dict[str, dict[str, Any]]
    known_references: list[dict[str, Any]] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.structures)

    def to_frame(self) -> Any:
        """The rows as a :class:`pandas.DataFrame`."""
        import pandas as pd

        return pd.DataFrame(self.columns)


def _row_structures(
    table: RankTable, library: TemplateLibrary, n: int, scale: str
) -> tuple[list[Structure | None], list[str]]:
    from afpx.rank import candidate_structure

    template = table.variables[TEMPLATE][1]
    assignment = table.variables["assignment"][1]
    out: list[Structure | None] = []
    errors: list[str] = []
    for i in range(n):
        try:
            s, _ = candidate_structure(
                library, int(template[i]), table.elements, np.asarray(assignment[i]), scale=scale
            )
            out.append(s)
            errors.append("")
        except AfpxError as exc:  # a template that cannot be rebuilt is one failed row
            out.append(None)
            errors.append(str(exc))
    return out, errors


def _hull(
    symbols: Sequence[str],
    references: dict[str, dict[str, Any]],
    rows: list[RelaxResult],
    known: list[RelaxResult],
) -> tuple[np.ndarray, np.ndarray]:
    """(e_above_hull, hull_energy) of every row (NaN where not relaxed)."""
    from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
    from pymatgen.core import Composition

    entries = [PDEntry(Composition(s), references[s]["energy_per_atom"]) for s in symbols]
    entries += [PDEntry(r.structure.composition, r.energy) for r in known if r.ok and r.structure]
    mine: list[Any] = []
    for r in rows:
        e = PDEntry(r.structure.composition, r.energy) if r.ok and r.structure else None
        mine.append(e)
        if e is not None:
            entries.append(e)
    diagram = PhaseDiagram(entries)
    above = np.full(len(rows), np.nan)
    hull = np.full(len(rows), np.nan)
    for i, e in enumerate(mine):
        if e is None:
            continue
        above[i] = float(diagram.get_e_above_hull(e) or 0.0)
        hull[i] = float(diagram.get_phase_separation_energy(e))
    return above, hull


def relax_ranking(
    table: RankTable,
    library: TemplateLibrary,
    *,
    n: int,
    params: RelaxParams | None = None,
    order: str = "likelihood",
    known_references: bool = True,
    references: dict[str, dict[str, Any]] | None = None,
    scale: str = "dls",
    calculator: Callable[[], Calculator] | None = None,
    progress: bool = False,
) -> RelaxTable:
    """Relax the best candidate of the top ``n`` compositions and rank them by stability.

    Parameters
    ----------
    table : RankTable
        From :func:`afpx.rank.rank_table` (composition rows with assignments).
    library : TemplateLibrary
        The library it came from (with geometry).
    n : int
        Rows to relax (the first ``n`` of ``table``).
    params : RelaxParams, optional
    order : {"likelihood", "hull"}
        Order of the rows: afpx's likelihood rank, or hull energy (failed
        relaxations last, in likelihood order).
    known_references : bool
        Also relax the library's known compounds of the chemical system
        (every subset of the elements with two or more) and build the hull
        with them. Leave out for a leakage-free evaluation.
    references : dict, optional
        Elemental references already relaxed (:func:`element_references`,
        same parameters and calculator), reused for the elements they name.
    scale : {"dls", "radii", "none"}
        Lattice scaling of the starting structures (as for CIF export).
    calculator : callable, optional
        Makes the ASE calculator of each task (default: CHGNet's pretrained
        model); a test injects a cheap one here.
    progress : bool
        A progress bar on stderr.

    Returns
    -------
    RelaxTable

    Raises
    ------
    AfpxError
        For ``n < 1``, an unknown ``order``, a library without geometry,
        a missing ``relax`` extra, or an element none of whose reference
        structures relaxes.
    """
    params = params or RelaxParams()
    if n < 1:
        raise AfpxError(f"the number of compositions to relax must be at least 1, got {n}")
    if order not in ORDERS:
        raise AfpxError(f"unknown order {order!r}: give one of {', '.join(ORDERS)}")
    if library.geometry is None:
        raise AfpxError(
            "relaxing needs template geometry, which this library lacks (a cube built by an "
            "older afpx); rebuild it with `afpx build-cube`"
        )
    if calculator is None:
        require_relax()
    t0 = time.perf_counter()
    n = min(n, len(table))
    zs = list(table.elements)
    symbols = list(table.symbols)
    starts, start_errors = _row_structures(table, library, n, scale)

    # every structure of the run in one Dask computation: rows, elements, known compounds
    given = dict(references or {})
    elem = _element_candidates(
        library, [z for z in zs if element_symbol(int(z)) not in given], params
    )
    known_t: list[int] = []
    if known_references:
        geo = library.geometry
        n_atoms = np.diff(np.asarray(geo.atom_start, dtype=np.int64))
        for key, ts in sorted(_templates_within(library, zs).items()):
            if len(key) >= 2:
                known_t += [t for t in ts if n_atoms[t] <= params.max_atoms]
    flat: list[Structure] = [s for s in starts if s is not None]
    flat += [s for structures, _ in elem.values() for s in structures]
    flat += [_template_structure(library, t) for t in known_t]
    results = relax_structures(flat, params=params, calculator=calculator, progress=progress)
    row_results: list[RelaxResult] = []
    j = 0
    for s, err in zip(starts, start_errors, strict=True):
        if s is None:
            row_results.append(RelaxResult("error", err))
        else:
            row_results.append(results[j])
            j += 1
    n_elem = sum(len(structures) for structures, _ in elem.values())
    references = {**_pick_references(elem, results[j : j + n_elem]), **given}
    references = {sym: references[sym] for sym in symbols}
    known_results = results[j + n_elem :]

    above, hull = _hull(symbols, references, row_results, known_results)
    epa = np.asarray([r.energy_per_atom for r in row_results], dtype=np.float64)
    formation = np.full(n, np.nan)
    for i, r in enumerate(row_results):
        if r.ok and r.structure is not None:
            comp = r.structure.composition
            mu = sum(comp[el] * references[str(el)]["energy_per_atom"] for el in comp.elements)
            formation[i] = (r.energy - mu) / comp.num_atoms
    stability = _stability_ranks(hull)

    base = {name: np.asarray(values)[:n] for name, values in table.columns().items()}
    columns: dict[str, np.ndarray] = dict(base)
    columns["likelihood_rank"] = np.asarray(base["rank"], dtype=np.float64)
    columns["stability_rank"] = stability
    columns["hull_energy"] = hull
    columns["e_above_hull"] = above
    columns["formation_energy"] = formation
    columns["energy_per_atom"] = epa
    columns["volume_ratio"] = np.asarray([r.volume_ratio for r in row_results])
    columns["converged"] = np.asarray([r.converged for r in row_results], dtype=bool)
    columns["n_steps"] = np.asarray([r.n_steps for r in row_results], dtype=np.int64)
    columns["n_atoms"] = np.asarray([r.n_atoms for r in row_results], dtype=np.int64)
    columns["relax_seconds"] = np.asarray([r.seconds for r in row_results])
    columns["relax_status"] = np.asarray([r.status for r in row_results], dtype=object)
    columns["relax_message"] = np.asarray([r.message for r in row_results], dtype=object)
    structures = [r.structure for r in row_results]
    if order == "hull":
        perm = np.lexsort((np.arange(n), np.nan_to_num(stability, nan=np.inf)))
        columns = {k: v[perm] for k, v in columns.items()}
        structures = [structures[i] for i in perm.tolist()]
    known_rows = [
        {
            "structure_id": str(library.structure_id[t]),
            "formula": str(library.formula[t]),
            "status": r.status,
            "energy_per_atom": r.energy_per_atom,
        }
        for t, r in zip(known_t, known_results, strict=True)
    ]
    wall = time.perf_counter() - t0
    return RelaxTable(
        columns,
        structures,
        order,
        references,
        known_rows,
        {
            "elements": symbols,
            "n_relaxed": n,
            "n_failed": int(sum(not r.ok for r in row_results)),
            "n_structures": len(flat),
            "params": asdict(params),
            "known_references": known_references,
            "wall_seconds": wall,
            "ranking": dict(table.attrs),
            "potential": f"CHGNet {params.model}" if calculator is None else "injected",
            schema.SYMBOL: symbols,
        },
    )


def _stability_ranks(hull: np.ndarray) -> np.ndarray:
    """Mid-ranks of hull energies (lower is more stable); NaN rows get NaN."""
    from afpx.templates.ties import tie_ranks

    out = np.full(hull.shape, np.nan)
    ok = np.isfinite(hull)
    if ok.any():
        # tie_ranks ranks higher-is-better scores; hull energies are in eV/atom
        out[ok] = tie_ranks(-hull[ok], tolerance=HULL_TIE_TOLERANCE).rank
    return out
