"""Streaming export: `save_pretrained` writes shard after shard, gathering for each shard only the tensors
it holds (a stacked parameter's experts or scanned layers in parts), and never holds more than one shard of
tensors plus one gathered parameter.

The files must be exactly what writing every tensor at once (`write_safetensors(hf_tensors(model))`)
produces, and `transformers` must load them. Models are tiny random Llama / DeepSeek checkpoints.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import weakref
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import jaxft
from jaxft.hf import export
from jaxft.hf.files import SAFE_INDEX, write_safetensors
from jaxft.hf.load import flat_params
from jaxft.hf.table import NameTable
from causal_helpers import hf_logits, load_hf, max_diff, padded_batch, save_hf
from conftest import xla_env


def same_files(a: Path, b: Path, pattern: str = "model*") -> list[str]:
    names = sorted(p.name for p in a.glob(pattern))
    assert names == sorted(p.name for p in b.glob(pattern))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    return names


def count_gathers(monkeypatch) -> Counter:
    """Count `to_host` calls by the array gathered (a parameter, or a part of one picked on the devices)
    and, under "bytes", the bytes gathered."""
    calls, real = Counter(), export.to_host

    def gather(x):
        calls[id(x)] += 1
        out = real(x)
        calls["bytes"] += out.nbytes
        return out

    monkeypatch.setattr(export, "to_host", gather)
    return calls


def param_bytes(model) -> list[int]:
    return [int(np.prod(v.get_value().shape)) * v.get_value().dtype.itemsize for v in flat_params(model).values()]


@contextmanager
def log_lines():
    """The messages of the `jaxft` logger at INFO level (a handler of its own: training configures that
    logger not to propagate)."""
    lines, logger = [], logging.getLogger("jaxft")

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler, level = Collect(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def reloads_like(src: Path, out: Path):
    """`transformers` loads `out` with no missing/unexpected keys and gives the source's logits."""
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, mask = padded_batch(seed=5)
    d = max_diff(hf_logits(model.eval(), ids, mask), hf_logits(load_hf(src), ids, mask), mask)
    assert d <= 1e-5, d


def test_llama_streams_shards_identical_to_writing_everything_at_once(tmp_path, monkeypatch):
    src = save_hf("llama-bias", tmp_path / "src")
    model = jaxft.load_model(src, task="causal-lm")
    limit = 16 * 1024
    gathers = count_gathers(monkeypatch)
    with log_lines() as lines:
        jaxft.save_pretrained(model, tmp_path / "stream", max_shard_bytes=limit)
    params = {id(v.get_value()) for v in flat_params(model).values()}
    assert gathers.pop("bytes") == sum(param_bytes(model))
    assert set(gathers) == params and set(gathers.values()) == {1}   # every parameter gathered once

    write_safetensors(export.hf_tensors(model), tmp_path / "at_once", limit)
    files = same_files(tmp_path / "stream", tmp_path / "at_once")
    shards = [f for f in files if f != SAFE_INDEX]
    assert len(shards) >= 3 and SAFE_INDEX in files
    # and the bits are the source checkpoint's, split the same way
    from safetensors.numpy import load_file
    write_safetensors(load_file(str(src / "model.safetensors")), tmp_path / "source", limit)
    same_files(tmp_path / "stream", tmp_path / "source")

    lines = [line for line in lines if line.startswith("export: wrote")]
    assert len(lines) == len(shards)
    assert lines[1].startswith(f"export: wrote model-00002-of-{len(shards):05d}.safetensors (")
    assert lines[1].endswith(f"KiB, 2/{len(shards)})")
    reloads_like(src, tmp_path / "stream")


class LiveBytes:
    """Bytes of host arrays alive at once, counting each block of memory once (views count as their
    base): gathered parameters (`to_host`) and the HF tensors split from them (`NameTable.export`)."""

    def __init__(self):
        self.now = self.peak = 0
        self.alive: dict[int, int] = {}

    def add(self, a: np.ndarray) -> None:
        while isinstance(a.base, np.ndarray):
            a = a.base
        if id(a) in self.alive:
            return
        self.alive[id(a)] = a.nbytes
        self.now += a.nbytes
        self.peak = max(self.peak, self.now)
        weakref.finalize(a, self.free, id(a))

    def free(self, key: int) -> None:
        self.now -= self.alive.pop(key)


def track(monkeypatch) -> LiveBytes:
    live, gather, split = LiveBytes(), export.to_host, NameTable.export

    def to_host(x):
        out = gather(x)
        live.add(out)
        return out

    def export_(self, arrays):
        out = split(self, arrays)
        for t in out.values():
            live.add(t)
        return out

    monkeypatch.setattr(export, "to_host", to_host)
    monkeypatch.setattr(NameTable, "export", export_)
    return live


@pytest.mark.parametrize("family,scan", [("llama", False), ("deepseek", False), ("llama", True), ("deepseek", True)],
                         ids=["llama", "deepseek", "llama-scanned", "deepseek-scanned"])
