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
# Under Slurm a signal can arrive twice (slurmstepd signals every process of the step, and the agent forwards
# it too): like any real worker, act on the first and ignore repeats while stopping.
trap 'trap "" USR1 TERM; echo "checkpoint attempt=$attempt rank=$RANK signal=USR1" >>"$log"; kill $sleeper 2>/dev/null; exit 0' USR1
trap 'trap "" USR1 TERM; echo "stopped attempt=$attempt rank=$RANK signal=TERM" >>"$log"; kill $sleeper 2>/dev/null; exit 143' TERM
echo "ready rank=$RANK attempt=$attempt" >>"$dir/ready"
# Wait for the signal on a background child: a signal interrupts `wait` and runs the trap at once (with a
# foreground `sleep` the shell would run the trap only after the sleep ended). The child is not a timer to
# trust, though: slurmstepd signals each process of the step one by one, so the `sleep` can be killed by the
# step's SIGTERM a moment before this shell gets its own. `wait` then returns early with no trap run, and the
# shell must keep waiting for its signal (it is on its way) instead of taking the sleep's end for a timeout.
# Only a sleep that ran its full time (status 0) means no signal came.
for _ in 1 2 3 4 5 6; do
  sleep 20 &
  sleeper=$!
  wait $sleeper && break
done
echo "no signal came within 120 s: rank=$RANK" >>"$log"
exit 1
