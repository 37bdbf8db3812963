#!/usr/bin/env bash
# tests/slurm/sweep_job.sh — `lancet sweep` inside a Slurm allocation, on the throw-away cluster
# of run_local_slurm.sh:
#
#   tests/slurm/run_local_slurm.sh LANCET_BINARY -- bash tests/slurm/sweep_job.sh
#
# (CTest: `slurm.sweep`, label slurm.) Submits a 2-task batch job that runs
# `lancet sweep --ranks 1,2` (bench mode, a tiny model, 2 timed steps) with sbatch --wait and
# checks that the sweep picked srun as its launcher (SLURM_JOB_ID is set inside the job), ran
# both rows through it, and wrote the tables, CSV and plots. Needs SLURM_CONF and LANCET, which
# run_local_slurm.sh exports; the job's files go to a temporary folder, removed on exit
# (KEEP=1 keeps it). Exit: 0 passed, 1 failed.
set -uo pipefail

say() { echo "sweep_job: $*"; }
fail() { say "FAIL: $*"; exit 1; }
[[ -n ${SLURM_CONF:-} && -n ${LANCET:-} ]] || fail "run me through run_local_slurm.sh (SLURM_CONF and LANCET unset)"

D=$(mktemp -d /tmp/lancet-slurm-sweep.XXXXXX)
cleanup() { if [[ ${KEEP:-0} == 1 ]]; then say "kept $D"; else rm -rf "$D"; fi; }
trap cleanup EXIT

TINY="--image-size 16 --set model.widths=[8,8,8,8] --set model.depths=[1,1,1,1] --set model.head_hidden=8 --set model.context_width=8"
# Bounded: sbatch --wait returns when the job ends; run_local_slurm.sh cancels a job left behind.
timeout 180 sbatch --wait --ntasks=2 --cpus-per-task=1 --time=5 --output="$D/job.out" \
  --wrap "'$LANCET' sweep --ranks 1,2 --threads 1 --batch-size 4 --steps 2 --warmup 1 $TINY --out '$D/s'"
rc=$?
echo "--- job output ($D/job.out)"
cat "$D/job.out" 2>/dev/null
echo "---"
((rc == 0)) || fail "sbatch --wait exit status $rc (the job failed or timed out)"

grep -q 'launcher srun' "$D/s/sweep.md" 2>/dev/null || fail "sweep.md does not say 'launcher srun'"
for r in 1 2; do
  cmd=$(cat "$D"/s/runs/cpu_fp32_r${r}_t1_b*.cmd 2>/dev/null)
  [[ $cmd == "srun -n $r "* ]] || fail "the ${r}-rank row was not launched with srun -n $r: '$cmd'"
done
grep -q '^cpu,fp32,1,1,1,4,4,"ok",' "$D/s/sweep.csv" || fail "no ok 1-rank row in sweep.csv"
grep -q '^cpu,fp32,2,1,2,8,4,"ok",' "$D/s/sweep.csv" || fail "no ok 2-rank row in sweep.csv"
grep -q '^| 2 | 2 | 8 | [0-9]' "$D/s/sweep.md" || fail "no measured 2-rank row in the scaling table of sweep.md"
for f in sweep.json scaling.svg scaling.png phases.svg phases.png; do
  [[ -s $D/s/$f ]] || fail "no $f"
done
say "PASS: lancet sweep in a 2-task job ran 1 and 2 ranks with srun and wrote tables, CSV and plots"
