#!/usr/bin/env python3
"""MedicalCNN in PyTorch, written from shared/spec/medicalcnn.md alone.

This is the independent reference that lancet's numerics are checked against
(tests/fixtures/ is produced from it by tests/reference/make_fixtures.py).
The module tree is laid out so that state_dict() names are exactly the spec's
parameter names (stem.0.weight, stages.1.0.down.0.weight, context.project.1.*,
head.4.bias, ...). HDF5 helpers follow shared/spec/interchange.md.

    python3 tools/reference/medicalcnn.py     # self-check: parameter count, MACs
    python3 tools/reference/medicalcnn.py forward --weights W.h5 --input X.h5 \
        --output Y.h5 [--mode eval|train] [--grads] [--float64]   # `lancet forward` in PyTorch
"""
import json
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_CONFIG = {
    "name": "medicalcnn",
    "in_channels": 3,
    "num_classes": 2,
    "widths": [64, 128, 256, 512],
    "depths": [3, 4, 6, 3],
    "se_reduction": 16,
    "context_width": None,  # None: widths[-1] // 8, at least 1
    "head_hidden": 256,
    "dropout": [0.5, 0.3],
}

# Figures the spec states for the default config (in_channels 3, num_classes 2), MACs as
# (value, half a unit in the last digit the spec prints).
SPEC_TRAINABLE_PARAMS = 22_627_822
SPEC_MACS = {224: (3.715e9, 0.0005e9), 64: (0.304e9, 0.0005e9), 512: (19.41e9, 0.005e9)}


def resolve_config(cfg=None):
    """Interchange `model` JSON (a dict; absent keys take defaults) -> full config."""
    cfg = dict(cfg or {})
    name = cfg.get("name", "medicalcnn")
    if name != "medicalcnn":
        raise ValueError(f"model name {name!r} is not 'medicalcnn'")
    out = dict(DEFAULT_CONFIG)
    out.update({k: v for k, v in cfg.items() if k in DEFAULT_CONFIG})
    out["widths"] = [int(w) for w in out["widths"]]
    out["depths"] = [int(d) for d in out["depths"]]
    if len(out["widths"]) != 4 or len(out["depths"]) != 4:
        raise ValueError("widths and depths must have 4 entries (four stages)")
    if out["context_width"] is None:
        out["context_width"] = max(1, out["widths"][-1] // 8)
    out["dropout"] = [float(p) for p in out["dropout"]]
    if len(out["dropout"]) != 2:
        raise ValueError("dropout must have 2 entries")
    for k in ("in_channels", "num_classes", "se_reduction", "context_width", "head_hidden"):
        out[k] = int(out[k])
    return out


class SqueezeExcite(nn.Module):
    """s = sigmoid(fc2(relu(fc1(mean_hw(y))))); y * s.  h = max(1, C // r)."""

    def __init__(self, channels, reduction):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, y):
        s = y.mean(dim=(2, 3))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return y * s[:, :, None, None]


class BasicBlock(nn.Module):
    def __init__(self, in_ch, out_ch, stride, se_reduction):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.se = SqueezeExcite(out_ch, se_reduction)
        if stride != 1 or in_ch != out_ch:
            self.down = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))
        else:
            self.down = None

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.se(self.bn2(self.conv2(y)))
        shortcut = x if self.down is None else self.down(x)
        return F.relu(y + shortcut)


