"""A run's report: one self-contained HTML file (pictures inlined, no network, a small script that sorts
tables) that tells what the run learned, from the files the run wrote (``dualcoop report RUN``).

What it shows: the settings and the number of learnable parameters (#P); the learning curves with the
picked epoch; each evaluated split's metrics, each with a one-line definition, beside the published
number where the run's settings match a published experiment (``REFERENCE_RESULTS``); per class, a
sortable table (AP, positives, prevalence, precision, recall and F1 at P+ > P-) and a chart of AP
against chance (the class's prevalence); precision-recall curves as small multiples; and for the worst
classes the most confident false positives and the missed positives, as thumbnails with the evidence
map of the class over the image. Scores come from ``scores/<split>.npz`` (the final evaluation wrote
them): nothing is scored again; only the thumbnails' maps run the model, on a few images.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np

from .._atomic import atomic_write_text
from ..errors import UsageError
from ..training.config import PRESETS, TrainConfig, preset_config
from ..training.datasets import fractions_in_words
from ..training.evaluation import METRIC_MEANINGS, SUMMARY_COLUMNS, TOP_K_COLUMNS, is_split, load_scores
from ..training.plots import selection_key
from ..version import __version__
from .maps import SCALE_TICKS, SCALE_TOP, VEIL, VEIL_OPACITY, evidence_summary, jpeg_bytes, overlay

# Published test mAP (%) of DualCoOp++ at the best epoch, by (dataset, image side, partial); the first
# author's run logs (kjmillerCURIS/dualcoopstarstar), RN101, the authors' protocol.
REFERENCE_RESULTS = {
    ("coco", 448, 0.1): 81.9,
    ("coco", 448, 0.3): 84.0,
    ("coco", 448, 0.6): 84.9,
    ("coco", 448, 0.8): 85.2,
    ("voc", 512, 0.1): 92.0,
    ("voc", 512, 0.3): 93.9,
    ("voc", 512, 0.5): 94.5,
    ("voc", 512, 0.7): 94.9,
    ("voc", 512, 0.9): 94.9,
}
REFERENCE_SOURCE = "the first author's run logs (github.com/kjmillerCURIS/dualcoopstarstar), test mAP at the best epoch"
SETTINGS_SHOWN = (
    "dataset", "root", "test_root", "protocol", "partial", "zero_shot", "backbone", "pretrained", "image_size",
    "n_ctx", "shared_contexts", "wta", "epochs", "batch_size", "lr", "loss_weight", "augment", "select_on", "seed",
    "features",
)  # fmt: skip
WORST_CLASSES, THUMBNAILS, THUMBNAIL_SIDE = 3, 4, 112
SMALL_MULTIPLES = 24  # precision-recall curves drawn: every class up to this many, else the worst and best
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd}table{border-collapse:collapse;margin:.5em 0}
td,th{padding:.2em .6em;border-bottom:1px solid #eee;text-align:right}td:first-child,th:first-child{text-align:left}
th.sortable{cursor:pointer;user-select:none}th.sortable:after{content:" \\2195";color:#aaa}
.note{color:#666;font-size:.9em}.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;font-size:.8em;text-align:center}figure img,figure svg{display:block;margin:auto}
figure img{border:1px solid #ccc}
"""
SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th.sortable").forEach(function (header, column) {
    header.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.from(body.rows);
      var descending = header.dataset.order !== "descending";
      rows.sort(function (a, b) {
        var x = a.cells[column].dataset.value, y = b.cells[column].dataset.value;
        var order = isNaN(x) || isNaN(y) ? String(x).localeCompare(String(y)) : Number(x) - Number(y);
        return descending ? -order : order;
      });
      header.dataset.order = descending ? "descending" : "ascending";
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def write_report(run, out=None, *, model=None) -> Path:
    """Write the report of the run in ``run`` to ``out`` (``run/report.html`` by default). ``model``: the
    run's best model, for the thumbnails' evidence maps (loaded from the run when None)."""
    run = Path(run)
    config = TrainConfig.load(run / "config.json")
    results = _read_json(run / "eval.json")
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    splits = {name: load_scores(run / "scores" / f"{name}.npz") for name, value in results.items() if is_split(value)}
    if model is None:
        from ..training.runs import load_best

        _, model, _ = load_best(run, "cpu")
    sections = [
        _settings_section(config, results),
        _findings_section(results),
        _curves_section(history, results.get("best_epoch")),
        _metrics_section(config, results),
        *(_classes_section(name, scored, results[name], model, config) for name, scored in splits.items()),
    ]
    page = _page(f"DualCoOp++ run: {run.name}", "".join(sections))
    out = Path(out) if out is not None else run / "report.html"
    atomic_write_text(out, page)
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"{path} cannot be read ({error}): has the run finished?") from error


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p class='note'>dualcoop_kernels {__version__}; every number below comes from the run's own files.</p>"
        f"{body}<script>{SORT_SCRIPT}</script></body></html>"
    )