def test_host_holds_at_most_one_shard_and_one_parameter(tmp_path, monkeypatch, family, scan):
    """Scanned models stack every layer parameter (`[L, ...]`), so each shard needs a few layers of all
    of them: only those layers are gathered."""
    if family == "llama":
        src, limit = save_hf("llama-bias", tmp_path / "src"), 16 * 1024
    else:
        from test_deepseek_parity import save_hf as save_deepseek
        src, limit = save_deepseek("v3", tmp_path / "src"), 12 * 1024
    model = jaxft.load_model(src, task="causal-lm", scan_layers=scan)
    sizes = param_bytes(model)
    largest, total = max(sizes), sum(sizes)

    live = track(monkeypatch)
    jaxft.save_pretrained(model, tmp_path / "out", max_shard_bytes=limit)
    shards = json.loads((tmp_path / "out" / SAFE_INDEX).read_text())["weight_map"].values()
    print(f"{family}{' scanned' if scan else ''}: peak {live.peak} B, bound {limit + largest} B, "
          f"model {total} B, {len(set(shards))} shards")
    assert len(set(shards)) >= 3
    assert 0 < live.peak <= limit + largest < total
    assert live.now == 0                                         # nothing left behind

    export.hf_tensors(model)                                     # the tracker sees a whole-model gather
    assert live.peak >= total


def test_deepseek_stacked_experts_span_shards_and_reload(tmp_path, monkeypatch):
    from test_deepseek_parity import save_hf as save_deepseek

    src = save_deepseek("v3", tmp_path / "src")
    model = jaxft.load_model(src, task="causal-lm")
    limit = 8 * 1024
    gathers = count_gathers(monkeypatch)
    jaxft.save_pretrained(model, tmp_path / "stream", max_shard_bytes=limit)
    where = json.loads((tmp_path / "stream" / SAFE_INDEX).read_text())["weight_map"]

    # one stacked parameter ([E, ...] in jaxft, E tensors in HF) is split over several shards
    experts = {f for n, f in where.items() if n.startswith("model.layers.1.mlp.experts.")
               and n.endswith(".gate_proj.weight")}
    assert len(experts) >= 2 and len(set(where.values())) >= 5
    # every tensor is gathered once: unstacked parameters whole, stacked ones one part per shard
    assert gathers.pop("bytes") == sum(param_bytes(model))
    plan = export.export_plan(model)[2]
    files_of: dict[str, set[str]] = {}
    for name, (path, _) in plan.source.items():
        files_of.setdefault(path, set()).add(where[name])
    assert sum(gathers.values()) == sum(map(len, files_of.values()))
    write_safetensors(export.hf_tensors(model), tmp_path / "at_once", limit)
    same_files(tmp_path / "stream", tmp_path / "at_once")
    reloads_like(src, tmp_path / "stream")


def test_to_host_leaves_no_host_copy_cached_on_the_array():
    """`np.asarray` of a sharded jax array caches the host copy on the array; `to_host` must not, or the
    exporting host would keep every parameter it gathered (2 CPU devices, so in a subprocess)."""
    code = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxft.hf.export import to_host
x = jax.device_put(jnp.arange(8.0).reshape(4, 2), NamedSharding(jax.make_mesh((2,), ("x",)), P("x")))
a = to_host(x)
assert np.array_equal(a, np.arange(8.0).reshape(4, 2))
assert x._npy_value is None, "host copy cached on the parameter"
print("ok")
"""
    env = xla_env(2)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


TWO_PROCESSES = """
import sys, jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, src, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid, initialization_timeout=120)
import jaxft
from jaxft.parallel import make_mesh
model = jaxft.load_model(src, task="causal-lm", scan_layers=True, mesh=make_mesh({"fsdp": 4}))
jaxft.save_pretrained(model, out.format(pid=pid), max_shard_bytes=16 * 1024)
print("exported", jax.process_count(), len(jax.devices()))
"""


def test_two_processes_stream_a_scanned_model_like_one(tmp_path):
    """Two processes (2 CPU devices each, fsdp=4): the per-shard picks of stacked layers run on arrays
    spanning both processes, every process runs the same gathers, and only process 0 writes."""
    from safetensors.numpy import load_file
    from test_multihost import free_port

    src = save_hf("llama-mha", tmp_path / "src", num_key_value_heads=2)
    script, port = tmp_path / "two.py", free_port()
    script.write_text(TWO_PROCESSES)
    env = xla_env(2)
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(pid), str(src), str(tmp_path / "out{pid}")],
                              env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for pid in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "exported 2 4" in out, err[-4000:]
    assert not (tmp_path / "out1").exists()
    write_safetensors(load_file(str(src / "model.safetensors")), tmp_path / "source", 16 * 1024)
    assert len(same_files(tmp_path / "out0", tmp_path / "source")) >= 4
