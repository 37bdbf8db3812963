#!/usr/bin/env python3
"""Train the PyTorch MedicalCNN on random data and time it: the baseline for `lancet bench train`.

    python3 tools/reference/bench_torch.py --batch-size 32 --image-size 64 --channels 3 --threads 1
    python3 tools/reference/bench_torch.py --ranks 2 --threads 1 ...   # DDP (gloo), 2 processes

With --ranks N (N > 1) it runs torch DistributedDataParallel over the gloo backend in N local
processes (the CPU data parallelism the glaucoma study used), each with --threads threads;
--batch-size is the global batch, split over the ranks as `lancet bench train` splits it under
mpirun; DDP's defaults otherwise (25 MB buckets, parameters broadcast from rank 0). The
figures are rank 0's, with the slowest rank's wall time.

Each step is zero_grad, forward (train mode, dropout on), mean softmax cross-entropy,
backward and Adam, on one fixed random batch generated before timing (data loading is not
measured, as in `lancet bench train`). W warm-up steps are run untimed, then S timed steps.
Prints one JSON object on stdout:
    images_per_s, step_ms_mean, step_ms_p50, step_ms_p95, peak_bytes (peak resident set size
    of the process, not comparable to a framework's allocator peak), config {...}
"""
import argparse
import json
import os
import platform
import resource
import sys
import time

import numpy as np


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--num-classes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ranks", type=int, default=1, help="DDP processes (gloo); 1 = no DDP")
    ap.add_argument("--port", type=int, default=29517, help="rendezvous port for --ranks > 1")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--precision", choices=["fp32"], default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-json", default=None,
                    help="interchange model JSON overriding the default config (e.g. smaller widths)")
    return ap.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    if a.ranks > 1:
        if a.batch_size % a.ranks:
            sys.exit(f"bench_torch: --batch-size {a.batch_size} (global) is not a multiple of --ranks {a.ranks}")
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        procs = [ctx.Process(target=run, args=(a, r, q)) for r in range(a.ranks)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            sys.exit(f"bench_torch: a DDP rank failed (exit codes {[p.exitcode for p in procs]})")
        print(q.get())
        return 0
    print(run(a, 0, None))
    return 0


def run(a, rank, queue):
    # Thread counts must be fixed before torch does any parallel work; BLAS libraries read the
    # environment at load time, so set it before importing torch too.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import medicalcnn as mc

    torch.set_num_threads(a.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.manual_seed(a.seed)

    cfg = json.loads(a.model_json) if a.model_json else {}
    cfg.setdefault("in_channels", a.channels)
    cfg.setdefault("num_classes", a.num_classes)
    model = mc.MedicalCNN(cfg).train()
    ddp = a.ranks > 1
    if ddp:
        import torch.distributed as dist
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(a.port))
        dist.init_process_group("gloo", rank=rank, world_size=a.ranks)
        model = torch.nn.parallel.DistributedDataParallel(model)
        torch.manual_seed(a.seed + 7919 * rank)  # each rank its own data
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    b = a.batch_size // a.ranks
    x = torch.randn(b, cfg["in_channels"], a.image_size, a.image_size)
    y = torch.randint(0, cfg["num_classes"], (b,))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    for _ in range(a.warmup):
        step()
    if ddp:
        dist.barrier()
    times = []
    t_all = time.perf_counter()
    for _ in range(a.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    total = time.perf_counter() - t_all
    loss = float(loss.item())
    if ddp:
        t = torch.tensor([total], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        total = float(t.item())

    ms = np.array(times) * 1e3
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    out = {
        "images_per_s": a.batch_size * len(times) / total,
        "step_ms_mean": float(ms.mean()),
        "step_ms_p50": float(np.percentile(ms, 50)),
        "step_ms_p95": float(np.percentile(ms, 95)),
        "peak_bytes": int(rss),
        "final_loss": loss,
        "config": {
            "framework": "pytorch", "torch": torch.__version__, "device": "cpu",
            "batch_size": a.batch_size, "image_size": a.image_size,
            "channels": cfg["in_channels"], "num_classes": cfg["num_classes"],
            "threads": torch.get_num_threads(), "ranks": a.ranks, "warmup": a.warmup, "steps": a.steps,
            "optimizer": "adam", "lr": a.lr, "precision": a.precision,
            "model": mc.resolve_config(cfg),
            "params": mc.trainable_parameter_count(model.module if ddp else model),
            "mkldnn": bool(torch.backends.mkldnn.is_available()),
            "python": platform.python_version(),
        },
    }
    if ddp:
        dist.destroy_process_group()
        if rank == 0:
            queue.put(json.dumps(out))
        return None
    return json.dumps(out)


if __name__ == "__main__":
    sys.exit(main())
