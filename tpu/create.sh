#!/usr/bin/env bash
# Create the TPU VM or pod slice $TPU_NAME (see tpu/env.sh for the settings).
#   TPU_NAME=my-v4 ACCELERATOR=v4-32 ZONE=us-central2-b SPOT=1 tpu/create.sh
source "$(dirname "$0")/env.sh"
flags=(--accelerator-type="$ACCELERATOR" --version="$RUNTIME")
[[ "$SPOT" == 1 ]] && flags+=(--spot)
echo "creating $TPU_NAME: $ACCELERATOR, runtime $RUNTIME, zone $ZONE$([[ "$SPOT" == 1 ]] && echo ', spot')"
tpu_vm create "$TPU_NAME" "${flags[@]}"
