#!/usr/bin/env bash
# Keep a training run going on a Spot/preemptible slice: launch it, and whenever the slice is preempted
# (or the run exits with 75, jaxft's "preempted, checkpoint written" code, or 4, "not every host joined")
# recreate/reinstall as needed and launch the same command again; jaxft resumes from the latest checkpoint
# in its output_dir, which must live on $RUN_ROOT (the bucket) to survive the VM. Stops when the run
# finishes (exit 0) or fails (any other code, e.g. 2 for a bad config), and exits with that code.
#   TPU_NAME=my-v4 SPOT=1 BUCKET=my-bucket tpu/watch.sh configs/x.yaml output_dir=/mnt/jaxft/runs/x
# POLL (seconds between checks, default 300) and MAX_ROUNDS (default unlimited) tune the loop.
source "$(dirname "$0")/env.sh"
[[ $# -ge 1 ]] || { echo "usage: tpu/watch.sh CONFIG [key.sub=value ...]" >&2; exit 2; }
here=$(dirname "$0")
POLL=${POLL:-300}
MAX_ROUNDS=${MAX_ROUNDS:-0}
# What worker 0 says about the run: running, idle (never started), or the exit code it ended with.
run_status() {
  tpu_vm ssh "$TPU_NAME" --worker=0 --command='if pgrep -f "[j]axft train" > /dev/null; then echo running;
    elif [ -f ~/jaxft-exit-code ]; then cat ~/jaxft-exit-code; else echo idle; fi' 2>/dev/null | tail -n 1 \
    || echo unreachable
}

round=0
launched=0
while (( MAX_ROUNDS == 0 || round < MAX_ROUNDS )); do
  round=$((round + 1))
  state=$(tpu_state)
  case "$state" in
    READY)
      status=$(run_status)
      if [[ "$status" == running || "$status" == unreachable ]]; then
        launched=1                      # a run is going (perhaps started before this watcher): leave it
      elif (( ! launched )); then
        "$here/launch.sh" "$@"; launched=1
      else
        case "$status" in
          0) echo "$(date -u +%FT%TZ) training finished"; exit 0 ;;
          75|4|idle) echo "$(date -u +%FT%TZ) run stopped ($status): relaunching"; "$here/launch.sh" "$@" ;;
          *) echo "$(date -u +%FT%TZ) training failed with exit code $status; see ~/jaxft-train.log" >&2
             exit "$status" ;;
        esac
      fi ;;
    PREEMPTED|TERMINATED|NOT_FOUND)
      echo "$(date -u +%FT%TZ) $TPU_NAME is $state: recreating"
      [[ "$state" != NOT_FOUND ]] && tpu_vm delete "$TPU_NAME" --quiet
      "$here/create.sh" && "$here/setup.sh" && "$here/launch.sh" "$@" && launched=1 ;;
    *) echo "$(date -u +%FT%TZ) $TPU_NAME is $state: waiting" ;;
  esac
  sleep "$POLL"
done
echo "tpu/watch.sh: stopped after $MAX_ROUNDS rounds" >&2
exit 1