def _table(headers: list[str], rows: list[list], sortable: bool = False) -> str:
    """An HTML table; each cell is a value or (shown text, sort value)."""
    css = " class='sortable'" if sortable else ""
    head = "".join(f"<th{css}>{html.escape(h)}</th>" for h in headers)
    cells = []
    for row in rows:
        pairs = [cell if isinstance(cell, tuple) else (cell, cell) for cell in row]
        tds = "".join(f"<td data-value='{html.escape(str(value))}'>{text}</td>" for text, value in pairs)
        cells.append(f"<tr>{tds}</tr>")
    return f"<table{css}><thead><tr>{head}</tr></thead><tbody>{''.join(cells)}</tbody></table>"


def _cell(value, digits: int = 2) -> tuple[str, float]:
    return (f"{value:.{digits}f}", value) if value is not None and not math.isnan(value) else ("-", -1)


def _settings_section(config: TrainConfig, results: dict) -> str:
    """The settings as the run had them: beside ``partial`` the labels actually known, and the
    augmentation the training images actually had (none from a cache of the test transform)."""
    values = {name: str(value) for name, value in config.as_dict().items()}
    known = results.get("labels_known")
    if known:
        values["partial"] += f"; labels known: {fractions_in_words(known)}"
    if results.get("augmentation"):
        values["augment"] = f"{results['augmentation']} (--augment {config.augment})"
    rows = [[name, html.escape(values[name])] for name in SETTINGS_SHOWN]
    parameters = results.get("learnable_parameters")
    rows.insert(0, ["learnable parameters (#P)", f"{parameters:,}" if parameters else "-"])
    picked = f"epoch {results.get('best_epoch')}, by {results.get('selection_metric')} on {results.get('selected_on')}"
    rows.insert(1, ["picked", picked])
    return "<h2>Settings</h2>" + _table(["setting", "value"], rows)


def _findings_section(results: dict) -> str:
    """What makes the run's numbers worth less than they look, from the run and from each split:
    the warnings the run gave at its start and its end, in one list."""
    if "findings" not in results:
        return (
            "<h2 id='findings'>Findings</h2><p>Not checked: the run was evaluated by a version before 0.2.0, "
            "which looked for none. <code>dualcoop eval RUN</code> checks it now.</p>"
        )
    findings = [html.escape(finding) for finding in results["findings"]]
    for name, metrics in results.items():
        if is_split(metrics):
            findings += [f"{html.escape(name)}: {html.escape(finding)}" for finding in metrics.get("findings", [])]
    if not findings:
        return (
            "<h2 id='findings'>Findings</h2><p>None: every split's mAP is clearly above chance, the predictions "
            "depend on the image, and the data and the pick raised no warning.</p>"
        )
    items = "".join(f"<li>{finding}</li>" for finding in findings)
    return (
        "<h2 id='findings'>Findings</h2><p class='note'>What makes the numbers below worth less than they look "
        f"(the run's warnings).</p><ul class='findings'>{items}</ul>"
    )


def _curves_section(history: list[dict], best_epoch) -> str:
    if not history:
        return ""
    score_key = selection_key(history)
    epochs = [record["epoch"] for record in history]
    loss = _line_chart(epochs, [r["train_loss"] for r in history], "training loss", best_epoch)
    score = _line_chart(epochs, [r[score_key] for r in history], score_key.replace("_", " "), best_epoch)
    note = f"<p class='note'>The dashed line marks the picked epoch ({best_epoch}).</p>"
    return f"<h2>Learning curves</h2><div class='grid'>{loss}{score}</div>{note}"


