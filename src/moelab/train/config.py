"""TrainConfig: every knob of `moelab train`, validated (pydantic), mapped one-to-one onto CLI flags.

The default is a small MoE language model that trains meaningfully in about ten minutes on two
CPU cores (4 layers, d_model 128, 8 experts top-2 of hidden 256, sequence 128, vocabulary 4096,
~7k tokens/s). ``quick_overrides`` shrinks it to a tiny model for tests and the demo. The
optimiser and schedule follow common small-LM practice (AdamW, Loshchilov & Hutter 2019;
linear warmup + cosine decay, Radford et al. 2018/nanoGPT); the loss coefficients follow the
Switch Transformer (Fedus et al. 2022: aux 0.01, Eq. 4) and ST-MoE (Zoph et al. 2022: z-loss
0.001, Eq. 5).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moelab.errors import ConfigError
from moelab.layers.config import ROUTER_TYPES, MoEConfig
from moelab.models import MoETransformerConfig, dense_baseline

__all__ = ["TrainConfig", "quick_overrides", "load_train_config"]


class TrainConfig(BaseModel):
    """Validated training configuration (data, model, optimisation, evaluation, run)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # data
    corpus: str = Field(
        "default", description="built-in corpus name or path to user text/JSONL/Parquet/folder"
    )
    max_bytes: int | None = Field(
        None, gt=0, description="cap on corpus bytes read (None = corpus default)"
    )
    text_column: str = Field("text", description="text column of JSONL/Parquet/datasets input")
    tokenizer: str | None = Field(
        None, description="local tokenizer.json / HF tokenizer folder (None = train BPE)"
    )
    vocab_size: int = Field(
        4096, ge=261, description="BPE vocabulary size when training the tokenizer"
    )
    data_dir: str | None = Field(None, description="prepared-data folder (default: <out_dir>/data)")
    # model
    mode: Literal["causal", "mlm"] = Field(
        "causal", description="causal LM (decoder) or masked LM (encoder)"
    )
    dense: bool = Field(
        False, description="train the dense model with the same active FLOPs instead"
    )
    d_model: int = Field(128, gt=0, description="hidden size")
    n_layers: int = Field(4, gt=0, description="transformer layers")
    n_heads: int = Field(4, gt=0, description="attention heads")
    n_kv_heads: int | None = Field(None, gt=0, description="key/value heads (None = n_heads)")
    d_ff: int = Field(256, gt=0, description="hidden size of one routed expert")
    num_experts: int = Field(8, gt=0, description="routed experts per MoE layer")
    top_k: int = Field(2, gt=0, description="experts per token")
    router: str = Field("topk", description="router type (see moelab.layers.config.ROUTER_TYPES)")
    expert_act: Literal["swiglu", "gelu"] = Field("swiglu", description="expert activation")
    moe_every: int = Field(1, gt=0, description="MoE FFN in every n-th layer")
    first_k_dense: int = Field(0, ge=0, description="first k layers dense")
    num_shared_experts: int = Field(0, ge=0, description="always-on shared experts")
    capacity_factor: float | None = Field(
        None, gt=0, description="expert capacity factor (None = dropless)"
    )
    aux_loss_coef: float = Field(0.01, ge=0, description="load-balancing loss coefficient")
    z_loss_coef: float = Field(0.001, ge=0, description="router z-loss coefficient")
    bias_update_rate: float = Field(
        0.0,
        ge=0,
        description="aux-loss-free balancing: per-step update of each router's selection bias "
        "(topk and deepseek routers; 0 = off)",
    )
    seq_len: int = Field(128, ge=2, description="tokens per training block")
    mlm_prob: float = Field(0.15, gt=0, lt=1, description="MLM masking probability")
    # optimisation
    batch_size: int = Field(16, gt=0, description="blocks per step")
    lr: float = Field(3e-3, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="final lr as a fraction of peak (cosine)"
    )
    warmup_steps: int = Field(100, ge=0, description="linear warmup steps")
    max_steps: int = Field(2000, gt=0, description="optimizer steps")
    max_minutes: float | None = Field(
        None,
        gt=0,
        description="wall-clock safety cap in minutes: the budget is max_steps; a run the cap "
        "stops early is marked time-capped (its numbers are not comparable)",
    )
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (matrices only)")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2")
    grad_clip: float = Field(1.0, ge=0, description="global grad-norm clip (0 = off)")
    # evaluation and logging
    eval_every: int = Field(200, gt=0, description="validate every N steps")
    eval_batches: int = Field(16, gt=0, description="validation batches per evaluation")
    log_every: int = Field(50, gt=0, description="log losses and expert load every N steps")
    checkpoint_every: int = Field(200, gt=0, description="checkpoint every N steps")
    keep_checkpoints: int = Field(2, gt=0, description="checkpoints kept on disk")
    # run
    out_dir: str = Field("runs/moe-lm", description="run folder (checkpoints, logs, final model)")
    seed: int = Field(0, ge=0, description="random seed")
    device: str = Field("cpu", description="torch device")
    threads: int = Field(
        0, ge=0, description="torch threads per process (0 = the cores shared out over processes)"
    )
    expert_parallel: int = Field(
        1,
        ge=1,
        description="processes each MoE layer's experts are sharded over (run under torchrun; "
        "the processes beyond one group are data-parallel replicas)",
    )
    tensorboard: bool = Field(True, description="write TensorBoard logs")
    mlflow: bool = Field(False, description="log to MLflow (needs mlflow installed)")
    progress: bool = Field(True, description="show a progress bar")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be <= num_experts={self.num_experts}")
        if self.router not in ROUTER_TYPES:
            raise ValueError(f"router={self.router!r} must be one of {ROUTER_TYPES}")
        if self.bias_update_rate > 0 and self.router not in ("topk", "deepseek"):
            raise ValueError(
                f"bias_update_rate={self.bias_update_rate} needs router 'topk' or 'deepseek', "
                f"got {self.router!r}"
            )
        if self.first_k_dense >= self.n_layers:
            raise ValueError(
                f"first_k_dense={self.first_k_dense} must be < n_layers={self.n_layers}"
            )
        return self

    # ------------------------------------------------------------------ helpers
    @property
    def data_path(self) -> Path:
        """Folder of the prepared data."""
        return Path(self.data_dir) if self.data_dir else Path(self.out_dir) / "data"

    @property
    def tokens_per_step(self) -> int:
        """batch_size * seq_len."""
        return self.batch_size * self.seq_len

    def build_model_config(
        self, vocab_size: int, pad_id: int | None, mask_id: int | None, bos_id: int | None
    ) -> MoETransformerConfig:
        """The MoETransformerConfig this training config describes (dense baseline if `dense`)."""
        shared_hidden = self.num_shared_experts * self.d_ff
        moe = MoEConfig(
            d_model=self.d_model,
            d_ff=self.d_ff,
            num_experts=self.num_experts,
            top_k=self.top_k,
            router=self.router,
            expert_act=self.expert_act,
            capacity_factor=self.capacity_factor,
            num_shared_experts=self.num_shared_experts,
            bias_update_rate=self.bias_update_rate,
            vocab_size=vocab_size if self.router == "hash" else None,
            seed=self.seed,
        )
        cfg = MoETransformerConfig(
            vocab_size=vocab_size,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            d_ff=self.top_k * self.d_ff + shared_hidden,  # dense layers match the active MoE hidden
            max_seq_len=self.seq_len,
            mode=self.mode,
            moe=moe,
            moe_every=self.moe_every,
            first_k_dense=self.first_k_dense,
            aux_loss_coef=self.aux_loss_coef,
            z_loss_coef=self.z_loss_coef,
            pad_token_id=pad_id,
            mask_token_id=mask_id,
            bos_token_id=bos_id,
            dense_act=self.expert_act,
        )
        return dense_baseline(cfg) if self.dense else cfg

    def to_yaml(self) -> str:
        """YAML text of this config."""
        return yaml.safe_dump(self.model_dump(), sort_keys=False)


