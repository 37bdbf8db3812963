#!/usr/bin/env python3
"""Regenerate tests/fixtures/schedules.json: PyTorch reference values for trainer/schedule.h
(learning-rate schedules) and kernels/optim.h (clip_grad_norm).

    python3 tests/reference/make_schedule_fixtures.py [--out tests/fixtures/schedules.json] [--check]

Learning rates come from torch.optim.lr_scheduler driven the way lancet's training loop drives
LrSchedule: the lr in effect for every optimizer step is recorded before the step, per-step
schedulers (LinearLR warm-up, CosineAnnealingLR) step after every optimizer step, and
per-epoch ones (StepLR, ReduceLROnPlateau with the case's metric) at every epoch end.
Warm-up: cosine runs SequentialLR([LinearLR, CosineAnnealingLR], milestones=[warmup_steps])
so the cosine starts after the warm-up; step and plateau chain LinearLR (per step) with the
epoch scheduler on one optimizer, so the warm-up factor multiplies their lr.

clip_grad_norm cases: float32 gradients drawn from numpy PCG64 (fixed seeds), then
torch.nn.utils.clip_grad_norm_ (norm_type 2); the file holds the inputs, the returned total
norm and the clipped gradients. --check fails when the committed file would change.
"""
import argparse
import json
import os
import sys
import warnings

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures", "schedules.json")

# The schedule section's defaults (trainer/schedule.cpp: default_schedule_config()).
DEFAULTS = {"name": "constant", "warmup_steps": 0, "warmup_start_factor": 0.1, "step_size": 30, "gamma": 0.1,
            "eta_min": 0.0, "t_max": 0, "monitor": "val_loss", "mode": "min", "factor": 0.1, "patience": 10,
            "cooldown": 0, "min_lr": 0.0, "threshold": 0.0001}

# A validation loss that improves, stalls (reductions after `patience` bad epochs, then a
# cooldown), improves by less than the relative threshold, and improves again.
LOSS = [1.0, 0.8, 0.8, 0.81, 0.79, 0.9, 0.95, 0.7, 0.69995, 0.7, 0.72, 0.6, 0.6, 0.6, 0.6, 0.6]
ACC = [0.5, 0.6, 0.6, 0.59, 0.61, 0.61, 0.6, 0.7, 0.70005, 0.7, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75]


def lr_sequence(cfg, base_lr, steps_per_epoch, epochs, metrics):
    cfg = dict(DEFAULTS, **cfg)
    total_steps = steps_per_epoch * epochs
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=base_lr)
    warmup = cfg["warmup_steps"]
    per_step, per_epoch, plateau = [], [], None
    name = cfg["name"]
    if name == "cosine":
        t_max = cfg["t_max"] or total_steps - warmup
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=cfg["eta_min"])
        if warmup:
            lin = torch.optim.lr_scheduler.LinearLR(opt, start_factor=cfg["warmup_start_factor"], end_factor=1.0,
                                                    total_iters=warmup)
            per_step.append(torch.optim.lr_scheduler.SequentialLR(opt, [lin, cos], milestones=[warmup]))
        else:
            per_step.append(cos)
    else:
        if warmup:
            per_step.append(torch.optim.lr_scheduler.LinearLR(opt, start_factor=cfg["warmup_start_factor"],
                                                              end_factor=1.0, total_iters=warmup))
        if name == "step":
            per_epoch.append(torch.optim.lr_scheduler.StepLR(opt, step_size=cfg["step_size"], gamma=cfg["gamma"]))
        elif name == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, mode=cfg["mode"], factor=cfg["factor"], patience=cfg["patience"], cooldown=cfg["cooldown"],
                min_lr=cfg["min_lr"], threshold=cfg["threshold"], threshold_mode="rel", eps=1e-8)
        else:
            assert name == "constant", name
    lrs = []
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            for s in per_step:
                s.step()
        for s in per_epoch:
            s.step()
        if plateau is not None:
            plateau.step(metrics[epoch])
    return {"config": cfg, "base_lr": base_lr, "steps_per_epoch": steps_per_epoch, "epochs": epochs,
            "total_steps": total_steps, "metrics": metrics[:epochs], "lr": lrs}


def schedule_cases():
    cases = {}
    cases["constant"] = lr_sequence({}, 0.1, 3, 3, LOSS)
    cases["constant_warmup"] = lr_sequence({"warmup_steps": 5, "warmup_start_factor": 0.25}, 0.1, 3, 3, LOSS)
    cases["step"] = lr_sequence({"name": "step", "step_size": 2, "gamma": 0.5}, 0.1, 3, 7, LOSS)
    cases["step_warmup"] = lr_sequence({"name": "step", "step_size": 2, "gamma": 0.3, "warmup_steps": 4}, 0.05, 3, 7,
                                       LOSS)
    cases["cosine"] = lr_sequence({"name": "cosine"}, 0.1, 4, 5, LOSS)
    cases["cosine_warmup"] = lr_sequence({"name": "cosine", "warmup_steps": 6, "warmup_start_factor": 0.01,
                                          "eta_min": 1e-4}, 0.1, 4, 5, LOSS)
    # t_max shorter than the run: torch's cosine rises again after t_max (period 2 t_max).
    cases["cosine_tmax"] = lr_sequence({"name": "cosine", "t_max": 7, "eta_min": 0.001, "warmup_steps": 3}, 0.02, 5,
                                       4, LOSS)
    cases["plateau_min"] = lr_sequence({"name": "plateau", "patience": 1, "cooldown": 1, "factor": 0.5,
                                        "min_lr": 0.02}, 0.1, 2, len(LOSS), LOSS)
    cases["plateau_min_nocooldown"] = lr_sequence({"name": "plateau", "patience": 2, "factor": 0.1,
                                                   "threshold": 0.01}, 0.1, 2, len(LOSS), LOSS)
    cases["plateau_max_warmup"] = lr_sequence({"name": "plateau", "mode": "max", "monitor": "val_accuracy",
                                               "patience": 1, "cooldown": 2, "factor": 0.3, "warmup_steps": 3,
                                               "warmup_start_factor": 0.5}, 0.01, 2, len(ACC), ACC)
    return cases


def clip_cases():
    rng = np.random.Generator(np.random.PCG64(20261123))
    cases = {}
    shapes = [[4, 3, 3, 3], [4], [5, 4], [7]]
    for name, scale, max_norm in [("clipped", 1.0, 1.0), ("unclipped", 0.01, 5.0), ("mixed_scales", 3.0, 0.5)]:
        grads = [(rng.standard_normal(s) * scale * (10.0 ** i if name == "mixed_scales" else 1.0)).astype(np.float32)
                 for i, s in enumerate(shapes)]
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g.copy())
        total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=2.0)
        cases[name] = {"max_norm": max_norm, "shapes": shapes,
                       "grads": [[float(v) for v in g.ravel()] for g in grads],
                       "total_norm": float(total),
                       "clipped": [[float(v) for v in p.grad.numpy().ravel()] for p in params]}
    return cases


def generate():
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SequentialLR's step(0) deprecation notice
        data = {"torch_version": torch.__version__.split("+")[0], "schedules": schedule_cases(),
                "clip_grad_norm": clip_cases()}
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true", help="fail when the file at --out would change")
    args = ap.parse_args()
    text = generate()
    if args.check:
        with open(args.out) as f:
            old = json.load(f)
        new = json.loads(text)
        old.pop("torch_version", None)
        new.pop("torch_version", None)
        if old != new:
            print(f"{args.out} is out of date; rerun {os.path.basename(__file__)}", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
