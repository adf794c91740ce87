# Settings shared by the tpu/ scripts; source it, do not run it. Override any of them in the environment:
#
#   TPU_NAME      name of the TPU VM / pod slice (required)
#   ZONE          e.g. us-central2-b (v4), us-east5-a (v5p), us-west4-a (v5e), us-east1-d (v6e)
#   ACCELERATOR   e.g. v4-8 (one host), v4-32 or v5p-64 (a pod slice: several hosts)
#   RUNTIME       TPU software version; default chosen from ACCELERATOR
#   PROJECT       gcloud project (default: gcloud's configured one)
#   SPOT=1        create a Spot (preemptible) slice
#   BUCKET        a GCS bucket mounted on every worker at $RUN_ROOT with gcsfuse (run directories and
#                 checkpoints must outlive a preempted VM and be visible from every host)
#   RUN_ROOT      where BUCKET is mounted (default /mnt/jaxft)
#   REMOTE_DIR    where jaxft is installed on the workers (default ~/jaxft)
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME (the TPU VM or pod slice to use)}"
ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-8}
PROJECT=${PROJECT:-}
SPOT=${SPOT:-0}
BUCKET=${BUCKET:-}
RUN_ROOT=${RUN_ROOT:-/mnt/jaxft}
REMOTE_DIR=${REMOTE_DIR:-'~/jaxft'}

if [[ -z "${RUNTIME:-}" ]]; then
  case "$ACCELERATOR" in
    v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    *) echo "tpu/env.sh: no default RUNTIME for ACCELERATOR=$ACCELERATOR; set RUNTIME" >&2; exit 2 ;;
  esac
fi

# gcloud compute tpus tpu-vm SUBCOMMAND ... with the zone and project filled in
tpu_vm() {
  local sub=$1; shift
  gcloud compute tpus tpu-vm "$sub" "$@" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"}
}

# Run one shell command on every worker of the slice at once (all hosts of a pod must start together).
on_all_workers() {
  tpu_vm ssh "$TPU_NAME" --worker=all --command="$1"
}

# The slice's state (READY, CREATING, PREEMPTED, TERMINATED, ...), or NOT_FOUND.
tpu_state() {
  tpu_vm describe "$TPU_NAME" --format='value(state)' 2>/dev/null || echo NOT_FOUND
}
