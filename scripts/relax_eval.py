"""Does re-ranking the top compositions by CHGNet hull energy find the known ones sooner?

For a seeded sample of binary and ternary element sets of the cube's test
split (composition-disjoint from training), every composition is ranked by
likelihood (``afpx.rank.rank_table`` with ``exclude_own_formula``: a known
structure never re-predicts itself), the best candidates of the top N are
relaxed with CHGNet (``afpx.relax.relax_ranking``, no known compounds in the
hull) and re-ranked by hull energy; N random compositions of the same set are
relaxed and ranked the same way as a baseline. Known compositions are those of
the library's structures made of exactly the set (as in Test 2). Per set:
the position of the first known composition under each ranking.

One JSON line per set is appended to ``--out``; a run can be stopped and
started again (sets already there are skipped). ``--summary`` prints the
table of docs/relax.md from such a file.

    python scripts/relax_eval.py --cube cube.zarr --out relax_eval.jsonl --sets-per-size 15
    python scripts/relax_eval.py --summary relax_eval.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np


def _subset(table: Any, rows: np.ndarray) -> Any:
    """The rows ``rows`` of a RankTable (composition variables only)."""
    from afpx.rank import COMPOSITION, RankTable

    variables = {
        name: (dims, values[rows] if dims and dims[0] == COMPOSITION else values)
        for name, (dims, values) in table.variables.items()
    }
    return RankTable(list(table.elements), list(table.symbols), variables, dict(table.attrs))


def _reranked_first(known: np.ndarray, stab: np.ndarray, likelihood_first: float) -> float:
    """1-based position of the first known composition after re-ranking the top n by hull.

    Rows are ordered by stability rank (mid-ranks), failed relaxations after
    them in likelihood order; with no known composition among the n, the
    likelihood position stands (re-ranking only permutes the top n).
    """
    known = np.asarray(known, dtype=bool)
    if not known.any():
        return likelihood_first
    stab = np.asarray(stab, dtype=np.float64)
    n_ok = int(np.isfinite(stab).sum())
    pos = stab.copy()
    failed = np.flatnonzero(~np.isfinite(stab))
    pos[failed] = n_ok + 1 + np.arange(failed.size)  # in likelihood order
    return float(pos[known].min())


def _hull_positions(relaxed: Any, n: int, symbols: list[str]) -> np.ndarray:
    """Stability ranks of the first n rows with the hull of those rows alone."""
    from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
    from pymatgen.core import Composition

    from afpx.templates.ties import tie_ranks

    cols = relaxed.columns
    entries = [PDEntry(Composition(s), relaxed.references[s]["energy_per_atom"]) for s in symbols]
    mine: list[Any] = []
    for i in range(n):
        epa = float(cols["energy_per_atom"][i])
        if math.isfinite(epa):
            comp = Composition(str(cols["formula"][i]))
            entry = PDEntry(comp, epa * comp.num_atoms)
            entries.append(entry)
            mine.append(entry)
        else:
            mine.append(None)
    diagram = PhaseDiagram(entries)
    hull = np.asarray(
        [np.nan if e is None else diagram.get_phase_separation_energy(e) for e in mine]
    )
    out = np.full(n, np.nan)
    ok = np.isfinite(hull)
    if ok.any():
        out[ok] = tie_ranks(-hull[ok], tolerance=1e-6).rank
    return out


def run(args: argparse.Namespace) -> None:
    from afpx.evaluate.test2 import sample_sets
    from afpx.rank import load_library, rank_table
    from afpx.relax import RelaxParams, relax_ranking
    from afpx.templates import element_symbol

    out = Path(args.out)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            done.add(tuple(json.loads(line)["elements"]))
    lib = load_library(args.cube)
    split = np.asarray(lib.split).astype(str)
    z = np.asarray(lib.z, dtype=np.int64)
    start = np.asarray(lib.site_start, dtype=np.int64)
    sets = set()
    for t in np.flatnonzero(split == "test").tolist():
        es = tuple(sorted(set(z[start[t] : start[t + 1]].tolist())))
        if len(es) in (2, 3):
            sets.add(es)
    sample = sample_sets(sorted(sets), args.sets_per_size, seed=args.seed)
    binaries = [s for s in sample if len(s) == 2]
    ternaries = [s for s in sample if len(s) == 3]
    order = [s for pair in zip(binaries, ternaries, strict=False) for s in pair]
    order += binaries[len(ternaries) :] + ternaries[len(binaries) :]
    params = RelaxParams(steps=args.steps, fmax=args.fmax, max_atoms=args.max_atoms)
    refs: dict[str, dict[str, Any]] = {}
    tops = sorted(args.top)
    n_max = tops[-1]
    for es in order:
        symbols = [element_symbol(e) for e in es]
        if tuple(symbols) in done:
            continue
        t0 = time.perf_counter()
        full = rank_table(list(es), library=lib, top=None, known=True, exclude_own_formula=True)
        cols = full.columns()
        known = np.asarray(cols["known"], dtype=bool)
        ranks = np.asarray(cols["rank"], dtype=np.float64)
        lik_first = float(ranks[known].min()) if known.any() else math.inf
        record: dict[str, Any] = {
            "elements": symbols,
            "n_compositions": len(full),
            "n_known": int(lib.known_compositions(list(es)).shape[0]),
            "n_known_generated": int(known.sum()),
            "likelihood_first": lik_first,
        }
        top = _subset(full, np.arange(min(n_max, len(full))))
        relaxed = relax_ranking(
            top, lib, n=len(top), params=params, known_references=False, references=refs
        )
        refs.update(relaxed.references)
        for n in tops:
            n_eff = min(n, len(top))
            stab = _hull_positions(relaxed, n_eff, symbols)
            record[f"hull_first@{n}"] = _reranked_first(
                relaxed.columns["known"][:n_eff], stab, lik_first
            )
        status = relaxed.columns["relax_status"]
        record["statuses"] = {s: int((status == s).sum()) for s in sorted(set(status.tolist()))}
        record["converged"] = int(np.asarray(relaxed.columns["converged"]).sum())
        record["relax_seconds"] = [float(v) for v in relaxed.columns["relax_seconds"]]
        record["n_atoms"] = [int(v) for v in relaxed.columns["n_atoms"]]
        record["top_wall_s"] = relaxed.attrs["wall_seconds"]
        if args.random:
            rng = np.random.default_rng([args.seed, zlib.crc32("-".join(symbols).encode())])
            pick = np.sort(rng.choice(len(full), size=min(args.random, len(full)), replace=False))
            rnd = relax_ranking(
                _subset(full, pick),
                lib,
                n=pick.size,
                params=params,
                known_references=False,
                references=refs,
            )
            rk = np.asarray(rnd.columns["known"], dtype=bool)
            stab = np.asarray(rnd.columns["stability_rank"], dtype=np.float64)
            record["random_known_sampled"] = int(rk.sum())
            record["random_first"] = (
                float(np.nanmin(np.where(rk, stab, np.nan)))
                if np.isfinite(stab[rk]).any()
                else None
            )
            rs = rnd.columns["relax_status"]
            record["random_statuses"] = {k: int((rs == k).sum()) for k in sorted(set(rs.tolist()))}
            record["random_wall_s"] = rnd.attrs["wall_seconds"]
        # chance that N random draws of the set's compositions include a known one
        q = int(known.sum())
        n_all = len(full)
        draws = min(args.random or n_max, n_all)
        record["p_known_in_random"] = (
            1.0
            - math.exp(
                math.lgamma(n_all - q + 1)
                - math.lgamma(n_all - q - draws + 1)
                - math.lgamma(n_all + 1)
                + math.lgamma(n_all - draws + 1)
            )
            if n_all - q >= draws
            else 1.0
        )
        record["set_wall_s"] = time.perf_counter() - t0
        with out.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(
            f"{'-'.join(symbols)}: likelihood {lik_first:g}, "
            + ", ".join(f"hull@{n} {record[f'hull_first@{n}']:g}" for n in tops)
            + f", {record['set_wall_s']:.0f} s",
            flush=True,
        )


def timing(args: argparse.Namespace) -> None:
    """Seconds per structure (one core) and per set (threads) on the built-in library."""
    from afpx.rank import load_library, rank_table
    from afpx.relax import RelaxParams, element_references, relax_ranking
    from afpx.scheduler import use_scheduler

    lib = load_library(args.cube)
    params = RelaxParams(steps=args.steps, fmax=args.fmax, max_atoms=args.max_atoms)
    n = args.top[0]
    for elements in args.timing:
        table = rank_table(elements, library=lib, top=n)
        refs = element_references(lib, table.elements, params=params)
        for scheduler, workers in (("synchronous", None), ("threads", 2)):
            for repeat in range(args.repeats):
                with use_scheduler(scheduler, workers=workers):
                    res = relax_ranking(
                        table, lib, n=n, params=params, known_references=False, references=refs
                    )
                ok = res.columns["relax_status"] == "ok"
                secs = np.asarray(res.columns["relax_seconds"])[ok]
                atoms = np.asarray(res.columns["n_atoms"])[ok]
                steps = np.asarray(res.columns["n_steps"])[ok]
                print(
                    f"{elements} {scheduler}({workers or 1}) repeat {repeat}: "
                    f"{ok.sum()}/{n} relaxed, set {res.attrs['wall_seconds']:.1f} s, "
                    f"per structure median {np.median(secs):.2f} s "
                    f"({np.median(atoms):g} atoms, {np.median(steps):g} steps), "
                    f"per step-atom {1e3 * np.sum(secs) / np.sum(steps * atoms):.2f} ms",
                    flush=True,
                )


def _metrics(first: list[float | None]) -> dict[str, float]:
    q = np.asarray([math.inf if v is None else v for v in first], dtype=np.float64)
    return {
        "hit@1": float(np.mean(q <= 1)),
        "hit@10": float(np.mean(q <= 10)),
        "mrr": float(np.mean(np.where(np.isfinite(q), 1.0 / q, 0.0))),
    }


def summary(path: str) -> None:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    tops = sorted({int(k.split("@")[1]) for r in rows for k in r if k.startswith("hull_first@")})
    print("| sets | ranking | hit@1 | hit@10 | MRR |")
    print("|---|---|---|---|---|")
    for label, group in (
        ("binary", [r for r in rows if len(r["elements"]) == 2]),
        ("ternary", [r for r in rows if len(r["elements"]) == 3]),
        ("all", rows),
    ):
        if not group:
            continue
        name = f"{label} ({len(group)})"
        m = _metrics([r["likelihood_first"] for r in group])
        print(f"| {name} | likelihood | {m['hit@1']:.2f} | {m['hit@10']:.2f} | {m['mrr']:.3f} |")
        for n in tops:
            # a file may join runs of different --top lists: each column on the sets it has
            have = [r for r in group if f"hull_first@{n}" in r]
            if not have:
                continue
            row = name
            if len(have) < len(group):
                row = f"{label} ({len(have)} of {len(group)})"
                m = _metrics([r["likelihood_first"] for r in have])
                print(
                    f"| {row} | likelihood | {m['hit@1']:.2f} | {m['hit@10']:.2f} "
                    f"| {m['mrr']:.3f} |"
                )
            m = _metrics([r[f"hull_first@{n}"] for r in have])
            print(
                f"| {row} | hull, top {n} | {m['hit@1']:.2f} | {m['hit@10']:.2f} | {m['mrr']:.3f} |"
            )
        if all("random_first" in r for r in group):
            m = _metrics([r["random_first"] for r in group])
            sampled = sum(r["random_known_sampled"] > 0 for r in group)
            print(
                f"| {name} | hull, random {sum(group[0]['random_statuses'].values())} "
                f"(a known one drawn in {sampled} sets) | {m['hit@1']:.2f} | "
                f"{m['hit@10']:.2f} | {m['mrr']:.3f} |"
            )
    status: dict[str, int] = {}
    for r in rows:
        for k, v in r["statuses"].items():
            status[k] = status.get(k, 0) + v
    secs = [s for r in rows for s, a in zip(r["relax_seconds"], r["n_atoms"], strict=True) if s]
    print(
        f"\nrelaxations of the top lists: {status}; converged {sum(r['converged'] for r in rows)}"
    )
    print(
        f"seconds per relaxed structure (median, this run's load): {np.median(secs):.2f}; "
        f"per set, top list: {np.median([r['top_wall_s'] for r in rows]):.0f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cube", default=os.environ.get("AFPX_CUBE"))
    parser.add_argument("--out", default="relax_eval.jsonl")
    parser.add_argument("--sets-per-size", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, nargs="+", default=[20])
    parser.add_argument("--random", type=int, default=20, help="random compositions (0: none)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--fmax", type=float, default=0.1)
    parser.add_argument("--max-atoms", type=int, default=32)
    parser.add_argument("--summary", default=None, help="print the table of a finished run")
    parser.add_argument(
        "--timing", nargs="+", default=None, help="element sets to time, e.g. Mn,Ge Li,Mn,Ge"
    )
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.timing:
        timing(args)
    elif args.summary:
        summary(args.summary)
    else:
        run(args)


if __name__ == "__main__":
    main()
