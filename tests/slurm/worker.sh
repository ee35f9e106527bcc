#!/bin/sh
# The stand-in worker of the Slurm test tier (run by `dtrain run` as every rank), until the trainer's own
# checkpoint/resume is tested there. It records what it saw in DIR/rank<RANK>.log:
#   worker.sh block DIR    write "ready" to DIR/ready, then wait for a signal: SIGUSR1 records "checkpoint" and
#                          exits 0 (what the trainer does: checkpoint and stop), SIGTERM records "stopped", exits 143
#   worker.sh record DIR   as block on a job's first attempt (SLURM_RESTART_COUNT unset or 0); on a requeued
#                          attempt it records "done" and exits 0
mode=$1
dir=$2
attempt=${SLURM_RESTART_COUNT:-0}
log="$dir/rank$RANK.log"
echo "start attempt=$attempt rank=$RANK world=$WORLD_SIZE local=$LOCAL_RANK node=$(hostname) run=$DTRAIN_RUN_ID restart=$DTRAIN_RESTART_COUNT" >>"$log"
if [ "$mode" = record ] && [ "$attempt" != 0 ]; then
  echo "done attempt=$attempt rank=$RANK" >>"$log"
  exit 0
fi
# Waiting on a background child lets a signal interrupt `wait` and run the trap at once (with a foreground
# `sleep` the shell would run the trap only after the sleep ended).
sleep 120 &
sleeper=$!
# Under Slurm a signal can arrive twice (slurmstepd signals every process of the step, and the agent forwards
# it too): like any real worker, act on the first and ignore repeats while stopping.
trap 'trap "" USR1 TERM; echo "checkpoint attempt=$attempt rank=$RANK signal=USR1" >>"$log"; kill $sleeper 2>/dev/null; exit 0' USR1
trap 'trap "" USR1 TERM; echo "stopped attempt=$attempt rank=$RANK signal=TERM" >>"$log"; kill $sleeper 2>/dev/null; exit 143' TERM
echo "ready rank=$RANK attempt=$attempt" >>"$dir/ready"
wait $sleeper
echo "no signal came within 120 s: rank=$RANK" >>"$log"
exit 1
