"""An offline word-level tokenizer with a chat template, and a tiny Llama that uses it.

Built with `tokenizers` and `transformers` only (no network). The vocabulary holds the special tokens,
the chat role markers and the words the SFT tests use.
"""

from __future__ import annotations

from pathlib import Path

WORDS = [f"w{i}" for i in range(20)] + [f"d{i}" for i in range(20)] + ["map", "please", "hello", "world"]
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

# Renders each turn as `<|role|> content </s>`; the generation prompt is `<|assistant|>`.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")
# The same, with the {% generation %} markers transformers uses for assistant masks.
TEMPLATE_MARKED = ("{% for m in messages %}<|{{ m['role'] }}|> {% if m['role'] == 'assistant' %}"
                   "{% generation %}{{ m['content'] }} </s> {% endgeneration %}{% else %}{{ m['content'] }} </s> "
                   "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
# Rewrites earlier turns depending on the conversation length: no prefix property, no markers.
TEMPLATE_BAD = ("{% for m in messages %}{% if loop.length > 2 %}<|system|> {% endif %}<|{{ m['role'] }}|> "
                "{{ m['content'] }} </s> {% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")


def make_tokenizer(template: str = TEMPLATE):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = template
    return fast


def save_tiny_llama(folder: Path, seed: int = 0, **overrides) -> Path:
    import torch
    import transformers

    tok = make_tokenizer()
    kw = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)
    kw.update(overrides)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_tiny_deepseek(folder: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random DeepSeek-V3 (MLA + MoE, one dense first layer) with the word-level tokenizer."""
    import torch
    import transformers

    tok = make_tokenizer()
    kw = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=12,
              q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=8,
              n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
              max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)
    kw.update(overrides)
    torch.manual_seed(seed)
    transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**kw)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
