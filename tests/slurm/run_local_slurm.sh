#!/usr/bin/env bash
# tests/slurm/run_local_slurm.sh — slurm/cpu_ddp.sbatch against a real Slurm on this machine.
#
#   tests/slurm/run_local_slurm.sh [LANCET_BINARY]      (default: build/bin/lancet)
#   tests/slurm/run_local_slurm.sh LANCET_BINARY -- COMMAND [ARGS...]
#       the same cluster, but runs COMMAND (from the repository root, SLURM_CONF set, LANCET
#       exported) instead of the test job, then stops everything: to try any slurm/ script on
#       a real Slurm, e.g. ... -- bash -c 'sbatch --wait slurm/gpu_ddp.sbatch ...'
#
# Installs slurm-wlm and munge with apt-get when missing (Debian 12: Slurm 22.05), starts a
# private munged (its own key and socket in a temporary folder; the system's munge, if any, is
# not used or touched), writes a minimal slurm.conf into the same folder (unprivileged ports,
# no cgroups), starts slurmctld and slurmd, submits slurm/cpu_ddp.sbatch with sbatch (2 tasks,
# srun --mpi=pmix, one epoch of 4 training steps on a 32-image synthetic set), waits for
# it and checks its state, exit code, output and run folder. The daemons and any job
# processes are stopped and the folder removed on every exit (KEEP=1 keeps the folder).
#
# Exit: 0 passed, 1 failed, 77 skipped (not root, no apt-get, the install failed e.g. without
# network, or lancet built without MPI); LANCET_SLURM_REQUIRED=1 turns a skip into a failure.
# Registered in CTest as `slurm.cpu_ddp`, and with `-- bash tests/slurm/sweep_job.sh` (lancet sweep
# inside a job) as `slurm.sweep` (label slurm, SKIP_RETURN_CODE 77).
# Environment: SLURM_TEST_PORT (first of two TCP ports, default 16817), SLURM_TEST_TIMEOUT
# (seconds to wait for the job, default 100), KEEP=1. Worst case, every wait bounded:
# lock 60 s + apt 3 x 60 s + node 30 s + job 100 s, under CTest's TIMEOUT 420. Takes
# about 7 s here with Slurm installed, 17 s with the install.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
LANCET=${1:-$ROOT/build/bin/lancet}
(($#)) && shift
USER_CMD=()
if [[ ${1:-} == -- ]]; then shift; USER_CMD=("$@"); fi
[[ $LANCET == /* ]] || LANCET=$PWD/$LANCET
JOB_TIMEOUT=${SLURM_TEST_TIMEOUT:-100}
T0=$SECONDS

say() { echo "run_local_slurm: $*"; }
skip() {
  say "SKIP: $*"
  [[ ${LANCET_SLURM_REQUIRED:-0} == 1 ]] && { say "LANCET_SLURM_REQUIRED=1: failing instead"; exit 1; }
  exit 77
}
fail() { say "FAIL: $*"; exit 1; }

[[ -x $LANCET ]] || fail "no lancet binary at $LANCET"
"$LANCET" --version 2>/dev/null | grep -qE '^ +MPI +off' && skip "this lancet was built without MPI (2 tasks need the MPI communicator)"

# --- 1. packages ---------------------------------------------------------------------------
need_install() {
  local c
  for c in slurmctld slurmd sbatch srun scontrol sinfo munged munge unmunge; do
    command -v "$c" >/dev/null 2>&1 || return 0
  done
  return 1
}
if [[ $(id -u) != 0 ]]; then
  need_install && skip "not root: Slurm is not installed and installing it needs root (apt-get install slurm-wlm munge)"
  skip "not root: this test runs slurmd as root (SlurmdUser=root) to start jobs"
fi
# One run at a time on this machine (apt, fixed ports).
exec 9>/tmp/run_local_slurm.lock
flock -w 60 9 || fail "another run_local_slurm.sh holds /tmp/run_local_slurm.lock for 60 s"
if need_install; then
  command -v apt-get >/dev/null || skip "Slurm is not installed and there is no apt-get"
  say "installing slurm-wlm and munge (apt-get)"
  # Keep the packages' init scripts from starting system daemons (munge, slurmctld, slurmd)
  # during the install, as Docker images do; a policy-rc.d made here is removed afterwards.
  made_policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
  fi
  t=$SECONDS
  ok=1
  # Bounded (a dead network must not eat CTest's time): at most 60 s per apt-get call.
  apt=(timeout 60 apt-get -y -qq -o DPkg::Lock::Timeout=30 -o Acquire::Retries=1 -o Acquire::http::Timeout=15)
  if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" install --no-install-recommends slurm-wlm munge \
      >/tmp/run_local_slurm.apt.log 2>&1; then
    # A fresh machine may not have package lists yet, or stale ones.
    { "${apt[@]}" update && DEBIAN_FRONTEND=noninteractive "${apt[@]}" install --no-install-recommends \
        slurm-wlm munge; } >>/tmp/run_local_slurm.apt.log 2>&1 || ok=0
  fi
  ((made_policy)) && rm -f /usr/sbin/policy-rc.d
  if ((!ok)); then
    tail -n 5 /tmp/run_local_slurm.apt.log
    skip "apt-get could not install slurm-wlm munge (no network or mirror?); log: /tmp/run_local_slurm.apt.log"
  fi
  say "installed in $((SECONDS - t)) s"
fi

# --- 2. ports and a private folder ------------------------------------------------------------
port_busy() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q . ; }
PORT=${SLURM_TEST_PORT:-16817}
for _ in $(seq 20); do
  port_busy "$PORT" || port_busy $((PORT + 1)) || break
  PORT=$((PORT + 2))
done

W=$(mktemp -d /tmp/lancet-slurm.XXXXXX)
chmod 711 "$W"   # munged insists that everyone may traverse the socket's folder
mkdir -p "$W/munge" "$W/state" "$W/spool" "$W/job" "$W/cache"
chmod 711 "$W/munge"
CONF=$W/slurm.conf
PIDS=()

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n ${JOBID:-} ]] && [[ -n ${SLURM_CONF:-} ]]; then
    scancel "$JOBID" >/dev/null 2>&1
    for _ in $(seq 20); do  # let slurmd end the job's steps before it goes
      pgrep -f "slurmstepd: \[$JOBID" >/dev/null 2>&1 || break
      sleep 0.5
    done
  fi
  # The daemons, by the pids we started (slurmd first; munged last, the others use it).
  local p
  for p in ${PIDS[@]+"${PIDS[@]}"}; do kill "$p" 2>/dev/null; done
  for p in ${PIDS[@]+"${PIDS[@]}"}; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null
  done
  # Anything a job left behind: processes whose environment names our slurm.conf.
  for p in $(grep -lsz "^SLURM_CONF=$CONF\$" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3); do
    [[ $p != "$$" ]] && kill -9 "$p" 2>/dev/null
  done
  if [[ ${KEEP:-0} == 1 ]]; then say "kept $W"; else rm -rf "$W"; fi
  say "took $((SECONDS - T0)) s"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

show_logs() {
  local f
  for f in "$W"/slurmctld.log "$W"/slurmd.log "$W"/munge/munged.log; do
    [[ -s $f ]] && { echo "--- tail of $f"; tail -n 25 "$f"; }
  done
}

# --- 3. munged, with its own key and socket ----------------------------------------------------
head -c 1024 /dev/urandom >"$W/munge/munge.key"
chmod 400 "$W/munge/munge.key"
SOCK=$W/munge/munge.socket
munged --key-file="$W/munge/munge.key" --socket="$SOCK" --pid-file="$W/munge/munged.pid" \
  --log-file="$W/munge/munged.log" --seed-file="$W/munge/munged.seed" ||
  { show_logs; fail "munged did not start"; }
PIDS=("$(cat "$W/munge/munged.pid")")
munge -S "$SOCK" -n | unmunge -S "$SOCK" | grep -q 'STATUS: *Success' || { show_logs; fail "munge -n | unmunge fails"; }

# --- 4. slurm.conf -----------------------------------------------------------------------------
HOST=$(hostname -s)
NCPU=$(nproc)
((NCPU < 2)) && NCPU=2   # the job has 2 tasks; config_overrides lets a 1-core machine claim 2
MEM_MB=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
: >"$W/plugstack.conf"
cat >"$CONF" <<EOF
# Minimal single-node Slurm for tests/slurm/run_local_slurm.sh (generated).
ClusterName=lancet-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
StateSaveLocation=$W/state
SlurmdSpoolDir=$W/spool
SlurmctldPidFile=$W/slurmctld.pid
SlurmdPidFile=$W/slurmd.pid
SlurmctldLogFile=$W/slurmctld.log
SlurmdLogFile=$W/slurmd.log
PlugStackConfig=$W/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerParameters=sched_interval=1
MinJobAge=600
InactiveLimit=0
KillWait=5
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NCPU RealMemory=$MEM_MB State=UNKNOWN
PartitionName=test Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
export SLURM_CONF=$CONF
# Keep the caller's Slurm job environment (when this runs inside a job) away from our clients.
unset SLURM_JOB_ID SLURM_JOBID SLURM_NTASKS SLURM_PROCID SLURM_STEP_ID SLURM_CPUS_PER_TASK

# --- 5. daemons ----------------------------------------------------------------------------------
slurmctld -D -i -f "$CONF" >"$W/slurmctld.out" 2>&1 &
PIDS=($! "${PIDS[@]}")
slurmd -D -f "$CONF" >"$W/slurmd.out" 2>&1 &
PIDS=($! "${PIDS[@]}")
state=""
for _ in $(seq 60); do   # bounded: 30 s
  state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n 1)
  [[ $state == idle ]] && break
  for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null || { show_logs; cat "$W"/slurm*.out; fail "a Slurm daemon exited"; }; done
  sleep 0.5
done
[[ $state == idle ]] || { show_logs; fail "the node is not idle after 30 s (state '$state')"; }
say "slurmctld and slurmd up on $HOST (ports $PORT, $((PORT + 1))), node idle after $((SECONDS - T0)) s"

if ((${#USER_CMD[@]})); then
  say "running: ${USER_CMD[*]}"
  (cd "$ROOT" && LANCET=$LANCET "${USER_CMD[@]}")
  rc=$?
  say "command exit status $rc"
  exit "$rc"
fi

# --- 6. the job ------------------------------------------------------------------------------------
cd "$W/job" || fail "cannot cd to $W/job"
JOBID=$(LANCET=$LANCET RUNS=$W/job/runs LANCET_CACHE=$W/cache \
  sbatch --parsable --ntasks=2 --cpus-per-task=1 --time=5 --output="$W/job/slurm-%j.out" \
    "$ROOT/slurm/cpu_ddp.sbatch" \
    --max-steps 4 --epochs 1 --image-size 32 --batch-size 8 \
    --set data.synth.train=32 --set data.synth.val=16 --set data.synth.size=32 --set train.log_every=1)
[[ -n $JOBID ]] || { show_logs; fail "sbatch did not return a job id"; }
say "submitted job $JOBID"
info=""
jstate=""
for _ in $(seq $((JOB_TIMEOUT * 2))); do
  info=$(scontrol show job "$JOBID" 2>/dev/null)
  jstate=$(sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' <<<"$info")
  case $jstate in COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE | PREEMPTED) break ;; esac
  sleep 0.5
done
OUTFILE=$W/job/slurm-$JOBID.out
echo "--- job $JOBID output ($OUTFILE)"
cat "$OUTFILE" 2>/dev/null
echo "---"
exitcode=$(sed -n 's/.* ExitCode=\([0-9:]*\).*/\1/p' <<<"$info")
say "job $JOBID: JobState=$jstate ExitCode=$exitcode after $((SECONDS - T0)) s"
case $jstate in
  COMPLETED) ;;
  PENDING | RUNNING | CONFIGURING | COMPLETING | "") show_logs; fail "job $JOBID not finished within ${JOB_TIMEOUT} s (state '$jstate')" ;;
  *) show_logs; fail "job $JOBID ended $jstate" ;;
esac
[[ $exitcode == 0:0 ]] || fail "job $JOBID exit code $exitcode"

# --- 7. what the job wrote ---------------------------------------------------------------------------
RUN=$W/job/runs/cpu-ddp-$JOBID/np2-t1
grep -q 'data parallel: 2 ranks (mpi' "$OUTFILE" || fail "no 'data parallel: 2 ranks (mpi' line from rank 0"
grep -q 'batch 8 (2 ranks x 4)' "$OUTFILE" || fail "no 'batch 8 (2 ranks x 4)' line"
grep -q 'training: 4 steps' "$OUTFILE" || fail "no 'training: 4 steps' line"
n=$(grep -c '^validation report' "$OUTFILE")
[[ $n == 1 ]] || fail "expected one validation report (rank 0 only), found $n"
[[ -s $RUN/final.h5 ]] || fail "no $RUN/final.h5"
grep -q '"phases"' "$RUN/metrics.jsonl" 2>/dev/null || fail "no epoch record with the step-phase profile in $RUN/metrics.jsonl"
grep -q 'grad_sync' "$OUTFILE" || fail "no step-phase table (with grad_sync) in the output"
steps=$(wc -l <"$RUN/steps.jsonl")
[[ $steps == 4 ]] || fail "$RUN/steps.jsonl has $steps lines, expected 4"
say "PASS: job $JOBID (2 tasks, srun --mpi=pmix) trained 4 steps; final.h5, metrics.jsonl, steps.jsonl written"
