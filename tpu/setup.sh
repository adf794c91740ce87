#!/usr/bin/env bash
# Install this checkout of jaxft (its committed HEAD) with JAX for TPU on every worker of $TPU_NAME, and
# mount $BUCKET at $RUN_ROOT when set. Safe to re-run (after a code change, or on a recreated slice).
#   TPU_NAME=my-v4 BUCKET=my-bucket tpu/setup.sh
source "$(dirname "$0")/env.sh"
repo=$(cd "$(dirname "$0")/.." && pwd)
archive=$(mktemp -t jaxft-XXXXXX.tar.gz)
trap 'rm -f "$archive"' EXIT
git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
echo "copying jaxft $(git -C "$repo" rev-parse --short HEAD) to every worker of $TPU_NAME"
tpu_vm scp "$archive" "$TPU_NAME:/tmp/jaxft.tar.gz" --worker=all
on_all_workers "set -e; mkdir -p $REMOTE_DIR; tar -xzf /tmp/jaxft.tar.gz -C $REMOTE_DIR; cd $REMOTE_DIR;
  python3 -m venv .venv; .venv/bin/pip install -q --upgrade pip;
  .venv/bin/pip install -q -e . 'jax[tpu]'; .venv/bin/python -c 'import jax; print(jax.devices())'"
if [[ -n "$BUCKET" ]]; then
  echo "mounting gs://$BUCKET at $RUN_ROOT on every worker"
  on_all_workers "set -e; if ! command -v gcsfuse >/dev/null; then
      export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s);
      echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list;
      curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null;
      sudo apt-get update -q && sudo apt-get install -yq gcsfuse; fi;
    sudo mkdir -p $RUN_ROOT && sudo chown \$USER $RUN_ROOT;
    mountpoint -q $RUN_ROOT || gcsfuse --implicit-dirs $BUCKET $RUN_ROOT"
fi
