"""Load a local dense Llama-family LM (safetensors dir or GGUF file) and copy it into a moelab
MoETransformer: dense as-is, or with each SwiGLU FFN split into E experts (MoEfication).

Supported: transformers `llama` and `mistral` (no sliding window) with SwiGLU ("silu") FFNs,
no attention/MLP biases and default rotary embeddings — SmolLM2, TinyLlama, Llama-2/3, Mistral.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moelab.errors import ModelError
from moelab.layers.config import MoEConfig
from moelab.models.config import MoETransformerConfig
from moelab.models.transformer import MoETransformer

SUPPORTED_FAMILIES = ("llama", "mistral")


def check_supported(hf_config) -> None:
    """Raise ModelError unless the config is a SwiGLU Llama-family decoder we can copy exactly."""
    mt = getattr(hf_config, "model_type", "?")
    why = None
    if mt not in SUPPORTED_FAMILIES:
        why = f"model_type {mt!r}"
    elif getattr(hf_config, "hidden_act", "silu") != "silu":
        why = f"FFN activation {hf_config.hidden_act!r} (only SwiGLU/'silu' FFNs can be split)"
    elif getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        why = "attention or MLP biases"
    elif getattr(hf_config, "sliding_window", None):
        why = f"sliding-window attention ({hf_config.sliding_window})"
    else:
        rope = (
            getattr(hf_config, "rope_parameters", None)
            or getattr(hf_config, "rope_scaling", None)
            or {}
        )
        if rope.get("rope_type", "default") not in ("default", None):
            why = f"rotary scaling {rope.get('rope_type')!r}"
        hd = getattr(hf_config, "head_dim", None)
        if hd is not None and hd * hf_config.num_attention_heads != hf_config.hidden_size:
            why = f"head_dim {hd} != hidden_size / num_attention_heads"
    if why is not None:
        raise ModelError(
            f"moefy/upcycle: not supported yet: {why}. Supported families are "
            f"{', '.join(SUPPORTED_FAMILIES)} with SwiGLU FFNs, no biases, default rotary "
            "embeddings and no sliding window"
        )


def load_dense_lm(
    path: str | Path, gguf_file: str | None = None, dtype: torch.dtype = torch.float32
):
    """Load (model, tokenizer) from a local transformers dir, optionally from a GGUF file in it."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise ModelError(f"--model {path}: path does not exist (expected a local model directory)")
    if gguf_file is not None and not (path / gguf_file).is_file():
        raise ModelError(f"--gguf-file {gguf_file}: not found in {path}")
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        cfg = AutoConfig.from_pretrained(str(path), **kw)
    except (OSError, ValueError) as exc:
        raise ModelError(f"--model {path}: cannot read a transformers config ({exc})") from None
    check_supported(cfg)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kw)
    model.eval()
    try:
        tok = AutoTokenizer.from_pretrained(str(path), **kw)
    except (OSError, ValueError) as exc:
        raise ModelError(f"--model {path}: no tokenizer could be loaded ({exc})") from None
    return model, tok


def moelab_config(
    hf_config, moe: MoEConfig | None, max_seq_len: int | None = None
) -> MoETransformerConfig:
    """The MoETransformerConfig equal to a Llama-family config (dense if moe is None)."""
    rope = getattr(hf_config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return MoETransformerConfig(
        vocab_size=hf_config.vocab_size,
        d_model=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers,
        n_heads=hf_config.num_attention_heads,
        n_kv_heads=hf_config.num_key_value_heads,
        d_ff=hf_config.intermediate_size,
        max_seq_len=max_seq_len or min(int(hf_config.max_position_embeddings), 4096),
        mode="causal",
        moe=moe,
        rope_theta=float(theta),
        norm_eps=float(hf_config.rms_norm_eps),
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        pad_token_id=None,
        bos_token_id=getattr(hf_config, "bos_token_id", None),
        aux_loss_coef=0.0,
    )


@torch.no_grad()
def copy_non_ffn(hf_model, model: MoETransformer) -> None:
    """Copy embeddings, attention, norms and LM head from a Llama-family model."""
    src = hf_model.model
    model.embed_tokens.weight.copy_(src.embed_tokens.weight)
    for blk, layer in zip(model.blocks, src.layers, strict=True):
        blk.attn_norm.weight.copy_(layer.input_layernorm.weight)
        blk.ffn_norm.weight.copy_(layer.post_attention_layernorm.weight)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(blk.attn, name).weight.copy_(getattr(layer.self_attn, name).weight)
    model.norm.weight.copy_(src.norm.weight)
    if not model.cfg.tie_embeddings:
        model.lm_head.weight.copy_(hf_model.lm_head.weight)


@torch.no_grad()
def dense_to_moelab(hf_model, max_seq_len: int | None = None) -> MoETransformer:
    """A dense MoETransformer with exactly the weights of the Llama-family model."""
    check_supported(hf_model.config)
    model = MoETransformer(moelab_config(hf_model.config, None, max_seq_len))
    copy_non_ffn(hf_model, model)
    for blk, layer in zip(model.blocks, hf_model.model.layers, strict=True):
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(blk.ffn, name).weight.copy_(getattr(layer.mlp, name).weight)
    return model.eval()