class ContextBlock(nn.Module):
    """ASPP-style: 1x1 and 3x3 dilation 1/2/3 branches (C -> b), concat, 1x1 project, residual."""

    def __init__(self, channels, branch_width):
        super().__init__()
        b = branch_width

        def branch(k, d):
            return nn.Sequential(
                nn.Conv2d(channels, b, k, padding=d * (k // 2), dilation=d, bias=False),
                nn.BatchNorm2d(b), nn.ReLU(inplace=False))

        self.branches = nn.ModuleList([branch(1, 1), branch(3, 1), branch(3, 2), branch(3, 3)])
        self.project = nn.Sequential(nn.Conv2d(4 * b, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        y = torch.cat([br(x) for br in self.branches], dim=1)
        return F.relu(self.project(y) + x)


class MedicalCNN(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        cfg = resolve_config(config)
        self.config = cfg
        w, d = cfg["widths"], cfg["depths"]
        self.stem = nn.Sequential(
            nn.Conv2d(cfg["in_channels"], w[0], 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(w[0]), nn.ReLU(inplace=False),
            nn.MaxPool2d(3, stride=2, padding=1))
        stages = []
        in_ch = w[0]
        for i in range(4):
            blocks = []
            for j in range(d[i]):
                stride = 2 if (j == 0 and i > 0) else 1
                blocks.append(BasicBlock(in_ch, w[i], stride, cfg["se_reduction"]))
                in_ch = w[i]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.context = ContextBlock(w[-1], cfg["context_width"])
        p0, p1 = cfg["dropout"]
        self.head = nn.Sequential(
            nn.Dropout(p0), nn.Linear(w[-1], cfg["head_hidden"]), nn.ReLU(inplace=False),
            nn.Dropout(p1), nn.Linear(cfg["head_hidden"], cfg["num_classes"]))

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        x = self.context(x)
        return self.head(x.mean(dim=(2, 3)))


def trainable_parameter_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def expected_parameter_count(cfg):
    """The spec's architecture counted by hand (no PyTorch), to cross-check the module tree."""
    cfg = resolve_config(cfg)
    w, d, r, b = cfg["widths"], cfg["depths"], cfg["se_reduction"], cfg["context_width"]
    bn = lambda c: 2 * c
    n = cfg["in_channels"] * w[0] * 49 + bn(w[0])
    cin = w[0]
    for i in range(4):
        c = w[i]
        h = max(1, c // r)
        for j in range(d[i]):
            s = 2 if (j == 0 and i > 0) else 1
            n += cin * c * 9 + bn(c) + c * c * 9 + bn(c)
            n += (c * h + h) + (h * c + c)
            if s != 1 or cin != c:
                n += cin * c + bn(c)
            cin = c
    c = w[-1]
    n += c * b + bn(b) + 3 * (c * b * 9 + bn(b)) + 4 * b * c + bn(c)
    n += c * cfg["head_hidden"] + cfg["head_hidden"]
    n += cfg["head_hidden"] * cfg["num_classes"] + cfg["num_classes"]
    return n


def expected_macs(cfg, height, width=None):
    """Conv + linear forward MACs per image from the spec's shapes, counted by hand."""
    cfg = resolve_config(cfg)
    w, d, r, b = cfg["widths"], cfg["depths"], cfg["se_reduction"], cfg["context_width"]
    out = lambda x, k, s, p: (x + 2 * p - k) // s + 1
    h, wd = height, height if width is None else width
    h, wd = out(h, 7, 2, 3), out(wd, 7, 2, 3)
    n = h * wd * w[0] * cfg["in_channels"] * 49
    h, wd = out(h, 3, 2, 1), out(wd, 3, 2, 1)
    cin = w[0]
    for i in range(4):
        c, hid = w[i], max(1, w[i] // r)
        for j in range(d[i]):
            s = 2 if (j == 0 and i > 0) else 1
            h, wd = out(h, 3, s, 1), out(wd, 3, s, 1)
            n += h * wd * c * (cin * 9 + c * 9) + 2 * c * hid
            if s != 1 or cin != c:
                n += h * wd * c * cin
            cin = c
    c = w[-1]
    n += h * wd * (b * c + 3 * b * c * 9 + c * 4 * b)
    n += c * cfg["head_hidden"] + cfg["head_hidden"] * cfg["num_classes"]
    return n


def count_macs(model, height, width=None):
    """Forward multiply-adds per image, conv and linear layers only (no BN, pooling, SE scaling)."""
    width = height if width is None else width
    total = [0]

    def conv_hook(m, inp, out):
        k = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        total[0] += out[0].numel() * k

    def linear_hook(m, inp, out):
        total[0] += m.in_features * m.out_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p = next(model.parameters())
            model(torch.zeros(1, model.config["in_channels"], height, width, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total[0]


# ---------------------------------------------------------------- HDF5 interchange

def _h5py():
    import h5py
    return h5py


def save_weights_h5(model, path, config_dict=None, include_counters=True):
    """Write /model/<state_dict name> (float32; num_batches_tracked as int64 scalar when
    include_counters) and the `model` JSON attribute on /model."""
    h5py = _h5py()
    cfg = resolve_config(config_dict if config_dict is not None else model.config)
    with h5py.File(path, "w") as f:
        g = f.create_group("model")
        g.attrs["model"] = json.dumps(cfg)
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                if include_counters:
                    g.create_dataset(name, data=np.int64(t.item()))
                continue
            g.create_dataset(name, data=t.detach().cpu().to(torch.float32).numpy())


def load_weights_h5(path, dtype=torch.float32):
    """Read a weights file -> (model, config). Fails naming the first missing, unexpected
    or mis-shaped entry; num_batches_tracked is optional and ignored."""
    h5py = _h5py()
    with h5py.File(path, "r") as f:
        if "model" not in f:
            raise ValueError(f"{path}: no /model group")
        g = f["model"]
        raw = g.attrs.get("model")
        if raw is None:
            raise ValueError(f"{path}: /model has no 'model' attribute")
        if isinstance(raw, bytes):
            raw = raw.decode()
        cfg = resolve_config(json.loads(raw))
        model = MedicalCNN(cfg).to(dtype)
        sd = model.state_dict()
        wanted = [k for k in sd if not k.endswith("num_batches_tracked")]
        for k in wanted:
            if k not in g:
                raise ValueError(f"{path}: missing /model/{k}")
        for k in g.keys():
            if k not in sd:
                raise ValueError(f"{path}: unexpected /model/{k}")
        new_sd = {}
        for k in wanted:
            a = g[k][()]
            if tuple(a.shape) != tuple(sd[k].shape):
                raise ValueError(f"{path}: /model/{k} has shape {tuple(a.shape)}, "
                                 f"expected {tuple(sd[k].shape)}")
            new_sd[k] = torch.from_numpy(np.asarray(a)).to(dtype)
    model.load_state_dict(new_sd, strict=False)
    return model, cfg


def save_batch_h5(path, images, labels=None):
    """/images float32 [N, C, H, W], /labels int64 [N]."""
    h5py = _h5py()
    images = np.asarray(images.detach().cpu() if torch.is_tensor(images) else images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError("images must be [N, C, H, W]")
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images)
        if labels is not None:
            labels = np.asarray(labels.detach().cpu() if torch.is_tensor(labels) else labels, dtype=np.int64)
            if labels.shape != (images.shape[0],):
                raise ValueError("labels must be [N]")
            f.create_dataset("labels", data=labels)


def load_batch_h5(path):
    h5py = _h5py()
    with h5py.File(path, "r") as f:
        images = torch.from_numpy(f["images"][()])
        labels = torch.from_numpy(f["labels"][()]) if "labels" in f else None
    return images, labels


# ---------------------------------------------------------------- `lancet forward`, in PyTorch

def reference_forward(model, images, labels=None, mode="eval", grads=True):
    """What `lancet forward [--grads] --mode eval|train` computes (interchange.md), in the
    model's dtype. Train mode: BatchNorm uses batch statistics, dropout stays off, and the
    running statistics are left as they were. Returns {"logits", ["loss", "grads/<name>"]}
    as float32 numpy arrays."""
    if mode not in ("eval", "train"):
        raise ValueError(f"mode {mode!r} is not eval or train")
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    model.eval()
    if mode == "train":
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.train()
    try:
        dtype = next(model.parameters()).dtype
        x = images.to(dtype)
        out = {}
        with torch.set_grad_enabled(grads):
            logits = model(x)
            out["logits"] = logits.detach().to(torch.float32).numpy()
            if grads:
                if labels is None:
                    raise ValueError("--grads needs labels")
                loss = F.cross_entropy(logits, labels.to(torch.int64), reduction="mean")
                names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
                gs = torch.autograd.grad(loss, params)
                out["loss"] = np.float32(loss.item())
                for n, g in zip(names, gs):
                    out["grads/" + n] = g.detach().to(torch.float32).numpy()
    finally:
        model.load_state_dict(saved)  # undo the running-statistics update of train mode
        model.train(was_training)
    return out


def save_outputs_h5(path, outputs):
    """/logits, /loss (scalar) and /grads/<name>, float32, as `lancet forward` writes them."""
    h5py = _h5py()
    with h5py.File(path, "w") as f:
        for k, v in outputs.items():
            f.create_dataset(k, data=np.asarray(v, dtype=np.float32))


def _forward_cli(argv):
    import argparse
    ap = argparse.ArgumentParser(prog="medicalcnn.py forward",
                                 description="PyTorch stand-in for `lancet forward` (interchange.md)")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--mode", choices=["eval", "train"], default="eval")
    ap.add_argument("--grads", action="store_true")
    ap.add_argument("--float64", action="store_true", help="compute in float64 (outputs stay float32)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, _ = load_weights_h5(a.weights, torch.float64 if a.float64 else torch.float32)
    images, labels = load_batch_h5(a.input)
    save_outputs_h5(a.output, reference_forward(model, images, labels, a.mode, a.grads))
    return 0


# ---------------------------------------------------------------- self-check

def _self_check():
    torch.manual_seed(0)
    model = MedicalCNN()
    n = trainable_parameter_count(model)
    by_hand = expected_parameter_count(DEFAULT_CONFIG)
    print(f"trainable parameters: {n:,} (by hand {by_hand:,}, spec {SPEC_TRAINABLE_PARAMS:,})")
    assert n == by_hand, "module tree disagrees with the hand count"
    assert n == SPEC_TRAINABLE_PARAMS, "parameter count disagrees with the spec"

    # Names: every spec example must be a state_dict key.
    sd = model.state_dict()
    for name in ["stem.0.weight", "stem.1.weight", "stem.1.bias", "stem.1.running_mean",
                 "stem.1.running_var", "stages.0.0.conv1.weight", "stages.1.0.down.0.weight",
                 "stages.2.5.se.fc1.weight", "stages.2.5.se.fc1.bias",
                 "context.branches.3.0.weight", "context.project.1.running_var",
                 "head.1.weight", "head.4.bias"]:
        assert name in sd, name
    assert "stages.0.0.down.0.weight" not in sd  # stage 0 block 0: stride 1, 64 -> 64
    assert tuple(sd["stages.2.5.se.fc1.weight"].shape) == (16, 256)

    ok = True
    for size in (224, 64, 512):
        macs = count_macs(model, size)
        assert macs == expected_macs(DEFAULT_CONFIG, size), "hooks disagree with the hand count"
        spec, half_ulp = SPEC_MACS[size]
        flag = "ok" if abs(macs - spec) <= half_ulp else "DISAGREES"
        ok &= flag == "ok"
        print(f"forward MACs/image at {size}x{size}: {macs:,} = {macs / 1e9:.4f} G "
              f"(spec {spec / 1e9:.4g} G, agrees to the digits printed: {flag})")
    print(f"train FLOP/image at 224 (3 x 2 x MACs): {6 * count_macs(model, 224) / 1e9:.2f} G (spec about 22.3)")

    # Forward shape and a tiny odd-size batch in train mode.
    x = torch.randn(2, 3, 37, 41)
    assert model.eval()(x).shape == (2, 2)
    small = MedicalCNN({"in_channels": 1, "num_classes": 4, "widths": [4, 8, 8, 16],
                        "depths": [1, 1, 1, 1]})
    assert small.context.branches[0][0].out_channels == 2
    assert small.stages[0][0].se.fc1.out_features == 1  # max(1, 4 // 16)
    assert trainable_parameter_count(small) == expected_parameter_count(small.config)
    assert count_macs(small, 37, 23) == expected_macs(small.config, 37, 23)
    print("self-check passed" if ok else "self-check: MAC figures disagree with the spec")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "forward":
        sys.exit(_forward_cli(sys.argv[2:]))
    sys.exit(_self_check())
