#!/usr/bin/env python3
"""Training throughput, lancet against PyTorch, on the same machine in alternating runs.

    python3 tools/reference/side_by_side.py build/bin/lancet [--rounds 3] [--threads 1,2]
    python3 tools/reference/side_by_side.py --torch-only          # PyTorch half alone
    python3 tools/reference/side_by_side.py build/bin/lancet --device cuda --precision fp16 \
        --batch-size 256 --image-size 224 --threads 16 --cudnn-autotune   # vs PyTorch AMP

Each round runs, for every thread count T,
    <lancet> bench train --device cpu --batch-size 32 --image-size 64 --channels 3 --threads T --json
and tools/reference/bench_torch.py with the same settings (Adam, fp32), each as its own
process, alternating which goes first from round to round so that drifting machine load
hits both alike. Both children get OMP/MKL/OPENBLAS_NUM_THREADS = T (and any --env). On a
loaded machine spinning OpenMP barriers collapse multi-thread throughput (PyTorch, 2 threads,
load ~5 on 2 cores: 3 img/s spinning vs 37 with --env OMP_WAIT_POLICY=PASSIVE), so record the
load averages the table prints and compare like with like. The last line of each
child's stdout that parses as a JSON object is its result (needs images_per_s).
Prints a markdown table of best and median img/s and the ratio lancet / PyTorch per thread
count, plus machine information; --json-out keeps every raw result.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def parse_json_tail(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "images_per_s" in obj:
                return obj
    # A pretty-printed object spanning lines.
    start = text.find("{")
    if start >= 0:
        try:
            obj = json.loads(text[start:])
            if isinstance(obj, dict) and "images_per_s" in obj:
                return obj
        except json.JSONDecodeError:
            pass
    return None


def run_child(cmd, threads, timeout, extra_env=None):
    env = dict(os.environ)
    env.update(extra_env or {})
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    t0 = time.time()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s: {' '.join(cmd)}"
    except OSError as ex:
        return None, f"cannot run {cmd[0]}: {ex}"
    res = parse_json_tail(p.stdout)
    if p.returncode != 0 or res is None:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        how = f"killed by signal {-p.returncode}" if p.returncode < 0 else f"exit {p.returncode}"
        return None, f"{how}, no result from {' '.join(cmd)}: {' | '.join(tail)}"
    res["_wall_s"] = time.time() - t0
    return res, None


def machine_info(lancet):
    info = {"cpu": platform.processor() or "unknown", "logical_cpus": os.cpu_count(),
            "python": platform.python_version(), "os": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        info["loadavg_start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = "not importable"
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                        capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if dirty:
            info["commit"] += " (with uncommitted changes)"
    except (OSError, subprocess.TimeoutExpired):
        info["commit"] = "unknown"
    if lancet:
        try:
            v = subprocess.run([lancet, "--version"], capture_output=True, text=True, timeout=30)
            info["lancet"] = (v.stdout.strip() or v.stderr.strip()).splitlines()[0] if v.returncode == 0 else "?"
        except (OSError, subprocess.TimeoutExpired, IndexError):
            info["lancet"] = "?"
    return info


def fmt(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def summarize(results, threads_list, have_lancet):
    rows = ["| threads | lancet best | lancet median | PyTorch best | PyTorch median "
            "| lancet/PyTorch best | lancet/PyTorch median | runs (lancet, PyTorch) |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    summary = {}
    for t in threads_list:
        ips = {k: [r["images_per_s"] for r in results[(k, t)]] for k in ("lancet", "torch")}
        best = {k: max(v) if v else None for k, v in ips.items()}
        med = {k: statistics.median(v) if v else None for k, v in ips.items()}
        ratio = lambda d: d["lancet"] / d["torch"] if d["lancet"] and d["torch"] else None
        rows.append(f"| {t} | {fmt(best['lancet'])} | {fmt(med['lancet'])} | {fmt(best['torch'])} "
                    f"| {fmt(med['torch'])} | {fmt(ratio(best), 2)} | {fmt(ratio(med), 2)} "
                    f"| {len(ips['lancet']) if have_lancet else '-'}, {len(ips['torch'])} |")
        summary[t] = {"best": best, "median": med, "ratio_best": ratio(best), "ratio_median": ratio(med)}
    return "\n".join(rows), summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lancet", nargs="?", help="path to the lancet binary")
    ap.add_argument("--torch-only", action="store_true", help="run only the PyTorch half")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--batch-size", type=int, default=32, help="global batch (split over --ranks)")
    ap.add_argument("--ranks", type=int, default=1,
                    help="data-parallel ranks: lancet under `mpirun -np N --bind-to none`, PyTorch DDP "
                         "(gloo) in N processes; threads are per rank")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                    help="fp16/bf16 (cuda): lancet's mixed precision vs PyTorch AMP (autocast, GradScaler)")
    ap.add_argument("--mode", choices=["train", "infer"], default="train")
    ap.add_argument("--cudnn-autotune", action="store_true",
                    help="lancet --cudnn-autotune and PyTorch cudnn.benchmark=True (else heuristics on both)")
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--memory-format", choices=["nchw", "channels_last"], default=None,
                    help="activation layout for both (lancet --memory-format, PyTorch --channels-last); "
                         "default channels_last on cuda (PyTorch AMP practice), nchw on cpu")
    ap.add_argument("--torch-warmup", type=int, default=3)
    ap.add_argument("--torch-steps", type=int, default=10)
    ap.add_argument("--lancet-extra", default="",
                    help="extra arguments for `lancet bench train`, e.g. '--warmup 3 --steps 20' "
                         "(its defaults, like PyTorch's here: Adam, fp32, 3 warm-up + 10 timed steps)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment for both children, e.g. OMP_WAIT_POLICY=PASSIVE (repeatable)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child run")
    ap.add_argument("--json-out", help="write every raw result and the summary here")
    a = ap.parse_args(argv)
    if not a.torch_only and not a.lancet:
        ap.error("give the lancet binary path, or --torch-only")
    lancet = None if a.torch_only else os.path.abspath(a.lancet)
    if a.memory_format is None:
        a.memory_format = "channels_last" if a.device == "cuda" else "nchw"
    threads_list = [int(t) for t in a.threads.split(",") if t.strip()]
    try:
        extra_env = dict(kv.split("=", 1) for kv in a.env)
    except ValueError:
        ap.error("--env takes KEY=VALUE")

    def mpirun():
        if a.ranks == 1:
            return []
        m = ["mpirun", "-np", str(a.ranks), "--oversubscribe", "--bind-to", "none"]
        return m + (["--allow-run-as-root"] if os.geteuid() == 0 else [])

    def lancet_cmd(t):
        return mpirun() + [lancet, "bench", a.mode, "--device", a.device, "--precision", a.precision,
                "--batch-size", str(a.batch_size),
                "--image-size", str(a.image_size), "--channels", str(a.channels),
                "--threads", str(t), "--memory-format", a.memory_format, "--json"] + \
            (["--cudnn-autotune"] if a.cudnn_autotune else []) + \
            a.lancet_extra.split()

    def torch_cmd(t):
        return [sys.executable, os.path.join(HERE, "bench_torch.py"), "--batch-size", str(a.batch_size),
                "--image-size", str(a.image_size), "--channels", str(a.channels), "--threads", str(t),
                "--warmup", str(a.torch_warmup), "--steps", str(a.torch_steps), "--precision", a.precision,
                "--device", a.device, "--mode", a.mode, "--cudnn-benchmark", str(int(a.cudnn_autotune)),
                "--ranks", str(a.ranks), "--channels-last", str(int(a.memory_format == "channels_last"))]

    info = machine_info(lancet)
    if extra_env:
        info["child_env"] = " ".join(f"{k}={v}" for k, v in extra_env.items())
    results = {(k, t): [] for k in ("lancet", "torch") for t in threads_list}
    raw, errors = [], []
    for r in range(a.rounds):
        for t in threads_list:
            order = ["lancet", "torch"] if r % 2 == 0 else ["torch", "lancet"]
            for kind in order:
                if kind == "lancet" and lancet is None:
                    continue
                cmd = lancet_cmd(t) if kind == "lancet" else torch_cmd(t)
                res, err = run_child(cmd, t, a.timeout, extra_env)
                if err:
                    errors.append(err)
                    print(f"round {r + 1} threads {t} {kind}: {err}", file=sys.stderr)
                    continue
                results[(kind, t)].append(res)
                raw.append({"round": r + 1, "threads": t, "framework": kind, "result": res})
                print(f"round {r + 1} threads {t} {kind:6s}: {res['images_per_s']:.2f} img/s, "
                      f"p50 {res.get('step_ms_p50', float('nan')):.1f} ms", file=sys.stderr)
    try:
        info["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass

    table, summary = summarize(results, threads_list, lancet is not None)
    what = "training" if a.mode == "train" else "inference"
    print(f"## MedicalCNN {what} throughput, {a.device}: lancet vs PyTorch\n")
    print(f"{a.ranks} rank(s) x T threads, global batch {a.batch_size}, {a.image_size}x{a.image_size}, "
          f"{a.channels} channels, {'Adam' if a.mode == 'train' else 'eval mode'}, {a.precision}"
          f"{' (PyTorch: autocast' + (' + GradScaler' if a.precision == 'fp16' else '') + ')' if a.precision != 'fp32' else ''}, "
          f"{a.memory_format}, cuDNN {'autotuned' if a.cudnn_autotune else 'heuristics'}, "
          f"{a.rounds} alternating rounds; img/s (higher is better)\n")
    print(table)
    print()
    for k, v in info.items():
        print(f"- {k}: {v}")
    peaks = [(k, t, max((r.get("peak_bytes", 0) for r in results[(k, t)]), default=0))
             for k in ("lancet", "torch") for t in threads_list]
    print("- peak_bytes (lancet: its allocator's peak; PyTorch: " +
          ("torch.cuda.max_memory_allocated): " if a.device == "cuda" else "process peak RSS): ") +
          ", ".join(f"{k} T={t} {p / 2**20:.0f} MiB" for k, t, p in peaks if p))
    for t in threads_list:  # both sides must train the same way
        for r in results[("lancet", t)]:
            c = r.get("config", {})
            for key, want in (("optimizer", "adam" if a.mode == "train" else "none"), ("precision", a.precision)):
                if key in c and str(c[key]).lower() != want:
                    print(f"- WARNING: lancet ran with {key} {c[key]}, PyTorch with {want}")
                    break
    if errors:
        print(f"- failed runs: {len(errors)} (first: {errors[0]})")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"machine": info, "runs": raw, "summary": {str(k): v for k, v in summary.items()},
                       "errors": errors}, f, indent=1)
    complete = all(results[("torch", t)] for t in threads_list) and (
        lancet is None or all(results[("lancet", t)] for t in threads_list))
    return 0 if complete and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
