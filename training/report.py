"""`report.html`: a model's evidence in one self-contained page, written beside `model.pt`.

`python -m training train` writes it for the test split after every export, `python -m training evaluate
--report` for the split it evaluated; the service serves the served model's at `GET /model/report`. Every
figure is drawn with matplotlib and embedded as a data: URL (SVG, or JPEG for the gallery's photos), the style
sheet is inline and there is no script, so the file opens anywhere, offline, and under the service's strict
Content-Security-Policy for it (app/routes.py).

What it shows, from the scored pairs of one split and the manifest: the ROC curve with the threshold marked,
the score histograms of similar and dissimilar pairs, a reliability diagram of the calibrated score, the
confusion matrix, accuracy per pair of classes, the learning curves (the manifest's `training.history`), the
faithfulness curves (the manifest's `metrics.faithfulness`, when measured) and a gallery of the most confident
right and wrong pairs with their factual Grad-CAM maps.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from jinja2 import Environment
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from contract.explainers import decide, gradcam
from contract.manifest import REPORT_FILE, Manifest
from contract.preprocess import normalize
from training.metrics import pair_metrics

GALLERY_PAIRS = 4  # of each kind: right, wrong
RELIABILITY_BINS = 10
SIMILAR_COLOUR, DISSIMILAR_COLOUR, THRESHOLD_COLOUR = "#1a7f37", "#9a6700", "#cf222e"
ORDER_NAMES = {"gradcam": "Grad-CAM", "contributions": "exact contributions", "random": "random order"}
# One rcParams set for every figure: text kept as text (smaller, searchable) and no date or random ids in the
# SVG, so the same model and pairs give the same figures.
FIGURE_STYLE = {"svg.fonttype": "none", "svg.hashsalt": "siamcam", "font.size": 10, "axes.spines.top": False,
                "axes.spines.right": False}


@dataclass(frozen=True)
class ScoredPairs:
    """One split's pairs as the model scored them: what every figure but the learning curves is drawn from."""

    split: str
    images: torch.Tensor  # uint8 [N, 3, H, W] at the model's input size
    labels: list[int]  # class index of each image
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray]  # positions in images (first, second) and target (1: similar)
    scores: np.ndarray  # [pairs]


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    text: str  # what the figure shows and how to read it
    image: str | None = None  # data: URL
    alt: str = ""
    absent: str | None = None  # why there is no figure
    table: list[list[str]] | None = None  # first row is the header


def write_report(model_dir: Path, manifest: Manifest, module: torch.jit.ScriptModule, scored: ScoredPairs,
                 command: str) -> Path:
    """Write model_dir/report.html for `scored` pairs of the model in model_dir; returns its path."""
    targets, scores = scored.pairs[2].astype(int), scored.scores
    threshold = manifest.threshold
    metrics = pair_metrics(targets, scores, threshold)
    classes = list(manifest.dataset.get("classes") or [str(label) for label in sorted(set(scored.labels))])
    with matplotlib.rc_context(FIGURE_STYLE):
        sections = [
            _roc(targets, scores, threshold),
            _histograms(targets, scores, threshold),
            _reliability(targets, scores),
            _confusion(metrics["confusion_matrix"]),
            _class_pairs(scored, classes, threshold),
            _learning_curves(manifest.training.get("history")),
            _faithfulness(manifest.metrics.get("faithfulness")),
        ]
    gallery = _gallery(module, manifest, scored, classes)
    html = _TEMPLATE.render(
        manifest=manifest, scored=scored, metrics=metrics, classes=classes, sections=sections, gallery=gallery,
        command=command, written=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        recorded={split: manifest.metrics[split] for split in ("validation", "test") if split in manifest.metrics},
        seen_in_training=scored.split in ("all", "train"), GALLERY_PAIRS=GALLERY_PAIRS,
    )
    path = model_dir / REPORT_FILE
    path.write_text(html, encoding="utf-8")
    return path


