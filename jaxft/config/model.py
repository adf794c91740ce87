"""`model:` — which checkpoint, its task and precision, LoRA/QLoRA and MoE options."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from jaxft.config.base import Section


class MoESection(Section):
    """DeepSeekMoE fine-tuning options (ignored by dense models)."""

    aux_loss_coef: float = Field(0.0, ge=0, description="sequence-wise balance loss weight, summed over layers")
    freeze_router: bool = Field(False, description="keep the router (gate) weights fixed")


class LoraSection(Section):
    """LoRA adapters on the frozen base (`jaxft.lora`); on when `rank` is set."""

    rank: int | None = Field(None, ge=1, description="adapter rank r; null = full fine-tuning")
    alpha: float = Field(16.0, gt=0, description="scale = alpha / r (alpha / sqrt(r) with rslora)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input, training only")
    targets: str = Field("all-linear", description="regex over HF module names (q_proj|v_proj), or all-linear")
    rslora: bool = False
    train_modules: str | None = Field("default", description="regex over HF module names trained in full "
                                      "(peft's modules_to_save); default: the classifier of "
                                      "sequence-classification, nothing for causal-lm")


class ModelSection(Section):
    name_or_path: str = Field(description="local HF folder or Hub id")
    task: Literal["sequence-classification", "causal-lm"] = "sequence-classification"
    num_labels: int | None = Field(None, ge=1, description="default: from the label map of the train data")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="compute dtype (matmuls, activations)")
    param_dtype: Literal["float32", "bfloat16"] = Field("float32", description="stored parameters (and optimizer state)")
    remat: Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"] = Field(
        "none", description="what each block keeps for the backward pass (jaxft.models.layers.REMAT_POLICIES)")
    scan_layers: bool = Field(False, description="stack the blocks' parameters on a leading layer axis and run "
                              "them with jax.lax.scan: compile time independent of depth")
    attention: Literal["auto", "plain", "blockwise"] = Field(
        "auto", description="how attention is computed (jaxft.models.attention): auto = cuDNN on GPU in bfloat16 "
        "where it applies, plain up to 1024x1024 scores, blockwise (O(T) memory) beyond")
    attention_block: int = Field(512, ge=16, description="query/key block of blockwise attention")
    moe: MoESection = MoESection()
    lora: LoraSection = LoraSection()
    quantize: Literal["int8", "nf4"] | None = Field(None, description="QLoRA: store the frozen base quantised "
                                                    "(needs model.lora.rank)")
    hidden_dropout: float | None = Field(None, ge=0, lt=1, description="overrides the checkpoint's hidden "
                                         "dropout (BERT hidden_dropout_prob; GPT-2 resid_pdrop and embd_pdrop); "
                                         "null = the checkpoint's")
    attention_dropout: float | None = Field(None, ge=0, lt=1, description="overrides the checkpoint's attention "
                                            "dropout (BERT attention_probs_dropout_prob, GPT-2 attn_pdrop, "
                                            "Llama/Mistral/Qwen/DeepSeek attention_dropout); null = the checkpoint's")
    freeze_embeddings: bool = Field(False, description="keep the embeddings fixed (with tied embeddings, the "
                                    "output head too)")
    freeze_layers: int = Field(0, ge=0, description="keep the first k blocks fixed")