def quick_overrides() -> dict[str, Any]:
    """A tiny configuration for tests and the demo (seconds on a laptop CPU)."""
    return {
        "max_bytes": 400_000,
        "vocab_size": 1024,
        "d_model": 64,
        "n_layers": 2,
        "n_heads": 4,
        "d_ff": 64,
        "num_experts": 4,
        "top_k": 2,
        "seq_len": 64,
        "batch_size": 8,
        "max_steps": 60,
        "warmup_steps": 10,
        "eval_every": 20,
        "eval_batches": 4,
        "log_every": 10,
        "checkpoint_every": 20,
    }


def _format_validation(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f"={value!r}"
        parts.append(f"{loc}{shown}: {err['msg']}")
    return f"invalid training config ({source}): " + "; ".join(parts)


def make_train_config(values: dict[str, Any], source: str = "arguments") -> TrainConfig:
    """Build a TrainConfig, turning pydantic errors into one ConfigError naming each bad field."""
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source)) from None


def load_train_config(
    path: str | os.PathLike[str] | None = None, quick: bool = False, **overrides: Any
) -> TrainConfig:
    """--quick preset < YAML file (optional) < explicit overrides (None values are ignored)."""
    values: dict[str, Any] = dict(quick_overrides()) if quick else {}
    source = "arguments"
    if path is not None:
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"training config file {p} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(
                f"training config file {p} is a directory; expected a YAML file of field: value"
            ) from None
        except UnicodeDecodeError:
            raise ConfigError(
                f"training config file {p} is not UTF-8 text; expected a YAML file of field: value"
            ) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"training config file {p} is not valid YAML ({exc})") from None
        if loaded is None:
            raise ConfigError(
                f"training config file {p} is empty; expected a YAML mapping of field: value"
                " (omit --config to use the defaults)"
            )
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"training config file {p}: expected a mapping of field: value, got {type(loaded).__name__}"
            )
        values.update(loaded)
        source = str(p)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return make_train_config(values, source)
