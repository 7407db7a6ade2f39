"""Distil an MoE into a dense model of its active size, and measure how much of the MoE's gain
survives (Fedus et al. 2022, "Switch Transformers", Sec. 5.1 and Table 6: a dense student
initialised from scratch and trained on 0.25 * teacher probabilities + 0.75 * ground truth kept
about 30% of the teacher's quality gain).

Two students with the same architecture (``moelab.models.dense_baseline`` of the teacher: the
same active FFN FLOPs per token), the same initialisation, the same batches in the same order
and the same number of tokens:

- ``alone``: next-token cross-entropy only;
- ``distilled``: ``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE``
  (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", with temperature T).

Both are scored on held-out blocks (a named split) beside the teacher; the surviving share of
the gain is (loss_alone - loss_distilled) / (loss_alone - loss_teacher) in nats per token. Each
finished student is saved (``<out>/<arm>/model``) with its log; a rerun with the same settings
loads it instead of training again.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress

from moelab._io import atomic_write_json
from moelab.data.dataset import PackedBlocks
from moelab.errors import ConfigError, ModelError
from moelab.experts.heldout import EvalSample, domain_loss, sequence_sums
from moelab.models.config import dense_baseline
from moelab.models.transformer import MoETransformer
from moelab.train.schedule import warmup_cosine

__all__ = ["kd_loss", "mean_kl", "train_student", "distill_to_dense"]


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, KL, CE) for causal LM logits [B, S, V] and labels = input ids [B, S] (shifted here)."""
    s = student_logits[:, :-1].float()
    y = labels[:, 1:]
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1))
    if alpha == 0.0:
        return ce, torch.zeros((), device=s.device), ce
    t = teacher_logits[:, :-1].float()
    t_logp = F.log_softmax(t / temperature, -1)
    s_logp = F.log_softmax(s / temperature, -1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    return alpha * temperature**2 * kl + (1 - alpha) * ce, kl, ce


@torch.no_grad()
def mean_kl(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    input_ids: torch.Tensor,
    batch_size: int = 16,
) -> float:
    """Token-mean KL(teacher || student) of next-token distributions over the given blocks."""
    teacher.eval()
    student.eval()
    total, n = 0.0, 0
    for i in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[i : i + batch_size]
        t = F.log_softmax(teacher(ids).logits[:, :-1].float(), -1)
        s = F.log_softmax(student(ids).logits[:, :-1].float(), -1)
        kl = (t.exp() * (t - s)).sum(-1)
        total += float(kl.sum())
        n += kl.numel()
    return total / max(n, 1)


def train_student(
    student: MoETransformer,
    teacher: MoETransformer | None,
    blocks: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    alpha: float,
    temperature: float = 1.0,
    seed: int = 0,
    label: str = "student",
) -> list[dict[str, float]]:
    """AdamW (warmup 5%, cosine) on the student for `steps` batches drawn by `seed`; `teacher`
    is needed when alpha > 0. Returns the per-step log."""
    if steps < 1 or batch_size < 1:
        raise ConfigError(f"distill: steps={steps} and batch_size={batch_size} must be >= 1")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"distill: alpha={alpha} must be in [0, 1]")
    if alpha > 0 and teacher is None:
        raise ConfigError("distill: alpha > 0 needs a teacher")
    if temperature <= 0:
        raise ConfigError(f"distill: temperature={temperature} must be > 0")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = warmup_cosine(opt, max(1, steps // 20), steps, min_ratio=0.1)
    if teacher is not None:
        teacher.eval()
    student.train()
    log = []
    t0 = time.perf_counter()
    with Progress() as prog:
        task = prog.add_task(f"training {label}", total=steps)
        for step in range(steps):
            idx = torch.randint(blocks.shape[0], (batch_size,), generator=g)
            ids = blocks[idx].to(student.device)
            t_logits = None
            if alpha > 0:
                with torch.no_grad():
                    t_logits = teacher(ids).logits
            loss, kl, ce = kd_loss(student(ids).logits, t_logits, ids, alpha, temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            sched.step()
            log.append(
                {"step": step + 1, "loss": loss.item(), "kl": kl.item(), "ce": ce.item(),
                 "seconds": time.perf_counter() - t0}
            )  # fmt: skip
            prog.advance(task)
    student.eval()
    return log


def distill_to_dense(
    teacher: MoETransformer,
    train_blocks: PackedBlocks,
    eval_sample: EvalSample,
    out_dir: str | os.PathLike[str],
    steps: int = 300,
    batch_size: int = 8,
    lr: float = 1e-3,
    alpha: float = 0.5,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the `alone` and `distilled` dense students on the same batches; compare held-out."""
    if teacher.cfg.moe is None:
        raise ModelError("distill --teacher: the teacher is dense; it needs MoE layers")
    if teacher.cfg.mode != "causal":
        raise ModelError("distill --teacher: only causal LMs are supported")
    scfg = dense_baseline(teacher.cfg)
    out = Path(out_dir)
    settings = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "alpha": alpha,
        "temperature": temperature, "seed": seed, "seq_len": train_blocks.seq_len,
        "student": scfg.to_dict(), "train_blocks": len(train_blocks),
    }  # fmt: skip
    teacher.eval()
    blocks = train_blocks.input_ids
    arms: dict[str, dict[str, Any]] = {}
    students: dict[str, MoETransformer] = {}
    for arm, a in (("alone", 0.0), ("distilled", alpha)):
        d = out / arm
        summ = d / "summary.json"
        if summ.is_file() and (d / "model" / "config.json").is_file():
            old = json.loads(summ.read_text(encoding="utf-8"))
            if old.get("settings") == {**settings, "alpha": a}:
                students[arm] = MoETransformer.load(d / "model", device=teacher.device)
                arms[arm] = old
                continue
        st = MoETransformer(scfg, seed=seed).to(teacher.device)
        log = train_student(
            st, teacher if a > 0 else None, blocks, steps, batch_size, lr, a, temperature, seed, arm
        )
        st.save(d / "model")
        arms[arm] = {"settings": {**settings, "alpha": a}, "log": log[-1:], "final": log[-1]}
        atomic_write_json(summ, arms[arm])
        students[arm] = st
    res: dict[str, Any] = {
        "split": eval_sample.split,
        "tokens_trained": steps * batch_size * blocks.shape[1],
    }
    s_t, c = sequence_sums(teacher, eval_sample)
    losses = {"teacher": domain_loss(s_t, c, eval_sample.domains)}
    pair = {}
    for arm, st in students.items():
        s, _ = sequence_sums(st, eval_sample)
        losses[arm] = domain_loss(s, c, eval_sample.domains)
        pair[arm] = s
    kl = {arm: mean_kl(teacher, st, eval_sample.input_ids) for arm, st in students.items()}
    lt, la, ld = (losses[k].value["all"] for k in ("teacher", "alone", "distilled"))
    gain = la - lt
    share = (la - ld) / gain if gain > 0 else float("nan")
    # uncertainty of the share: bootstrap over held-out sequences (paired)
    rng = np.random.default_rng(seed)
    shares = []
    n = s_t.shape[0]
    tot_a, tot_d, tot_t, tot_c = (x.sum(1) for x in (pair["alone"], pair["distilled"], s_t, c))
    for _ in range(1000):
        i = rng.integers(0, n, n)
        cc = tot_c[i].sum()
        ga = tot_a[i].sum() / cc - tot_t[i].sum() / cc
        if ga > 0:
            shares.append((tot_a[i].sum() - tot_d[i].sum()) / cc / ga)
    res.update(
        {
            "teacher_params": teacher.stats().total_params,
            "teacher_active_params": teacher.stats().active_params,
            "student_params": students["alone"].stats().total_params,
            "loss": {k: v.value for k, v in losses.items()},
            "loss_se": {k: v.se for k, v in losses.items()},
            "ppl": {k: math.exp(v.value["all"]) for k, v in losses.items()},
            "kl_to_teacher": kl,
            "gain_nats": gain,
            "surviving_share": share,
            "surviving_share_bootstrap_95": (
                [float(np.percentile(shares, 2.5)), float(np.percentile(shares, 97.5))]
                if len(shares) > 10
                else None
            ),
            "settings": settings,
        }
    )
    atomic_write_json(out / "distill.json", res)
    return res
