"""Model families, found by the `model_type` of a Hugging Face `config.json`.

A `Family` bundles what jaxft needs to know about one architecture: how to read its HF config into a
typed config (raising on options it does not support), the NNX module for each task, the HF name table,
and the HF class names written to an exported `config.json`. Adding a family = one file + one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from jaxft.hf.table import NameTable
from jaxft.models import bert, deepseek, gpt2, llama

TASKS = ("sequence-classification", "causal-lm")


@dataclass(frozen=True)
class Family:
    name: str
    config_from_hf: Callable[..., Any]       # (hf_config, RunOptions, num_labels=) -> config
    modules: dict[str, type]                 # task -> NNX module class taking (config, rngs)
    name_table: Callable[[Any, str], NameTable]
    architectures: dict[str, str]            # task -> HF class name for config.json
    base_prefix: str = ""                    # prefix of the bare-backbone names inside task checkpoints


FAMILIES: dict[str, Family] = {
    "bert": Family(
        name="bert",
        config_from_hf=bert.BertConfig.from_hf,
        modules={"sequence-classification": bert.BertForSequenceClassification},
        name_table=bert.name_table,
        architectures={"sequence-classification": "BertForSequenceClassification"},
        base_prefix="bert.",
    ),
    "gpt2": Family(
        name="gpt2",
        config_from_hf=gpt2.GPT2Config.from_hf,
        modules={"causal-lm": gpt2.GPT2LMHeadModel},
        name_table=gpt2.name_table,
        architectures={"causal-lm": "GPT2LMHeadModel"},
        base_prefix="transformer.",
    ),
    **{mt: Family(
        name=mt,
        config_from_hf=llama.DecoderConfig.from_hf,
        modules={"causal-lm": llama.LlamaForCausalLM},
        name_table=llama.name_table,
        architectures={"causal-lm": arch},
        base_prefix="model.",
    ) for mt, arch in [("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"),
                       ("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM")]},
    **{mt: Family(
        name=mt,
        config_from_hf=deepseek.DeepseekConfig.from_hf,
        modules={"causal-lm": deepseek.DeepseekForCausalLM},
        name_table=deepseek.name_table,
        architectures={"causal-lm": arch},
        base_prefix="model.",
    ) for mt, arch in [("deepseek_v2", "DeepseekV2ForCausalLM"), ("deepseek_v3", "DeepseekV3ForCausalLM")]},
}


def get_family(model_type: str, task: str) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r} in config.json; jaxft supports "
                         f"{sorted(FAMILIES)}")
    family = FAMILIES[model_type]
    if task not in family.modules:
        raise ValueError(f"task {task!r} is not available for model_type {model_type!r}; "
                         f"available: {sorted(family.modules)}")
    return family
