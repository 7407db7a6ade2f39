"""The training loop of `moelab train`: causal LM or MLM, MoE or dense, resumable after a kill.

Objective: cross-entropy + aux_loss_coef * load-balancing loss (Fedus et al. 2022, Switch
Transformer, Eq. 4) + z_loss_coef * router z-loss (Zoph et al. 2022, ST-MoE, Eq. 5), both
computed by the model. AdamW (Loshchilov & Hutter 2019) with decoupled weight decay on
matrices only, linear warmup + cosine decay, global grad-norm clipping. MLM corruption is
BERT's 15% / 80-10-10 (Devlin et al. 2019). Validation perplexity = exp(mean token
cross-entropy) on a fixed set of held-out blocks (fixed masks for MLM), reported beside the
unigram baseline on exactly the same target tokens.

Reproducibility: batch order is a function of (seed, epoch); every other random draw comes
from RNGs whose states are checkpointed with the model, optimizer, scheduler and data position,
so a run killed and resumed from its last checkpoint produces the same loss curve as an
uninterrupted one on the same machine.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from moelab._io import atomic_write_json, atomic_write_text
from moelab.data.dataset import PackedBlocks, pack_blocks
from moelab.data.mlm import IGNORE_INDEX, mask_tokens
from moelab.data.prepare import PreparedData, prepare_data
from moelab.data.tokenizer import special_ids
from moelab.errors import ConfigError
from moelab.models import MoETransformer
from moelab.parallel.training import TrainParallel, local_device
from moelab.train.checkpoint import (
    latest_checkpoint,
    load_model_weights,
    load_training_state,
    save_checkpoint,
)
from moelab.train.config import TrainConfig
from moelab.train.metrics import ExpertLoad, unigram_logprobs, unigram_perplexity
from moelab.train.schedule import warmup_cosine

__all__ = ["TrainResult", "train", "evaluate", "build_model", "set_threads", "time_cap_warning"]

# fields that must not change when a run is resumed (they define the model or its data)
_RESUME_KEYS = (
    "corpus", "max_bytes", "text_column", "tokenizer", "vocab_size", "mode", "dense", "d_model",
    "n_layers", "n_heads", "n_kv_heads", "d_ff", "num_experts", "top_k", "router", "expert_act",
    "moe_every", "first_k_dense", "num_shared_experts", "capacity_factor", "seq_len", "batch_size",
    "seed",
)  # fmt: skip


@dataclass
class TrainResult:
    """What a training run produced."""

    run_dir: Path
    model_dir: Path
    steps: int
    losses: list[float]  # training lm_loss per step (1..steps)
    evals: list[dict[str, float]]  # step, tokens, train_flops, train_seconds, val_loss, val_ppl
    unigram_ppl: float
    final_val_ppl: float
    expert_load: dict[str, Any] | None  # last logging window (None for dense)
    stopped: str  # "max_steps" (the work budget) or "time_cap" (the wall-clock safety limit)
    stats: dict[str, int] = field(default_factory=dict)
    resumed_from: int = 0
    max_steps: int = 0  # the step budget asked for
    warning: str | None = None  # set when the time cap stopped the run before its step budget
    parallel: dict[str, Any] | None = None  # processes, bytes sent per step, tokens/s (torchrun)

    @property
    def time_capped(self) -> bool:
        """True when the wall-clock safety cap, not the step budget, ended the run."""
        return self.stopped == "time_cap"


def time_cap_warning(steps: int, max_steps: int, max_minutes: float | None) -> str:
    """The loud message every output carries when the time cap cut a run short."""
    return (
        f"stopped by the time cap (max_minutes={max_minutes}) after {steps} of {max_steps} "
        "steps: numbers are not comparable with a run that completed its step budget"
    )


def set_threads(threads: int = 0) -> int:
    """Use `threads` torch threads (0 = every core this process may run on)."""
    n = threads or (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    torch.set_num_threads(n)
    return n


def build_model(cfg: TrainConfig, data: PreparedData, device: torch.device) -> MoETransformer:
    """Model for this config and tokenizer, initialised from cfg.seed."""
    sp = special_ids(data.tokenizer)
    if cfg.mode == "mlm" and sp.mask is None:
        raise ConfigError("mode='mlm' needs a tokenizer with a <mask>/[MASK] token")
    mcfg = cfg.build_model_config(data.tokenizer.get_vocab_size(), sp.pad, sp.mask, sp.bos)
    return MoETransformer(mcfg, seed=cfg.seed).to(device)


def update_selection_biases(
    model: MoETransformer,
    routing: list,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Aux-loss-free balancing: move each MoE router's selection bias towards equal load, from
    the expert counts of this step (padding excluded; `reduce` sums them over processes)."""
    for block, r in zip(model.blocks, routing, strict=True):
        if r is not None:
            counts = r.expert_counts()
            block.ffn.router.update_bias(reduce(counts) if reduce is not None else counts)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def _validation_set(
    cfg: TrainConfig, blocks: PackedBlocks, vocab: int, special: list[int], mask_id: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed (inputs, labels) of the validation blocks; MLM masks drawn once from seed + 1."""
    x = blocks.input_ids
    if cfg.mode == "causal":
        return x, x
    g = torch.Generator().manual_seed(cfg.seed + 1)
    assert mask_id is not None
    return mask_tokens(x, mask_id, vocab, special, mlm_prob=cfg.mlm_prob, generator=g)


@torch.no_grad()
def evaluate(
    model: MoETransformer,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> tuple[float, int]:
    """(mean token cross-entropy, number of target tokens) over the given blocks."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, inputs.shape[0], batch_size):
        x = inputs[i : i + batch_size].to(device)
        y = labels[i : i + batch_size].to(device)
        out = model(x, labels=y)
        t = y[:, 1:] if model.cfg.mode == "causal" else y
        n = int((t != IGNORE_INDEX).sum())
        total += float(out.lm_loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1), count


class _Loggers:
    """TensorBoard / MLflow / metrics.jsonl sinks."""

    def __init__(
        self, cfg: TrainConfig, run_dir: Path, start_step: int, enabled: bool = True
    ) -> None:
        self.tb = None
        self.mlflow = None
        self.jsonl = run_dir / "metrics.jsonl"
        self.enabled = enabled  # False on every process but rank 0
        if not enabled:
            return
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(
                str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None
            )
        if cfg.mlflow:
            try:
                import mlflow
            except ImportError:
                raise ConfigError(
                    "mlflow=True but MLflow is not installed; run: pip install mlflow"
                ) from None
            self.mlflow = mlflow
            mlflow.start_run(run_name=run_dir.name)
            mlflow.log_params({k: v for k, v in cfg.model_dump().items() if v is not None})

    def log(self, step: int, scalars: dict[str, float], record: dict[str, Any]) -> None:
        """Write scalars to every sink and one JSON line."""
        if not self.enabled:
            return
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in scalars.items()}, step=step)
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")

    def close(self) -> None:
        """Flush and close."""
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