def _line_chart(xs, ys, label: str, marked=None, width=420, height=220) -> str:
    """An SVG line chart with axes' ranges, a label and a dashed line at x = ``marked``."""
    left, bottom, top, right = 48, 28, 16, 12
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(max(ys), min(ys) + 1e-9)

    def point(x, y):
        return (
            left + (x - x0) / (x1 - x0) * (width - left - right),
            top + (y1 - y) / (y1 - y0) * (height - top - bottom),
        )

    path = " ".join(f"{px:.1f},{py:.1f}" for px, py in (point(x, y) for x, y in zip(xs, ys)))
    mark = ""
    if marked is not None:
        mx = point(marked, y0)[0]
        mark = (
            f"<line x1='{mx:.1f}' x2='{mx:.1f}' y1='{top}' y2='{height - bottom}' stroke='green' stroke-dasharray='4'/>"
        )
    return (
        f"<svg width='{width}' height='{height}' role='img' aria-label='{html.escape(label)}'>"
        f"<rect x='{left}' y='{top}' width='{width - left - right}' height='{height - top - bottom}' "
        "fill='none' stroke='#ccc'/>"
        f"{mark}<polyline points='{path}' fill='none' stroke='#1f77b4' stroke-width='2'/>"
        f"<text x='{left}' y='{height - 8}' font-size='11'>epoch {x0} to {x1}</text>"
        f"<text x='4' y='{top + 10}' font-size='11'>{y1:.3g}</text>"
        f"<text x='4' y='{height - bottom}' font-size='11'>{y0:.3g}</text>"
        f"<text x='{width - right}' y='{top + 12}' font-size='12' text-anchor='end'>{html.escape(label)}</text></svg>"
    )


def reference_result(config: TrainConfig) -> float | None:
    """The published test mAP of the experiment the run repeats, where there is one: the dataset's
    preset in every setting (the authors' weights, schedule, contexts, WTA, loss and augmentation), and
    a proportion of known labels that was published."""
    if config.dataset not in PRESETS or config.pretrained != "openai" or config.protocol != "dualcoop++":
        return None
    preset = TrainConfig(**{**preset_config(config.dataset), "root": config.root, "partial": config.partial})
    same = ("backbone", "image_size", "n_ctx", "shared_contexts", "wta", "freeze_temperature", "epochs", "batch_size")
    same += ("lr",)
    same += ("warmup_lr", "momentum", "weight_decay", "gamma_neg", "gamma_pos", "asl_clip", "loss_weight")
    same += ("crop_scale", "augment", "zero_shot", "features")
    if any(getattr(config, name) != getattr(preset, name) for name in same):
        return None
    return REFERENCE_RESULTS.get((config.dataset, config.image_size, round(config.partial, 2)))


def _metrics_section(config: TrainConfig, results: dict) -> str:
    reference = reference_result(config)
    rows = []
    for name, metrics in results.items():
        if not is_split(metrics):
            continue
        top = metrics.get("top_k") or {}
        values = [metrics.get("mAP"), metrics.get("chance_mAP"), *(metrics.get(key) for key in SUMMARY_COLUMNS[1:])]
        values += [top.get(key) for _, key in TOP_K_COLUMNS]
        published = _cell(reference) if reference is not None and name == "test" else ("-", -1)
        rows.append([name, metrics.get("images", "-"), *(_cell(v) for v in values), published])
    k = next((m["top_k"]["k"] for m in results.values() if is_split(m) and m.get("top_k")), 3)
    top_k_headers = [f"{label}@{k}" for label, _ in TOP_K_COLUMNS]
    headers = ["split", "images", "mAP", "chance mAP", *SUMMARY_COLUMNS[1:], *top_k_headers, "published mAP"]
    notes = [f"<li>{html.escape(line)}</li>" for line in METRIC_MEANINGS]
    notes += [
        f"<li>{html.escape(name)}: {html.escape(m['unknown_labels'])}</li>"
        for name, m in results.items()
        if is_split(m) and m.get("unknown_labels")
    ]
    source = (
        f"published mAP: {REFERENCE_SOURCE}"
        if reference is not None
        else "published mAP: no published experiment has these settings"
    )
    notes.append(f"<li>{html.escape(source)}</li>")
    return "<h2>Results</h2>" + _table(headers, rows) + f"<ul class='note'>{''.join(notes)}</ul>"