# -- figures -----------------------------------------------------------------------------------------------

def _data_url(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _roc(targets: np.ndarray, scores: np.ndarray, threshold: float) -> Section:
    false_positive, true_positive, _ = roc_curve(targets, scores)
    decided = scores >= threshold
    at_threshold = (float(decided[targets == 0].mean()), float(decided[targets == 1].mean()))
    figure = Figure(figsize=(4.6, 4.2))
    axes = figure.subplots()
    axes.plot(false_positive, true_positive, color="#1f5fbf", label=f"ROC AUC {roc_auc_score(targets, scores):.4f}")
    axes.plot([0, 1], [0, 1], color="#8c959f", linestyle=":", label="chance")
    axes.plot(*at_threshold, "o", color=THRESHOLD_COLOUR, label=f"threshold {threshold:.4f}")
    axes.set(xlabel="false positive rate (dissimilar pairs called similar)",
             ylabel="true positive rate (similar pairs called similar)", xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower right")
    return Section("roc", "ROC curve", "Every threshold's trade-off between similar pairs found and dissimilar "
                   f"pairs let through; the dot is the model's threshold: {at_threshold[1]:.1%} of similar pairs "
                   f"called similar, {at_threshold[0]:.1%} of dissimilar ones.", _data_url(figure),
                   "ROC curve with the threshold marked")


def _histograms(targets: np.ndarray, scores: np.ndarray, threshold: float) -> Section:
    figure = Figure(figsize=(6.4, 3.6))
    axes = figure.subplots()
    bins = np.linspace(0, 1, 41)
    axes.hist(scores[targets == 1], bins=bins, color=SIMILAR_COLOUR, alpha=0.6,
              label=f"similar pairs ({int((targets == 1).sum())})")
    axes.hist(scores[targets == 0], bins=bins, color=DISSIMILAR_COLOUR, alpha=0.6,
              label=f"dissimilar pairs ({int((targets == 0).sum())})")
    axes.axvline(threshold, color=THRESHOLD_COLOUR, linestyle="--", label=f"threshold {threshold:.4f}")
    axes.set(xlabel="score", ylabel="pairs", xlim=(0, 1))
    axes.legend(loc="upper center")
    return Section("score-histograms", "Scores of similar and dissimilar pairs",
                   "How the scores of the two kinds of pair spread; the pairs on the wrong side of the dashed "
                   "threshold are the mistakes.", _data_url(figure), "histograms of the scores per kind of pair")


def _reliability(targets: np.ndarray, scores: np.ndarray) -> Section:
    edges = np.linspace(0, 1, RELIABILITY_BINS + 1)
    bins = np.clip(np.digitize(scores, edges[1:-1]), 0, RELIABILITY_BINS - 1)
    counts = np.bincount(bins, minlength=RELIABILITY_BINS)
    filled = counts > 0
    mean_score = np.bincount(bins, weights=scores, minlength=RELIABILITY_BINS)[filled] / counts[filled]
    similar_fraction = np.bincount(bins, weights=targets, minlength=RELIABILITY_BINS)[filled] / counts[filled]
    calibration_error = float((counts[filled] / len(scores) * np.abs(similar_fraction - mean_score)).sum())
    brier = float(np.mean((scores - targets) ** 2))
    figure = Figure(figsize=(4.6, 4.2))
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], color="#8c959f", linestyle=":", label="perfectly calibrated")
    axes.plot(mean_score, similar_fraction, "-o", color="#1f5fbf", label="this model")
    for x, y, count in zip(mean_score, similar_fraction, counts[filled], strict=True):
        axes.annotate(str(count), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7, color="#5b6570")
    axes.set(xlabel="mean score in the bin", ylabel="fraction of similar pairs", xlim=(0, 1), ylim=(0, 1))
    axes.legend(loc="upper left")
    return Section("reliability", "Reliability of the score",
                   f"Pairs grouped in {RELIABILITY_BINS} bins of score (the small numbers count them): a calibrated "
                   "score lies on the diagonal, a score of 0.8 meaning 8 pairs in 10 like it are similar. Expected "
                   f"calibration error {calibration_error:.4f}, Brier score {brier:.4f}. The score was calibrated "
                   "(Platt scaling) on validation pairs, half of them similar, as here.", _data_url(figure),
                   "reliability diagram")


