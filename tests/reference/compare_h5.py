#!/usr/bin/env python3
"""Compare every dataset of an expected HDF5 file with the same dataset in an actual file.

    compare_h5.py expected.h5 actual.h5 [--rtol 1e-4] [--atol 1e-6] [--atol-frac 1e-4]

Typical use: expected = tests/fixtures/<name>_eval.h5 (PyTorch, float64 reference),
actual = what `lancet forward --grads --mode eval` wrote for the same weights and batch.

An element passes when |actual - expected| <= atol + atol_frac * max|expected| + rtol * |expected|,
where max|expected| is taken over that dataset. atol_frac makes the absolute floor scale with
each dataset's own magnitude (gradients of different layers differ by orders of magnitude);
set it to 0 for plain numpy.allclose semantics. Datasets present only in actual are listed but
do not fail. Shape and dtype must match (the contract fixes float32 and the shapes).

Prints one line per dataset: max abs error, max rel error (elements with |expected| above the
absolute floor), error relative to max|expected|, and PASS/FAIL.
Exit status: 0 all pass, 1 some dataset fails or is missing, 2 a file cannot be read.
"""
import argparse
import sys

import numpy as np


def _datasets(f):
    import h5py
    out = {}
    f.visititems(lambda name, obj: out.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None)
    return out


def compare_arrays(e, a, rtol, atol, atol_frac):
    """-> (ok, max_abs, max_rel, scaled, n_bad) for two same-shape arrays."""
    e64 = np.asarray(e, dtype=np.float64)
    a64 = np.asarray(a, dtype=np.float64)
    scale = float(np.max(np.abs(e64))) if e64.size else 0.0
    floor = atol + atol_frac * scale
    diff = np.abs(a64 - e64)
    finite = np.isfinite(a64)
    bad = ~finite | (diff > floor + rtol * np.abs(e64))
    max_abs = float(np.max(np.where(finite, diff, np.inf))) if diff.size else 0.0
    sig = np.abs(e64) > max(floor, np.finfo(np.float64).tiny)
    max_rel = float(np.max(diff[sig] / np.abs(e64[sig]))) if np.any(sig) else 0.0
    scaled = max_abs / scale if scale > 0 else max_abs
    return not bool(np.any(bad)), max_abs, max_rel, scaled, int(np.count_nonzero(bad))


def compare_files(expected, actual, rtol=1e-4, atol=1e-6, atol_frac=1e-4, check_dtype=True,
                  out=sys.stdout, verbose=True):
    """Compare all datasets of `expected` with `actual`; returns True when all pass."""
    import h5py
    with h5py.File(expected, "r") as fe, h5py.File(actual, "r") as fa:
        de, da = _datasets(fe), _datasets(fa)
        all_ok = True
        width = max([len(k) for k in de] + [8])
        if verbose:
            print(f"{'dataset':<{width}}  {'max_abs':>10}  {'max_rel':>10}  {'abs/max|e|':>10}  result",
                  file=out)
        for name in sorted(de, key=lambda n: (n.startswith("grads/"), n)):
            e = de[name]
            if name not in da:
                print(f"{name:<{width}}  missing in {actual}  FAIL", file=out)
                all_ok = False
                continue
            a = da[name]
            if a.shape != e.shape:
                print(f"{name:<{width}}  shape {a.shape}, expected {e.shape}  FAIL", file=out)
                all_ok = False
                continue
            if check_dtype and a.dtype != e.dtype:
                print(f"{name:<{width}}  dtype {a.dtype}, expected {e.dtype}  FAIL", file=out)
                all_ok = False
                continue
            if not np.issubdtype(e.dtype, np.number):
                same = np.array_equal(a[()], e[()])
                print(f"{name:<{width}}  {'equal' if same else 'differs'}  {'PASS' if same else 'FAIL'}",
                      file=out)
                all_ok &= same
                continue
            ok, max_abs, max_rel, scaled, n_bad = compare_arrays(e[()], a[()], rtol, atol, atol_frac)
            all_ok &= ok
            if verbose or not ok:
                tail = "PASS" if ok else f"FAIL ({n_bad} of {max(e.size, 1)} elements)"
                print(f"{name:<{width}}  {max_abs:10.3e}  {max_rel:10.3e}  {scaled:10.3e}  {tail}", file=out)
        extra = sorted(set(da) - set(de))
        if extra and verbose:
            print(f"only in actual (not compared): {', '.join(extra)}", file=out)
    return all_ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("expected")
    ap.add_argument("actual")
    ap.add_argument("--rtol", type=float, default=1e-4)
    ap.add_argument("--atol", type=float, default=1e-6, help="absolute floor")
    ap.add_argument("--atol-frac", type=float, default=1e-4,
                    help="extra absolute floor, as a fraction of the dataset's max|expected|")
    ap.add_argument("--ignore-dtype", action="store_true", help="do not fail on a dtype mismatch")
    ap.add_argument("--quiet", action="store_true", help="print failures and the verdict only")
    a = ap.parse_args(argv)
    try:
        ok = compare_files(a.expected, a.actual, a.rtol, a.atol, a.atol_frac,
                           check_dtype=not a.ignore_dtype, verbose=not a.quiet)
    except OSError as ex:
        print(f"compare_h5: cannot read: {ex}", file=sys.stderr)
        return 2
    print(f"{'PASS' if ok else 'FAIL'}: {a.actual} vs {a.expected} "
          f"(rtol {a.rtol:g}, atol {a.atol:g}, atol-frac {a.atol_frac:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
