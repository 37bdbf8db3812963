#!/usr/bin/env python3
"""The PyTorch peer of `lancet bench data`: images/s of a torch DataLoader that serves the
training split of a lancet pack (HDF5 from `lancet prep`) the way lancet's loader does.

Same work per sample as lancet: the split's 8-bit (or, from a uint16 pack, 16-bit) images held
in memory (read once, as lancet's cache holds them), a random horizontal flip with probability
--hflip, conversion to float, (x / 255 - mean) / std (x / 65535 for uint16), batched by a
DataLoader with shuffling. torch has few uint16 ops, so 16-bit samples become int32 first. The loader's worker
processes are the peer of lancet's worker threads. Prints one JSON object per worker count.

    python3 tools/reference/bench_data_torch.py PACK.h5 --workers 0,1,2 --batches 60
"""
import argparse
import json
import time

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class PackSplit(Dataset):
    def __init__(self, path, split, hflip, mean, std):
        with h5py.File(path, "r") as f:
            self.images = f[split + "/images"][...]  # [n, H, W] or [n, H, W, C], uint8 or uint16
            self.labels = f[split + "/labels"][...]
        self.hflip, self.mean, self.std = hflip, mean, std
        self.max = 65535.0 if self.images.dtype == np.uint16 else 255.0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        a = self.images[i]
        img = torch.from_numpy(a.astype(np.int32) if a.dtype == np.uint16 else a)
        if img.ndim == 2:
            img = img.unsqueeze(0)
        else:
            img = img.permute(2, 0, 1)
        if self.hflip > 0 and torch.rand(()) < self.hflip:
            img = img.flip(-1)
        x = (img.float() / self.max - self.mean) / self.std
        return x, int(self.labels[i])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pack")
    ap.add_argument("--split", default="train")
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--hflip", type=float, default=0.5)
    ap.add_argument("--mean", type=float, default=0.5)
    ap.add_argument("--std", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    ds = PackSplit(a.pack, a.split, a.hflip, a.mean, a.std)
    load_s = time.perf_counter() - t0
    for w in [int(v) for v in a.workers.split(",")]:
        dl = DataLoader(ds, batch_size=a.batch_size, shuffle=True, num_workers=w, drop_last=True,
                        persistent_workers=False, prefetch_factor=2 if w > 0 else None)
        images = 0
        it = iter(dl)  # worker start-up is outside the timing, as lancet's threads start before it
        first = next(it)
        t = time.perf_counter()
        n = 0
        while n < a.batches:
            try:
                x, _ = next(it)
            except StopIteration:
                it = iter(dl)
                continue
            images += x.shape[0]
            n += 1
        s = time.perf_counter() - t
        del first
        print(json.dumps({"framework": "pytorch", "torch": torch.__version__, "workers": w,
                          "images_per_s": images / s, "batch_ms_mean": s * 1e3 / a.batches,
                          "load_seconds": load_s, "batch_size": a.batch_size}), flush=True)


if __name__ == "__main__":
    main()
