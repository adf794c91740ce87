"""Build the offline GRPO demo: a tiny random Llama chat model and prompt-only rows of a verifiable task.

    .venv/bin/python scripts/make_grpo_demo.py runs/grpo_demo
    .venv/bin/jaxft train configs/grpo_tiny.yaml

The task: the user asks `parity dK` and the answer is `even` or `odd` alone (a fixed format a regex checks,
and the right class, which `exact_match` checks against the `answer` column). The model is random (no hub access here),
so it starts near chance; the demo shows GRPO's machinery learning a verifiable reward on a 2-core CPU in
about a minute, not a reasoning model. Written: OUT/model (config, safetensors, tokenizer with a chat
template, generation_config), OUT/train.jsonl (200 rows) and OUT/validation.jsonl (40 rows).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = ["parity", "even", "odd"] + [f"d{i}" for i in range(20)]
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL + WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = TEMPLATE
    return fast


def build(out: Path, seed: int = 0) -> None:
    import torch
    import transformers

    tok = tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():   # every weight random (the default init leaves norms at 1 and biases at 0)
        for p in model.parameters():
            p.normal_(0.0, 0.08 if p.ndim > 1 else 0.1).add_(1.0 if p.ndim == 1 else 0.0)
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    rng = random.Random(seed)

    def rows(n):
        out = []
        for _ in range(n):
            k = rng.randrange(20)
            out.append({"prompt": [{"role": "user", "content": f"parity d{k}"}], "answer": ("even", "odd")[k % 2]})
        return out

    for name, n in (("train", 200), ("validation", 40)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n)))
    print(f"wrote {out}/model, {out}/train.jsonl, {out}/validation.jsonl")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default="runs/grpo_demo")
    build(Path(ap.parse_args().out))
