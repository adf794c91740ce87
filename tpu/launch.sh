#!/usr/bin/env bash
# Start `jaxft train CONFIG [key=value ...]` on every worker of $TPU_NAME at once, detached. Each worker
# logs to ~/jaxft-train.log and records the exit code in ~/jaxft-exit-code when training ends.
# mesh.distributed=on makes the workers of a pod find each other (jax.distributed on TPU needs no address).
# CONFIG is a path inside the repository (copied by tpu/setup.sh); point output_dir at $RUN_ROOT.
#   TPU_NAME=my-v4 tpu/launch.sh configs/sft_tiny.yaml output_dir=/mnt/jaxft/runs/sft mesh.fsdp=-1 mesh.data=1
source "$(dirname "$0")/env.sh"
[[ $# -ge 1 ]] || { echo "usage: tpu/launch.sh CONFIG [key.sub=value ...]" >&2; exit 2; }
args=$(printf ' %q' "$@")
on_all_workers "cd $REMOTE_DIR && rm -f ~/jaxft-exit-code && nohup bash -c '.venv/bin/jaxft train$args \
mesh.distributed=on > ~/jaxft-train.log 2>&1; echo \$? > ~/jaxft-exit-code' > /dev/null 2>&1 &"
echo "started on every worker of $TPU_NAME; follow with:"
echo "  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f ~/jaxft-train.log'"
