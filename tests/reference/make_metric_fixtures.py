#!/usr/bin/env python3
"""Writes tests/fixtures/metrics_cases.json: prediction sets with scikit-learn's value for every
metric that trainer/metrics.h reports (checked by tests/test_metrics.cpp).

    pip install numpy scikit-learn
    python3 tests/reference/make_metric_fixtures.py [--out tests/fixtures/metrics_cases.json]

Probabilities are float32 (as lancet's EvalResult stores them) written as the exact doubles
they convert to, so C++ and sklearn see the same scores, ties included. Conventions:
zero_division=0; macro averages over all k classes (labels=range(k)); binary predictions are
P(class 1) >= threshold, multi-class predictions the argmax (first maximum); specificity of a
class is the recall of "not that class"; multi-class AUROC is one-vs-rest per class over the
classes with both positives and negatives (the others are "skipped") with their plain mean as
the macro value, and micro = roc_auc_score(label_binarize(y), probs, average='micro'). The
operating point is the first roc_curve(drop_intermediate=False) point whose tpr >= target.
"""
import argparse
import json
import os

import numpy as np
import sklearn
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix,
                             precision_recall_fscore_support, recall_score, roc_auc_score, roc_curve)
from sklearn.preprocessing import label_binarize


def softmax32(logits):
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def binary_probs(p1):
    p1 = np.asarray(p1, dtype=np.float32)
    return np.stack([np.float32(1) - p1, p1], axis=1)


def expected(probs, labels, k, threshold=None, target=None):
    y = np.asarray(labels)
    p = probs.astype(np.float64)  # the exact float32 values
    binary = k == 2
    thr = 0.5 if threshold is None else threshold
    pred = (p[:, 1] >= thr).astype(int) if binary else p.argmax(axis=1)
    ks = list(range(k))
    prec, rec, f1, sup = precision_recall_fscore_support(y, pred, labels=ks, average=None, zero_division=0)
    spec = np.array([recall_score(y == c, pred == c, pos_label=False, zero_division=0) for c in ks])
    e = {
        "predicted": pred.tolist(),
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "confusion_matrix": confusion_matrix(y, pred, labels=ks).tolist(),
        "per_class": [{"precision": float(prec[c]), "recall": float(rec[c]), "specificity": float(spec[c]),
                       "f1": float(f1[c]), "support": int(sup[c]), "predicted": int((pred == c).sum())} for c in ks],
    }
    for avg in ("macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(y, pred, labels=ks, average=avg, zero_division=0)
        aspec = float(np.mean(spec)) if avg == "macro" else float(np.average(spec, weights=sup))
        e[avg] = {"precision": float(ap), "recall": float(ar), "f1": float(af), "specificity": aspec}
    if binary:
        e["auroc"] = roc_auc_score(y, p[:, 1])
    else:
        per, skipped = [], []
        for c in ks:
            yc = y == c
            if yc.all() or not yc.any():
                per.append(None)
                skipped.append(c)
            else:
                per.append(roc_auc_score(yc, p[:, c]))
        used = [a for a in per if a is not None]
        e["auroc"] = float(np.mean(used))
        e["auroc_per_class"] = per
        e["auroc_skipped"] = skipped
        e["auroc_micro"] = roc_auc_score(label_binarize(y, classes=ks), p, average="micro")
        if not skipped:  # all classes present: sklearn's own OvR macro must agree
            assert abs(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=ks) - e["auroc"]) < 1e-12
    if target is not None:
        fpr, tpr, thresholds = roc_curve(y, p[:, 1], drop_intermediate=False)
        i = int(np.argmax(tpr >= target))
        e["operating_point"] = {"threshold": float(thresholds[i]), "sensitivity": float(tpr[i]),
                                "specificity": float(1 - fpr[i])}
    return e


def case(name, probs, labels, names, threshold=None, target=None):
    k = probs.shape[1]
    options = {}
    if threshold is not None:
        options["threshold"] = threshold
    if target is not None:
        options["target_sensitivity"] = target
    return {"name": name, "num_classes": k, "class_names": names, "options": options,
            "labels": [int(v) for v in labels], "probs": [float(v) for v in probs.reshape(-1)],
            "expected": expected(probs, labels, k, threshold, target)}


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "fixtures", "metrics_cases.json"))
    out = ap.parse_args().out
    rng = np.random.default_rng(8)
    cases = []

    # Binary, scores on a 0.1 grid: many ties, some exactly at the 0.5 threshold.
    y = rng.integers(0, 2, 40)
    p1 = np.clip(np.round(0.5 + 0.25 * (2 * y - 1) + rng.normal(0, 0.2, 40), 1), 0, 1)
    cases.append(case("binary_tied_scores", binary_probs(p1), y, ["normal", "pneumonia"]))

    # Binary at a non-0.5 threshold with a target sensitivity (pairs of tied scores too).
    y = rng.integers(0, 2, 60)
    p1 = 1 / (1 + np.exp(-(1.2 * (2 * y - 1) + rng.normal(0, 1.3, 60))))
    p1[10:20] = p1[0:10]
    cases.append(case("binary_threshold_target", binary_probs(p1), y, ["benign", "malignant"], threshold=0.3,
                      target=0.9))

    # Five classes: class 3 never in the labels, class 2 never predicted (its logit is held low).
    y = rng.choice([0, 1, 2, 4], 80)
    logits = rng.normal(0, 1, (80, 5))
    logits[np.arange(80), y] += 1.5
    logits[:, 2] -= 6
    cases.append(case("multiclass_absent_and_unpredicted", softmax32(logits), y, ["a", "b", "c", "d", "e"]))

    # Three classes, all present, some rows tied between classes.
    y = rng.integers(0, 3, 30)
    logits = np.round(rng.normal(0, 1, (30, 3)) + 1.0 * np.eye(3)[y], 0)
    cases.append(case("multiclass_ties", softmax32(logits), y, ["covid", "normal", "pneumonia"]))

    # Perfect separation, target sensitivity 1.
    y = np.array([0] * 6 + [1] * 5)
    p1 = np.where(y == 1, rng.uniform(0.6, 1, 11), rng.uniform(0, 0.4, 11))
    cases.append(case("binary_perfect", binary_probs(p1), y, ["healthy", "glaucoma"], target=1.0))

    doc = {"generator": "tests/reference/make_metric_fixtures.py", "sklearn": sklearn.__version__,
           "numpy": np.__version__, "cases": cases}
    with open(out + ".tmp", "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    os.replace(out + ".tmp", out)
    out = os.path.normpath(out)
    print(f"wrote {out} ({os.path.getsize(out)} bytes, {len(cases)} cases)")


if __name__ == "__main__":
    main()
