#!/usr/bin/env python3
"""Regenerates tests/data/npz/numpy_compressed.npz: a tiny MedMNIST-layout archive written by
numpy itself (savez_compressed: deflated members, ZIP64 local headers), so that tests/test_npz.cpp
checks lancet's zip/.npy reader against numpy's writer. Values follow formulas the test repeats:
  train_images[i, r, c, k] = (i * 31 + r * 7 + c * 3 + k) % 256, uint8 (5, 6, 7, 3)
  train_labels[i, 0] = i % 3, int16 (5, 1);  val_*: the same formulas with 2 samples, labels int64 (2,)
Usage: python3 tests/data/npz/make_npz.py   (numpy >= 1.17)
"""
import os

import numpy as np


def images(n):
    i, r, c, k = np.meshgrid(np.arange(n), np.arange(6), np.arange(7), np.arange(3), indexing="ij")
    return ((i * 31 + r * 7 + c * 3 + k) % 256).astype(np.uint8)


here = os.path.dirname(os.path.abspath(__file__))
np.savez_compressed(
    os.path.join(here, "numpy_compressed.npz"),
    train_images=images(5),
    train_labels=(np.arange(5) % 3).astype(np.int16).reshape(5, 1),
    val_images=images(2),
    val_labels=(np.arange(2) % 3).astype(np.int64),
)
