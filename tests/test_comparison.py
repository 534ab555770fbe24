"""The comparison table: which family is marked best, and how an estimated likelihood is shown."""
from __future__ import annotations

from pipeline.evaluation.comparison import COLUMNS, FLOOR_ROW, best_per_column, cell

COL = {c.key: c for c in COLUMNS}


def test_an_estimate_is_never_ranked_best_against_exact_values_or_bounds():
    rows = {"rbm": {"nll_kind": "estimate", "nll": 80.0, "bpd": 1.0, "fid": 1.0},
            "flow": {"nll_kind": "exact", "nll": 96.0, "bpd": 2.0, "fid": 2.0},
            "vae": {"nll_kind": "lower_bound", "nll": 90.0, "bpd": 1.5, "fid": 3.0},
            FLOOR_ROW: {"fid": 0.1}}
    best = best_per_column(rows)
    assert best["nll"] == "vae" and best["bpd"] == "vae"  # the estimate's 80 is not comparable
    assert best["fid"] == "rbm"  # sample metrics do not depend on the NLL kind
    assert cell(rows["rbm"], COL["nll"]) == "≈80.00" and cell(rows["flow"], COL["nll"]) == "96.00"
    assert cell(rows["rbm"], COL["fid"]) == "1.00"


def test_estimates_compete_among_themselves():
    rows = {"a": {"nll_kind": "estimate", "nll": 80.0}, "b": {"nll_kind": "estimate", "nll": 70.0}}
    assert best_per_column(rows)["nll"] == "b"
