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


def test_token_data_shows_the_ngram_baselines_beside_the_families_unranked():
    """The featnet stage's n-gram baselines (token data) are rows of the report's table, in the reference style;
    the best mark stays among the families even where a baseline is better."""
    from pipeline.report_page import html_table, table_rows

    results = {"hmm": {"metrics": {"nll": 160.0, "bpd": 3.5, "perplexity": 11.5}, "nll_kind": "exact"}}
    floor = {"ngram": {"unigram": {"nll": 210.8, "bpd": 4.78, "perplexity": 27.43, "smoothing_k": 1e-3},
                       "bigram": {"nll": 151.4, "bpd": 3.43, "perplexity": 10.78, "smoothing_k": 0.3}}}
    rows = table_rows(results, floor)
    assert list(rows) == ["hmm", "unigram (add-k)", "bigram (add-k)"]
    rows["flow"] = {"nll": 170.0, "nll_kind": "exact"}
    assert best_per_column(rows)["nll"] == "hmm"  # not the bigram's 151.4
    page = html_table(rows)
    assert '<tr class="floor"><th>bigram (add-k)</th><td>exact</td><td>151.40</td><td>3.430</td><td>10.78</td>' in page
