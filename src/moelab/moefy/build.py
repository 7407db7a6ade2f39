"""MoEfication pipeline (Zhang et al. 2022 "MoEfication"; Zhu et al. 2024 "LLaMA-MoE"):
dense Llama-family LM -> record FFN inputs on training text -> split every FFN's neurons into
E groups -> fit a linear router per layer on the groups' output norms -> moelab MoETransformer
whose experts sum to the original FFN (k = E reproduces the dense model exactly).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import track

from moelab._io import atomic_write_json
from moelab.errors import ConfigError, InputError
from moelab.layers.config import MoEConfig
from moelab.models.transformer import MoETransformer
from moelab.moefy.convert import moelab_config
from moelab.moefy.partition import partition_neurons, split_ffn
from moelab.moefy.router import fit_router, group_output_norms


@dataclass
class MoefyReport:
    """What moefy did, per layer: partition method, router held-out recall of the true top-k."""

    method: str
    num_experts: int
    top_k: int
    router_tokens: int
    router_recall: list[dict[int, float]] = field(default_factory=list)  # per layer, held out
    seed: int = 0

    def to_dict(self) -> dict:
        """JSON-serialisable dict."""
        return asdict(self)


@torch.no_grad()
def record_ffn_inputs(
    dense: MoETransformer, blocks: list[torch.Tensor], coact_tokens: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run the dense model over token blocks [n, S]; return per layer FFN inputs [N, D] (float16)
    and, if coact_tokens > 0, the first coact_tokens tokens' neuron activations [n, F]."""
    L = len(dense.blocks)
    xs: list[list[torch.Tensor]] = [[] for _ in range(L)]
    acts: list[list[torch.Tensor]] = [[] for _ in range(L)]
    seen = [0]

    def hook(i):
        def fn(mod, inp):
            x = inp[0].reshape(-1, inp[0].shape[-1])
            xs[i].append(x.to(torch.float16))
            if coact_tokens and seen[0] < coact_tokens:
                a = F.silu(mod.gate_proj(x)) * mod.up_proj(x)
                acts[i].append(a[: coact_tokens - seen[0]].float())

        return fn

    handles = [b.ffn.register_forward_pre_hook(hook(i)) for i, b in enumerate(dense.blocks)]
    try:
        for ids in track(blocks, description="recording FFN inputs"):
            dense(ids[None] if ids.dim() == 1 else ids)
            seen[0] += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(x) for x in xs], [torch.cat(a) if a else torch.empty(0) for a in acts]


def token_blocks(ids: list[int], seq_len: int, max_tokens: int) -> list[torch.Tensor]:
    """Cut a token stream into [seq_len] blocks holding at most max_tokens tokens."""
    n = min(len(ids), max_tokens) // seq_len * seq_len
    if n == 0:
        raise InputError(
            f"moefy: need at least {seq_len} tokens of training text, got {len(ids)} "
            "(use a larger corpus or a smaller --seq-len)"
        )
    t = torch.tensor(ids[:n], dtype=torch.long)
    return list(t.view(-1, seq_len))


@torch.no_grad()
def moefy_dense(
    dense: MoETransformer,
    hf_config,
    blocks: list[torch.Tensor],
    num_experts: int = 8,
    top_k: int = 2,
    method: str = "cluster",
    seed: int = 0,
    router_epochs: int = 30,
    recorded: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
) -> tuple[MoETransformer, MoefyReport]:
    """Split every FFN of a dense MoETransformer (a Llama copy) into experts and fit routers."""
    if dense.cfg.moe is not None:
        raise ConfigError("moefy: the input model is already an MoE")
    d_ff = dense.cfg.d_ff
    if num_experts < 1 or d_ff % num_experts:
        raise ConfigError(f"--experts={num_experts} must divide the FFN size {d_ff}")
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"--top-k={top_k} must be in [1, --experts={num_experts}]")
    coact = 4096 if method == "coactivation" else 0
    if recorded is not None and (coact == 0 or recorded[1][0].numel() > 0):
        xs, acts = recorded  # reuse FFN inputs recorded once for several methods
    else:
        xs, acts = record_ffn_inputs(dense, blocks, coact)
    moe = MoEConfig(
        d_model=dense.cfg.d_model,
        d_ff=d_ff // num_experts,
        num_experts=num_experts,
        top_k=top_k,
        router="topk",
        router_bias=True,
        norm_topk_prob=False,
        unit_weights=True,
        seed=seed,
    )
    cfg = moelab_config(hf_config, moe, dense.cfg.max_seq_len)
    model = MoETransformer(cfg)
    model.load_state_dict(
        {k: v for k, v in dense.state_dict().items() if ".ffn." not in k}, strict=False
    )
    report = MoefyReport(method, num_experts, top_k, int(xs[0].shape[0]), seed=seed)
    for i, (dblk, mblk) in enumerate(
        track(list(zip(dense.blocks, model.blocks, strict=True)), description="splitting FFNs")
    ):
        f = dblk.ffn
        groups = partition_neurons(
            f.gate_proj.weight,
            f.up_proj.weight,
            num_experts,
            method,
            activations=acts[i] if method == "coactivation" else None,
            seed=seed + i,
        )
        gu, dn = split_ffn(f.gate_proj.weight, f.up_proj.weight, f.down_proj.weight, groups)
        mblk.ffn.experts.gate_up_proj.copy_(gu)
        mblk.ffn.experts.down_proj.copy_(dn)
        x = xs[i].float()
        norms = group_output_norms(x, gu, dn)
        with torch.enable_grad():
            fit = fit_router(x, norms, epochs=router_epochs, seed=seed + i)
        mblk.ffn.router.gate.weight.copy_(fit.weight)
        mblk.ffn.router.gate.bias.copy_(fit.bias)
        report.router_recall.append(fit.topk_recall)
    return model.eval(), report


def set_top_k(model: MoETransformer, k: int) -> None:
    """Change how many experts every MoE layer uses (for the k = 1, 2, 4 quality sweep)."""
    for i in model.moe_layer_indices():
        r = model.blocks[i].ffn.router
        if not 1 <= k <= r.num_experts:
            raise ConfigError(f"top_k={k} must be in [1, {r.num_experts}]")
        r.top_k = k
        r.cfg.top_k = k
    model.cfg.moe.top_k = k


@torch.no_grad()
def perplexity(model, blocks: list[torch.Tensor], batch: int = 4) -> float:
    """exp(mean next-token cross-entropy) over token blocks, for a moelab or transformers model."""
    tot, n = 0.0, 0
    for s in range(0, len(blocks), batch):
        ids = torch.stack(blocks[s : s + batch])
        logits = model(ids).logits[:, :-1].float()
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        tot += float(loss)
        n += ids[:, 1:].numel()
    return float(np.exp(tot / max(n, 1)))


def save_moefied(model: MoETransformer, report: MoefyReport, tokenizer, out: str | Path) -> Path:
    """Save the MoEfied model (moelab format), its tokenizer.json and moefy.json."""
    out = Path(out)
    model.save(out)
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(
        tokenizer, "_tokenizer", None
    )
    if backend is not None:
        from moelab._io import atomic_write_text

        atomic_write_text(out / "tokenizer.json", backend.to_str())
    atomic_write_json(out / "moefy.json", report.to_dict())
    return out
