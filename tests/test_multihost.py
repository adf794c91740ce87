"""Multi-host: two local processes (`jax.distributed` on CPU, gloo collectives, 2 devices each) form one
4-device mesh, each feeding its own half of every global batch, and train, checkpoint (Orbax, collectively),
resume and export a tiny Llama exactly like one process with 4 devices; only process 0 writes the export.
`jaxft train` itself runs as two such processes: each feeds its slice of every batch, only process 0 writes
the run's files, and SIGTERM to one process stops both at the same step with one checkpoint.
A run where only one process starts exits with a message instead of hanging.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from causal_helpers import save_hf
from conftest import xla_env
from jaxft.cli import main
from sft_helpers import save_tiny_llama

HERE = Path(__file__).resolve().parent
MESH = {"data": 2, "fsdp": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: dict, path: Path, devices: int) -> subprocess.Popen:
    path.write_text(json.dumps(spec))
    env = xla_env(devices)
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


# Runs `jaxft train` (argv[2:]) with an audit hook recording every file this process creates, writes,
# renames or deletes in the run directory (argv[1]) outside `checkpoints/`, which Orbax writes collectively;
# the list goes to argv[1]/../writes_p<process id>.json at exit.
TRAIN_WITH_AUDIT = r"""
import atexit, json, os, sys

run, argv = os.path.abspath(sys.argv[1]), sys.argv[2:]
ckpts, writes = os.path.join(run, "checkpoints"), set()
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "shutil.move", "os.truncate"}

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if (mode is not None and not set(mode) & set("wax+")) or (mode is None and not (flags or 0) & WRITE):
            return
    elif event in EVENTS:
        path = args[0]
    else:
        return
    for path in (path, args[1]) if event in ("os.rename", "shutil.move") else (path,):  # both ends
        if isinstance(path, int):
            continue
        path = os.path.abspath(os.fsdecode(path))
        if path.startswith(run + os.sep) and not (path + os.sep).startswith(ckpts + os.sep):
            writes.add(os.path.relpath(path, run))

sys.addaudithook(hook)

def report():
    pid = next(a.split("=", 1)[1] for a in argv if a.startswith("mesh.process_id="))
    with open(os.path.join(os.path.dirname(run), f"writes_p{pid}.json"), "w") as f:
        json.dump(sorted(writes), f)

