#!/usr/bin/env python3
"""Train the PyTorch MedicalCNN on random data and time it: the baseline for `lancet bench train`.

    python3 tools/reference/bench_torch.py --batch-size 32 --image-size 64 --channels 3 --threads 1
    python3 tools/reference/bench_torch.py --ranks 2 --threads 1 ...   # DDP (gloo), 2 processes
    python3 tools/reference/bench_torch.py --device cuda --precision fp16 --batch-size 256 --image-size 224

With --ranks N (N > 1) it runs torch DistributedDataParallel over the gloo backend in N local
processes (the CPU data parallelism the glaucoma study used), each with --threads threads;
--batch-size is the global batch, split over the ranks as `lancet bench train` splits it under
mpirun; DDP's defaults otherwise (25 MB buckets, parameters broadcast from rank 0). The
figures are rank 0's, with the slowest rank's wall time.

Each step is zero_grad, forward (train mode, dropout on), mean softmax cross-entropy,
backward and Adam, on one fixed random batch generated before timing (data loading is not
measured, as in `lancet bench train`). W warm-up steps are run untimed, then S timed steps.
On --device cuda the batch is on the GPU before timing, every timed step ends with
torch.cuda.synchronize(), and --precision fp16|bf16 is PyTorch AMP as its users run it:
torch.autocast(dtype) around forward and loss, a GradScaler for fp16 (none for bf16), FP32
weights and Adam state; --channels-last (default on for cuda) and --cudnn-benchmark (default on)
as PyTorch's performance guide recommends; --allow-tf32 sets torch.backends.cudnn.allow_tf32 and
matmul TF32 (default off, matching lancet's train.allow_tf32 default; PyTorch's own cuDNN
default is on). --mode infer times forward passes in eval mode under torch.inference_mode().
Prints one JSON object on stdout:
    images_per_s, step_ms_mean, step_ms_p50, step_ms_p95, peak_bytes (CPU: peak resident set
    size of the process, not comparable to a framework's allocator peak; cuda:
    torch.cuda.max_memory_allocated, comparable to lancet's caching-allocator peak), config {...}
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
    ap.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                    help="fp16/bf16: autocast (AMP) on cuda; the CPU runs fp32 only")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--mode", choices=["train", "infer"], default="train")
    ap.add_argument("--channels-last", type=int, choices=[0, 1], default=None,
                    help="NHWC memory format (default: 1 on cuda, 0 on cpu)")
    ap.add_argument("--cudnn-benchmark", type=int, choices=[0, 1], default=1)
    ap.add_argument("--allow-tf32", type=int, choices=[0, 1], default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-json", default=None,
                    help="interchange model JSON overriding the default config (e.g. smaller widths)")
    return ap.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    if a.precision != "fp32" and a.device != "cuda":
        sys.exit("bench_torch: --precision fp16/bf16 needs --device cuda (the CPU peer runs fp32)")
    if a.ranks > 1 and (a.device != "cpu" or a.mode != "train"):
        sys.exit("bench_torch: --ranks > 1 is the CPU DDP (gloo) training benchmark")
    if a.channels_last is None:
        a.channels_last = 1 if a.device == "cuda" else 0
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
    cuda = a.device == "cuda"
    dev = torch.device(a.device)
    if cuda:
        torch.backends.cudnn.benchmark = bool(a.cudnn_benchmark)
        torch.backends.cudnn.allow_tf32 = bool(a.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = bool(a.allow_tf32)
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    model = mc.MedicalCNN(cfg).to(dev, memory_format=fmt)
    model.train(a.mode == "train")
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
    x = torch.randn(b, cfg["in_channels"], a.image_size, a.image_size).to(dev, memory_format=fmt)
    y = torch.randint(0, cfg["num_classes"], (b,)).to(dev)
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(a.precision)
    scaler = torch.amp.GradScaler("cuda") if a.precision == "fp16" else None

    def autocast():
        return torch.autocast("cuda", dtype=amp_dtype, enabled=amp_dtype is not None)

    def train_step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        return loss

    def infer_step():
        with torch.inference_mode(), autocast():
            return model(x).float().mean()

    step = train_step if a.mode == "train" else infer_step
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(a.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if ddp:
        dist.barrier()
    times = []
    t_all = time.perf_counter()
    for _ in range(a.steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    total = time.perf_counter() - t_all
    loss = float(loss.item())
    if ddp:
        t = torch.tensor([total], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        total = float(t.item())

    ms = np.array(times) * 1e3
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    peak = int(torch.cuda.max_memory_allocated()) if cuda else int(rss)
    out = {
        "images_per_s": a.batch_size * len(times) / total,
        "step_ms_mean": float(ms.mean()),
        "step_ms_p50": float(np.percentile(ms, 50)),
        "step_ms_p95": float(np.percentile(ms, 95)),
        "peak_bytes": peak,
        "final_loss": loss,
        "config": {
            "framework": "pytorch", "torch": torch.__version__, "device": a.device, "mode": a.mode,
            "channels_last": bool(a.channels_last),
            "gpu": ({"name": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version(), "cudnn_benchmark": bool(a.cudnn_benchmark),
                     "allow_tf32": bool(a.allow_tf32)} if cuda else None),
            "batch_size": a.batch_size, "image_size": a.image_size,
            "channels": cfg["in_channels"], "num_classes": cfg["num_classes"],
            "threads": torch.get_num_threads(), "ranks": a.ranks, "warmup": a.warmup, "steps": a.steps,
            "optimizer": "adam" if a.mode == "train" else "none", "lr": a.lr, "precision": a.precision,
            "amp": ("autocast+GradScaler" if a.precision == "fp16" else "autocast" if amp_dtype else None),
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
