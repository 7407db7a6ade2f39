"""Parameter and FLOP accounting for a MoETransformer (Kaplan et al. 2020, Table 1; Hoffmann et al.
2022, Appendix F, for the attention term).

FLOPs count 2 per multiply-add. Per token and layer: q/k/v/o projections, attention scores and
weighted values 2 * 2 * seq_len * n_heads * head_dim (full context, no causal halving, as in
Chinchilla), the FFN (dense, or router + k routed experts + shared experts + shared gate), plus
the LM head. Norms, softmax, rotary and residual additions are left out (O(d_model), not O(d^2)).
Training = 3x forward (backward = 2x forward).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from moelab.errors import InputError

if TYPE_CHECKING:
    from moelab.models.transformer import ModelStats, MoETransformer


def n_matrices(act: str) -> int:
    """Weight matrices of an FFN: 3 for SwiGLU (gate, up, down), 2 otherwise (up, down)."""
    return 3 if act == "swiglu" else 2


def model_stats(model: MoETransformer, seq_len: int | None = None) -> ModelStats:
    """Count parameters from the modules and FLOPs per token from the architecture."""
    from moelab.models.transformer import DenseFFN, ModelStats

    cfg = model.cfg
    S = cfg.max_seq_len if seq_len is None else seq_len
    if not isinstance(S, int) or S < 1:
        raise InputError(f"stats: seq_len={seq_len!r} must be a positive int")
    D, hd = cfg.d_model, cfg.head_dim
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    embedding = model.embed_tokens.weight.numel()
    if not cfg.tie_embeddings:
        embedding += model.lm_head.weight.numel()

    inactive = routed = router_flops = 0
    flops = 2 * D * cfg.vocab_size  # LM head
    for block in model.blocks:
        q_out, kv_out = cfg.n_heads * hd, cfg.n_kv_heads * hd
        flops += 2 * D * (q_out + 2 * kv_out) + 2 * q_out * D  # projections
        flops += 2 * 2 * S * cfg.n_heads * hd  # scores QK^T and weighted values AV
        ffn = block.ffn
        if isinstance(ffn, DenseFFN):
            flops += 2 * n_matrices(ffn.act) * D * ffn.down_proj.in_features
            continue
        m = ffn.cfg
        bank_params = sum(p.numel() for p in (ffn.experts.gate_up_proj, ffn.experts.down_proj))
        routed += bank_params
        inactive += bank_params * (m.num_experts - m.top_k) // m.num_experts
        gate = getattr(ffn.router, "gate", None)
        if isinstance(gate, nn.Linear):
            router_flops += 2 * D * gate.out_features
        flops += m.top_k * 2 * n_matrices(m.expert_act) * D * m.d_ff
        if ffn.shared_experts is not None:
            flops += 2 * n_matrices(m.expert_act) * D * m.shared_hidden
        if ffn.shared_gate is not None:
            flops += 2 * D
    flops += router_flops
    return ModelStats(
        total_params=total,
        active_params=total - inactive,
        flops_per_token_fwd=flops,
        flops_per_token_train=3 * flops,
        embedding_params=embedding,
        routed_expert_params=routed,
        router_flops_per_token=router_flops,
        seq_len=S,
    )