def _truncate_jsonl(path: Path, step: int) -> None:
    """Drop log lines written after `step` (they belong to the part of a killed run being redone)."""
    if not path.is_file():
        return
    keep = [
        ln
        for ln in path.read_text(encoding="utf-8").splitlines()
        if ln and json.loads(ln)["step"] <= step
    ]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def train(
    cfg: TrainConfig,
    resume: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    console: Console | None = None,
) -> TrainResult:
    """Train (or resume) the model `cfg` describes; writes everything under cfg.out_dir.

    Under torchrun (or in an initialised process group) every process calls this; experts are
    sharded over `cfg.expert_parallel` processes and only rank 0 writes files
    (`moelab.parallel.training`)."""
    par = TrainParallel.setup(
        cfg.expert_parallel, cfg.device, cfg.batch_size, cfg.num_experts, cfg.dense
    )
    try:
        return _train(cfg, par, resume, on_step, console)
    finally:
        par.close()


def _train(
    cfg: TrainConfig,
    par: TrainParallel,
    resume: bool,
    on_step: Callable[[int, float], None] | None,
    console: Console | None,
) -> TrainResult:
    console = console or Console()
    if not par.is_main:
        console = Console(quiet=True)
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(local_device(cfg.device))
    set_threads(cfg.threads if par.world == 1 else par.threads(cfg.threads))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)

    def prepare() -> PreparedData:
        with console.status(f"preparing data ({cfg.corpus}) in {cfg.data_path} ..."):
            return prepare_data(
                cfg.corpus, cfg.data_path, vocab_size=cfg.vocab_size, seed=cfg.seed, max_bytes=cfg.max_bytes,
                text_column=cfg.text_column, tokenizer=cfg.tokenizer,
            )  # fmt: skip

    data = prepare() if par.is_main else None
    par.barrier()  # rank 0 prepares the folder; the others then read it
    data = data if data is not None else prepare()
    sp = special_ids(data.tokenizer)
    vocab = data.tokenizer.get_vocab_size()
    train_blocks = pack_blocks(data.streams["train"], cfg.seq_len)
    val_blocks = pack_blocks(
        data.streams["validation"], cfg.seq_len, max_blocks=cfg.eval_batches * cfg.batch_size
    )
    model = build_model(cfg, data, device)
    model.train()
    stats = model.stats(cfg.seq_len)  # of the whole model, before any expert sharding
    val_x, val_y = _validation_set(cfg, val_blocks, vocab, sp.all(), sp.mask)
    uni = unigram_logprobs(data.streams["train"].ids, vocab)
    uni_ppl = unigram_perplexity(uni, (val_y[:, 1:] if cfg.mode == "causal" else val_y).numpy())

    state: dict[str, Any] = {
        "epoch": 0, "batch_in_epoch": 0, "tokens": 0, "train_seconds": 0.0, "elapsed": 0.0,
        "losses": [], "evals": [], "config": cfg.model_dump(),
    }  # fmt: skip
    step = 0
    ckpt = latest_checkpoint(run_dir) if resume else None
    if not resume and par.is_main:  # start over: drop the previous run's checkpoints and logs
        for old in ("checkpoints", "tb", "topics"):
            shutil.rmtree(run_dir / old, ignore_errors=True)
        for old in ("metrics.jsonl", "summary.json"):
            (run_dir / old).unlink(missing_ok=True)
    if ckpt is not None:
        saved = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))["config"]
        changed = [k for k in _RESUME_KEYS if saved.get(k) != getattr(cfg, k)]
        if changed:
            raise ConfigError(
                f"{run_dir} holds a checkpoint of a run with different {changed}"
                f" ({', '.join(f'{k}={saved.get(k)!r}' for k in changed)}); use another --out-dir or --no-resume"
            )
        load_model_weights(ckpt, model)  # the single-process layout, whatever wrote it
    par.shard(model)  # experts over the EP group (no-op with one process)

    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8
    )
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    gen = torch.Generator().manual_seed(cfg.seed)
    if ckpt is not None:
        state = load_training_state(
            ckpt, optimizer, scheduler, gen, transform=par.shard_optimizer_state(optimizer)
        )
        step = int(state["step"])
        state["config"] = cfg.model_dump()
        console.print(f"resuming {run_dir} from step {step} ({ckpt.name})")
    resumed_from = step
    if par.is_main:
        _truncate_jsonl(run_dir / "metrics.jsonl", step)
        atomic_write_text(run_dir / "train_config.yaml", cfg.to_yaml())

    loggers = _Loggers(cfg, run_dir, step, enabled=par.is_main)
    load = (
        ExpertLoad(model.moe_layer_indices(), cfg.num_experts)
        if model.moe_layer_indices()
        else None
    )
    n_blocks = len(train_blocks)
    per_epoch = max(1, n_blocks // cfg.batch_size)
    order = _epoch_order(n_blocks, cfg.seed, state["epoch"])
    session_start = time.perf_counter()
    window_t, window_tokens = 0.0, 0
    stopped = "max_steps"
    last_load: dict[str, Any] | None = None

    def checkpoint() -> None:
        full = par.full_model(model)  # gathered on rank 0 (the model itself with one process)
        opt_state = par.full_optimizer_state(optimizer)
        if par.is_main:
            save_checkpoint(
                run_dir, step, full, optimizer, scheduler, gen, state, keep=cfg.keep_checkpoints,
                optimizer_state=opt_state,
            )  # fmt: skip

    def load_summary() -> dict[str, Any]:
        assert load is not None
        load.counts.copy_(par.update_counts(load.counts))
        return load.summary()

    def run_eval() -> dict[str, float]:
        loss, _ = par.evaluate(model, val_x, val_y, cfg.batch_size, device)
        par.stats.reset()  # communication is counted per training step, evaluation apart
        rec = {
            "step": step, "tokens": state["tokens"], "train_flops": float(stats.flops_per_token_train) * state["tokens"],
            "train_seconds": state["train_seconds"], "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
        }  # fmt: skip
        state["evals"].append(rec)
        loggers.log(step, {"val/loss": loss, "val/ppl": rec["val_ppl"]}, {"eval": rec})
        return rec

    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), console=console, disable=not cfg.progress, transient=False,
    )  # fmt: skip
    try:
        with progress:
            task = progress.add_task("train", total=cfg.max_steps, completed=step, info="")
            while step < cfg.max_steps:
                if cfg.max_minutes is not None:
                    spent = state["elapsed"] + time.perf_counter() - session_start
                    if par.any(spent >= cfg.max_minutes * 60):
                        stopped = "time_cap"
                        break
                if state["batch_in_epoch"] >= per_epoch:
                    state["epoch"] += 1
                    state["batch_in_epoch"] = 0
                    order = _epoch_order(n_blocks, cfg.seed, state["epoch"])
                b = state["batch_in_epoch"]
                idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                x = train_blocks.input_ids[idx]
                if cfg.mode == "mlm":
                    x, y = mask_tokens(
                        x, sp.mask, vocab, sp.all(), mlm_prob=cfg.mlm_prob, generator=gen
                    )
                else:
                    y = x
                xl, yl = par.shard_batch(x), par.shard_batch(y)  # this process's rows
                t0 = time.perf_counter()
                out = model(xl.to(device), labels=yl.to(device))
                optimizer.zero_grad(set_to_none=True)
                objective, logs = par.objective(out, yl, model)
                objective.backward()
                par.sync_grads(model)
                if cfg.grad_clip > 0:
                    par.clip_grad_norm(model, cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                if cfg.bias_update_rate > 0:
                    update_selection_biases(model, out.routing, par.update_counts)
                dt = time.perf_counter() - t0
                par.end_step()
                step += 1
                state["batch_in_epoch"] += 1
                state["tokens"] += int(x.numel())
                state["train_seconds"] += dt
                window_t += dt
                window_tokens += int(x.numel())
                lm = logs["lm_loss"]
                state["losses"].append(lm)
                if load is not None:
                    load.update(out.routing)
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    scalars = {"train/loss": logs["loss"], "train/lm_loss": lm, "train/lr": scheduler.get_last_lr()[0],
                               "train/tokens_per_s": window_tokens / max(window_t, 1e-9)}  # fmt: skip
                    if "aux_loss" in logs:
                        scalars["train/aux_loss"] = logs["aux_loss"]
                        scalars["train/z_loss"] = logs["z_loss"]
                    if par.world > 1:  # bytes this process sent (all-to-all + all-reduce)
                        recent = par.step_bytes[-cfg.log_every :]
                        scalars["train/comm_bytes_per_step"] = sum(recent) / len(recent)
                    record: dict[str, Any] = {k.split("/")[1]: v for k, v in scalars.items()}
                    if load is not None:
                        last_load = load_summary()
                        for j, layer in enumerate(last_load["layers"]):
                            scalars[f"load/max_over_uniform/layer{layer}"] = last_load[
                                "max_over_uniform"
                            ][j]
                            scalars[f"load/dead_experts/layer{layer}"] = last_load["dead"][j]
                        record["expert_load"] = last_load
                        load.reset()
                    loggers.log(step, scalars, record)
                    window_t, window_tokens = 0.0, 0
                if step % cfg.eval_every == 0 or step == cfg.max_steps:
                    rec = run_eval()
                    progress.update(
                        task, info=f"val ppl {rec['val_ppl']:.1f} (unigram {uni_ppl:.0f})"
                    )
                state["elapsed"] += time.perf_counter() - session_start
                session_start = time.perf_counter()
                if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                    checkpoint()
                progress.update(task, completed=step)
                if step % 10 == 0:
                    progress.update(task, info=f"loss {lm:.3f}")
                if on_step is not None:
                    on_step(step, lm)
            if load is not None and int(load.counts.sum()) > 0:
                last_load = load_summary()  # the last (possibly partial) logging window
            if stopped == "time_cap" and (not state["evals"] or state["evals"][-1]["step"] != step):
                run_eval()
            if stopped == "time_cap":
                checkpoint()
    finally:
        loggers.close()

    model_dir = run_dir / "model"
    full = par.full_model(model)  # rank 0: the unsharded model; None on the other processes
    if full is not None:
        full.save(model_dir)
        shutil.copyfile(data.tokenizer_path, model_dir / "tokenizer.json")
    tps = state["tokens"] / state["train_seconds"] if state["train_seconds"] > 0 else None
    parallel = par.summary(tps)
    final_ppl = state["evals"][-1]["val_ppl"] if state["evals"] else float("nan")
    warning = None
    if stopped == "time_cap":
        warning = time_cap_warning(step, cfg.max_steps, cfg.max_minutes)
        console.print(f"[bold red]WARNING[/bold red] {run_dir}: {warning}")
    result = TrainResult(
        run_dir=run_dir, model_dir=model_dir, steps=step, losses=list(state["losses"]), evals=list(state["evals"]),
        unigram_ppl=uni_ppl, final_val_ppl=final_ppl, expert_load=last_load, stopped=stopped,
        stats=stats.to_dict(), resumed_from=resumed_from, max_steps=cfg.max_steps, warning=warning,
        parallel=parallel,
    )  # fmt: skip
    if not par.is_main:
        return result
    summary = {k: v for k, v in asdict(result).items() if k != "losses"}
    atomic_write_json(run_dir / "summary.json", summary)
    if cfg.mode == "mlm" and load is not None:
        from moelab.train.topics import topic_histograms

        topic_histograms(
            full, val_blocks, run_dir / "topics", batch_size=cfg.batch_size, device=device
        )
    return result