def _classes_section(name: str, scored: dict, metrics: dict, model, config: TrainConfig) -> str:
    """Per class: the sortable table, AP against chance, precision-recall curves, the worst classes' errors."""
    from ..metrics import threshold_metrics

    scores, labels, classnames = scored["scores"], scored["labels"], scored["classnames"]
    known = labels != 0
    positives = ((labels == 1) & known).sum(axis=0)
    prevalence = positives / np.maximum(known.sum(axis=0), 1)
    ap = np.array([metrics["per_class_AP"][c] for c in classnames])
    thresholded = threshold_metrics(scores, labels, known=known)
    rows = [
        [html.escape(c), _cell(ap[i]), int(positives[i]), _cell(100 * prevalence[i], 1)]
        + [_cell(thresholded[f"per_class_{key}"][i], 1) for key in ("precision", "recall", "f1")]
        for i, c in enumerate(classnames)
    ]
    headers = ["class", "AP", "positives", "chance AP (prevalence %)", "precision", "recall", "F1"]
    table = _table(headers, rows, sortable=True)
    chart = _ap_chart(classnames, ap, 100 * prevalence)
    curves = _pr_curves(scores, labels, classnames, ap)
    worst = _worst_classes(name, scored, ap, positives, model, config)
    return (
        f"<h2>Classes: {html.escape(name)}</h2><p class='note'>Click a column's header to sort by it. "
        "Precision, recall and F1 of the predictions P+ &gt; P-, over the known labels.</p>"
        f"{table}<h3>AP against chance</h3>{chart}<h3>Precision-recall curves</h3>{curves}{worst}"
    )


