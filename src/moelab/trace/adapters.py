"""Adapters: one small class per model family that finds the router modules, decodes their
outputs into (logits, expert ids, weights) and exports the routers as a GateSet.

Routers are observed with forward hooks only (no model edits). Supported:
- moelab's MoETransformer (hook on each MoEBlock, which returns (y, RoutingResult));
- transformers v5 token-choice routers that return `(router_logits, weights, indices)`, found
  through the model's own `_can_record_outputs["router_logits"]` recorder (the modules that
  `output_router_logits=True` reads): Mixtral (Jiang et al. 2024), Qwen2/Qwen3-MoE, OLMoE
  (Muennighoff et al. 2024), DeepSeek-V2/V3 (DeepSeek-AI 2024, sigmoid + selection bias, eq. 16
  of the V3 report), GraniteMoe, PhiMoE, GPT-OSS and other families with the same contract
  (tested: GLM-4-MoE, ERNIE-4.5-MoE, HunYuan-MoE, GraniteMoeShared, MiniMax);
- Switch Transformers (Fedus et al. 2022; top-1 with capacity, encoder and decoder stacks);
- JetMoE (Shen et al. 2024; its feed-forward MoE, not the attention mixture).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from moelab.errors import ModelError
from moelab.trace.gates import GateSet
from moelab.trace.schema import NO_EXPERT

LAYER_RE = re.compile(r"(?:^|\.)(?:layers|block|h|blocks)\.(\d+)(?:\.|$)")


@dataclass
class RouterSite:
    """One MoE layer: the hooked module, its transformer layer and the pre-router norm."""

    name: str  # module path of the hooked module
    module: nn.Module  # module whose forward hook sees the routing decision
    layer_index: int  # transformer layer (global index; Switch decoder = n_encoder + j)
    group: str = "decoder"  # "decoder", "encoder" (Switch) or "model" (moelab)
    block: nn.Module | None = None  # transformer layer module (its input = residual stream)
    norm: nn.Module | None = None  # norm producing the router input from the residual stream
    gate: Any = None  # object holding the router projection (weight [E, D], maybe bias)


@dataclass
class Decoded:
    """Routing of a flat batch of T tokens taken from a router module's output."""

    logits: torch.Tensor | None  # [T, E] (None where the family exposes no router logits)
    expert_ids: torch.Tensor  # [T, k] experts the model ran (intended expert where dropped)
    weights: torch.Tensor  # [T, k]
    dropped: torch.Tensor | None = None  # [T, k] bool: over capacity (Switch), else None