atexit.register(report)
from jaxft.cli import main
sys.exit(main(argv))
"""


@pytest.mark.slow
def test_jaxft_train_on_two_processes_slices_writes_once_and_stops_together(tmp_path):
    """`jaxft train` as two processes (2 CPU devices each, one data=2 × fsdp=2 mesh): the per-step losses and
    the preemption checkpoint equal a one-device run's (so each process fed its own half of every global
    batch); process 0 alone writes the run files; SIGTERM to process 1 stops both at the same step, each
    exiting with 75, with exactly one checkpoint, of that step."""
    model = save_tiny_llama(tmp_path / "llama", hidden_size=32, intermediate_size=48)
    words = ["w1", "w2", "w3", "d4", "d5", "hello", "world", "map", "please"]
    rng = np.random.RandomState(0)
    (tmp_path / "rows.jsonl").write_text("".join(
        json.dumps({"text": " ".join(rng.choice(words, rng.randint(3, 13)))}) + "\n" for _ in range(200)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name_or_path: {model}, task: causal-lm}}\n"
                   f"data: {{train: {tmp_path / 'rows.jsonl'}, max_length: 16, cache_dir: {tmp_path / 'cache'}}}\n"
                   "optim: {lr: 3.0e-3, schedule: constant}\n"
                   "train: {batch_size: 8, steps: 1000, log_every: 1, log_batches: true}\n"
                   "mesh: {data: 2, fsdp: 2}\n")
    run, port, procs = tmp_path / "run", free_port(), []
    env = xla_env(2)
    for pid in range(2):
        procs.append(subprocess.Popen(
            [sys.executable, "-c", TRAIN_WITH_AUDIT, str(run), "train", str(cfg), f"output_dir={run}",
             f"mesh.coordinator=127.0.0.1:{port}", "mesh.num_processes=2", f"mesh.process_id={pid}",
             "mesh.init_timeout=240"], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        deadline = time.monotonic() + 400
        while not ((run / "batches.jsonl").exists() and len((run / "batches.jsonl").read_text().splitlines()) >= 2):
            assert all(p.poll() is None for p in procs), [p.communicate()[1][-3000:] for p in procs]
            assert time.monotonic() < deadline, "no training step within 400 s"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)
        errs = [p.communicate(timeout=180)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [75, 75], [e[-3000:] for e in errs]
    stopped = [int(e.split("preempted at step ")[1].split(":")[0]) for e in errs]
    step = stopped[0]
    assert stopped == [step, step] and 2 <= step < 1000, stopped
    assert sorted(os.listdir(run / "checkpoints")) == [str(step)]            # exactly one checkpoint

    # process 0 alone wrote the run files (each once: no step logged twice)
    p0, p1 = (json.loads((tmp_path / f"writes_p{pid}.json").read_text()) for pid in range(2))
    assert p1 == [], p1
    assert {"config.yaml", "metrics.jsonl", "batches.jsonl", "train.log"} <= set(p0), p0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, step + 1))
    assert len((run / "batches.jsonl").read_text().splitlines()) == step
    assert len(list((run / "tensorboard").iterdir())) == 1

    # the same run on one device, in this process, stopped at the same step
    ref = tmp_path / "ref"
    assert main(["train", str(cfg), f"output_dir={ref}", "mesh.data=1", "mesh.fsdp=1",
                 f"train.stop_at_step={step}"]) == 0
    ref_rows = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in ref_rows], rtol=1e-4)
    assert [r["trained_tokens_per_step"] for r in rows] == [r["trained_tokens_per_step"] for r in ref_rows]
    assert main(["export", str(run), str(tmp_path / "e_multi")]) == 0
    assert main(["export", str(ref), str(tmp_path / "e_ref")]) == 0
    ours, theirs = (load_file(tmp_path / e / "model.safetensors") for e in ("e_multi", "e_ref"))
    assert sorted(ours) == sorted(theirs)
    # Adam divides each gradient element by its own running scale, so where an element's gradient is near
    # zero, float32 sums in another order (sharded vs one device) move its update by a fraction of the
    # learning rate (seen: up to 3.9e-6 = 0.13% of lr 3e-3 after 3-13 steps, before and after the lean
    # backward passes). A batch fed wrongly moves whole tensors by ~lr per step: bound each element by 1% of lr.
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-4, atol=0.01 * 3.0e-3, err_msg=name)


def test_ctrl_c_on_a_multi_process_run_reaches_jax_as_sigterm(monkeypatch):
    """JAX's preemption notifier (a C++ SIGTERM handler, set by `jax.distributed.initialize`) is what makes
    every process stop at the same step; it does not listen for SIGINT. The guard of a multi-process run
    leaves SIGTERM to it and forwards a first Ctrl-C as a SIGTERM to its own process; a second one stops."""
    import jax

    from jaxft.train import faults

    got = []
    notifier = lambda signum, frame: got.append(signum)       # stands in for JAX's SIGTERM handler
    previous = signal.signal(signal.SIGTERM, notifier)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever ran before
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    guard = faults.PreemptionGuard()
    try:
        assert signal.getsignal(signal.SIGTERM) is notifier    # JAX's handler is left in place
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)                                        # handlers run between bytecodes
        assert got == [signal.SIGTERM] and guard.requested
        with pytest.raises(KeyboardInterrupt):                 # a second Ctrl-C: stop now
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
        assert got == [signal.SIGTERM]
    finally:
        guard.close()
        signal.signal(signal.SIGTERM, previous)
        restored = signal.signal(signal.SIGINT, previous_int)
    assert restored is signal.default_int_handler             # the guard put back the handler it found
