"""Cold start: the loop counts what it compiles, compiles once per padding bucket, reports throughput
without compilation, and a second run of the same recipe reads every program from the persistent cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import minilm_path, save_tiny_bert, shared_data


def train_cli(cfg, run_dir, xla_cache):
    env = {**os.environ, "JAXFT_XLA_CACHE": str(xla_cache)}
    proc = subprocess.run([sys.executable, "-m", "jaxft.cli", "train", str(cfg), f"output_dir={run_dir}"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):proc.stdout.rindex("}") + 1])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, [r for r in rows if r["split"] == "train"]


@pytest.mark.slow
def test_one_compile_per_bucket_and_none_on_a_second_run(tmp_path):
    """Real SST-2 sentences (lengths 3–60 tokens) padded to multiples of 16 up to 48: at most three
    train-step shapes; the second run compiles nothing at all."""
    model = save_tiny_bert(tmp_path / "model", tokenizer_from=minilm_path(), random_init=True, vocab_size=30522, num_labels=2)
    sst2 = shared_data("sst2")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""
model: {{name_or_path: {model}}}
data: {{train: {sst2 / 'train.tsv'}, text_field: sentence, label_field: label, max_length: 48,
        pad_to_multiple_of: 16, max_train_rows: 192, validation_fraction: 0.25, cache_dir: {tmp_path / 'tok'}}}
train: {{batch_size: 16, epochs: 1, log_every: 3}}
""")
    cache = tmp_path / "xla"
    first, rows = train_cli(cfg, tmp_path / "run1", cache)
    c = first["compilation"]
    assert 2 <= c["by_program"]["train_step"] <= 3, c  # the data do vary in length; one compile per bucket
    assert 1 <= c["by_program"]["eval_step"] <= 3, c
    assert c["cache_hits"] == 0 and c["seconds"] > 0
    assert [r["step"] for r in rows] == [3, 6, 9]
    assert rows[0]["compile_s"] > 0  # the first window compiled, and its throughput excludes that time
    for r in rows:
        assert r["examples_per_s"] > 0 and r["tokens_per_s"] > r["examples_per_s"]

    second, rows2 = train_cli(cfg, tmp_path / "run2", cache)
    c2 = second["compilation"]
    assert c2["compiles"] == 0 and c2["by_program"] == {}, c2
    assert c2["cache_hits"] >= c["by_program"]["train_step"] + c["by_program"]["eval_step"]
    # the cached programs are the same programs: the same losses, bit for bit
    assert [r["loss"] for r in rows2] == [r["loss"] for r in rows]
    np.testing.assert_array_equal(second["eval"]["loss"], first["eval"]["loss"])


def test_jit_options_lower_the_llvm_level_on_cpu_unless_xla_flags_set_it(monkeypatch):
    """The train and eval steps compile at LLVM -O1 on CPU (a third less compile time, steps as fast);
    an `XLA_FLAGS` that sets the level itself wins, and the options are ones `jax.jit` accepts."""
    import jax
    import jax.numpy as jnp

    from jaxft.compilation import jit_options

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    assert jit_options() == {"compiler_options": {"xla_backend_optimization_level": 1}}
    f = jax.jit(lambda x: jnp.tanh(x) * 2, **jit_options())
    np.testing.assert_allclose(np.asarray(f(jnp.arange(4.0))), 2 * np.tanh(np.arange(4.0)), rtol=1e-6)
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    assert jit_options() == {}
