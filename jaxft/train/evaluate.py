"""Evaluation over a whole split: loss, accuracy and macro-F1 for classification."""

from __future__ import annotations

import numpy as np

from jaxft.data.batches import Batches, to_device


def macro_f1(pred: np.ndarray, gold: np.ndarray, num_classes: int) -> float:
    """Unweighted mean over classes of F1 = 2·TP / (2·TP + FP + FN); classes absent from both count 0."""
    f1 = []
    for c in range(num_classes):
        tp = np.sum((pred == c) & (gold == c))
        fp = np.sum((pred == c) & (gold != c))
        fn = np.sum((pred != c) & (gold == c))
        f1.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1))


def evaluate_classification(eval_step, params, batches: Batches, mesh, num_classes: int) -> dict:
    loss, preds, golds = 0.0, [], []
    for batch in batches.epoch():
        loss_sum, aux = eval_step(params, to_device(batch, mesh))
        keep = batch["weights"] > 0
        loss += float(loss_sum)
        preds.append(np.asarray(aux["logits"]).argmax(-1)[keep])
        golds.append(batch["labels"][keep])
    pred, gold = np.concatenate(preds), np.concatenate(golds)
    return {"loss": loss / len(gold), "accuracy": float(np.mean(pred == gold)),
            "macro_f1": macro_f1(pred, gold, num_classes), "examples": int(len(gold))}
