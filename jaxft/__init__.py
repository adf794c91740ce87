"""jaxft: fine-tune Hugging Face transformer checkpoints with JAX/Flax NNX, export them back to PyTorch.

    model = jaxft.load_model("folder-or-hub-id", task="sequence-classification", num_labels=2)
    logits = model(input_ids, attention_mask=mask)
    jaxft.save_pretrained(model, "out_dir", tokenizer=tokenizer)
    new_ids = jaxft.generate(causal_lm, prompt_ids, max_new_tokens=32, temperature=0.0)
"""

from jaxft import parallel
from jaxft.generate import generate
from jaxft.hf.export import save_pretrained
from jaxft.hf.load import load_model

__all__ = ["generate", "load_model", "parallel", "save_pretrained"]
__version__ = "0.1.0"
