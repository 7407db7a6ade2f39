"""MoETransformer: a whole MoE language model in one readable file, in the spirit of nanoGPT.

Pre-norm transformer (RMSNorm, Zhang & Sennrich 2019) with rotary position embeddings (Su et al.
2021, RoFormer eq. 34; the "rotate half" layout of transformers' Llama/Mixtral), multi-head
attention with optional grouped KV heads (Ainslie et al. 2023, GQA) through
``F.scaled_dot_product_attention``, and per layer either a dense SwiGLU FFN (Shazeer 2020) or a
``moelab.layers.moe.MoEBlock`` (any router of the layer library, shared and fine-grained experts).
Two modes: causal LM (decoder, Mixtral-like) and masked LM (bidirectional encoder, BERT-like).

Loss (Switch Transformer, Fedus et al. 2022, eq. 4-6; ST-MoE, Zoph et al. 2022, eq. 5):
``loss = lm_loss + aux_loss_coef * aux_loss + z_loss_coef * z_loss`` with aux_loss the
load-balancing loss (pooled over MoE layers as transformers' Mixtral does, for top-k routers) and
z_loss the router z-loss, padding excluded; see ``moelab.models.router_losses``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moelab._io import atomic_write_json, atomic_write_with
from moelab.errors import InputError, ModelError, MoelabError
from moelab.layers.experts import ExpertBank
from moelab.layers.moe import MoEBlock
from moelab.layers.types import RoutingResult
from moelab.models import router_losses
from moelab.models.config import MoETransformerConfig

IGNORE_INDEX = -100
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class ModelOutput:
    """What MoETransformer.forward returns; losses are None when not computable."""

    logits: torch.Tensor  # [B, S, V]
    loss: torch.Tensor | None = None  # lm_loss + coefficients * (aux_loss, z_loss)
    lm_loss: torch.Tensor | None = None  # cross-entropy over labelled positions
    aux_loss: torch.Tensor | None = None  # load balancing over the MoE layers (None if dense,
    # or in a KV-cached step without labels: decoding forms no loss)
    z_loss: torch.Tensor | None = None  # router z-loss over the MoE layers (None if dense)
    routing: list[RoutingResult | None] = field(default_factory=list)  # one per layer


@dataclass
class ModelStats:
    """Parameter and FLOP accounting (FLOPs = 2 per multiply-add; attention at seq_len)."""

    total_params: int
    active_params: int  # parameters touched by one token (embedding + k of E experts ...)
    flops_per_token_fwd: int
    flops_per_token_train: int  # 3x forward (backward = 2x forward)
    embedding_params: int
    routed_expert_params: int  # all routed experts of all MoE layers
    router_flops_per_token: int
    seq_len: int

    def to_dict(self) -> dict[str, int]:
        """Plain dict."""
        return dict(self.__dict__)


class KVCache:
    """Per-layer keys/values [B, n_kv_heads, S, head_dim] grown by concatenation."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    @property
    def length(self) -> int:
        """Number of cached positions (0 when empty)."""
        return next(iter(self.keys.values())).shape[2] if self.keys else 0

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's k/v for `layer` and return all cached k/v of that layer."""
        if layer in self.keys:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 (transformers' convention)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [S, head_dim] for rotary embeddings, frequencies theta^(-2i/d), both halves equal."""
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, S, hd] by position: x*cos + rotate_half(x)*sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Multi-head self-attention with optional grouped KV heads, no biases, rotary q/k."""

    def __init__(self, cfg: MoETransformerConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d = cfg.d_model
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1))


class DenseFFN(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); GELU/ReLU: down(act(up(x)))."""

    def __init__(self, d_model: int, d_ff: int, act: str = "swiglu") -> None:
        super().__init__()
        self.act = act
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False) if act == "swiglu" else None
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        act = F.gelu if self.act == "gelu" else F.relu
        return self.down_proj(act(self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm block: h += attn(attn_norm(h)); h += ffn(ffn_norm(h)). ffn is MoEBlock or DenseFFN."""

    def __init__(self, cfg: MoETransformerConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn: nn.Module = (
            MoEBlock(cfg.moe)
            if cfg.is_moe_layer(layer)
            else DenseFFN(cfg.d_model, cfg.d_ff, cfg.dense_act)
        )

    @property
    def is_moe(self) -> bool:
        """True if this block's FFN is an MoEBlock."""
        return isinstance(self.ffn, MoEBlock)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        token_ids: torch.Tensor,
        token_mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> tuple[torch.Tensor, RoutingResult | None]:
        h = h + self.attn(self.attn_norm(h), cos, sin, mask, is_causal, cache)
        if self.is_moe:
            y, routing = self.ffn(self.ffn_norm(h), token_ids=token_ids, mask=token_mask)
            return h + y, routing
        return h + self.ffn(self.ffn_norm(h)), None


class MoETransformer(nn.Module):
    """Causal or masked MoE language model; see the module docstring."""

    def __init__(self, cfg: MoETransformerConfig, seed: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layers)])
            self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            if cfg.tie_embeddings:
                self.lm_head.weight = self.embed_tokens.weight
            self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual outputs scaled by 1/sqrt(2*n_layers) (GPT-2)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.embed_tokens.weight, std=std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.blocks:
            a = block.attn
            for lin in (a.q_proj, a.k_proj, a.v_proj):
                nn.init.normal_(lin.weight, std=std)
            nn.init.normal_(a.o_proj.weight, std=out_std)
            if isinstance(block.ffn, DenseFFN):
                for lin in (block.ffn.gate_proj, block.ffn.up_proj):
                    if lin is not None:
                        nn.init.normal_(lin.weight, std=std)
                nn.init.normal_(block.ffn.down_proj.weight, std=out_std)
            else:
                for bank in (block.ffn.experts, block.ffn.shared_experts):
                    if isinstance(bank, ExpertBank):
                        nn.init.normal_(bank.gate_up_proj, std=std)
                        nn.init.normal_(bank.down_proj, std=out_std)
                for lin in (getattr(block.ffn.router, "gate", None), block.ffn.shared_gate):
                    if isinstance(lin, nn.Linear):
                        nn.init.normal_(lin.weight, std=std)
                        if lin.bias is not None:
                            nn.init.zeros_(lin.bias)

    # ------------------------------------------------------------- structure
    def moe_layer_indices(self) -> list[int]:
        """Indices of the blocks whose FFN is an MoEBlock."""
        return [i for i, b in enumerate(self.blocks) if b.is_moe]

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the parameters."""
        return self.embed_tokens.weight.dtype

    # --------------------------------------------------------------- forward
    def _attention_mask(
        self, attention_mask: torch.Tensor | None, q_len: int, k_len: int, device: torch.device
    ) -> tuple[torch.Tensor | None, bool]:
        """(bool mask [B|1, 1, q_len, k_len] or None, is_causal flag) for scaled_dot_product_attention."""
        causal = self.cfg.mode == "causal"
        if attention_mask is None:
            if not causal or q_len == 1:
                return None, False
            if q_len == k_len:
                return None, True
        offset = k_len - q_len  # queries are the last q_len positions
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
        if causal:
            allowed = torch.tril(allowed, diagonal=offset)
        allowed = allowed[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
            # a query that may see nothing (e.g. left padding) sees itself, so its row stays finite
            own = (
                torch.arange(k_len, device=device)[None, :]
                == torch.arange(offset, k_len, device=device)[:, None]
            )
            allowed = allowed | (own[None, None] & ~allowed.any(dim=-1, keepdim=True))
        return allowed, False

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> ModelOutput:
        """input_ids [B, S] -> ModelOutput; attention_mask [B, S] 1 = token, 0 = padding.

        Positions count from column 0 (exact for right padding). With `cache`, input_ids are the
        new tokens only and attention_mask (if any) covers cached + new positions.
        """
        self._check_inputs(input_ids, attention_mask, labels, cache)
        B, S = input_ids.shape
        past = cache.length if cache is not None else 0
        if attention_mask is not None and cache is not None and attention_mask.shape[1] != past + S:
            raise InputError(
                f"attention_mask has {attention_mask.shape[1]} positions; with a KV cache it must "
                f"cover the cached {past} plus the {S} new positions"
            )
        h = self.embed_tokens(input_ids)
        positions = torch.arange(past, past + S, device=input_ids.device)
        cos, sin = rotary_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, h.dtype)
        mask, is_causal = self._attention_mask(attention_mask, S, past + S, h.device)
        token_mask = attention_mask[:, past:] if attention_mask is not None else None
        routing: list[RoutingResult | None] = []
        for block in self.blocks:
            h, r = block(h, cos, sin, mask, is_causal, input_ids, token_mask, cache)
            routing.append(r)
        logits = self.lm_head(self.norm(h))
        if cache is not None and labels is None:  # a decoding step: no loss is ever formed
            aux_loss = z_loss = None
        else:
            aux_loss, z_loss = self._router_losses(routing, token_mask)
        out = ModelOutput(logits=logits, aux_loss=aux_loss, z_loss=z_loss, routing=routing)
        if labels is not None:
            out.lm_loss = self._lm_loss(logits, labels, token_mask)
            out.loss = out.lm_loss
            if aux_loss is not None:
                out.loss = (
                    out.loss + self.cfg.aux_loss_coef * aux_loss + self.cfg.z_loss_coef * z_loss
                )
        return out

    def _check_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        cache: KVCache | None,
    ) -> None:
        """Raise InputError for wrong shapes, dtypes or token ids."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = (
                tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)
            )
            raise InputError(f"input_ids must be an integer tensor [batch, seq], got {shape}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise InputError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.cfg.vocab_size):
            raise InputError(
                f"input_ids must lie in [0, vocab_size={self.cfg.vocab_size}), got range "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]"
            )
        total = input_ids.shape[1] + (cache.length if cache is not None else 0)
        if total > self.cfg.max_seq_len:
            raise InputError(f"sequence length {total} exceeds max_seq_len={self.cfg.max_seq_len}")
        if attention_mask is not None and (
            attention_mask.shape[0] != input_ids.shape[0]
            or (cache is None and attention_mask.shape != input_ids.shape)
        ):
            raise InputError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
                f"{tuple(input_ids.shape)}"
            )
        if labels is not None and labels.shape != input_ids.shape:
            raise InputError(
                f"labels shape {tuple(labels.shape)} != input_ids {tuple(input_ids.shape)}"
            )

    def _lm_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, token_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Cross-entropy; causal shifts by one (labels = input_ids works); -100 and padding ignored."""
        if token_mask is not None:
            labels = labels.masked_fill(~token_mask.bool(), IGNORE_INDEX)
        if self.cfg.mode == "causal":
            logits, labels = logits[:, :-1], labels[:, 1:]
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
        )

    def _router_losses(
        self, routing: list[RoutingResult | None], token_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(load-balancing loss, router z-loss) over the MoE layers; (None, None) for a dense model."""
        moe = [r for r in routing if r is not None]
        if not moe:
            return None, None
        flat_mask = token_mask.reshape(-1).bool() if token_mask is not None else None
        first = self.blocks[self.moe_layer_indices()[0]].ffn
        has_gate = isinstance(getattr(first.router, "gate", None), nn.Linear)
        aux = router_losses.balance_loss(self.cfg.moe.router, moe, flat_mask)
        return aux, router_losses.z_loss(has_gate, moe, flat_mask)

    # ---------------------------------------------------------------- stats
    def stats(self, seq_len: int | None = None) -> ModelStats:
        """Total/active parameters and FLOPs per token (attention at seq_len, default max_seq_len)."""
        from moelab.models.stats import model_stats

        return model_stats(self, seq_len)

    # -------------------------------------------------------------- save/load
    def save(self, directory: str | Path) -> Path:
        """Write model.safetensors + config.json (each atomically; config last)."""
        from safetensors.torch import save_model

        import moelab

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_with(directory / WEIGHTS_FILE, lambda tmp: save_model(self, str(tmp)))
        meta = {"model_type": "moelab_transformer", "moelab_version": moelab.__version__}
        atomic_write_json(directory / CONFIG_FILE, {**meta, **self.cfg.to_dict()})
        return directory

    @classmethod
    def load(
        cls,
        directory: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> MoETransformer:
        """Load a directory written by save() onto `device` (optionally casting to `dtype`)."""
        from safetensors.torch import load_model

        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise ModelError(
                    f"MoETransformer.load: {p} is missing (expected a dir written by save())"
                )
        try:
            raw = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"MoETransformer.load: {cfg_path} is not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ModelError(
                f"MoETransformer.load: {cfg_path} holds a JSON {type(raw).__name__}; expected the"
                " object of config fields that MoETransformer.save() writes"
            )
        try:
            cfg = MoETransformerConfig.from_dict(raw)
        except (TypeError, ValueError, KeyError) as exc:
            if isinstance(exc, MoelabError):
                raise
            raise ModelError(
                f"MoETransformer.load: {cfg_path} is not a moelab model config ({exc})"
            ) from None
        # built on the meta device and allocated uninitialised: the random init it would
        # overwrite cost ~2 s per 0.6 GB model; strict loading leaves no parameter or buffer
        # unwritten (a missing key is an error)
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device="cpu")
        if cfg.tie_embeddings:  # to_empty gives each parameter its own storage: tie again
            model.lm_head.weight = model.embed_tokens.weight
        try:
            load_model(model, str(w_path), strict=True)
        except (RuntimeError, OSError) as exc:
            raise ModelError(
                f"MoETransformer.load: {w_path} does not match {cfg_path}: {exc}"
            ) from None
        model.to(device=device, dtype=dtype)
        model.eval()
        return model

    # -------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        greedy: bool = True,
        use_cache: bool = True,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        seed: int = 0,
    ) -> torch.Tensor:
        """Extend input_ids [B, S] by up to max_new_tokens tokens (greedy or sampled); causal only."""
        if self.cfg.mode != "causal":
            raise ModelError(
                "generate: needs a causal model (cfg.mode='causal'), this one is 'mlm'"
            )
        if max_new_tokens < 0:
            raise InputError(f"generate: max_new_tokens={max_new_tokens} must be >= 0")
        if not greedy and temperature <= 0:
            raise InputError(f"generate: temperature={temperature} must be > 0 when sampling")
        was_training = self.training
        self.eval()
        gen = torch.Generator(device=input_ids.device).manual_seed(seed)
        cache = KVCache() if use_cache else None
        ids, step_input = input_ids, input_ids
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            logits = self(step_input, cache=cache).logits[:, -1, :].float()
            if greedy:
                nxt = logits.argmax(dim=-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=gen).squeeze(1)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done = done | (nxt == eos_token_id)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            step_input = nxt[:, None] if use_cache else ids
            if eos_token_id is not None and bool(done.all()):
                break
        self.train(was_training)
        return ids