def _arr(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to(torch.float32).cpu().numpy()


def _norm_params(norm: nn.Module | None) -> tuple[np.ndarray | None, np.ndarray | None, str, float]:
    """(weight, bias, kind, eps) of an RMSNorm / T5 LayerNorm / nn.LayerNorm module."""
    if norm is None:
        return None, None, "rms", 1e-6
    kind = "layer" if isinstance(norm, nn.LayerNorm) else "rms"
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    w = getattr(norm, "weight", None)
    b = getattr(norm, "bias", None) if kind == "layer" else None
    return _arr(w), _arr(b), kind, float(eps)


class Adapter:
    """Base: subclasses fill `sites`, `num_experts`, `top_k` and implement `decode`."""

    family = "base"
    score_fn = "softmax"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.sites: list[RouterSite] = []
        self.num_experts = 0
        self.top_k = 0
        self.d_model = 0

    def moe_layers(self) -> list[RouterSite]:
        """Router sites in forward order (index = MoE layer l of the trace)."""
        return self.sites

    def layer_indices(self) -> list[int]:
        """Transformer layer of each MoE layer."""
        return [s.layer_index for s in self.sites]

    def decode(self, site: RouterSite, args: tuple, output: Any) -> Decoded:
        """Routing decision from the hooked module's forward output."""
        raise NotImplementedError

    def decode_capture(self, site: RouterSite, cap: dict[str, Any]) -> Decoded:
        """Routing decision from what the tracer's hooks captured for one site."""
        args, output = cap["output"]
        return self.decode(site, args, output)

    def check_first(self, decoded: list[Decoded], want_logits: bool) -> None:
        """Validate the first batch's routing against the sizes meta.json will declare."""
        for site, d in zip(self.sites, decoded, strict=True):
            k = int(d.expert_ids.shape[1])
            if k != self.top_k:
                raise ModelError(
                    f"{site.name} ({self.family}): {k} experts per token recorded, but the"
                    f" model declares top_k={self.top_k}; nothing was traced"
                )
            if d.logits is not None and int(d.logits.shape[1]) != self.num_experts:
                raise ModelError(
                    f"{site.name} ({self.family}): router logits have {d.logits.shape[1]}"
                    f" columns, the model declares {self.num_experts} experts; nothing traced"
                )
            if want_logits and d.logits is None:
                raise ModelError(f"{site.name} ({self.family}): no router logits; use --no-logits")
            ok = d.expert_ids[d.expert_ids != NO_EXPERT]
            if ok.numel() and (int(ok.min()) < 0 or int(ok.max()) >= self.num_experts):
                raise ModelError(
                    f"{site.name} ({self.family}): expert ids outside [0, {self.num_experts})"
                )

    def router_input(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The tensor the router is applied to (the hooked module's first input)."""
        x = args[0] if args else next(iter(kwargs.values()))
        return x.reshape(-1, x.shape[-1])

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Forward pass that fires every router once per token (no LM head where avoidable)."""
        raise NotImplementedError

    def vocab_size(self) -> int | None:
        """Vocabulary size of the model (for checking tokenizer ids)."""
        return None

    def bos_token_id(self) -> int | None:
        """BOS id from the model config, if any."""
        return None

    def max_positions(self) -> int | None:
        """Longest sequence the model accepts."""
        return None

    def num_model_layers(self) -> int:
        """Transformer layers of the model (dense ones included)."""
        return max(self.layer_indices()) + 1

    def gate_set(self) -> GateSet | None:
        """Routers of every MoE layer as arrays (None if a router has no linear projection)."""
        ws, bs, sbs, nws, nbs = [], [], [], [], []
        kind, eps = "rms", 1e-6
        for s in self.sites:
            g = s.gate
            w = getattr(g, "weight", None) if g is not None else None
            if not isinstance(w, torch.Tensor) or w.dim() != 2:
                return None
            ws.append(_arr(w))
            b = getattr(g, "bias", None)
            bs.append(_arr(b) if isinstance(b, torch.Tensor) else None)
            sb = getattr(g, "e_score_correction_bias", None)
            sbs.append(_arr(sb) if isinstance(sb, torch.Tensor) else None)
            nw, nb, kind, eps = _norm_params(s.norm)
            nws.append(nw)
            nbs.append(nb)
        return GateSet(
            weights=ws,
            biases=bs,
            selection_bias=sbs,
            norm_weight=nws,
            norm_bias=nbs,
            norm_kind=kind,
            norm_eps=eps,
            score_fn=self.score_fn,
            top_k=self.top_k,
        )

    def fingerprint(self) -> str:
        """Short hash of the routers' weights: identifies the model when resuming a trace."""
        import hashlib

        h = hashlib.sha256()
        for s in self.sites:
            w = getattr(s.gate, "weight", None) if s.gate is not None else None
            params = [w] if isinstance(w, torch.Tensor) else list(s.module.parameters())[:1]
            for p in params:  # a slice only: never copy a whole (possibly huge) tensor
                flat = p.detach().reshape(-1)[:16384].to(torch.float32).cpu()
                h.update(flat.numpy().tobytes())
        return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# moelab's own models
# ---------------------------------------------------------------------------------------------
class MoelabAdapter(Adapter):
    """moelab MoETransformer: hook blocks[i].ffn (MoEBlock) -> (y, RoutingResult)."""

    family = "moelab"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        from moelab.layers.moe import MoEBlock

        cfg = model.cfg
        for i, block in enumerate(model.blocks):
            if isinstance(block.ffn, MoEBlock):
                router = block.ffn.router
                self.sites.append(
                    RouterSite(
                        name=f"blocks.{i}.ffn",
                        module=block.ffn,
                        layer_index=i,
                        group="model",
                        block=block,
                        norm=block.ffn_norm,
                        gate=getattr(router, "gate", None),
                    )
                )
        if cfg.moe is None or not self.sites:
            raise ModelError("moelab model has no MoE layers (cfg.moe is None): nothing to trace")
        self.num_experts = cfg.moe.num_experts
        self.expert_choice = cfg.moe.router == "expert_choice"
        # expert choice: one slot per expert (slot j = expert j), unchosen slots NO_EXPERT
        self.top_k = cfg.moe.num_experts if self.expert_choice else cfg.moe.top_k
        self.d_model = cfg.d_model
        self.score_fn = "sigmoid" if cfg.moe.router == "deepseek" else "softmax"

    def decode(self, site: RouterSite, args: tuple, output: Any) -> Decoded:
        r = output[1]
        ids = r.expert_ids
        w = r.weights
        if r.dropped is not None and self.expert_choice:  # an expert did not pick the token
            return Decoded(
                logits=r.logits,
                expert_ids=ids.masked_fill(r.dropped, NO_EXPERT),
                weights=w.masked_fill(r.dropped, 0),
            )
        if r.dropped is not None:  # capacity: keep the intended expert, flag the slot, weight 0
            w = w.masked_fill(r.dropped, 0)
        return Decoded(logits=r.logits, expert_ids=ids, weights=w, dropped=r.dropped)

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.model(input_ids, attention_mask=attention_mask)

    def vocab_size(self) -> int | None:
        return int(self.model.cfg.vocab_size)

    def bos_token_id(self) -> int | None:
        return getattr(self.model.cfg, "bos_token_id", None)

    def max_positions(self) -> int | None:
        return int(self.model.cfg.max_seq_len)

    def num_model_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    def gate_set(self) -> GateSet | None:
        gs = super().gate_set()
        if gs is not None:
            # DeepSeek-style routers keep their selection bias in a buffer named `bias`
            for li, s in enumerate(self.sites):
                router = s.module.router
                for name in ("selection_bias", "e_score_correction_bias", "expert_bias"):
                    b = getattr(router, name, None)
                    if isinstance(b, torch.Tensor):
                        gs.selection_bias[li] = _arr(b)
        return gs


# ---------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------
def _router_recorder_classes(model: nn.Module) -> list[tuple[type, str | None, int]]:
    """(module class, layer_name filter, output index) of the model's router_logits recorders."""
    out = []
    for cls in type(model).__mro__:
        rec = getattr(cls, "_can_record_outputs", None)
        if rec and "router_logits" in rec:
            items = rec["router_logits"]
            items = items if isinstance(items, list) else [items]
            for it in items:
                tc = getattr(it, "target_class", None)
                if isinstance(tc, type):
                    out.append((tc, getattr(it, "layer_name", None), int(getattr(it, "index", 0))))
    # the submodels (e.g. MixtralModel inside MixtralForCausalLM) declare the recorders
    for m in model.modules():
        rec = getattr(type(m), "_can_record_outputs", None)
        if rec and "router_logits" in rec:
            items = rec["router_logits"]
            items = items if isinstance(items, list) else [items]
            for it in items:
                tc = getattr(it, "target_class", None)
                if isinstance(tc, type):
                    t = (tc, getattr(it, "layer_name", None), int(getattr(it, "index", 0)))
                    if t not in out:
                        out.append(t)
    return out


class HFConfigFacts:
    """Vocabulary, BOS id, positions and layer count read from a transformers `self.config`
    (shared by the family adapters and the generic experts-module adapter)."""

    def vocab_size(self) -> int | None:
        v = getattr(self.config, "vocab_size", None)
        return int(v) if v else None

    def bos_token_id(self) -> int | None:
        return getattr(self.config, "bos_token_id", None)

    def max_positions(self) -> int | None:
        v = getattr(self.config, "max_position_embeddings", None)
        return int(v) if v else None

    def num_model_layers(self) -> int:
        v = getattr(self.config, "num_hidden_layers", None)
        return int(v) if v else super().num_model_layers()


class HFAdapter(HFConfigFacts, Adapter):
    """transformers causal LMs whose router returns (router_logits [T,E], weights [T,k], ids [T,k])."""

    family = "hf"
    # families whose recorders point at something other than a (logits, weights, ids) router
    router_name_filter: str | None = None

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.config = model.config
        self.family = str(getattr(self.config, "model_type", "hf"))
        self._find_sites()
        if not self.sites:
            raise ModelError(
                f"{type(model).__name__} ({self.family}): no MoE router modules found; "
                "is this a mixture-of-experts model?"
            )
        self._infer_sizes()

    def _find_sites(self) -> None:
        classes = _router_recorder_classes(self.model)
        for name, mod in self.model.named_modules():
            if not any(isinstance(mod, c) for c, _, _ in classes):
                continue
            if self.router_name_filter and not name.endswith(self.router_name_filter):
                continue
            m = LAYER_RE.search(name)
            if m is None:
                continue
            prefix = name[: m.end(1)]
            block = self.model.get_submodule(prefix)
            group = "encoder" if ".encoder." in f".{name}" else "decoder"
            self.sites.append(
                RouterSite(
                    name=name,
                    module=mod,
                    layer_index=int(m.group(1)),
                    group=group,
                    block=block,
                    norm=self._find_norm(block, name),
                    gate=self._find_gate(mod),
                )
            )

    def _find_norm(self, block: nn.Module, name: str) -> nn.Module | None:
        return getattr(block, "post_attention_layernorm", None)

    def _find_gate(self, mod: nn.Module) -> Any:
        """The router's projection: the module itself if it owns a 2-D weight, else its only
        nn.Linear child (e.g. HunYuan's `wg`)."""
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            return mod
        linears = [c for c in mod.children() if isinstance(c, nn.Linear)]
        return linears[0] if len(linears) == 1 else mod

    def _infer_sizes(self) -> None:
        c = self.config
        get = lambda *names: next(  # noqa: E731
            (getattr(c, n) for n in names if getattr(c, n, None) is not None), None
        )
        g = self.sites[0].gate
        w = getattr(g, "weight", None)
        self.num_experts = int(
            w.shape[0]
            if isinstance(w, torch.Tensor)
            else get("num_local_experts", "n_routed_experts", "num_experts")
        )
        self.top_k = int(get("num_experts_per_tok", "moe_topk", "top_k") or 1)
        self.d_model = int(get("hidden_size", "d_model") or 0)
        if getattr(g, "e_score_correction_bias", None) is not None or self.family.startswith(
            ("deepseek_v3", "glm4_moe", "dots1")
        ):
            self.score_fn = "sigmoid"

    def decode(self, site: RouterSite, args: tuple, output: Any) -> Decoded:
        if not isinstance(output, tuple) or len(output) < 3:
            raise ModelError(
                f"{site.name}: router returned {type(output).__name__}, expected a tuple "
                "(router_logits, weights, indices); this family needs its own adapter"
            )
        logits, w, ids = output[0], output[1], output[2]
        E = logits.shape[-1]
        logits = logits.reshape(-1, E)
        ids = ids.reshape(logits.shape[0], -1)
        if ids.is_floating_point():
            raise ModelError(
                f"{site.name}: router output[2] is {ids.dtype}, expected integer expert ids"
            )
        w = w.reshape(logits.shape[0], -1)
        if w.shape[1] == E and ids.shape[1] != E:  # dense [T, E] scores -> gather the chosen
            w = w.gather(1, ids)
        return Decoded(logits=logits, expert_ids=ids, weights=w)

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        base = getattr(self.model, "base_model", self.model)
        base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


class JetMoeAdapter(HFAdapter):
    """JetMoE: the MLP router returns sorted-by-expert dispatch info plus logits; we unsort it."""

    router_name_filter = "mlp.router"

    def _find_gate(self, mod: nn.Module) -> Any:
        return mod.layer

    def decode(self, site: RouterSite, args: tuple, output: Any) -> Decoded:
        index_sorted, _batch_index, batch_gates, expert_size, logits = output
        T, E = logits.shape
        k = index_sorted.shape[0] // T
        sizes = torch.as_tensor(expert_size, device=logits.device)
        sorted_expert = torch.repeat_interleave(torch.arange(E, device=logits.device), sizes)
        ids = torch.empty(T * k, dtype=torch.long, device=logits.device)
        ids[index_sorted] = sorted_expert
        w = torch.empty(T * k, dtype=batch_gates.dtype, device=logits.device)
        w[index_sorted] = batch_gates
        return Decoded(logits=logits, expert_ids=ids.view(T, k), weights=w.view(T, k))


class SwitchAdapter(HFAdapter):
    """Switch Transformers: top-1 with per-sequence capacity; encoder and decoder stacks.

    The decoder is run teacher-forced, as in training and scoring: its input is the sequence
    shifted right (`decoder_start_token_id` first, the model's own `_shift_right`), so row t's
    decoder layers describe the decoder step that predicts token t from tokens < t.
    Capacity-dropped tokens keep the expert the router chose (argmax of its probabilities),
    weight 0 (transformers v5 gives them a zero MoE output; they pass via the residual) and
    the per-slot `dropped` flag.
    """

    decoder_input = "shifted-right input_ids (teacher forcing)"

    def decoder_start(self) -> int:
        """decoder_start_token_id of the config, else its pad id (T5/Switch use pad = 0)."""
        for name in ("decoder_start_token_id", "pad_token_id"):
            v = getattr(self.config, name, None)
            if isinstance(v, int):
                return v
        return 0

    def shift_right(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced decoder input: decoder start token, then the sequence minus its end."""
        start = torch.full_like(input_ids[:, :1], self.decoder_start())
        return torch.cat([start, input_ids[:, :-1]], dim=1)

    def _find_sites(self) -> None:
        super()._find_sites()
        n_enc = int(getattr(self.config, "num_layers", 0))
        for s in self.sites:
            if s.group == "decoder":
                s.layer_index += n_enc
        self.sites.sort(key=lambda s: (s.group != "encoder", s.layer_index))

    def _find_norm(self, block: nn.Module, name: str) -> nn.Module | None:
        return block.layer[-1].layer_norm

    def _find_gate(self, mod: nn.Module) -> Any:
        return mod.classifier

    def _infer_sizes(self) -> None:
        self.num_experts = int(self.config.num_experts)
        self.top_k = 1
        self.d_model = int(self.config.d_model)

    def decode(self, site: RouterSite, args: tuple, output: Any) -> Decoded:
        if not isinstance(output, tuple) or len(output) != 3:
            raise ModelError(
                f"{site.name}: Switch router returned {type(output).__name__}, expected"
                " (dispatch one-hot, probability, logits)"
            )
        onehot, probs, logits = output
        E = logits.shape[-1]
        onehot = onehot.reshape(-1, E)
        logits = logits.reshape(-1, E)
        kept = onehot.sum(-1) > 0
        intended = logits.argmax(-1)  # the router's argmax(softmax(logits)), before capacity
        ids = torch.where(kept, onehot.argmax(-1), intended)
        w = torch.where(
            kept, probs.reshape(-1), torch.zeros((), dtype=probs.dtype, device=probs.device)
        )
        return Decoded(
            logits=logits, expert_ids=ids[:, None], weights=w[:, None], dropped=~kept[:, None]
        )

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=self.shift_right(input_ids),
            decoder_attention_mask=attention_mask,
            use_cache=False,
        )

    def max_positions(self) -> int | None:
        return None

    def num_model_layers(self) -> int:
        return int(self.config.num_layers) + int(self.config.num_decoder_layers)


class Llama4Adapter(HFAdapter):
    """Llama 4 text MoE: the router returns (scores [T, E], logits [T, E]) where scores are
    sigmoid of the top-k logits scattered into -inf (0 elsewhere); the experts then run every
    token scaled by its score, so the experts used are the non-zero scores."""

    def _infer_sizes(self) -> None:
        self.num_experts = int(self.config.num_local_experts)
        self.top_k = int(self.config.num_experts_per_tok)
        self.d_model = int(self.config.hidden_size)
        self.score_fn = "sigmoid"

    def decode(self, site: RouterSite, args: tuple, output: Any) -> Decoded:
        if not isinstance(output, tuple) or len(output) != 2:
            raise ModelError(f"{site.name}: Llama4 router output is not (scores, logits)")
        scores, logits = output
        w, ids = scores.topk(self.top_k, dim=-1)
        return Decoded(logits=logits, expert_ids=ids, weights=w)


@dataclass
class _Family:
    adapter: type[HFAdapter]
    note: str = ""
    tested: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


# model_type -> hand-written adapter, for families whose experts module does not receive the
# chosen ids. Every other transformers family goes through GenericHFAdapter (hf_generic.py).
FAMILIES: dict[str, _Family] = {
    "jetmoe": _Family(JetMoeAdapter),
    "switch_transformers": _Family(SwitchAdapter),
    "llama4_text": _Family(Llama4Adapter),
}
UNSUPPORTED = {
    "nllb-moe": "transformers 5.23-5.24 NLLB-MoE one-hot encodes its dispatch mask a second"
    " time (only experts 0 and 1 run), so no trace would describe the checkpoint's routing",
    "nllb_moe": "transformers 5.23-5.24 NLLB-MoE one-hot encodes its dispatch mask a second"
    " time (only experts 0 and 1 run), so no trace would describe the checkpoint's routing",
    "llama4": "vision-language Llama 4 checkpoint: trace its text model (model_type"
    " llama4_text, Llama4ForCausalLM), which is supported",
    "doge": "Doge's CDMoE retrieves expert rows by product keys (no router over E experts"
    " choosing k), so there is no (expert id, weight) per token to record",
    "dots3_note_vision_encoder": "a vision encoder: it routes image patches and takes no"
    " token ids (trace the dots3_note text model)",
    "ernie4_5_vl_moe_text": "each layer holds a text and a vision expert set chosen by token"
    " type, and the layer's router output is assembled from both; moelab records one expert"
    " set per layer",
    "qwen3_omni_moe_talker_text": "the Qwen3-Omni talker runs on the thinker's hidden"
    " states (inputs_embeds), not on token ids; trace the thinker (qwen3_omni_moe_text)",
    "vitpose_backbone": "ViTPose experts are chosen by the dataset index of the image, not"
    " per token by a router",
}


def unsupported_message(model_type: str) -> str:
    """One-line refusal for an unsupported family: which, why, and what is supported."""
    return (
        f"model family {model_type!r} is not supported: {UNSUPPORTED[model_type]}. Supported:"
        " moelab MoETransformer, and transformers MoE models whose experts module receives"
        " the routed expert ids (the families in docs/guide/hf_families.md), plus"
        f" {', '.join(FAMILIES)}"
    )


def get_adapter(model: nn.Module) -> Adapter:
    """Pick the adapter for a model object (moelab MoETransformer or transformers
    PreTrainedModel); refuses, before any forward pass, a family it cannot trace exactly."""
    if type(model).__name__ == "MoETransformer" and hasattr(model, "blocks"):
        return MoelabAdapter(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None or model_type is None or not hasattr(model, "named_modules"):
        raise ModelError(
            f"unknown model family: {type(model).__name__} is neither a moelab MoETransformer "
            "nor a transformers model; supported: moelab MoETransformer and transformers MoE"
            " models (docs/guide/hf_families.md)"
        )
    if model_type in UNSUPPORTED:
        raise ModelError(unsupported_message(str(model_type)))
    fam = FAMILIES.get(model_type)
    if fam is not None:
        return fam.adapter(model)
    from moelab.trace.hf_generic import GenericHFAdapter

    return GenericHFAdapter(model)
