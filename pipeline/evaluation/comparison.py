"""The family x metric comparison table, shared by the HTML report and `genzoo compare`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

FLOOR_ROW = "real data"
# token data: smoothed n-gram models of the same split (`evaluation.token_baselines`), the perplexity to beat
NGRAM_ROWS = {"unigram": "unigram (add-k)", "bigram": "bigram (add-k)"}
REFERENCE_ROWS = (FLOOR_ROW, *NGRAM_ROWS.values())  # rows shown beside the families, never ranked among them


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    better: Optional[str]  # "low" | "high" | None (not ranked)
    fmt: str = "{:.3g}"


COLUMNS: List[Column] = [
    Column("nll_kind", "NLL kind", None, "{}"),
    Column("nll", "NLL (nats)", "low", "{:.2f}"),
    Column("bpd", "bits/dim", "low", "{:.3f}"),
    Column("perplexity", "perplexity", "low", "{:.2f}"),
    Column("fid", "FID", "low", "{:.2f}"),
    Column("kid_mean", "KID", "low", "{:.4f}"),
    Column("precision", "precision", "high", "{:.3f}"),
    Column("recall", "recall", "high", "{:.3f}"),
    Column("anomaly_auroc", "anomaly AUROC", "high", "{:.3f}"),
    Column("probe_acc", "probe acc", "high", "{:.3f}"),
    Column("probe_acc_10", "probe acc (10/class)", "high", "{:.3f}"),
    # P(X, Y): the Bayes classifier, samples obeying their label, classifiers trained on samples (CAS);
    # the real-data row holds the discriminative baselines of the same budget
    Column("gen_class_acc", "Bayes classifier acc", "high", "{:.3f}"),
    Column("cond_acc", "cond. sample acc", "high", "{:.3f}"),
    Column("cas", "CAS", "high", "{:.3f}"),
    Column("logreg_acc", "logistic regression acc", None, "{:.3f}"),
    Column("accuracy", "featnet acc", None, "{:.3f}"),
    Column("train_seconds", "train s", "low", "{:.1f}"),
    Column("samples_per_second", "samples/s", "high", "{:.0f}"),
    Column("parameters", "params", "low", "{:.0f}"),
    Column("peak_memory_mb", "peak MB", "low", "{:.0f}"),
]

KIND_LABEL = {"exact": "exact", "lower_bound": "bound", "estimate": "estimate", None: "n/a"}
# The columns computed from `log_prob`, so their value is of the row's NLL kind. An "estimate" (the RBM's AIS
# log Z) is biased towards a better value (AIS underestimates log Z in expectation, Salakhutdinov & Murray
# 2008), so it is marked and never ranked best against exact values or bounds.
LIKELIHOOD_COLUMNS = ("nll", "bpd", "perplexity")
ESTIMATE_MARK = "≈"


def _number(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None


def best_per_column(rows: Dict[str, dict]) -> Dict[str, str]:
    """Column key -> the family with the best value (the real-data floor and the n-gram baselines never compete)."""
    best = {}
    for col in COLUMNS:
        if col.better is None:
            continue
        vals = {f: _number(r.get(col.key)) for f, r in rows.items() if f not in REFERENCE_ROWS}
        vals = {f: v for f, v in vals.items() if v is not None}
        if col.key in LIKELIHOOD_COLUMNS and any(rows[f].get("nll_kind") != "estimate" for f in vals):
            vals = {f: v for f, v in vals.items() if rows[f].get("nll_kind") != "estimate"}
        if len(vals) > 1:
            pick = min if col.better == "low" else max
            best[col.key] = pick(vals, key=vals.get)
    return best


def used_columns(rows: Dict[str, dict]) -> List[Column]:
    return [c for c in COLUMNS if any(c.key in r for r in rows.values())]


def cell(row: dict, col: Column) -> str:
    if col.key == "nll_kind":
        return KIND_LABEL.get(row.get("nll_kind"), str(row.get("nll_kind")))
    v = _number(row.get(col.key))
    if v is None:
        return "n/a"
    estimated = col.key in LIKELIHOOD_COLUMNS and row.get("nll_kind") == "estimate"
    return (ESTIMATE_MARK if estimated else "") + col.fmt.format(v)
