"""What the training loop does differently on several processes (`moelab train` under torchrun).

`TrainParallel` is the training loop's one handle on distribution; with one process every method
is the plain single-process operation, so the loop has no branches. With W = dp x ep processes:

- each process trains on its slice (1/W of the rows) of the same global batch;
- MoE experts are sharded over each EP group (`shard_experts`, all-to-all dispatch), everything
  else is replicated;
- the objective on process r is scaled so that the mean over processes equals the single-process
  loss of the whole batch: the LM term by n_r W / N (n_r labelled tokens here, N in total) and the
  top-k load-balancing loss (transformers' pooled form, Fedus et al. 2022 Eq. 4) from the
  *global* expert fractions f_e (an all-reduce of the counts) times this process's router
  probability sums -- the global-batch balance statistics of Qiu et al. 2025 ("Demons in the
  Detail: On Implementing Load Balancing Loss for Training Specialized MoE Models");
- gradients are averaged: non-expert parameters over the world, expert shards over the
  processes holding the same shard (their EP-group contributions already arrived through the
  all-to-all backward); the clipping norm sums the shards' squares over the EP group;
- checkpoints and the final model are gathered into the single-process layout (full stacked
  expert tensors, full optimizer state) and written by rank 0, so any process count -- one, or
  a different EP size -- loads them and shards them again.

Other routers' balancing terms (Switch/GShard/noisy top-k/DeepSeek seq-aux) and anything that
couples tokens of a batch (capacity, expert choice, Sinkhorn) are computed on each process's
own tokens, as in GShard's per-device groups; those runs are not bit-comparable with one process.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moelab.errors import ConfigError
from moelab.parallel.comm import CommStats
from moelab.parallel.expert import (
    gather_expert_tensor,
    shard_expert_tensor,
    shard_experts,
)
from moelab.parallel.groups import ParallelGroups, make_groups

__all__ = ["TrainParallel", "world_from_env"]


def world_from_env() -> int:
    """Processes of this job: the initialised group's size, else torchrun's WORLD_SIZE, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device: str) -> str:
    """A bare "cuda" becomes this process's GPU (LOCAL_RANK) under torchrun; others unchanged."""
    if device == "cuda" and world_from_env() > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


