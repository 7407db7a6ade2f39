"""MoEfication pipeline (Zhang et al. 2022 "MoEfication"; Zhu et al. 2024 "LLaMA-MoE"):
dense Llama-family LM -> record FFN inputs on training text -> split every FFN's neurons into
E groups -> fit a linear router per layer on the groups' output norms -> moelab MoETransformer
whose experts sum to the original FFN (k = E reproduces the dense model exactly).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import track

from moelab._io import atomic_write_json
from moelab.errors import ConfigError, InputError
from moelab.layers.config import MoEConfig
from moelab.models.transformer import MoETransformer
from moelab.moefy.calibrate import LayerWalker, refit_down_proj
from moelab.moefy.convert import moelab_config
from moelab.moefy.partition import partition_neurons, split_ffn
from moelab.moefy.router import fit_router, group_output_norms


@dataclass
class MoefyReport:
    """What moefy did: partition method, per MoE layer the router's held-out recall of the true
    top-k groups and (if calibrated) the held-out reconstruction error before/after the refit."""

    method: str
    num_experts: int
    top_k: int
    router_tokens: int
    router_recall: list[dict[int, float]] = field(default_factory=list)  # per MoE layer, held out
    seed: int = 0
    dense_layers: int = 0
    calibrated: bool = False
    ridge: float | None = None
    calibration: list[dict] = field(default_factory=list)  # per MoE layer, held-out rel. error

    def to_dict(self) -> dict:
        """JSON-serialisable dict."""
        return asdict(self)

    def mean_router_recall(self) -> dict[int, float]:
        """k -> held-out top-k recall averaged over the MoE layers."""
        n = len(self.router_recall)
        return {k: sum(r[k] for r in self.router_recall) / n for k in self.router_recall[0]}

    def mean_calibration(self) -> dict | None:
        """Held-out reconstruction error averaged over the MoE layers, before and after the
        refit (None if not calibrated)."""
        if not self.calibration:
            return None
        n = len(self.calibration)
        return {
            "split": "calibration tokens held out from the refit (train split of the corpus)",
            "before": sum(c["rel_err_before"] for c in self.calibration) / n,
            "after": sum(c["rel_err_after"] for c in self.calibration) / n,
        }


@torch.no_grad()
def record_ffn_inputs(dense: MoETransformer, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run the dense model over token blocks [n, S]; return per layer FFN inputs [N, D] (float16)."""
    xs: list[list[torch.Tensor]] = [[] for _ in dense.blocks]

    def hook(i):
        def fn(mod, inp):
            xs[i].append(inp[0].reshape(-1, inp[0].shape[-1]).to(torch.float16))

        return fn

    handles = [b.ffn.register_forward_pre_hook(hook(i)) for i, b in enumerate(dense.blocks)]
    try:
        for ids in track(blocks, description="recording FFN inputs"):
            dense(ids[None] if ids.dim() == 1 else ids)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(x) for x in xs]


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


