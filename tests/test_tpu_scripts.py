"""The tpu/ scripts against a fake `gcloud` that records its arguments and plays a TPU slice's states:
create, setup (code copied to every worker), launch on all workers at once, and watch.sh recreating a
preempted Spot slice and relaunching until the run finishes."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Records each call on one line; `describe` prints the next line of $FAKE/states; an ssh asking worker 0 for the run's
# status prints the next line of $FAKE/status.
echo "$*" | tr '\n' ' ' >> "$FAKE/calls"; echo >> "$FAKE/calls"
next() { local f="$FAKE/$1"; head -n 1 "$f"; tail -n +2 "$f" > "$f.tmp"; mv "$f.tmp" "$f"; }
case "$*" in
  *" describe "*) next states ;;
  *"--worker=0"*"jaxft-exit-code"*) next status ;;
esac
"""


@pytest.fixture
def fake(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE=str(tmp_path), TPU_NAME="pod",
               ZONE="us-east5-a", ACCELERATOR="v5p-16", SPOT="1", POLL="0")

    def run(script: str, *args: str, states=(), status=(), **extra) -> tuple[subprocess.CompletedProcess, list[str]]:
        (tmp_path / "states").write_text("".join(s + "\n" for s in states))
        (tmp_path / "status").write_text("".join(s + "\n" for s in status))
        (tmp_path / "calls").write_text("")
        proc = subprocess.run(["bash", str(ROOT / "tpu" / script), *args], env=dict(env, **extra),
                              capture_output=True, text=True, timeout=60)
        return proc, (tmp_path / "calls").read_text().splitlines()

    return run


def test_create_setup_launch(fake):
    proc, calls = fake("create.sh")
    assert proc.returncode == 0, proc.stderr
    assert calls == ["compute tpus tpu-vm create pod --accelerator-type=v5p-16 --version=v2-alpha-tpuv5 --spot "
                     "--zone=us-east5-a "]

    proc, calls = fake("setup.sh", BUCKET="my-bucket")
    assert proc.returncode == 0, proc.stderr
    assert calls[0].startswith("compute tpus tpu-vm scp ") and "pod:/tmp/jaxft.tar.gz --worker=all" in calls[0]
    assert "pip install -q -e . 'jax[tpu]'" in calls[1] and "--worker=all" in calls[1]
    assert "gcsfuse --implicit-dirs my-bucket /mnt/jaxft" in calls[2]

    proc, calls = fake("launch.sh", "configs/x.yaml", "output_dir=/mnt/jaxft/runs/a b")
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 1 and "--worker=all" in calls[0]
    assert r".venv/bin/jaxft train configs/x.yaml output_dir=/mnt/jaxft/runs/a\ b mesh.distributed=on" in calls[0]
    assert fake("launch.sh")[0].returncode == 2                               # usage error without a config


def test_watch_recreates_a_preempted_slice_and_relaunches_until_done(fake):
    proc, calls = fake("watch.sh", "configs/x.yaml",
                       states=["READY", "READY", "PREEMPTED", "READY", "READY"],
                       status=["idle", "running", "running", "0"])
    assert proc.returncode == 0, proc.stderr
    assert "training finished" in proc.stdout
    launches = [i for i, c in enumerate(calls) if "jaxft train configs/x.yaml" in c]
    assert len(launches) == 2                                                  # first start, after recreation
    assert any(c.startswith("compute tpus tpu-vm delete pod --quiet") for c in calls)
    assert any(c.startswith("compute tpus tpu-vm create pod") for c in calls)
    assert calls.index(next(c for c in calls if " create " in c)) < launches[1]


def test_watch_stops_on_a_failed_run(fake):
    proc, _ = fake("watch.sh", "configs/x.yaml", states=["READY", "READY"], status=["idle", "2"])
    assert proc.returncode == 2 and "failed with exit code 2" in proc.stderr
