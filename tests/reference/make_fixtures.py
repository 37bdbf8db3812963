#!/usr/bin/env python3
"""Regenerate tests/fixtures/: PyTorch reference outputs that `lancet forward` must reproduce.

    python3 tests/reference/make_fixtures.py [--out tests/fixtures] [--check]

For each configuration below it writes
    <name>_weights.h5   interchange weights: /model/<state_dict name> float32 (+ `model` JSON attr)
    <name>_batch.h5     /images float32 [N, C, H, W], /labels int64 [N]
    <name>_eval.h5      /logits, /loss, /grads/<param>  (BatchNorm running statistics)
    <name>_train.h5     the same with BatchNorm batch statistics, dropout off
and tests/fixtures/README.md. Everything is drawn from numpy's PCG64 with fixed seeds (not
torch's RNG) and computed in float64 from the float32 values that are stored, single-threaded,
so a rerun reproduces the files. --check regenerates into a temporary folder and fails when the
committed files differ in content from it.

After writing, every fixture is recomputed in float32 through the file loaders (the same path a
user takes) and compared with compare_h5's default tolerances; the float32-vs-float64 errors it
prints are what a correct float32 implementation should expect.
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tools", "reference"))
sys.path.insert(0, HERE)
import medicalcnn as mc  # noqa: E402
import compare_h5  # noqa: E402

# Shapes shrink as ceil(x / 2) five times (stem conv, max-pool, stages 1-3), so a side of
# 33..64 ends at 2 in stage 3 and 65..96 at 3. Train-mode BatchNorm needs N * H * W >= 2 per
# channel (PyTorch refuses one value), and with only a few values its gradient amplifies
# rounding error, so every configuration keeps N * H * W >= 6 at stage 3 and the context block.
# Widths stay small to keep the committed files under 1 MB (HDF5 costs ~450 bytes per dataset).
CONFIGS = [
    {
        "name": "gray_65x57",
        "what": "1 channel, 3 classes, widths 8/12/16/20 with two blocks in stage 1, se_reduction 4 "
                "(h = 2, 3, 4, 5), head_hidden 16, default context_width (20/8 = 2); stage 3 ends 3x2",
        "model": {"in_channels": 1, "num_classes": 3, "widths": [8, 12, 16, 20],
                  "depths": [1, 2, 1, 1], "se_reduction": 4, "head_hidden": 16},
        "images": (2, 1, 65, 57), "seed": 101, "counters": True,
    },
    {
        "name": "rgb_40x37",
        "what": "3 channels, 2 classes, stages 1 and 3 keep their channel count but stride (down "
                "path from the stride alone), se_reduction 3 (h = 8/3 = 2, 12/3 = 4), context_width 3, "
                "head_hidden 12, non-default dropout in the JSON; even x odd image, stage 3 ends 2x2",
        "model": {"in_channels": 3, "num_classes": 2, "widths": [8, 8, 12, 12],
                  "depths": [2, 1, 1, 2], "se_reduction": 3, "context_width": 3,
                  "head_hidden": 12, "dropout": [0.2, 0.1]},
        "images": (3, 3, 40, 37), "seed": 202, "counters": True,
    },
    {
        "name": "gray_b1_69x47",
        "what": "batch 1, 1 channel, 4 classes, default se_reduction 16 so h = max(1, 4/16) = 1 "
                "in stage 0, context_width 16/8 = 2, head_hidden 8; stage 3 ends 3x2; the weights "
                "file has no num_batches_tracked entries",
        "model": {"name": "medicalcnn", "in_channels": 1, "num_classes": 4, "widths": [4, 8, 8, 16],
                  "depths": [1, 1, 1, 1], "head_hidden": 8},
        "images": (1, 1, 69, 47), "seed": 316, "counters": False,
    },
]


def _f32(a):
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def build_model(cfg, image_shape, rng):
    """MedicalCNN in float64 holding float32-representable values: PyTorch's default init
    distribution (U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for conv/linear weights and linear biases),
    drawn from numpy, then BatchNorm affine, running statistics and counters made non-trivial.
    SE fc1 biases are shifted positive so the tiny SE layers carry gradient."""
    model = mc.MedicalCNN(cfg).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            mod = model.get_submodule(name.rsplit(".", 1)[0])
            if isinstance(mod, nn.BatchNorm2d):
                if name.endswith("weight"):
                    v = rng.uniform(0.6, 1.4, p.shape)
                else:
                    v = 0.2 * rng.standard_normal(p.shape)
            else:
                fan_in = mod.weight[0].numel()
                bound = 1.0 / np.sqrt(fan_in)
                v = rng.uniform(-bound, bound, p.shape)
                if name == "head.4.weight":
                    v *= 4.0  # logits of order 1, so softmax is far from uniform
                if name.endswith("se.fc1.bias"):
                    v += bound  # U(0, 2 bound): SE hidden layers of 1-6 units are otherwise often dead
            p.copy_(torch.from_numpy(_f32(v)))
    calibrate_running_stats(model, image_shape, rng)
    return model


def calibrate_running_stats(model, image_shape, rng):
    """Running statistics from a separate random batch (so eval-mode activations stay of
    order 1), then perturbed, so eval mode and train mode differ clearly."""
    n, c, h, w = image_shape
    calib = torch.from_numpy(_f32(1.5 * rng.standard_normal((max(4, 2 * n), c, h, w)) + 0.3))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model.train()
    for m in bns:
        m.momentum = None  # cumulative average: running = this batch's statistics
        m.reset_running_stats()
    with torch.no_grad():
        model(calib)
    with torch.no_grad():
        for k, m in enumerate(bns):
            std = m.running_var.sqrt()
            m.running_mean += torch.from_numpy(0.25 * rng.standard_normal(m.num_features)) * std
            m.running_var *= torch.from_numpy(np.exp(0.4 * rng.standard_normal(m.num_features)))
            m.running_mean.copy_(torch.from_numpy(_f32(m.running_mean.numpy())))
            m.running_var.copy_(torch.from_numpy(_f32(m.running_var.numpy())))
            m.num_batches_tracked.fill_(3 + k)
            m.momentum = 0.1
    model.eval()


def make_one(spec, out_dir):
    rng = np.random.default_rng(spec["seed"])
    cfg = mc.resolve_config(spec["model"])
    model = build_model(cfg, spec["images"], rng)
    n = spec["images"][0]
    images = torch.from_numpy(_f32(rng.standard_normal(spec["images"])))
    labels = torch.from_numpy(rng.integers(0, cfg["num_classes"], n).astype(np.int64))

    base = os.path.join(out_dir, spec["name"])
    mc.save_weights_h5(model, base + "_weights.h5", spec["model"] | {"name": "medicalcnn"},
                       include_counters=spec["counters"])
    mc.save_batch_h5(base + "_batch.h5", images, labels)

    # The stored files must describe exactly the float64 model used below.
    loaded, loaded_cfg = mc.load_weights_h5(base + "_weights.h5", torch.float64)
    assert loaded_cfg == cfg, (loaded_cfg, cfg)
    ref_sd = model.state_dict()
    for k, v in loaded.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, ref_sd[k]), k

    before = {k: v.clone() for k, v in model.state_dict().items()}
    outs = {}
    for mode in ("eval", "train"):
        outs[mode] = mc.reference_forward(model, images, labels, mode=mode, grads=True)
        mc.save_outputs_h5(f"{base}_{mode}.h5", outs[mode])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by the reference forward"

    for mode in outs:  # a dead ReLU (e.g. a 2-unit SE layer) would leave a parameter untested
        dead = [k for k, v in outs[mode].items() if k.startswith("grads/") and not np.any(v)]
        assert not dead, f"{spec['name']} {mode}: all-zero gradients {dead}; pick another seed"
    e, t = outs["eval"]["logits"], outs["train"]["logits"]
    assert np.max(np.abs(e - t)) > 1e-2, "eval and train logits are too close to tell apart"
    return {"name": spec["name"], "what": spec["what"], "config": cfg, "images": spec["images"],
            "labels": labels.tolist(), "counters": spec["counters"],
            "params": mc.trainable_parameter_count(model),
            "loss": {m: float(outs[m]["loss"]) for m in outs},
            "logit_gap": float(np.max(np.abs(e - t)))}


def verify_float32(out_dir, names):
    """Recompute every fixture in float32 from the files and compare with default tolerances."""
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            base = os.path.join(out_dir, name)
            model, _ = mc.load_weights_h5(base + "_weights.h5", torch.float32)
            images, labels = mc.load_batch_h5(base + "_batch.h5")
            for mode in ("eval", "train"):
                actual = os.path.join(tmp, f"{name}_{mode}.h5")
                mc.save_outputs_h5(actual, mc.reference_forward(model, images, labels, mode))
                print(f"-- float32 PyTorch vs {name}_{mode}.h5")
                ok &= compare_h5.compare_files(f"{base}_{mode}.h5", actual, verbose=False)
                worst = _worst(f"{base}_{mode}.h5", actual)
                print(f"   worst dataset: {worst[1]} abs/max|e| = {worst[0]:.2e}")
    return ok


def _worst(expected, actual):
    import h5py
    worst = (0.0, "")
    with h5py.File(expected, "r") as fe, h5py.File(actual, "r") as fa:
        for k in list(fe["grads"].keys()):
            e, a = fe["grads"][k][()].astype(np.float64), fa["grads"][k][()].astype(np.float64)
            s = np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-300)
            worst = max(worst, (s, "grads/" + k))
        for k in ("logits", "loss"):
            e, a = fe[k][()].astype(np.float64), fa[k][()].astype(np.float64)
            worst = max(worst, (np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-300), k))
    return worst


def write_readme(out_dir, infos):
    lines = [
        "# tests/fixtures — PyTorch reference outputs for `lancet forward`",
        "",
        "Generated by `tests/reference/make_fixtures.py` (do not edit by hand; this README is",
        "rewritten with the files). Regenerate, or check the committed files, from the repository root:",
        "",
        "    python3 tests/reference/make_fixtures.py            # rewrite tests/fixtures/",
        "    python3 tests/reference/make_fixtures.py --check    # fail if they would change",
        "",
        "The model is `tools/reference/medicalcnn.py`, a PyTorch MedicalCNN written from",
        "shared/spec/medicalcnn.md; the file layouts follow shared/spec/interchange.md.",
        "Weights follow PyTorch's default init distribution (drawn with numpy PCG64, fixed seeds);",
        "BatchNorm weight/bias are random, running statistics come from a separate random batch",
        "and are then perturbed, so eval and train mode give clearly different outputs.",
        "SE fc1 biases are drawn from U(0, 2/sqrt(C)) and the seeds are such that no parameter has",
        "an all-zero gradient (the generator asserts it: a dead SE unit would leave it untested).",
        "All outputs are computed in float64 from the stored float32 weights and images, then",
        "stored as float32.",
        "",
        "## Files, per configuration `<name>`",
        "| file | datasets |",
        "| --- | --- |",
        "| `<name>_weights.h5` | `/model/<state_dict name>` float32 in PyTorch shape (conv [out, in, kh, kw], linear [out, in]); `/model/*.num_batches_tracked` int64 scalars where noted; attribute `model` on `/model`: the configuration as JSON |",
        "| `<name>_batch.h5` | `/images` float32 [N, C, H, W]; `/labels` int64 [N] |",
        "| `<name>_eval.h5` | `/logits` float32 [N, num_classes]; `/loss` float32 scalar (mean softmax cross-entropy); `/grads/<param name>` float32, one per trainable parameter, in its shape |",
        "| `<name>_train.h5` | the same, with BatchNorm on batch statistics (biased variance), running statistics untouched, dropout off |",
        "",
        "The expected output of",
        "",
        "    lancet forward --weights <name>_weights.h5 --input <name>_batch.h5 --output out.h5 --grads --mode eval",
        "",
        "is `<name>_eval.h5` (and `--mode train` gives `<name>_train.h5`). Compare by hand with",
        "",
        "    python3 tests/reference/compare_h5.py tests/fixtures/<name>_eval.h5 out.h5",
        "",
        "(defaults: rtol 1e-4, atol 1e-6, plus 1e-4 x max|expected| per dataset). PyTorch itself in",
        "float32 stays about 10x inside them: its worst error is ~1e-5 x max|expected| (see the",
        "generator's output), so a correct float32 implementation should pass with margin.",
        "",
        "## Other fixtures (their own generators)",
        "- `metrics_cases.json`: scikit-learn's values for every clinical metric on fixed predictions,",
        "  from `tests/reference/make_metric_fixtures.py` (checked by tests/test_metrics.cpp).",
        "- `schedules.json`: torch.optim.lr_scheduler learning-rate sequences and clip_grad_norm_",
        "  results, from `tests/reference/make_schedule_fixtures.py` (checked by tests/test_schedule.cpp).",
        "",
        "## Configurations",
    ]
    for i in infos:
        c = dict(i["config"])
        lines += [
            "",
            f"### `{i['name']}`",
            f"- {i['what']}.",
            f"- model JSON: `{json.dumps(c)}`",
            f"- images {list(i['images'])}, labels {i['labels']}, {i['params']:,} trainable parameters",
            f"- num_batches_tracked in the weights file: {'yes' if i['counters'] else 'no'}",
            f"- loss: eval {i['loss']['eval']:.6f}, train {i['loss']['train']:.6f}; "
            f"max |logit(eval) - logit(train)| = {i['logit_gap']:.3f}",
        ]
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def generate(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    infos = [make_one(spec, out_dir) for spec in CONFIGS]
    write_readme(out_dir, infos)
    return infos


def _same_content(a, b):
    import h5py
    if a.endswith(".md"):
        return open(a).read() == open(b).read()
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        da, db = compare_h5._datasets(fa), compare_h5._datasets(fb)
        if set(da) != set(db):
            return False
        for k in da:
            if da[k].dtype != db[k].dtype or not np.array_equal(da[k][()], db[k][()]):
                return False
        if "model" in fa and dict(fa["model"].attrs) != dict(fb["model"].attrs):
            return False
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures"))
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temporary folder and compare with --out")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.check:
        with tempfile.TemporaryDirectory() as tmp:
            generate(tmp)
            bad = [f for f in sorted(os.listdir(tmp))
                   if not os.path.exists(os.path.join(a.out, f))
                   or not _same_content(os.path.join(tmp, f), os.path.join(a.out, f))]
        print("fixtures up to date" if not bad else f"fixtures differ: {', '.join(bad)}")
        return 1 if bad else 0
    infos = generate(a.out)
    total = 0
    for f in sorted(os.listdir(a.out)):
        size = os.path.getsize(os.path.join(a.out, f))
        total += size
        print(f"{size:>9,}  {f}")
    print(f"{total:>9,}  total bytes in {a.out}")
    for i in infos:
        print(f"{i['name']}: {i['params']:,} params, loss eval {i['loss']['eval']:.5f} "
              f"train {i['loss']['train']:.5f}, max logit gap {i['logit_gap']:.3f}")
    ok = verify_float32(a.out, [i["name"] for i in infos])
    print("float32 PyTorch passes compare_h5 defaults on every fixture" if ok
          else "float32 PyTorch FAILS compare_h5 defaults on some fixture")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