def _confusion(matrix: list[list[int]]) -> Section:
    counts = np.asarray(matrix)
    figure = Figure(figsize=(4.2, 3.6))
    axes = figure.subplots()
    axes.imshow(counts / counts.sum(axis=1, keepdims=True).clip(min=1), cmap="Blues", vmin=0, vmax=1)
    labels = ["dissimilar", "similar"]
    for row in range(2):
        for column in range(2):
            share = counts[row, column] / max(counts[row].sum(), 1)
            axes.text(column, row, f"{counts[row, column]}\n{share:.1%}", ha="center", va="center",
                      color="white" if share > 0.5 else "black")
    axes.set(xticks=[0, 1], yticks=[0, 1], xticklabels=labels, yticklabels=labels, xlabel="decision",
             ylabel="truth")
    axes.spines[:].set_visible(False)
    return Section("confusion-matrix", "Confusion matrix",
                   "Rows are the truth, columns the decision at the threshold; each cell counts pairs and gives "
                   "their share of the row.", _data_url(figure), "confusion matrix")


def class_pair_accuracy(scored: ScoredPairs, classes_count: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy [C, C] and pair counts [C, C] per unordered pair of classes (symmetric; NaN where no pair): the
    diagonal holds the similar pairs of each class, the rest the dissimilar pairs of two classes."""
    first, second, targets = scored.pairs
    labels = np.asarray(scored.labels)
    a, b = labels[first], labels[second]
    correct = ((scored.scores >= threshold) == (targets > 0.5)).astype(float)
    counts = np.zeros((classes_count, classes_count))
    hits = np.zeros((classes_count, classes_count))
    np.add.at(counts, (a, b), 1)
    np.add.at(hits, (a, b), correct)
    counts = counts + counts.T - np.diag(np.diag(counts))
    hits = hits + hits.T - np.diag(np.diag(hits))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, hits / counts, np.nan), counts


def _class_pairs(scored: ScoredPairs, classes: list[str], threshold: float) -> Section:
    accuracy, counts = class_pair_accuracy(scored, len(classes), threshold)
    side = min(2.4 + 0.55 * len(classes), 11)
    figure = Figure(figsize=(side + 1.2, side))
    axes = figure.subplots()
    shown = axes.imshow(np.ma.masked_invalid(accuracy), cmap="RdYlGn", vmin=0.5, vmax=1)
    figure.colorbar(shown, ax=axes, shrink=0.8, label="accuracy")
    if len(classes) <= 12:
        for row in range(len(classes)):
            for column in range(len(classes)):
                if counts[row, column]:
                    axes.text(column, row, f"{accuracy[row, column]:.2f}\n{int(counts[row, column])}",
                              ha="center", va="center", fontsize=7)
    ticks = range(len(classes))
    axes.set(xticks=ticks, yticks=ticks)
    axes.set_xticklabels(classes, rotation=45, ha="right")
    axes.set_yticklabels(classes)
    axes.spines[:].set_visible(False)
    pairs = [(accuracy[row, column], int(counts[row, column]), row, column)
             for row in range(len(classes)) for column in range(row, len(classes)) if counts[row, column]]
    worst = sorted(pairs)[:5]
    table = [["classes", "kind", "pairs", "accuracy"]] + [
        [f"{classes[row]} / {classes[column]}", "similar" if row == column else "dissimilar", str(count),
         f"{value:.3f}"] for value, count, row, column in worst]
    return Section("class-pairs", "Accuracy per pair of classes",
                   "Each cell: the accuracy on the pairs of those two classes, and how many there were. The diagonal "
                   "holds the similar pairs of one class (a low one: the class looks unlike itself), the other cells "
                   "the dissimilar pairs of two classes (a low one: the model confuses them). The table lists the "
                   "weakest.", _data_url(figure), "accuracy per pair of classes", table=table)


def _learning_curves(history: list[dict[str, Any]] | None) -> Section:
    title = "Learning curves"
    if not history:
        return Section("learning-curves", title, "", absent=(
            "This model's manifest records no per-epoch history (training.history): it was trained before "
            "training recorded one. Retrain it to see its loss and validation ROC AUC per epoch."))
    figure = Figure(figsize=(9, 3.4))
    loss_axes, auc_axes = figure.subplots(1, 2)
    steps = np.arange(1, len(history) + 1)
    stages = list(dict.fromkeys(record["stage"] for record in history))
    colours = dict(zip(stages, ("#8250df", "#1f5fbf", "#bf3989"), strict=False))
    for stage in stages:
        where = [index for index, record in enumerate(history) if record["stage"] == stage]
        for axes, key in ((loss_axes, "loss"), (auc_axes, "validation_roc_auc")):
            axes.plot(steps[where], [history[index][key] for index in where], "-o", markersize=3,
                      color=colours[stage], label=f"{stage} stage")
    best = max(range(len(history)), key=lambda index: history[index]["validation_roc_auc"])
    auc_axes.plot(steps[best], history[best]["validation_roc_auc"], "*", markersize=12, color=THRESHOLD_COLOUR,
                  label="kept (best)")
    loss_axes.set(xlabel="epoch (all stages)", ylabel="training loss")
    auc_axes.set(xlabel="epoch (all stages)", ylabel="validation ROC AUC")
    for axes in (loss_axes, auc_axes):
        axes.legend()
    figure.tight_layout()
    return Section("learning-curves", title,
                   "Training loss and validation ROC AUC after each epoch, per stage (each stage has its own loss: "
                   "the warm-up's classification loss is not the pair stage's). The star marks the epoch whose "
                   "weights were kept.", _data_url(figure), "learning curves")


def _faithfulness(result: dict[str, Any] | None) -> Section:
    title = "Faithfulness of the explanations"
    if not result:
        return Section("faithfulness", title, "", absent=(
            "Not measured for this model: python -m training evaluate --model DIR --data DATASET --split test "
            "--faithfulness --report measures it and redraws this report."))
    text = (f"Image 1's {result['grid'][0]} x {result['grid'][1]} cells removed (deletion) or restored (insertion), "
            f"most important first, on {result['pairs']} {result['split']} pairs: the probability of the decided "
            "class should fall fast when deleting (small area) and rise fast when inserting (large area); the "
            "random order is the baseline. Areas in the legend.")
    figure = Figure(figsize=(9, 3.4))
    all_axes = figure.subplots(1, 2)
    curves = result.get("curves")
    for axes, curve in zip(all_axes, ("deletion", "insertion"), strict=True):
        for order, area in result[curve].items():
            label = f"{ORDER_NAMES.get(order, order)} ({area:.4f})"
            if curves:
                values = curves[curve][order]
                axes.plot(np.linspace(0, 1, len(values)), values, label=label,
                          linestyle=":" if order == "random" else "-")
            else:
                axes.bar(label, area)
        axes.set(title=curve, ylim=(0, 1.02), ylabel="probability of the decided class" if curves else "area",
                 xlabel="fraction of cells" if curves else "")
        if curves:
            axes.legend(loc="lower right" if curve == "insertion" else "upper right", fontsize=8)
        else:
            axes.tick_params(axis="x", labelrotation=20)
    figure.tight_layout()
    if not curves:
        text += (" Only the areas were recorded for this measurement (as bars); measuring again with this "
                 "version records the curves too.")
    return Section("faithfulness", title, text, _data_url(figure), "deletion and insertion curves")


# -- gallery -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GalleryPair:
    first: str  # data: URL of image 1 with its factual map
    second: str
    caption: str


def _gallery(module: torch.jit.ScriptModule, manifest: Manifest, scored: ScoredPairs,
             classes: list[str]) -> dict[str, list[GalleryPair]]:
    """The most confident right and wrong pairs, each image with its factual Grad-CAM map."""
    first, second, targets = scored.pairs
    decided = scored.scores >= manifest.threshold
    confidence = np.where(decided, scored.scores, 1 - scored.scores)  # the decided class's probability
    right = decided == (targets > 0.5)
    chosen = {kind: [int(i) for i in np.flatnonzero(mask)[np.argsort(-confidence[mask], kind="stable")]]
              [:GALLERY_PAIRS] for kind, mask in (("right", right), ("wrong", ~right))}
    everything = chosen["right"] + chosen["wrong"]
    if not everything:
        return {"right": [], "wrong": []}
    images1, images2 = scored.images[first[everything]], scored.images[second[everything]]
    decided_pairs = decide(module, normalize(images1, manifest.normalization),
                           normalize(images2, manifest.normalization), manifest.threshold)
    maps = gradcam.explain(module, decided_pairs.feature_maps1, decided_pairs.feature_maps2, decided_pairs.similar,
                           tuple(images1.shape[-2:]))
    labels = np.asarray(scored.labels)
    pictures = []
    for position, pair in enumerate(everything):
        truth = "similar" if targets[pair] > 0.5 else "dissimilar"
        decision = "similar" if decided[pair] else "dissimilar"
        caption = (f"{classes[labels[first[pair]]]} and {classes[labels[second[pair]]]}: score "
                   f"{scored.scores[pair]:.3f}, decided {decision}, truly {truth}")
        pictures.append(GalleryPair(_overlay(images1[position], maps.factual1[position]),
                                    _overlay(images2[position], maps.factual2[position]), caption))
    return {"right": pictures[:len(chosen["right"])], "wrong": pictures[len(chosen["right"]):]}


def _overlay(picture: torch.Tensor, heatmap: torch.Tensor, opacity: float = 0.5) -> str:
    """A JPEG data: URL of the uint8 picture [3, H, W] with the map in [0, 1] drawn over it (jet, as the service
    draws by default)."""
    colours = matplotlib.colormaps["jet"](heatmap.detach().numpy())[..., :3] * 255
    blended = (1 - opacity) * picture.permute(1, 2, 0).numpy() + opacity * colours
    buffer = io.BytesIO()
    Image.fromarray(blended.round().clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_TEMPLATE = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True).from_string("""\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>siamcam model report: {{ manifest.name }} {{ manifest.version }}</title>
<style>
  body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d232a; line-height: 1.45;
         max-width: 64rem; margin: 0 auto; padding: 1rem; }
  h1 { margin-bottom: 0.25rem; }
  .muted { color: #5b6570; }
  table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
  th, td { border: 1px solid #c9d1d9; padding: 0.25rem 0.6rem; text-align: left; }
  td.number { text-align: right; font-variant-numeric: tabular-nums; }
  section { margin: 2rem 0; }
  figure { margin: 0.5rem 0; }
  figure img { max-width: 100%; height: auto; }
  .absent { padding: 0.5rem 1rem; border-left: 4px solid #9a6700; background: #fff8c5; }
  .gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(20rem, 1fr)); gap: 1rem; }
  .gallery figure { display: flex; flex-wrap: wrap; gap: 0.25rem; }
  .gallery img { width: calc(50% - 0.125rem); border-radius: 0.25rem; }
  .gallery figcaption { flex-basis: 100%; font-size: 0.9rem; }
  code { background: #f6f8fa; padding: 0 0.2rem; }
</style>
</head>
<body>
<header>
  <h1>Model report: {{ manifest.name }} {{ manifest.version }}</h1>
  <p class="muted">{{ manifest.backbone }}, input {{ manifest.input_size[0] }} x {{ manifest.input_size[1] }} px,
    format version {{ manifest.format_version }}, exported {{ manifest.created_at }}, model.pt sha256
    {{ manifest.sha256[:12] }}&hellip;; report written {{ written }} by <code>{{ command }}</code>.</p>
</header>

<section id="summary">
  <h2>Summary</h2>
  <p>Evaluated on the <strong>{{ scored.split }}</strong> split of
    <strong>{{ manifest.dataset.get("name", "?") }}</strong>
    ({{ classes | length }} classes, {{ scored.labels | length }} images, {{ metrics.pairs }} pairs: one similar
    and one dissimilar partner per image, the paper's protocol). A pair is called similar when its score is at
    least the threshold, {{ "%.4f" | format(manifest.threshold) }}, chosen on validation pairs.</p>
  {% if seen_in_training %}
  <p class="absent">This split holds images the model was trained on: its figures flatter the model. Evaluate with
    <code>--split test</code> to see how it does on images it never saw.</p>
  {% endif %}
  <table>
    <tr><th>pairs</th><th>accuracy</th><th>ROC AUC</th><th>precision</th><th>recall</th>
      <th>confusion [[TN FP] [FN TP]]</th></tr>
    <tr><td class="number">{{ metrics.pairs }}</td><td class="number">{{ "%.4f" | format(metrics.accuracy) }}</td>
      <td class="number">{{ "%.4f" | format(metrics.roc_auc) }}</td>
      <td class="number">{{ "%.4f" | format(metrics.precision) }}</td>
      <td class="number">{{ "%.4f" | format(metrics.recall) }}</td><td>{{ metrics.confusion_matrix }}</td></tr>
  </table>
  {% if recorded %}
  <p>As recorded in the manifest when the model was made:</p>
  <table>
    <tr><th>split</th><th>pairs</th><th>accuracy</th><th>ROC AUC</th></tr>
    {% for split, row in recorded.items() %}
    <tr><td>{{ split }}</td><td class="number">{{ row.pairs }}</td>
      <td class="number">{{ "%.4f" | format(row.accuracy) }}</td>
      <td class="number">{{ "%.4f" | format(row.roc_auc) }}</td></tr>
    {% endfor %}
  </table>
  {% endif %}
</section>

{% for section in sections %}
<section id="{{ section.id }}">
  <h2>{{ section.title }}</h2>
  {% if section.image %}
  <figure><img src="{{ section.image }}" alt="{{ section.alt }}"><figcaption>{{ section.text }}</figcaption></figure>
  {% else %}
  <p class="absent">{{ section.absent }}</p>
  {% endif %}
  {% if section.table %}
  <table>
    <tr>{% for cell in section.table[0] %}<th>{{ cell }}</th>{% endfor %}</tr>
    {% for row in section.table[1:] %}
    <tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>
    {% endfor %}
  </table>
  {% endif %}
</section>
{% endfor %}

<section id="gallery">
  <h2>The most confident right and wrong pairs</h2>
  <p>Each pair's two images with their factual Grad-CAM maps: the regions that led the model to its decision
    (red strongest). Up to {{ GALLERY_PAIRS }} of each, most confident first (the decided class's probability).</p>
  {% for kind in ("right", "wrong") %}
  <h3>{{ kind | capitalize }}</h3>
  {% if gallery[kind] %}
  <div class="gallery">
    {% for pair in gallery[kind] %}
    <figure class="{{ kind }}">
      <img src="{{ pair.first }}" alt="first image with its factual map">
      <img src="{{ pair.second }}" alt="second image with its factual map">
      <figcaption>{{ pair.caption }}</figcaption>
    </figure>
    {% endfor %}
  </div>
  {% else %}
  <p class="muted">No {{ kind }} pair on this split.</p>
  {% endif %}
  {% endfor %}
</section>
</body>
</html>
""")