def _ap_chart(classnames, ap, chance, height=220, named_up_to=100) -> str:
    """Bars of each class's AP, best first, each named below its bar (up to ``named_up_to`` classes;
    beyond, in the bars' tooltips), with a red tick at chance (a random ranking's AP: the prevalence)."""
    order = np.argsort(-ap, kind="stable")
    named = len(order) <= named_up_to
    bar = max(12 if named else 2, min(24, 1000 // max(len(order), 1)))
    axis, names = height - 20, 110 if named else 0
    width = max(320, 40 + bar * len(order))
    parts = [f"<svg width='{width}' height='{height + names}' role='img' aria-label='AP per class'>"]
    for slot, i in enumerate(order):
        x, h = 40 + slot * bar, axis * ap[i] / 100
        tick = axis - axis * chance[i] / 100
        parts.append(
            f"<rect x='{x}' y='{axis - h:.1f}' width='{bar - 1}' height='{h:.1f}' fill='#1f77b4'>"
            f"<title>{html.escape(classnames[i])}: AP {ap[i]:.1f}, chance {chance[i]:.1f}</title></rect>"
            f"<line x1='{x}' x2='{x + bar - 1}' y1='{tick:.1f}' y2='{tick:.1f}' stroke='red' stroke-width='2'/>"
        )
        if named:
            centre = x + bar / 2 + 3
            parts.append(
                f"<text x='{centre:.1f}' y='{axis + 8}' font-size='10' text-anchor='end' "
                f"transform='rotate(-60 {centre:.1f} {axis + 8})'>{html.escape(classnames[i][:20])}</text>"
            )
    caption = "classes, best AP first; red: chance" + ("" if named else " (names in the bars' tooltips)")
    parts.append(f"<text x='2' y='12' font-size='11'>100</text><text x='2' y='{axis}' font-size='11'>0</text>")
    parts.append(f"<text x='40' y='{height + names - 4}' font-size='11'>{caption}</text></svg>")
    return f"<div style='overflow-x:auto'>{''.join(parts)}</div>"


def _pr_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Recall and precision at every rank of one class's known labels."""
    known = labels != 0
    order = np.argsort(-scores[known], kind="stable")
    hits = (labels[known][order] == 1).astype(float)
    found = np.cumsum(hits)
    return found / max(hits.sum(), 1), found / np.arange(1, len(hits) + 1)


def _pr_curves(scores, labels, classnames, ap, side=120) -> str:
    order = np.argsort(ap, kind="stable")
    shown = (
        order if len(order) <= SMALL_MULTIPLES else np.r_[order[: SMALL_MULTIPLES // 2], order[-SMALL_MULTIPLES // 2 :]]
    )
    figures = []
    for i in shown:
        recall, precision = _pr_curve(scores[:, i], labels[:, i])
        points = " ".join(f"{4 + r * (side - 8):.1f},{4 + (1 - p) * (side - 8):.1f}" for r, p in zip(recall, precision))
        figures.append(
            f"<figure><svg width='{side}' height='{side}' role='img' "
            f"aria-label='precision-recall of {html.escape(classnames[i])}'>"
            f"<rect x='4' y='4' width='{side - 8}' height='{side - 8}' fill='none' stroke='#ccc'/>"
            f"<polyline points='{points}' fill='none' stroke='#1f77b4'/></svg>"
            f"{html.escape(classnames[i])} (AP {ap[i]:.1f})</figure>"
        )
    note = (
        ""
        if len(order) <= SMALL_MULTIPLES
        else f"<p class='note'>The {SMALL_MULTIPLES // 2} worst and best of {len(order)} classes.</p>"
    )
    return f"{note}<p class='note'>Recall across, precision up.</p><div class='grid'>{''.join(figures)}</div>"


def _worst_classes(split: str, scored: dict, ap, positives, model, config: TrainConfig) -> str:
    """The worst classes' most confident false positives and their lowest-scored positives."""
    from ..training.evaluation import model_for

    scores, labels, paths, classnames = scored["scores"], scored["labels"], scored["paths"], scored["classnames"]
    scoring = model_for(model, config, classnames)
    worst = [i for i in np.argsort(ap, kind="stable") if positives[i] > 0][:WORST_CLASSES]
    blocks = []
    for c in worst:
        negatives, hits = np.flatnonzero(labels[:, c] == -1), np.flatnonzero(labels[:, c] == 1)
        false = negatives[np.argsort(-scores[negatives, c], kind="stable")][:THUMBNAILS]
        missed = hits[np.argsort(scores[hits, c], kind="stable")][:THUMBNAILS]
        row = "".join(_thumbnail(paths[i], scoring, c, config, "false positive", scores[i, c]) for i in false)
        row += "".join(_thumbnail(paths[i], scoring, c, config, "positive", scores[i, c]) for i in missed)
        blocks.append(f"<h4>{html.escape(classnames[c])} (AP {ap[c]:.1f})</h4><div class='grid'>{row}</div>")
    intro = (
        f"<h3>The worst classes of {html.escape(split)}: their most confident false positives and lowest-scored "
        "positives</h3><p class='note'>Under each image: its probability of the class, sigmoid(P+ - P-), with "
        "the score P+ - P- that ranks it. Red: where the class finds its evidence (the softmax over regions that "
        "weighs the region logits), on the scale below, the one dualcoop explain draws.</p>" + _colour_bar()
    )
    return intro + "".join(blocks) if blocks else ""


def _colour_bar() -> str:
    """The veils' scale (reports/maps.py) as a CSS gradient with its ticks, in multiples of uniform."""
    red = ",".join(str(round((1 - VEIL_OPACITY) * 160 + VEIL_OPACITY * value)) for value in VEIL)  # over grey
    ticks = "".join(
        f"<span style='position:absolute;left:{100 * t / SCALE_TOP:.1f}%'>{t}{'+' if t == SCALE_TOP else ''}</span>"
        for t in SCALE_TICKS
    )
    return (
        "<div class='note' style='width:320px;margin:.5em 0 1.5em'>evidence, in multiples of uniform (1: spread "
        f"evenly over the regions)<div style='height:12px;background:linear-gradient(to right,rgb(160,160,160),"
        f"rgb({red}))'></div><div style='position:relative;height:1.2em'>{ticks}</div></div>"
    )


def _thumbnail(path: str, model, class_index: int, config: TrainConfig, kind: str, score: float) -> str:
    """A small JPEG of the image with the class's evidence map over it, inlined, captioned with what it
    is (a false positive, a positive), its probability and its score; a placeholder when the image
    cannot be read (moved since the run)."""
    from ..data import load_image
    from ..data.transforms import test_transform

    caption = f"{kind}: probability {1 / (1 + math.exp(-score)):.2f} (P+ - P- {score:.2f})"
    try:
        image = load_image(Path(path), "report")
    except (OSError, ValueError):
        return f"<figure><div style='width:{THUMBNAIL_SIDE}px'>image not found</div>{html.escape(caption)}</figure>"
    import torch

    with torch.no_grad():
        tensor = test_transform(config.image_size, config.protocol)(image)[None]
        evidence = model.region_maps(tensor)["evidence"][0, class_index]
    data = base64.b64encode(jpeg_bytes(overlay(image, evidence, THUMBNAIL_SIDE))).decode()
    return (
        f"<figure><img width='{THUMBNAIL_SIDE}' height='{THUMBNAIL_SIDE}' alt='{html.escape(Path(path).name)}' "
        f"src='data:image/jpeg;base64,{data}'>{html.escape(Path(path).name)}<br>{html.escape(caption)}<br>"
        f"{html.escape(evidence_summary(evidence))}</figure>"
    )
