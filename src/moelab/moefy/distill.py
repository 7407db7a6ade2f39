"""Recover a MoEfied model's quality by distilling the dense original into it (knowledge
distillation, Hinton et al. 2015; the recovery step after structured pruning, e.g. Sheared-LLaMA,
Minitron): minimise KL(dense || MoEfied) over next-token distributions on training text,
updating only the experts' weights. Routers stay fixed: with unit combine weights they get no
gradient, and the calibration already fitted them.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from rich.progress import Progress

from moelab.errors import ConfigError
from moelab.models.transformer import MoETransformer
from moelab.train.schedule import warmup_cosine


def expert_parameters(model: MoETransformer) -> list[torch.nn.Parameter]:
    """The routed experts' weights of every MoE layer (what distillation trains)."""
    params = []
    for i in model.moe_layer_indices():
        params.extend(model.blocks[i].ffn.experts.parameters())
    return params


def distill(
    student: MoETransformer,
    teacher: torch.nn.Module,
    blocks: list[torch.Tensor],
    steps: int,
    lr: float = 5e-5,
    batch_size: int = 2,
    max_minutes: float | None = None,
    seed: int = 0,
) -> list[dict]:
    """AdamW on the experts (warmup 10%, cosine) minimising token-mean KL(teacher || student).

    Stops after `steps` or `max_minutes`; returns the per-step log (KL, seconds).
    """
    if steps < 1:
        raise ConfigError(f"distill: steps={steps} must be >= 1")
    if not blocks:
        raise ConfigError("distill: no training blocks")
    params = expert_parameters(student)
    if not params:
        raise ConfigError("distill: the student has no MoE layers to train")
    frozen = [p for p in student.parameters() if all(p is not q for q in params)]
    was = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    teacher.eval()
    student.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    sched = warmup_cosine(opt, max(1, steps // 10), steps, min_ratio=0.0)
    log: list[dict] = []
    t0 = time.perf_counter()
    try:
        with Progress() as prog:
            task = prog.add_task("distilling dense -> MoEfied", total=steps)
            for step in range(steps):
                idx = torch.randint(len(blocks), (batch_size,), generator=g)
                ids = torch.stack([blocks[int(i)] for i in idx])
                with torch.no_grad():
                    t_logp = F.log_softmax(teacher(ids).logits.float(), -1)
                s_logp = F.log_softmax(student(ids).logits.float(), -1)
                kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
                opt.zero_grad(set_to_none=True)
                kl.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                log.append({"step": step + 1, "kl": kl.item(), "seconds": time.perf_counter() - t0})
                prog.advance(task)
                if max_minutes is not None and time.perf_counter() - t0 > 60 * max_minutes:
                    break
    finally:
        for p, r in zip(frozen, was, strict=True):
            p.requires_grad_(r)
        student.eval()
    return log