class TrainParallel:
    """Distribution handle of one training process (see the module docstring)."""

    def __init__(self, groups: ParallelGroups | None, owns_group: bool = False) -> None:
        self.groups = groups
        self.owns_group = owns_group
        self.stats = CommStats()
        self.sharded: set[int] = set()  # id() of this process's sharded expert parameters
        self.sharded_names: list[str] = []
        self.step_bytes: list[int] = []  # bytes this process sent, per training step
        self.step_kinds: dict[str, int] = {}

    # ------------------------------------------------------------- set-up
    @classmethod
    def setup(
        cls, expert_parallel: int, device: str, batch_size: int, num_experts: int, dense: bool
    ) -> TrainParallel:
        """Join (or start, under torchrun) the process group and build the EP/DP groups."""
        world = world_from_env()
        if world == 1:
            if expert_parallel > 1:
                raise ConfigError(
                    f"expert_parallel={expert_parallel} needs {expert_parallel} processes: run "
                    f"torchrun --nproc_per_node {expert_parallel} -m moelab.cli train "
                    f"--expert-parallel {expert_parallel} ..."
                )
            return cls(None)
        if world % expert_parallel:
            raise ConfigError(
                f"expert_parallel={expert_parallel} must divide the {world} processes "
                "(world = data-parallel groups x expert-parallel size)"
            )
        if batch_size % world:
            raise ConfigError(
                f"batch_size={batch_size} is the global batch; it must be divisible by the "
                f"{world} processes (each trains on batch_size / {world} blocks)"
            )
        if expert_parallel > 1 and (dense or num_experts % expert_parallel):
            what = "a dense model has no experts" if dense else f"num_experts={num_experts}"
            raise ConfigError(
                f"expert_parallel={expert_parallel}: {what}; the number of experts must be "
                "divisible by the expert-parallel size"
            )
        owns = False
        if not dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            dist.init_process_group(backend)
            owns = True
        return cls(make_groups(expert_parallel), owns_group=owns)

    def close(self) -> None:
        """Leave the process group if this handle created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def world(self) -> int:
        """Number of processes."""
        return self.groups.world if self.groups else 1

    @property
    def rank(self) -> int:
        """This process's global rank."""
        return self.groups.rank if self.groups else 0

    @property
    def is_main(self) -> bool:
        """True on the process that writes files (rank 0)."""
        return self.rank == 0

    def threads(self, threads: int) -> int:
        """Torch threads per process: `threads`, or (0) this machine's cores shared out."""
        if threads:
            return threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        return max(1, (cores or 1) // max(local, 1))

    def barrier(self) -> None:
        """Wait for every process (no-op with one)."""
        if self.world > 1:
            dist.barrier()

    def describe(self) -> dict[str, int]:
        """world, expert-parallel and data-parallel sizes."""
        g = self.groups
        return {
            "world": self.world,
            "expert_parallel": g.ep if g else 1,
            "data_parallel": g.dp if g else 1,
        }

    # ------------------------------------------------------------- model
    def shard(self, model: nn.Module) -> None:
        """Shard every MoE layer's experts over this process's EP group (no-op when ep == 1)."""
        if self.groups is None:
            return
        self.sharded_names = shard_experts(model, self.groups, self.stats)
        params = dict(model.named_parameters())
        self.sharded = {id(params[n]) for n in self.sharded_names}

    def shard_batch(self, x: torch.Tensor) -> torch.Tensor:
        """This process's rows of a global batch (contiguous slice r of W)."""
        if self.world == 1:
            return x
        n = x.shape[0] // self.world
        return x[self.rank * n : (self.rank + 1) * n]

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The single-process state dict: expert shards gathered (collective on every process)."""
        sd = model.state_dict()
        if self.groups is None or not self.sharded_names:
            return sd
        out = dict(sd)
        for name in self.sharded_names:
            out[name] = gather_expert_tensor(sd[name], self.groups)
        return out

    def full_model(self, model: nn.Module) -> nn.Module | None:
        """An unsharded copy of `model` on rank 0 (None elsewhere); `model` itself with one
        process or no sharding. Collective: every process must call it."""
        if self.groups is None or not self.sharded_names:
            return model if self.is_main else None
        sd = self.full_state_dict(model)
        if not self.is_main:
            return None
        full = type(model)(model.cfg, seed=0)  # seeded: leaves the global RNG untouched
        full = full.to(next(model.parameters()).device)
        full.load_state_dict(sd, strict=True)
        full.train(model.training)
        return full

    # ------------------------------------------------------------- optimizer state
    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """optimizer.state_dict() with the expert shards' moments gathered (collective)."""
        sd = optimizer.state_dict()
        if self.groups is None or not self.sharded:
            return sd
        state = dict(sd["state"])
        for idx, p in enumerate(_ordered_params(optimizer)):
            if id(p) in self.sharded and idx in state:
                st = dict(state[idx])
                for key, v in st.items():
                    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == p.shape:
                        st[key] = gather_expert_tensor(v, self.groups)
                state[idx] = st
        return {**sd, "state": state}

    def shard_optimizer_state(self, optimizer: torch.optim.Optimizer):
        """A transform for `load_training_state`: slice the full moments to this shard."""

        def transform(sd: dict[str, Any]) -> dict[str, Any]:
            if self.groups is None or not self.sharded:
                return sd
            state = dict(sd["state"])
            ep, er = self.groups.ep, self.groups.ep_rank
            for idx, p in enumerate(_ordered_params(optimizer)):
                if id(p) in self.sharded and idx in state:
                    st = dict(state[idx])
                    full_shape = (p.shape[0] * ep, *p.shape[1:])
                    for key, v in st.items():
                        if isinstance(v, torch.Tensor) and v.dim() > 0:
                            if tuple(v.shape) != full_shape:
                                raise ValueError(
                                    f"optimizer state {key} of parameter {idx} has shape "
                                    f"{tuple(v.shape)}, expected {full_shape}"
                                )
                            st[key] = shard_expert_tensor(v, er, ep)
                    state[idx] = st
            return {**sd, "state": state}

        return transform

    # ------------------------------------------------------------- objective
    def objective(
        self, out: Any, labels: torch.Tensor, model: nn.Module
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss to backpropagate here, global numbers to log: loss, lm_loss, aux_loss, z_loss)."""
        if self.world == 1:
            logs = {"loss": float(out.loss.detach()), "lm_loss": float(out.lm_loss.detach())}
            if out.aux_loss is not None:
                logs["aux_loss"] = float(out.aux_loss.detach())
                logs["z_loss"] = float(out.z_loss.detach())
            return out.loss, logs
        cfg = model.cfg
        t = labels[:, 1:] if cfg.mode == "causal" else labels
        n_here = (t != -100).sum().to(torch.float64)
        n_all = n_here.clone()
        self._all_reduce(n_all)
        W = self.world
        lm = out.lm_loss * (n_here * W / n_all.clamp_min(1)).to(out.lm_loss.dtype)
        loss = lm
        aux = z = None
        if out.aux_loss is not None:
            aux = (
                self._global_topk_balance(out.routing, cfg.moe.num_experts, cfg.moe.top_k)
                if cfg.moe.router == "topk"
                else out.aux_loss
            )
            z = out.z_loss
            loss = loss + cfg.aux_loss_coef * aux + cfg.z_loss_coef * z
        parts = [loss.detach(), lm.detach()] + (
            [aux.detach(), z.detach()] if aux is not None else []
        )
        v = torch.stack([p.double() for p in parts]) / W
        self._all_reduce(v)
        logs = {"loss": float(v[0]), "lm_loss": float(v[1])}
        if aux is not None:
            logs["aux_loss"], logs["z_loss"] = float(v[2]), float(v[3])
        return loss, logs

    def _global_topk_balance(self, routing: list, E: int, k: int) -> torch.Tensor:
        """This process's share of the pooled top-k balance loss with global f_e (see module)."""
        layers = [r.logits for r in routing if r is not None]
        device = layers[0].device
        tpe = torch.zeros(E, dtype=torch.float32, device=device)
        prob = torch.zeros(E, dtype=torch.float32, device=device)
        rows = 0
        for logits in layers:
            w = F.softmax(logits, dim=-1)
            _, sel = torch.topk(w, k, dim=-1)
            tpe = tpe + torch.zeros_like(tpe).scatter_add_(
                0, sel.reshape(-1), torch.ones(sel.numel(), device=device)
            )
            prob = prob + w.float().sum(0)
            rows += logits.shape[0]
        g = torch.cat([tpe.detach(), torch.tensor([float(rows)], device=device)])
        self._all_reduce(g)
        total = g[E].clamp_min(1)
        return torch.sum(g[:E] / total * prob / total) * E * self.world

    def update_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Expert counts summed over every process (for selection-bias updates, load logs)."""
        if self.world == 1:
            return counts
        c = counts.clone()
        self._all_reduce(c)
        return c

    # ------------------------------------------------------------- gradients
    def sync_grads(self, model: nn.Module) -> None:
        """Average gradients: replicated parameters over the world, expert shards over DP."""
        if self.world == 1:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        rep = [p for p in params if id(p) not in self.sharded]
        shard = [p for p in params if id(p) in self.sharded]
        self._reduce_mean(rep, None)
        if shard:
            self._reduce_mean(shard, self.groups.dp_group if self.groups.dp > 1 else False)

    def _reduce_mean(self, params: list[torch.Tensor], group: Any) -> None:
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        if group is not False:  # False: a single replica, nothing to add
            self._all_reduce(flat, group)
        flat /= self.world
        i = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[i : i + n].view_as(p.grad))
            i += n

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Global grad-norm clipping (torch's clip_grad_norm_ over the unsharded model)."""
        params = [p for p in model.parameters() if p.grad is not None]
        if self.world == 1 or not self.sharded:
            return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        rep = [p.grad for p in params if id(p) not in self.sharded]
        shard = [p.grad for p in params if id(p) in self.sharded]
        zero = params[0].grad.new_zeros((), dtype=torch.float32)
        sq_rep = sum((torch.linalg.vector_norm(g, 2).float() ** 2 for g in rep), zero)
        sq_shard = sum((torch.linalg.vector_norm(g, 2).float() ** 2 for g in shard), zero)
        sq_shard = sq_shard.reshape(1).clone()
        self._all_reduce(sq_shard, self.groups.ep_group)
        total = torch.sqrt(sq_rep + sq_shard[0])
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in params:
            p.grad.mul_(coef.to(p.grad.dtype))
        return float(total)

    # ------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        device: torch.device,
    ) -> tuple[float, int]:
        """(mean token cross-entropy, target tokens) over the blocks, each batch's rows shared
        out over the processes (a batch with fewer rows than processes runs on all, counted once)."""
        if self.world == 1:
            from moelab.train.loop import evaluate

            return evaluate(model, inputs, labels, batch_size, device)
        was_training = model.training
        model.eval()
        W, r = self.world, self.rank
        acc = torch.zeros(2, dtype=torch.float64)
        for i in range(0, inputs.shape[0], batch_size):
            x, y = inputs[i : i + batch_size], labels[i : i + batch_size]
            share = 1.0
            if x.shape[0] >= W:
                x, y = torch.tensor_split(x, W)[r], torch.tensor_split(y, W)[r]
            else:
                share = 1.0 / W
            out = model(x.to(device), labels=y.to(device))
            t = y[:, 1:] if model.cfg.mode == "causal" else y
            n = int((t != -100).sum())
            acc += torch.tensor([float(out.lm_loss) * n * share, n * share], dtype=torch.float64)
        self._all_reduce(acc)
        model.train(was_training)
        return float(acc[0] / acc[1].clamp_min(1)), int(round(float(acc[1])))

    # ------------------------------------------------------------- communication
    def _all_reduce(self, t: torch.Tensor, group: Any = None) -> None:
        dist.all_reduce(t, group=group)
        self.stats.add("all_reduce", t.numel() * t.element_size())

    def any(self, flag: bool) -> bool:
        """True if `flag` is True on any process (so every process stops at the same step)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t)
        return bool(t[0] > 0)

    def end_step(self) -> None:
        """Close this step's byte count."""
        kinds = self.stats.reset()
        for k, v in kinds.items():
            self.step_kinds[k] = self.step_kinds.get(k, 0) + v
        self.step_bytes.append(sum(kinds.values()))

    def summary(self, tokens_per_s: float | None) -> dict[str, Any] | None:
        """Parallel layout, bytes sent per step (this process; and summed over processes) and
        global tokens/s; None with one process."""
        if self.world == 1:
            return None
        steps = max(len(self.step_bytes), 1)
        per = {k: v / steps for k, v in sorted(self.step_kinds.items())}
        mine = torch.tensor([sum(per.values())], dtype=torch.float64)
        total = mine.clone()
        dist.all_reduce(total)
        return {
            **self.describe(),
            "steps_measured": len(self.step_bytes),
            "bytes_per_step_rank0": {k: int(v) for k, v in per.items()} if self.is_main else None,
            "bytes_sent_per_step_this_process": int(mine[0]),
            "bytes_sent_per_step_all_processes": int(total[0]),
            "tokens_per_s": tokens_per_s,
        }


def _ordered_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters in the index order of optimizer.state_dict()['state']."""
    return [p for g in optimizer.param_groups for p in g["params"]]
