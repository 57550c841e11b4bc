"""Pair metrics (accuracy, ROC AUC, precision, recall, confusion matrix), threshold choice and calibration."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, confusion_matrix, precision_score, recall_score, roc_auc_score, roc_curve


def pair_metrics(targets: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Metrics of deciding ``similar`` when ``score >= threshold``; the confusion matrix rows are the truth
    (dissimilar, similar), its columns the decision."""
    decided = (scores >= threshold).astype(int)
    return {
        "pairs": int(len(targets)),
        "accuracy": float(accuracy_score(targets, decided)),
        "roc_auc": float(roc_auc_score(targets, scores)),
        "precision": float(precision_score(targets, decided, zero_division=0)),
        "recall": float(recall_score(targets, decided, zero_division=0)),
        "confusion_matrix": confusion_matrix(targets, decided, labels=[0, 1]).tolist(),
    }


def best_threshold(targets: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold with the highest accuracy on these pairs (meant for the validation split)."""
    _, _, candidates = roc_curve(targets, scores)
    candidates = candidates[np.isfinite(candidates)]
    accuracies = [accuracy_score(targets, scores >= threshold) for threshold in candidates]
    return float(candidates[int(np.argmax(accuracies))])


def platt_scaling(targets: np.ndarray, raw: np.ndarray) -> tuple[float, float]:
    """(scale, bias) so that sigmoid(scale * raw + bias) is a calibrated probability of ``similar``."""
    regression = LogisticRegression(C=1e4).fit(raw.reshape(-1, 1), targets.astype(int))
    return float(regression.coef_[0, 0]), float(regression.intercept_[0])


def format_table(metrics: dict[str, dict[str, Any]]) -> str:
    """A plain-text table, one row per split."""
    header = (f"{'split':<11} {'pairs':>6} {'accuracy':>8} {'roc_auc':>8} {'precision':>9} {'recall':>7}"
              "  confusion [[TN FP] [FN TP]]")
    rows = [header]
    for split, row in metrics.items():
        rows.append(
            f"{split:<11} {row['pairs']:>6} {row['accuracy']:>8.4f} {row['roc_auc']:>8.4f} "
            f"{row['precision']:>9.4f} {row['recall']:>7.4f}  {row['confusion_matrix']}"
        )
    return "\n".join(rows)
