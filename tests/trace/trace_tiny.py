"""Tiny random-init transformers MoE models of every traced family (built from config classes)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 300
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def configs() -> dict:
    """model_type -> (config class name, kwargs)."""
    moe = dict(intermediate_size=48, num_experts_per_tok=2)
    return {
        "mixtral": ("MixtralConfig", {**COMMON, **moe, "num_local_experts": 6}),
        "qwen2_moe": (
            "Qwen2MoeConfig",
            {
                **COMMON,
                **moe,
                "num_experts": 6,
                "moe_intermediate_size": 24,
                "shared_expert_intermediate_size": 24,
            },
        ),
        "qwen3_moe": (
            "Qwen3MoeConfig",
            {**COMMON, **moe, "num_experts": 6, "moe_intermediate_size": 24, "head_dim": 8},
        ),
        "olmoe": ("OlmoeConfig", {**COMMON, **moe, "num_experts": 6}),
        "deepseek_v2": (
            "DeepseekV2Config",
            {
                **COMMON,
                "num_key_value_heads": 4,
                "intermediate_size": 48,
                "moe_intermediate_size": 16,
                "n_routed_experts": 8,
                "num_experts_per_tok": 2,
                "n_shared_experts": 1,
                "first_k_dense_replace": 1,
                "num_hidden_layers": 3,
                "kv_lora_rank": 16,
                "q_lora_rank": None,
                "qk_nope_head_dim": 8,
                "qk_rope_head_dim": 8,
                "v_head_dim": 8,
                "n_group": 1,
                "topk_group": 1,
                "topk_method": "greedy",
            },
        ),
        "deepseek_v3": (
            "DeepseekV3Config",
            {
                **COMMON,
                "num_key_value_heads": 4,
                "intermediate_size": 48,
                "moe_intermediate_size": 16,
                "n_routed_experts": 8,
                "num_experts_per_tok": 2,
                "n_shared_experts": 1,
                "first_k_dense_replace": 1,
                "num_hidden_layers": 3,
                "kv_lora_rank": 16,
                "q_lora_rank": 16,
                "qk_nope_head_dim": 8,
                "qk_rope_head_dim": 8,
                "v_head_dim": 8,
                "n_group": 2,
                "topk_group": 1,
            },
        ),
        "granitemoe": ("GraniteMoeConfig", {**COMMON, **moe, "num_local_experts": 6}),
        "phimoe": ("PhimoeConfig", {**COMMON, **moe, "num_local_experts": 6}),
        "gpt_oss": (
            "GptOssConfig",
            {
                **COMMON,
                "intermediate_size": 48,
                "num_local_experts": 6,
                "num_experts_per_tok": 2,
                "head_dim": 8,
            },
        ),
        "jetmoe": (
            "JetMoeConfig",
            {
                "vocab_size": VOCAB,
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_key_value_heads": 2,
                "kv_channels": 8,
                "intermediate_size": 48,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "max_position_embeddings": 128,
            },
        ),
        "switch_transformers": (
            "SwitchTransformersConfig",
            {
                "vocab_size": VOCAB,
                "d_model": 32,
                "d_kv": 8,
                "d_ff": 48,
                "num_layers": 2,
                "num_decoder_layers": 2,
                "num_heads": 4,
                "num_experts": 4,
                "num_sparse_encoder_layers": 1,
                "num_sparse_decoder_layers": 1,
                "expert_capacity": 64,
            },
        ),
    }


def extra_configs() -> dict:
    """Families without a dedicated adapter, traced through the generic (logits, weights, ids) one."""
    moe = dict(COMMON, intermediate_size=48, num_experts_per_tok=2, moe_intermediate_size=16)
    return {
        "glm4_moe": (
            "Glm4MoeConfig",
            {
                **moe,
                "n_routed_experts": 8,
                "first_k_dense_replace": 0,
                "n_group": 1,
                "topk_group": 1,
                "head_dim": 8,
            },
        ),
        "ernie4_5_moe": (
            "Ernie4_5_MoeConfig",
            {**moe, "moe_num_experts": 6, "moe_layer_start_index": 0},
        ),
        "hunyuan_v1_moe": (
            "HunYuanMoEV1Config",
            {**moe, "num_experts": 6, "moe_topk": 2, "head_dim": 8},
        ),
        "granitemoeshared": (
            "GraniteMoeSharedConfig",
            {**moe, "num_local_experts": 6, "shared_intermediate_size": 16},
        ),
        "minimax": ("MiniMaxConfig", {**moe, "num_local_experts": 6, "head_dim": 8}),
    }


def build(model_type: str, out: Path, seed: int = 0) -> Path:
    """Random-init model of `model_type`, randomised routers, saved with save_pretrained."""
    import transformers

    cls_name, kw = {**configs(), **extra_configs()}[model_type]
    cfg = getattr(transformers, cls_name)(**kw)
    torch.manual_seed(seed)
    if model_type == "switch_transformers":
        model = transformers.SwitchTransformersForConditionalGeneration(cfg)
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # some families init routers to zero: give them real decisions
        for name, p in model.named_parameters():
            if any(
                s in name
                for s in (
                    "gate.weight",
                    "router.weight",
                    "router.layer.weight",
                    "router.classifier.weight",
                    "router.bias",
                    "mlp.gate.weight",
                )
            ):
                p.normal_(0, 0.5)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.05)
    model.eval()
    model.save_pretrained(str(out))
    return out
