"""Relaxing ranked candidates (afpx.relax, ``afpx rank --relax``).

The logic (formation energies, the hull, the orders, failures) runs with a
tiny calculator whose energy is a known function of composition, injected
through ``calculator=``; one test relaxes a real cell with CHGNet.
"""

from __future__ import annotations

import functools
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ase.calculators.calculator import Calculator, all_changes
from click.testing import CliRunner

from afpx import AfpxError
from afpx.cli import main
from afpx.rank import load_library, rank_table
from afpx.relax import (
    RELAX_INSTALL,
    RelaxParams,
    element_references,
    relax_ranking,
    relax_structures,
    require_relax,
)

MN, GE = 25, 32


def _mixing(x: float) -> float:
    """Energy per atom of a Mn fraction x: made up, with compositions above and on the hull."""
    return -1.0 * x - 2.0 * (1 - x) - 1.2 * x * (1 - x) + 0.3 * np.sin(7 * x) * x * (1 - x)


class TableCalculator(Calculator):  # type: ignore[misc]
    """Energy = n_atoms × f(Mn fraction); zero forces; a constant stress; or failures."""

    implemented_properties = ("energy", "free_energy", "forces", "stress")

    def __init__(
        self,
        per_atom: Callable[[float], float] = _mixing,
        *,
        stress: float = 0.0,
        fail: bool = False,
    ) -> None:
        super().__init__()
        self.per_atom = per_atom
        self.stress = stress
        self.fail = fail

    def calculate(
        self, atoms: Any = None, properties: Any = ("energy",), system_changes: Any = all_changes
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        if self.fail:
            raise RuntimeError("the potential broke")
        numbers = self.atoms.get_atomic_numbers()
        x = float(np.mean(numbers == MN))
        e = len(numbers) * self.per_atom(x)
        self.results = {
            "energy": e,
            "free_energy": e,
            "forces": np.zeros((len(numbers), 3)),
            "stress": np.asarray([self.stress] * 3 + [0.0] * 3),
        }


@pytest.fixture(scope="module")
def library() -> Any:
    return load_library(None)


@pytest.fixture(scope="module")
def table(library: Any) -> Any:
    return rank_table("Mn,Ge", library=library, top=8, known=True)


def _lower_hull(x: np.ndarray, e: np.ndarray) -> Callable[[float], float]:
    """The lower convex hull of points (x, e) as a function: a slow, obvious oracle."""
    pts = sorted(zip(x.tolist(), e.tolist(), strict=True))

    def hull(q: float) -> float:
        best = np.inf
        for i, (xa, ea) in enumerate(pts):
            for xb, eb in pts[i:]:
                if xa <= q <= xb:
                    t = 0.0 if xb == xa else (q - xa) / (xb - xa)
                    best = min(best, ea + t * (eb - ea))
        return float(best)

    return hull


def test_formation_energy_and_hull_match_an_oracle(table: Any, library: Any) -> None:
    res = relax_ranking(
        table, library, n=8, calculator=TableCalculator, known_references=False, scale="none"
    )
    cols = res.columns
    assert (cols["relax_status"] == "ok").all() and cols["converged"].all()
    assert res.references["Mn"]["energy_per_atom"] == pytest.approx(_mixing(1.0))
    assert res.references["Ge"]["energy_per_atom"] == pytest.approx(_mixing(0.0))
    x = np.asarray([s.composition.get_atomic_fraction("Mn") for s in res.structures])
    e = np.asarray([_mixing(v) for v in x])
    reference = x * _mixing(1.0) + (1 - x) * _mixing(0.0)
    np.testing.assert_allclose(cols["formation_energy"], e - reference, atol=1e-9)
    np.testing.assert_allclose(cols["energy_per_atom"], e, atol=1e-9)
    hull = _lower_hull(np.r_[x, 0.0, 1.0], np.r_[e, _mixing(0.0), _mixing(1.0)])
    above = np.asarray([ev - hull(q) for q, ev in zip(x, e, strict=True)])
    np.testing.assert_allclose(cols["e_above_hull"], above, atol=1e-6)
    # the hull energy is the energy above the hull, or negative on the hull
    off = above > 1e-6
    np.testing.assert_allclose(cols["hull_energy"][off], above[off], atol=1e-6)
    assert (cols["hull_energy"][~off] <= 1e-9).all()
    assert off.any() and (~off).any()
    # stability rank: 1 for the lowest hull energy, following its order
    assert np.argsort(cols["stability_rank"]).tolist() == np.argsort(cols["hull_energy"]).tolist()
    # likelihood order by default: the ranking's own rows, in order
    assert cols["formula"].tolist() == table.columns()["formula"][:8].tolist()
    np.testing.assert_array_equal(cols["likelihood_rank"], table.columns()["rank"][:8])


def test_hull_order_sorts_by_stability(table: Any, library: Any) -> None:
    kwargs: dict[str, Any] = {"calculator": TableCalculator, "known_references": False}
    a = relax_ranking(table, library, n=6, scale="none", **kwargs)
    b = relax_ranking(table, library, n=6, scale="none", order="hull", **kwargs)
    assert np.all(np.diff(b.columns["stability_rank"]) >= 0)
    assert sorted(b.columns["formula"].tolist()) == sorted(a.columns["formula"].tolist())
    i = int(np.argmin(a.columns["hull_energy"]))
    assert b.columns["formula"][0] == a.columns["formula"][i]


def test_known_references_enter_the_hull(table: Any, library: Any) -> None:
    res = relax_ranking(table, library, n=3, calculator=TableCalculator, known_references=True)
    assert res.known_references, "the built-in library holds known Mn-Ge compounds"
    assert all(k["status"] == "ok" for k in res.known_references)
    from pymatgen.core import Composition

    for k in res.known_references:
        elements = {str(e) for e in Composition(k["formula"]).elements}
        assert elements == {"Mn", "Ge"}, k


def test_failures_are_reported_and_do_not_stop_the_run(table: Any, library: Any) -> None:
    n_atoms = [int(np.sum(np.asarray(table.variables["candidate_counts"][1])[i])) for i in range(6)]
    cap = min(n_atoms)
    assert max(n_atoms) > cap
    res = relax_ranking(
        table,
        library,
        n=6,
        calculator=TableCalculator,
        known_references=False,
        params=RelaxParams(max_atoms=cap),
        order="hull",
    )
    status = res.columns["relax_status"]
    assert "too_many_atoms" in status.tolist() and "ok" in status.tolist()
    failed = status != "ok"
    assert np.isnan(res.columns["stability_rank"][failed]).all()
    assert np.isnan(res.columns["hull_energy"][failed]).all()
    # failed rows come last in hull order
    assert not failed[: int((~failed).sum())].any()
    assert res.attrs["n_failed"] == int(failed.sum())
    assert all(s is None for s, f in zip(res.structures, failed, strict=True) if f)


def test_relaxation_failures_one_by_one(library: Any) -> None:
    from pymatgen.core import Lattice, Structure

    cell = Structure(Lattice.cubic(2.9), ["Mn", "Ge"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    params = RelaxParams(steps=200, max_volume_ratio=1.3)
    cases = {
        "error": functools.partial(TableCalculator, fail=True),
        "nan": functools.partial(TableCalculator, lambda x: float("nan")),
        "volume": functools.partial(TableCalculator, stress=-5.0),
        "ok": TableCalculator,
    }
    results = {
        name: relax_structures([cell], params=params, calculator=calc)[0]
        for name, calc in cases.items()
    }
    assert results["error"].status == "error" and "the potential broke" in results["error"].message
    assert results["nan"].status == "nan"
    assert results["volume"].status == "volume"
    assert not (1 / 1.3 <= results["volume"].volume_ratio <= 1.3)
    assert results["ok"].ok and results["ok"].n_steps == 0 and results["ok"].converged
    big = relax_structures([cell * (2, 2, 2)], params=RelaxParams(max_atoms=4))[0]
    assert big.status == "too_many_atoms" and "16 atoms" in big.message


def test_elemental_references_fall_back_to_prototypes(library: Any) -> None:
    # the library holds no structure of Xe alone: fcc, bcc and hcp prototypes stand in
    refs = element_references(library, [54], calculator=TableCalculator)
    assert refs["Xe"]["reference"].endswith("prototype") and refs["Xe"]["n_relaxed"] == 3
    with pytest.raises(AfpxError, match="no reference structure of Xe relaxed"):
        element_references(library, [54], calculator=functools.partial(TableCalculator, fail=True))


def test_bad_arguments(table: Any, library: Any) -> None:
    with pytest.raises(AfpxError, match="at least 1"):
        relax_ranking(table, library, n=0, calculator=TableCalculator)
    with pytest.raises(AfpxError, match="unknown order"):
        relax_ranking(table, library, n=2, order="energy", calculator=TableCalculator)
    for bad, match in [
        ({"steps": -1}, "steps"),
        ({"fmax": 0.0}, "fmax"),
        ({"max_volume_ratio": 1.0}, "max_volume_ratio"),
        ({"max_atoms": 0}, "max_atoms"),
        ({"n_element_structures": 0}, "n_element_structures"),
    ]:
        with pytest.raises(AfpxError, match=match):
            RelaxParams(**bad)
    from dataclasses import replace

    with pytest.raises(AfpxError, match="geometry"):
        relax_ranking(table, replace(library, geometry=None), n=2, calculator=TableCalculator)


def test_missing_extra_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, table: Any, library: Any
) -> None:
    monkeypatch.setitem(sys.modules, "chgnet", None)
    with pytest.raises(AfpxError, match=r'pip install "afpx\[relax\]"'):
        require_relax()
    with pytest.raises(AfpxError, match=r'pip install "afpx\[relax\]"'):
        relax_ranking(table, library, n=2)
    res = CliRunner().invoke(main, ["rank", "-e", "Mn,Ge", "--relax", "2"])
    assert res.exit_code == 2
    assert RELAX_INSTALL in res.output
    assert res.output.strip().count("\n") <= 2  # click's usage line and one error line


def test_cli_rejects_relax_with_formula() -> None:
    res = CliRunner().invoke(main, ["rank", "-f", "MnGe", "--relax", "2"])
    assert res.exit_code == 2 and "--relax" in res.output


def test_real_chgnet_relaxes_a_tiny_cell() -> None:
    pytest.importorskip("chgnet")
    from pymatgen.core import Lattice, Structure

    # silicon, diamond, primitive cell, 5 % too large
    si = Structure(
        Lattice.from_parameters(4.03, 4.03, 4.03, 60, 60, 60),
        ["Si", "Si"],
        [[0, 0, 0], [0.25, 0.25, 0.25]],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (res,) = relax_structures([si], params=RelaxParams(steps=30, fmax=0.05))
    assert res.ok, res.message
    # CHGNet's internal torch.tensor(list of tensors) warning is not passed on to users
    assert not [w for w in caught if "requires_grad" in str(w.message)], caught
    # CHGNet 0.3.0 (trained on MPtrj, GGA): Si near -5.4 eV/atom; the cell shrinks
    assert -5.6 < res.energy_per_atom < -5.2
    assert res.volume_ratio < 1.0
    assert res.structure is not None and len(res.structure) == 2


def test_cli_relax_writes_table_and_cifs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import afpx.relax

    # route the CLI's relaxations through the cheap calculator
    real = afpx.relax.relax_structures

    def cheap(structures: Any, **kwargs: Any) -> Any:
        return real(structures, **{**kwargs, "calculator": TableCalculator})

    monkeypatch.setattr(afpx.relax, "relax_structures", cheap)
    monkeypatch.setattr(afpx.relax, "require_relax", lambda: None)
    runner = CliRunner()
    out = tmp_path / "cifs"
    res = runner.invoke(
        main,
        [
            "rank",
            "-e",
            "Mn,Ge",
            "--relax",
            "3",
            "--order",
            "hull",
            "--known",
            "--export-cif",
            str(out),
            "--format",
            "json",
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["order"] == "hull" and len(doc["rows"]) == 3
    assert [r["stability_rank"] for r in doc["rows"]] == sorted(
        r["stability_rank"] for r in doc["rows"]
    )
    files = sorted(out.glob("*_relaxed.cif"))
    assert len(files) == 3
    assert "hull energy" in files[0].read_text()
    text = runner.invoke(main, ["rank", "-e", "Mn,Ge", "--relax", "2"])
    assert text.exit_code == 0 and "elemental references" in text.stdout
    assert "known library compounds" in text.stdout
    alone = runner.invoke(main, ["rank", "-e", "Mn,Ge", "--relax", "2", "--no-hull-known"])
    assert alone.exit_code == 0 and "known library compounds" not in alone.stdout
