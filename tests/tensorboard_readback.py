#!/usr/bin/env python3
"""Reads a TensorBoard event folder with TensorBoard's own reader and checks its scalars.

    tensorboard_readback.py DIR TAG:STEP:VALUE [TAG:STEP:VALUE ...]

Exit status: 0 when the folder holds exactly the given scalars (values compared as 32-bit
floats) and a "brain.Event:2" file version; 1 on any mismatch; 77 when tensorboard is not
installed (the C++ test then skips).
"""
import math
import sys

try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
except ImportError:
    print("tensorboard_readback.py: the tensorboard package is not installed (pip install tensorboard)")
    sys.exit(77)


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 1
    folder, specs = argv[0], argv[1:]
    expected = {}
    for spec in specs:
        tag, step, value = spec.rsplit(":", 2)
        expected.setdefault(tag, []).append((int(step), float(value)))

    acc = EventAccumulator(folder, size_guidance={"scalars": 0})
    acc.Reload()
    errors = []
    # The accumulator keeps the parsed version (2.0 for "brain.Event:2"); None: no version event.
    version = getattr(acc, "file_version", 2.0)
    if version not in (2.0, "brain.Event:2"):
        errors.append("file_version %r, expected 'brain.Event:2'" % (version,))
    tags = sorted(acc.Tags().get("scalars", []))
    if tags != sorted(expected):
        errors.append("scalar tags %s, expected %s" % (tags, sorted(expected)))
    for tag, want in expected.items():
        if tag not in tags:
            continue
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        if len(got) != len(want):
            errors.append("%s: %d scalars, expected %d" % (tag, len(got), len(want)))
            continue
        for (gs, gv), (ws, wv) in zip(got, want):
            if gs != ws or not math.isclose(gv, wv, rel_tol=1e-6, abs_tol=1e-6):
                errors.append("%s: got (step %d, %r), expected (step %d, %r)" % (tag, gs, gv, ws, wv))
    for e in errors:
        print("tensorboard_readback.py:", e)
    if not errors:
        print("tensorboard_readback.py: %d tags, %d scalars read back" % (len(expected), len(specs)))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
