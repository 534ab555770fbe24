"""The report page: the comparison table, sample grids, training and ROC curves, and config of a set of evaluated
runs, one self-contained HTML file. A row is a family of the pipeline (`pipeline/stages/report.py`,
`reports/index.html`) or a point of a sweep (`pipeline/stages/sweep_report.py`, `reports/sweeps/<id>.html`)."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Dict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from pipeline import tracking  # noqa: E402
from pipeline.evaluation.comparison import FLOOR_ROW, NGRAM_ROWS, REFERENCE_ROWS, best_per_column, cell, used_columns  # noqa: E402
from pipeline.paths import INDEX_HTML  # noqa: E402

CURVE_KEYS = ("train/loss", "val/loss", "val/fid")


def table_rows(results: Dict[str, dict], floor: dict) -> Dict[str, dict]:
    """The families' rows, then the reference rows the featnet stage measured: the real-data floor, and on token
    data the n-gram baselines."""
    rows = {f: {**r["metrics"], "nll_kind": r["nll_kind"]} for f, r in results.items()}
    floor_metrics = {k: v for k, v in floor.items()
                     if k in ("fid", "kid_mean", "precision", "recall", "cas", "logreg_acc", "accuracy")}
    if floor_metrics:
        rows[FLOOR_ROW] = floor_metrics
    for name, label in NGRAM_ROWS.items():
        if name in floor.get("ngram", {}):
            rows[label] = {**floor["ngram"][name], "nll_kind": "exact"}
    return rows


def metric_histories(cfg, results: Dict[str, dict]) -> Dict[str, Dict[str, list]]:
    c = tracking.client(cfg)
    out = {}
    for family, r in results.items():
        out[family] = {}
        for key in CURVE_KEYS:
            hist = sorted(c.get_metric_history(r["run_id"], key), key=lambda m: m.step)
            if hist:
                out[family][key] = [(m.step, m.value) for m in hist]
    return out


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _file_png(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def curves_figure(histories) -> str:
    families = [f for f in histories if histories[f]]
    cols = min(3, max(len(families), 1))
    rows = max(1, -(-len(families) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(families):]:
        ax.set_visible(False)
    for ax, family in zip(axes.flat, families):
        for key in ("train/loss", "val/loss"):
            pts = histories[family].get(key)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key)
        ax.set_title(family)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def roc_figure(results) -> str:
    """Each family's anomaly ROC (with `data.holdout_class`); empty when none has one."""
    if not any(r.get("curves", {}).get("roc") for r in results.values()):
        return ""
    fig, ax = plt.subplots(figsize=(4, 4))
    for family, r in results.items():
        roc = r.get("curves", {}).get("roc")
        if roc:
            auroc = r["metrics"].get("anomaly_auroc", float("nan"))
            ax.plot(roc["fpr"], roc["tpr"], label=f"{family} ({auroc:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("anomaly detection ROC")
    ax.legend(fontsize=7)
    return _png(fig)


def sample_tradeoff_figure(results, floor: dict) -> str:
    """FID against recall, and precision against recall: one curve per family with a sampling sweep (guidance
    scales, labelled), one point for every other family at its single setting. Empty when no
    family has a sweep."""
    if not any(r.get("curves", {}).get("sample_sweep") for r in results.values()):
        return ""
    fig, (ax_fid, ax_prec) = plt.subplots(1, 2, figsize=(8.4, 3.6))
    for family, r in results.items():
        m, points = r["metrics"], r.get("curves", {}).get("sample_sweep")
        if points:
            recall = [p["recall"] for p in points]
            line, = ax_fid.plot(recall, [p["fid"] for p in points], "o-", label=family)
            ax_prec.plot(recall, [p["precision"] for p in points], "o-", color=line.get_color(), label=family)
            for p in points:
                ax_fid.annotate(p["setting"], (p["recall"], p["fid"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
                ax_prec.annotate(p["setting"], (p["recall"], p["precision"]), fontsize=7, xytext=(3, 3),
                                 textcoords="offset points")
        elif all(isinstance(m.get(k), (int, float)) for k in ("fid", "precision", "recall")):
            point, = ax_fid.plot([m["recall"]], [m["fid"]], "s", label=family)
            ax_prec.plot([m["recall"]], [m["precision"]], "s", color=point.get_color(), label=family)
    if all(isinstance(floor.get(k), (int, float)) for k in ("fid", "precision", "recall")):
        ax_fid.plot([floor["recall"]], [floor["fid"]], "k*", markersize=9, label=FLOOR_ROW)
        ax_prec.plot([floor["recall"]], [floor["precision"]], "k*", markersize=9, label=FLOOR_ROW)
    ax_fid.set_xlabel("recall")
    ax_fid.set_ylabel("FID (lower is better)")
    ax_prec.set_xlabel("recall")
    ax_prec.set_ylabel("precision")
    ax_prec.legend(fontsize=7)
    fig.suptitle("sample quality against diversity")
    fig.tight_layout()
    return _png(fig)


def semi_supervised_section(results, floor: dict, labels_per_class) -> str:
    """With `data.labels_per_class`: each family's own semi-supervised classifier against the supervised-only
    baselines trained on the same labelled examples."""
    semi = {f: r for f, r in results.items() if "semi_acc" in r["metrics"]}
    if not semi:
        return ""
    best = max(semi, key=lambda f: semi[f]["metrics"]["semi_acc"])
    rows = []
    for f, r in semi.items():
        m, mark = r["metrics"], ' class="best"' if f == best else ""
        probe = f"{m['probe_acc_10']:.3f}" if "probe_acc_10" in m else "n/a"
        rows.append(f"<tr><th>{html.escape(f)}</th><td style='text-align:left'>"
                    f"{html.escape(r.get('semi_supervised_method') or '')}</td><td{mark}>{m['semi_acc']:.3f}</td>"
                    f"<td>{probe}</td></tr>")
    body = "".join(rows)
    baselines = [f"{name} {floor[key]:.3f}" for key, name in
                 (("semi_logreg_acc", "logistic regression on pixels"), ("semi_featnet_acc", "the featnet architecture"))
                 if key in floor]
    return (f"<h2>Semi-supervised learning: {labels_per_class} labels per class</h2><p>Each family trains its own "
            "semi-supervised method on the same split: the labelled examples by their class, the others with the class "
            "hidden. <i>semi-supervised acc</i> is the test accuracy of the family's classifier p(y | x); <i>probe acc "
            "(10/class)</i> a logistic regression on its features from 10 labels per class. Supervised-only baselines on "
            f"the same labelled examples: {', '.join(baselines) or 'n/a'}.</p><table><thead><tr><th>family</th>"
            "<th>method</th><th>semi-supervised acc</th><th>probe acc (10/class)</th></tr></thead>"
            f"<tbody>{body}</tbody></table>")


def html_table(rows: Dict[str, dict], row_heading: str = "family") -> str:
    cols = used_columns(rows)
    best = best_per_column(rows)
    head = "".join(f"<th>{html.escape(c.title)}</th>" for c in cols)
    body = []
    for family, row in rows.items():
        cells = []
        for c in cols:
            mark = ' class="best"' if best.get(c.key) == family else ""
            cells.append(f"<td{mark}>{html.escape(cell(row, c))}</td>")
        cls = ' class="floor"' if family in REFERENCE_ROWS else ""
        body.append(f"<tr{cls}><th>{html.escape(family)}</th>{''.join(cells)}</tr>")
    return f"<table><thead><tr><th>{html.escape(row_heading)}</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>genzoo report: {dataset}</title><style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse;font-size:14px}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} thead th{{background:#f0f0f0}}
tbody th{{text-align:left}} td.best{{background:#d8f5d0;font-weight:bold}} tr.floor{{color:#666;font-style:italic}}
.grids{{display:flex;flex-wrap:wrap;gap:1em}} figure{{margin:0;text-align:center}} pre{{background:#f7f7f7;padding:1em;font-size:12px}}
</style></head><body>
<h1>genzoo: {subject}</h1>
<p>Git commit <code>{commit}</code>. Best value per column in <b>green</b>; <i>n/a</i> where a metric has no meaning
for a family. NLL is in nats per example on the discrete data (bits/dim likewise); its kind says whether it is exact,
a lower bound on the log-likelihood (so an upper bound on NLL) or a stochastic estimate.{floor_note}</p>
<p>On labelled data each family models P(X, Y): <i>Bayes classifier acc</i> is argmax<sub>y</sub> log p(x | y) + log p(y)
on the test split; <i>cond. sample acc</i> is the featnet's accuracy on samples asked for a class (do they obey the label?);
<i>CAS</i> is the test accuracy of a featnet-sized classifier trained only on generated labelled examples (Ravuri &amp;
Vinyals 2019). The real-data row gives the discriminative baselines of the same budget: logistic regression on pixels, the
featnet, and the CAS classifier trained on the real training set.</p>
{table}
{semi}
<h2>Samples</h2><div class="grids">{grids}</div>
{class_grids}
{tradeoff}
<h2>Training curves</h2><img src="{curves}" style="max-width:100%" alt="training curves">
{roc}
<h2>Config</h2><pre>{config}</pre>
</body></html>
"""


def write_html(cfg, results, rows, histories, floor, path: Path = INDEX_HTML, subject: str = "",
               row_heading: str = "family") -> Path:
    """The page at `path`: one row (and sample grid, and training curves) per entry of `results`, a family of the
    pipeline or a point of a sweep (`pipeline.stages.sweep_report`)."""
    grids = "".join(
        f'<figure><img src="{_file_png(r["samples_png"])}" width="240" alt="{f} samples"><figcaption>{html.escape(f)}</figcaption></figure>'
        for f, r in results.items() if Path(r["samples_png"]).is_file()
    )
    class_grids = "".join(
        f'<figure><img src="{_file_png(r["class_samples_png"])}" width="240" alt="{f} samples by class">'
        f'<figcaption>{html.escape(f)}</figcaption></figure>'
        for f, r in results.items() if Path(r.get("class_samples_png", "")).is_file()
    )
    if class_grids:
        class_grids = f'<h2>Samples by class (row c: asked for class c)</h2><div class="grids">{class_grids}</div>'
    tradeoff = sample_tradeoff_figure(results, floor)
    if tradeoff:
        tradeoff = ("<h2>Sample quality against diversity</h2><p>Each point of a curve is one sampling setting of a "
                    "family (w: a classifier-free guidance scale, which trades recall for precision); the families "
                    "without a sweep are single points, the star is the real-data row.</p>"
                    f'<img src="{tradeoff}" alt="FID and precision against recall">')
    roc = roc_figure(results)
    if roc:
        roc = f'<h2>Anomaly detection</h2><img src="{roc}" alt="ROC curves">'
    note = (" The <i>real data</i> row is the test split scored against the train split: the floor no model is expected "
            "to beat." if floor else "")
    note += f" FID features: featnet classifier (test accuracy {floor['accuracy']:.3f})." if "accuracy" in floor else ""
    subject = subject or f"generative families on <code>{html.escape(cfg.data.dataset)}</code>"
    page = PAGE.format(dataset=html.escape(cfg.data.dataset), subject=subject, commit=tracking.git_commit(),
                       table=html_table(rows, row_heading), grids=grids, curves=curves_figure(histories), roc=roc,
                       config=html.escape(OmegaConf.to_yaml(cfg, resolve=True)), floor_note=note,
                       class_grids=class_grids, tradeoff=tradeoff,
                       semi=semi_supervised_section(results, floor, cfg.data.labels_per_class))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