def split_layer(
    dense_ffn,
    moe_ffn,
    x: torch.Tensor,
    num_experts: int,
    method: str,
    seed: int,
    router_epochs: int,
    coact_tokens: int = 4096,
) -> dict[int, float]:
    """Split one dense SwiGLU FFN into moe_ffn's experts and fit its router on FFN inputs x [n, D].

    Returns the router's held-out top-k recall of the true largest groups.
    """
    f = dense_ffn
    acts = None
    if method == "coactivation":
        xa = x[:coact_tokens].float()
        acts = F.silu(f.gate_proj(xa)) * f.up_proj(xa)
    groups = partition_neurons(
        f.gate_proj.weight, f.up_proj.weight, num_experts, method, activations=acts, seed=seed
    )
    gu, dn = split_ffn(f.gate_proj.weight, f.up_proj.weight, f.down_proj.weight, groups)
    moe_ffn.experts.gate_up_proj.copy_(gu)
    moe_ffn.experts.down_proj.copy_(dn)
    xf = x.float()
    norms = group_output_norms(xf, gu, dn)
    with torch.enable_grad():
        fit = fit_router(xf, norms, epochs=router_epochs, seed=seed)
    moe_ffn.router.gate.weight.copy_(fit.weight)
    moe_ffn.router.gate.bias.copy_(fit.bias)
    return fit.topk_recall


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
    recorded: list[torch.Tensor] | None = None,
    calibrate: bool = False,
    dense_layers: int = 0,
    ridge: float = 5e-2,
) -> tuple[MoETransformer, MoefyReport]:
    """Split every FFN of a dense MoETransformer (a Llama copy) into experts and fit routers.

    dense_layers: the first N FFNs stay dense (DeepSeekMoE's first_k_dense).
    calibrate: convert layers in order on the MoEfied model's own hidden states and ridge-refit
    the experts' down projections for top_k (moefy/calibrate.py); otherwise routers are fitted on
    the dense model's FFN inputs, recorded once, and the experts keep the split weights.
    """
    if dense.cfg.moe is not None:
        raise ConfigError("moefy: the input model is already an MoE")
    d_ff = dense.cfg.d_ff
    if num_experts < 1 or d_ff % num_experts:
        raise ConfigError(f"--experts={num_experts} must divide the FFN size {d_ff}")
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"--top-k={top_k} must be in [1, --experts={num_experts}]")
    L = len(dense.blocks)
    if not 0 <= dense_layers < L:
        raise ConfigError(
            f"--dense-layers={dense_layers} must be in [0, {L - 1}] (model has {L} layers)"
        )
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
    cfg = replace(moelab_config(hf_config, moe, dense.cfg.max_seq_len), first_k_dense=dense_layers)
    model = MoETransformer(cfg)
    model.load_state_dict(
        {
            k: v
            for k, v in dense.state_dict().items()
            if ".ffn." not in k or int(k.split(".")[1]) < dense_layers
        },
        strict=False,
    )
    report = MoefyReport(
        method,
        num_experts,
        top_k,
        int(sum(b.numel() for b in blocks)),
        seed=seed,
        dense_layers=dense_layers,
        calibrated=calibrate,
        ridge=ridge if calibrate else None,
    )
    layers = list(range(dense_layers, L))
    if calibrate:
        walker = LayerWalker(model, blocks)
        for i in track(range(L), description="moefy + calibrate, layer by layer"):
            mblk = model.blocks[i]
            h_attn, x = walker.ffn_input(mblk)
            if i < dense_layers:
                walker.advance(h_attn, mblk.ffn(x))
                continue
            dffn = dense.blocks[i].ffn
            recall = split_layer(dffn, mblk.ffn, x, num_experts, method, seed + i, router_epochs)
            report.router_recall.append(recall)
            cal = refit_down_proj(mblk.ffn, x, dffn(x), ridge, layer=i)
            report.calibration.append(asdict(cal))
            walker.advance(h_attn, mblk.ffn(x)[0])
        return model.eval(), report
    # FFN inputs may be recorded once by the caller and reused for several methods
    xs = recorded if recorded is not None else record_ffn_inputs(dense, blocks)
    for i in track(layers, description="splitting FFNs"):
        recall = split_layer(
            dense.blocks[i].ffn,
            model.blocks[i].ffn,
            xs[i],
            num_experts,
            method,
            seed + i,
            router_epochs,
        )
        report.router_recall.append(recall)
    return model.eval(), report


def ffn_compute_fraction(model: MoETransformer, top_k: int | None = None) -> float:
    """Active FFN neurons per token as a share of the dense model's (router excluded)."""
    cfg = model.cfg
    L = cfg.n_layers
    moe_layers = len(model.moe_layer_indices())
    m = cfg.moe
    k = m.top_k if top_k is None else top_k
    active = (L - moe_layers) * cfg.d_ff + moe_layers * (k * m.d_ff + m.shared_hidden)
    return active / (L * cfg.d_ff)


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
