"""jaxft: fine-tune Hugging Face transformer checkpoints with JAX/Flax NNX, export them back to PyTorch.

    model = jaxft.load_model("folder-or-hub-id", task="sequence-classification", num_labels=2)
    logits = model(input_ids, attention_mask=mask)
    jaxft.save_pretrained(model, "out_dir", tokenizer=tokenizer)
    new_ids = jaxft.generate(causal_lm, prompt_ids, max_new_tokens=32, temperature=0.0)

The names are imported on first use, so that `import jaxft` (and the `jaxft` command's start, which may
restart the process with another allocator setting, `jaxft.hostmem`) does not import JAX.
"""

import importlib

_NAMES = {"generate": "jaxft.generate", "save_pretrained": "jaxft.hf.export", "load_model": "jaxft.hf.load"}

__all__ = ["generate", "load_model", "parallel", "save_pretrained"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "parallel":
        return importlib.import_module("jaxft.parallel")
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'jaxft' has no attribute {name!r}")
