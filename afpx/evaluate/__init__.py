"""The paper's tests: Test 1, Test 2, softmax error rate, confusion matrix, baselines.

One job per module, all on the one enumeration engine :mod:`afpx.templates`:

* :mod:`~afpx.evaluate.params` — :class:`EvaluateParams`, report names;
* :mod:`~afpx.evaluate.metrics` — rank and score kernels (optimality score,
  hit@k, known positions), confusion matrix, error rate, likelihood histograms;
* :mod:`~afpx.evaluate.scoring` — what is scored: the model (from the cube or
  a model folder) and every baseline of :func:`afpx.baselines.baseline_likelihoods`;
* :mod:`~afpx.evaluate.test1` — Test 1 of the test structures;
* :mod:`~afpx.evaluate.test2` — Test 2 of the split's element sets;
* :mod:`~afpx.evaluate.graph` — Test 1 and Test 2 of every set as a Dask
  graph (batches of sets, one shared state) on :mod:`afpx.scheduler`;
* :mod:`~afpx.evaluate.case_study` — ranked lists of a few sets, as ``afpx rank``;
* :mod:`~afpx.evaluate.report` — verdict, summary table, ``metrics.json``,
  ``arrays.zarr``;
* :mod:`~afpx.evaluate.run` — :func:`evaluate`, the whole run over element sets.

Scores are log-likelihoods (higher is better) and ranks follow the one tie
rule of :mod:`afpx.templates.ties` (see docs/evaluation.md).
"""

from __future__ import annotations

from afpx.evaluate.metrics import (
    confusion_counts,
    error_rate,
    first_known_metrics,
    known_positions,
    likelihood_histogram,
    optimality_score,
    per_site_metrics,
)
from afpx.evaluate.params import VARIANTS, EvaluateParams
from afpx.evaluate.report import EvaluationReport, summary_table, verdict, write_report
from afpx.evaluate.run import check_evaluable, evaluate
from afpx.evaluate.scoring import scored_libraries, with_model_likelihoods
from afpx.evaluate.test1 import TrueRank, true_candidate_rank
from afpx.evaluate.test2 import sample_sets, set_positions

__all__ = [
    "VARIANTS",
    "EvaluateParams",
    "EvaluationReport",
    "TrueRank",
    "check_evaluable",
    "confusion_counts",
    "error_rate",
    "evaluate",
    "first_known_metrics",
    "known_positions",
    "likelihood_histogram",
    "optimality_score",
    "per_site_metrics",
    "sample_sets",
    "scored_libraries",
    "set_positions",
    "summary_table",
    "true_candidate_rank",
    "verdict",
    "with_model_likelihoods",
    "write_report",
]
