"""PyTorch's GradScaler on a scripted sequence of finite / overflowing steps: the scale after
each step, as the float32 bits of the scale (hex). tests/test_amp.cpp
(LossScaler.MatchesGradScalerWithNonDyadicFactors) holds this script's output for its defaults.

    python3 tools/reference/grad_scaler_sequence.py [--init 1000.1 --growth 3 --backoff 0.3 --interval 2 --steps ffiffnfffiff]
"""
import argparse
import struct

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", type=float, default=1000.1)
    ap.add_argument("--growth", type=float, default=3.0)
    ap.add_argument("--backoff", type=float, default=0.3)
    ap.add_argument("--interval", type=int, default=2)
    ap.add_argument("--steps", default="ffiffnfffiffffff")  # f finite, i inf, n NaN
    a = ap.parse_args()
    scaler = torch.amp.GradScaler("cpu", init_scale=a.init, growth_factor=a.growth, backoff_factor=a.backoff,
                                  growth_interval=a.interval)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.0)
    out = []
    for s in a.steps:
        opt.zero_grad()
        scaler.scale(p.sum() * 0 + 1.0).backward()
        if s != "f":
            p.grad.fill_(float("inf") if s == "i" else float("nan"))
        scaler.step(opt)
        scaler.update()
        out.append("0x%08x" % struct.unpack("<I", struct.pack("<f", scaler.get_scale()))[0])
    print(", ".join(out))


if __name__ == "__main__":
    main()
