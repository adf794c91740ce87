"""Multi-host: two local processes (`jax.distributed` on CPU, gloo collectives, 2 devices each) form one
4-device mesh, each feeding its own half of every global batch, and train, checkpoint (Orbax, collectively),
resume and export a tiny Llama exactly like one process with 4 devices; only process 0 writes the export.
A run where only one process starts exits with a message instead of hanging.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from causal_helpers import save_hf

HERE = Path(__file__).resolve().parent
MESH = {"data": 2, "fsdp": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: dict, path: Path, devices: int) -> subprocess.Popen:
    path.write_text(json.dumps(spec))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
               "--xla_backend_optimization_level=0")
    return subprocess.Popen([sys.executable, str(HERE / "mesh_helpers.py"), str(path)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def result(proc: subprocess.Popen, timeout: float = 300) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.split("RESULTS ", 1)[1])[0]


def test_two_processes_train_checkpoint_resume_and_export_like_one(tmp_path):
    model = save_hf("llama-mha", tmp_path / "llama", num_key_value_heads=2)
    run = {"model": str(model), "task": "causal-lm", "mesh": MESH, "steps": 6}
    single = launch({"runs": [dict(run, save=str(tmp_path / "single"))]}, tmp_path / "single.json", devices=4)
    port, procs = free_port(), []
    for pid in range(2):
        spec = {"runs": [dict(run, checkpoint_at=3, run_dir=str(tmp_path / "run"), save=str(tmp_path / "multi_p{pid}"))],
                "distributed": {"distributed": "on", "coordinator": f"127.0.0.1:{port}", "num_processes": 2,
                                "process_id": pid, "init_timeout": 120}}
        procs.append(launch(spec, tmp_path / f"p{pid}.json", devices=2))
    one, (p0, p1) = result(single), [result(p) for p in procs]

    assert p0["devices"] == p1["devices"] == one["devices"] == 4
    np.testing.assert_allclose(p0["losses"], one["losses"], rtol=1e-5)     # resumed at step 3 on the way
    assert p0["losses"] == p1["losses"]                                    # one global computation
    q = p0["params"]["model.layers.0.self_attn.q_proj.kernel"]             # [32, 4, 8] over fsdp=2
    assert q["spec"] == ["fsdp", None, None] and q["shard_shape"] == [16, 4, 8]

    assert (tmp_path / "run" / "checkpoints" / "3").is_dir()
    assert not (tmp_path / "multi_p1").exists()                           # process 1 wrote nothing
    ours, ref = load_file(tmp_path / "multi_p0" / "model.safetensors"), load_file(tmp_path / "single" / "model.safetensors")
    assert sorted(ours) == sorted(ref)
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_each_process_reads_only_the_slices_its_devices_hold(tmp_path):
    """fsdp=4 over two processes of two devices: every weight of a Llama has a model-width dimension, which
    FSDP shards, so each process reads its two devices' quarters of each tensor: half the checkpoint."""
    model = save_hf("llama-mha", tmp_path / "llama", num_key_value_heads=2)
    run = {"model": str(model), "task": "causal-lm", "mesh": {"fsdp": 4}, "steps": 1, "count_reads": True}
    port, procs = free_port(), []
    for pid in range(2):
        spec = {"runs": [run], "distributed": {"distributed": "on", "coordinator": f"127.0.0.1:{port}",
                                               "num_processes": 2, "process_id": pid, "init_timeout": 120}}
        procs.append(launch(spec, tmp_path / f"p{pid}.json", devices=2))
    for reads in (result(p)["reads"] for p in procs):
        q = reads["model.layers.0.self_attn.q_proj.weight"]         # HF [N*H=32, D=32] float32, D over fsdp
        assert q == [32 * 8 * 4] * 2, q                               # two quarter slices: half the tensor
        assert reads["model.layers.0.input_layernorm.weight"] == [8 * 4] * 2  # [D=32]: a quarter per device
        total = sum(map(sum, reads.values()))
        assert total == sum(t.nbytes for t in load_file(model / "model.safetensors").values()) // 2


def test_a_lone_process_fails_with_a_message(tmp_path):
    spec = {"runs": [], "distributed": {"coordinator": f"127.0.0.1:{free_port()}", "num_processes": 2,
                                        "process_id": 0, "init_timeout": 3}}    # mode auto: a coordinator is set
    t0 = time.monotonic()
    proc = launch(spec, tmp_path / "alone.json", devices=2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 4, err[-2000:]
    assert "not every process of the multi-host run joined within 3 s" in err
    assert "process 0 of 2" in err and time.monotonic() - t0 < 60


def test_single_process_runs_need_no_settings(monkeypatch):
    from jaxft.parallel import initialize_distributed

    for k in ("JAXFT_COORDINATOR", "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(k, raising=False)
    assert initialize_distributed("auto") is False
    assert initialize_distributed("off", coordinator="127.0.0.1:1") is False
    with pytest.raises(ValueError, match="mesh.distributed='maybe'"):
        initialize_distributed("maybe")
