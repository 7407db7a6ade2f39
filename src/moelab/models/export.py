"""Export a MoETransformer to a Hugging Face transformers checkpoint with identical logits.

Mappings (weights copy without transposes; transformers v5 expert layout):
- top-k softmax router with renormalised weights, SwiGLU experts, no shared experts, MoE in
  every layer -> ``MixtralForCausalLM`` (Jiang et al. 2024);
- with shared experts (DeepSeekMoE-style, optionally sigmoid-gated) -> ``Qwen2MoeForCausalLM``
  (Qwen2 technical report 2024), which also expresses ``norm_topk_prob=False``, MoE every n-th
  layer (``decoder_sparse_step``) and first-k-dense (``mlp_only_layers``). Qwen2-MoE always gates
  its shared expert with sigmoid(w.x): an ungated shared expert is exported with w = 0 (gate 0.5)
  and its down projection doubled, which is exact in floating point;
- a dense SwiGLU model -> ``LlamaForCausalLM``.
Both use rotary "rotate half" with rope_theta, RMSNorm in float32 with the same eps, attention
without biases and tied embeddings as configured. Everything else (other routers, GELU/ReLU
experts, capacity limits, router bias, routed scaling, MLM encoders) has no equivalent and raises
ModelError saying why.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moelab._io import default_mode
from moelab.errors import ModelError

if TYPE_CHECKING:
    from moelab.models.transformer import MoETransformer


def hf_family(model: MoETransformer) -> str:
    """'mixtral', 'qwen2_moe' or 'llama' for an exportable model; ModelError naming the obstacle."""
    cfg, m = model.cfg, model.cfg.moe
    why: list[str] = []
    if cfg.mode != "causal":
        why.append(f"mode={cfg.mode!r} (masked-LM encoders have no causal-LM equivalent)")
    dense_layers = cfg.n_layers - len(cfg.moe_layer_indices())
    if dense_layers and cfg.dense_act != "swiglu":
        why.append(f"dense_act={cfg.dense_act!r} (transformers' MLPs are SwiGLU)")
    if m is None:
        if why:
            raise ModelError("export_hf: cannot export this dense model: " + "; ".join(why))
        return "llama"
    if m.router != "topk":
        why.append(f"moe.router={m.router!r} (only 'topk' softmax routing has an equivalent)")
    if m.expert_act != "swiglu":
        why.append(f"moe.expert_act={m.expert_act!r} (Mixtral/Qwen2-MoE experts are SwiGLU)")
    if m.router_bias:
        why.append("moe.router_bias=True (their routers have no bias)")
    if m.bias_update_rate > 0 and m.router == "topk":
        why.append(
            "moe.bias_update_rate>0 (a selection bias on softmax scores: their routers have none)"
        )
    if m.capacity_factor is not None or getattr(m, "expert_capacity", None) is not None:
        why.append("a capacity limit is set (their MoE blocks are dropless)")
    if m.routed_scaling_factor != 1.0:
        why.append(f"moe.routed_scaling_factor={m.routed_scaling_factor} (no such scale)")
    if why:
        raise ModelError("export_hf: no transformers equivalent: " + "; ".join(why))
    if m.num_shared_experts > 0:
        return "qwen2_moe"
    if not m.norm_topk_prob or cfg.moe_every != 1 or cfg.first_k_dense != 0:
        raise ModelError(
            "export_hf: without shared experts the target is Mixtral, which needs "
            f"norm_topk_prob=True, moe_every=1 and first_k_dense=0 (got {m.norm_topk_prob}, "
            f"{cfg.moe_every}, {cfg.first_k_dense}); Qwen2-MoE expresses those but needs a "
            "shared expert"
        )
    return "mixtral"


def _hf_config(model: MoETransformer, family: str):
    """The transformers config object of the target family."""
    import transformers

    cfg, m = model.cfg, model.cfg.moe
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=None,
        attention_dropout=0.0,
    )
    if family == "llama":
        return transformers.LlamaConfig(
            intermediate_size=cfg.d_ff, attention_bias=False, mlp_bias=False, **common
        )
    if family == "mixtral":
        return transformers.MixtralConfig(
            intermediate_size=m.d_ff,
            num_local_experts=m.num_experts,
            num_experts_per_tok=m.top_k,
            router_jitter_noise=m.jitter_noise,
            router_aux_loss_coef=cfg.aux_loss_coef,
            sliding_window=None,
            **common,
        )
    return transformers.Qwen2MoeConfig(
        intermediate_size=cfg.d_ff,
        moe_intermediate_size=m.d_ff,
        shared_expert_intermediate_size=m.shared_hidden,
        num_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
        norm_topk_prob=m.norm_topk_prob,
        decoder_sparse_step=cfg.moe_every,
        mlp_only_layers=list(range(cfg.first_k_dense)),
        router_aux_loss_coef=cfg.aux_loss_coef,
        qkv_bias=False,
        use_sliding_window=False,
        **common,
    )


def hf_state_dict(model: MoETransformer, family: str) -> dict[str, torch.Tensor]:
    """Our weights under transformers' parameter names for `family`."""
    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": model.embed_tokens.weight,
        "model.norm.weight": model.norm.weight,
        "lm_head.weight": model.lm_head.weight,
    }
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = block.attn_norm.weight
        sd[p + "post_attention_layernorm.weight"] = block.ffn_norm.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{name}.weight"] = getattr(block.attn, name).weight
        ffn = block.ffn
        if not block.is_moe:
            for name in ("gate_proj", "up_proj", "down_proj"):
                sd[p + f"mlp.{name}.weight"] = getattr(ffn, name).weight
            continue
        sd[p + "mlp.gate.weight"] = ffn.router.gate.weight
        sd[p + "mlp.experts.gate_up_proj"] = ffn.experts.gate_up_proj
        sd[p + "mlp.experts.down_proj"] = ffn.experts.down_proj
        if family == "qwen2_moe":
            gate, up = ffn.shared_experts.gate_up_proj[0].chunk(2, dim=0)
            down = ffn.shared_experts.down_proj[0]
            if ffn.shared_gate is not None:
                shared_gate = ffn.shared_gate.weight
            else:  # sigmoid(0) = 0.5, compensated exactly by doubling the down projection
                shared_gate = torch.zeros(
                    1, model.cfg.d_model, dtype=down.dtype, device=down.device
                )
                down = down * 2
            sd[p + "mlp.shared_expert.gate_proj.weight"] = gate
            sd[p + "mlp.shared_expert.up_proj.weight"] = up
            sd[p + "mlp.shared_expert.down_proj.weight"] = down
            sd[p + "mlp.shared_expert_gate.weight"] = shared_gate
    return {k: v.detach() for k, v in sd.items()}


def export_hf(model: MoETransformer, out_dir: str | Path) -> Path:
    """Write a transformers checkpoint (save_pretrained) of `model` to out_dir, atomically."""
    try:
        import transformers
    except ImportError:
        raise ModelError("export_hf needs transformers: pip install 'moelab[hf]'") from None
    family = hf_family(model)
    hf_cfg = _hf_config(model, family)
    cls = {
        "llama": transformers.LlamaForCausalLM,
        "mixtral": transformers.MixtralForCausalLM,
        "qwen2_moe": transformers.Qwen2MoeForCausalLM,
    }[family]
    with torch.device("cpu"):
        hf = cls(hf_cfg)
    hf.to(dtype=model.dtype)
    missing, unexpected = hf.load_state_dict(
        {k: v.to("cpu") for k, v in hf_state_dict(model, family).items()}, strict=False
    )
    if missing or unexpected:
        raise ModelError(
            f"export_hf({family}): weight names do not match transformers {transformers.__version__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        hf.save_pretrained(tmp)
        os.chmod(tmp, default_mode(directory=True))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
