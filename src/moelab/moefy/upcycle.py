"""Sparse upcycling (Komatsuzaki et al. 2023; how Mixtral started from Mistral): copy each dense
SwiGLU FFN into E identical experts and add a router. With renormalised top-k weights the MoE
output equals the dense output at step 0 for ANY router (identical experts, weights sum to 1);
the router starts at zero so routing is uniform. Training then continues with the layer
library's load-balancing and z losses so experts diverge.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.progress import Progress

from moelab._io import atomic_write_json
from moelab.errors import ConfigError
from moelab.layers.config import MoEConfig
from moelab.models.transformer import MoETransformer
from moelab.moefy.convert import moelab_config
from moelab.train.schedule import warmup_cosine


@torch.no_grad()
def upcycle_dense(
    dense: MoETransformer, hf_config, experts: int = 8, top_k: int = 2, seed: int = 0
) -> MoETransformer:
    """MoE copy of a dense moelab model: every FFN duplicated into `experts` experts."""
    if dense.cfg.moe is not None:
        raise ConfigError("upcycle: the input model is already an MoE")
    if not 1 <= top_k <= experts:
        raise ConfigError(f"--top-k={top_k} must be in [1, --experts={experts}]")
    moe = MoEConfig(
        d_model=dense.cfg.d_model,
        d_ff=dense.cfg.d_ff,
        num_experts=experts,
        top_k=top_k,
        router="topk",
        norm_topk_prob=True,
        seed=seed,
    )
    cfg = moelab_config(hf_config, moe, dense.cfg.max_seq_len)
    cfg.aux_loss_coef = 0.01
    cfg.z_loss_coef = 0.001
    model = MoETransformer(cfg, seed=seed)
    model.load_state_dict(
        {k: v for k, v in dense.state_dict().items() if ".ffn." not in k}, strict=False
    )
    for d, m in zip(dense.blocks, model.blocks, strict=True):
        gu = torch.cat([d.ffn.gate_proj.weight, d.ffn.up_proj.weight], dim=0)
        m.ffn.experts.gate_up_proj.copy_(gu.expand(experts, *gu.shape))
        dn = d.ffn.down_proj.weight
        m.ffn.experts.down_proj.copy_(dn.expand(experts, *dn.shape))
        m.ffn.router.gate.weight.zero_()
    return model


def continue_training(
    model: MoETransformer,
    blocks: list[torch.Tensor],
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 4,
    max_minutes: float | None = None,
    seed: int = 0,
) -> list[dict]:
    """Short AdamW fine-tune (warmup 10%, cosine) of an upcycled model; returns the loss log.

    The router starts at zero (uniform routing): a little noise is added to its weights first so
    that experts receive different tokens and can diverge.
    """
    g = torch.Generator().manual_seed(seed)
    for i in model.moe_layer_indices():
        w = model.blocks[i].ffn.router.gate.weight
        with torch.no_grad():
            w.add_(torch.randn(w.shape, generator=g) * 1e-3)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = warmup_cosine(opt, max(1, steps // 10), steps, min_ratio=0.0)
    log: list[dict] = []
    t0 = time.perf_counter()
    with Progress() as prog:
        task = prog.add_task("upcycle training", total=steps)
        for step in range(steps):
            idx = torch.randint(len(blocks), (batch_size,), generator=g)
            ids = torch.stack([blocks[int(i)] for i in idx])
            out = model(ids, labels=ids)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            log.append(
                {"step": step + 1, "lm_loss": out.lm_loss.item(), "aux_loss": out.aux_loss.item()}
            )
            prog.advance(task)
            if max_minutes is not None and time.perf_counter() - t0 > 60 * max_minutes:
                break
    model.eval()
    return log


def save_upcycled(
    model: MoETransformer, log: list[dict], tokenizer, out: str | Path, info: dict
) -> Path:
    """Save the upcycled model, tokenizer.json and upcycle.json (loss log, cost)."""
    from moelab._io import atomic_write_text

    out = Path(out)
    model.save(out)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        atomic_write_text(out / "tokenizer.json", backend.to_str())
    atomic_write_json(out / "upcycle.json", {**info, "log": log})
    return out
