"""Generic transformers MoE tracing: record the experts each MoE layer actually ran.

transformers v5 MoE blocks compute a routing decision (softmax/sigmoid top-k, selection biases
as in DeepSeek-V3 eq. 16, group-limited routing, hash tables, null experts, ...) and hand it to
an *experts module* as `experts(hidden_states, top_k_index, top_k_weights)`. A forward
pre-hook on that module (`with_kwargs=True`) therefore sees exactly which experts ran for each
token and with what combine weight, whatever the router did; the router's logits come from
the module that the model's own `_can_record_outputs["router_logits"]` recorder reads (the one
`output_router_logits=True` uses), or from the MoE block's `gate`/`router` child.

Sizes are read from the modules (experts with weights, router width), cross-checked with the
config, and checked again on the first batch before anything is written. A model with an MoE
layer whose routing cannot be recorded is refused, naming the module: a layer is never
silently left out.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moelab.errors import ModelError
from moelab.trace.adapters import (
    LAYER_RE,
    Adapter,
    Decoded,
    HFConfigFacts,
    RouterSite,
    _router_recorder_classes,
)

# names transformers uses for the experts module's routing inputs
IDX_NAMES = ("top_k_index", "router_indices", "selected_experts", "topk_indices", "top_k_indices")
W_NAMES = ("top_k_weights", "routing_weights", "topk_weights", "router_weights", "top_k_scores")
# config keys naming the number of routed experts and the experts per token (first found wins)
E_KEYS = ("num_local_experts", "n_routed_experts", "num_experts", "moe_num_experts")
# families whose MoE block hands a chosen null ("skip") expert to the experts module as
# (id 0, weight 0): a zero weight there is the null expert (softmax weights are never 0)
MASKED_NULL = {"zaya": "skip expert masked to (0, 0.0) before ZayaExperts"}
K_KEYS = (
    "num_experts_per_tok",
    "num_experts_per_token",
    "top_k_experts",
    "moe_topk",
    "moe_k",
    "top_k",
)


def config_value(config: Any, keys: tuple[str, ...]) -> tuple[str, int] | None:
    """(key, value) of the first integer-valued key of `config` (sub-configs not searched)."""
    for k in keys:
        v = getattr(config, k, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return k, v
    return None


def _forward_params(mod: nn.Module) -> list[str] | None:
    """Parameter names of the module's (unwrapped) forward, self excluded."""
    try:
        sig = inspect.signature(inspect.unwrap(type(mod).forward))
    except (TypeError, ValueError):
        return None
    return [p for p in sig.parameters if p != "self"]


def routing_param_names(mod: nn.Module) -> tuple[str, str | None] | None:
    """(index param, weight param) of an experts module's forward, None if it takes no ids."""
    params = _forward_params(mod)
    if not params:
        return None
    idx = next((p for p in params if p in IDX_NAMES), None)
    if idx is None:
        return None
    w = next((p for p in params if p in W_NAMES), None)
    return idx, w


def real_experts(mod: nn.Module) -> int | None:
    """Experts that own weights: first dim of the 3-D expert tensors, or the ModuleList length."""
    if isinstance(mod, nn.ModuleList):
        return len(mod)
    dims = [int(p.shape[0]) for _n, p in mod.named_parameters(recurse=False) if p.dim() == 3]
    if dims:  # (LongCat's gate_up_proj also has rows for its zero experts: take the least)
        return min(dims)
    for child in mod.children():
        if isinstance(child, nn.ModuleList) and len(child) > 1:
            return len(child)
    v = getattr(mod, "num_experts", None)
    return int(v) if isinstance(v, int) else None


@dataclass
class GenericSite(RouterSite):
    """An MoE layer traced from its experts module's inputs."""

    router: nn.Module | None = None  # module whose output holds the router logits
    router_name: str = ""  # its module path
    logits_index: int | None = None  # index of the logits in the router's output tuple
    params: tuple[str, str | None] = ("top_k_index", "top_k_weights")
    signature: inspect.Signature | None = None


def _bind(site: GenericSite, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The experts module's call as {param name: value}."""
    assert site.signature is not None
    try:
        return dict(site.signature.bind_partial(None, *args, **kwargs).arguments)
    except TypeError as exc:
        raise ModelError(
            f"{site.name}: experts module called in an unexpected way ({exc})"
        ) from None


def _logits_from(site: GenericSite, out: Any, width: int | None) -> torch.Tensor | None:
    """The router logits inside a router module's output (tensor or tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        if site.logits_index is not None and site.logits_index < len(out):
            t = out[site.logits_index]
            return t if isinstance(t, torch.Tensor) else None
        for t in out:  # the first float tensor as wide as the router
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 2:
                if width is None or t.shape[-1] == width:
                    return t
    return None


class GenericHFAdapter(HFConfigFacts, Adapter):
    """Any transformers model whose MoE blocks call an experts module with the chosen ids."""

    family = "hf"
    capture = "experts"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.config = model.config
        self.family = str(getattr(self.config, "model_type", "hf"))
        self.null_experts: list[int] = []
        self.real_experts = 0
        self._find_sites()
        self._static_sizes()

    # -- discovery ------------------------------------------------------------------------
    def _find_sites(self) -> None:
        recorders = _router_recorder_classes(self.model)
        rec_classes = tuple(c for c, _, _ in recorders)
        experts: list[tuple[str, nn.Module, tuple[str, str | None]]] = []
        for name, mod in self.model.named_modules():
            names = routing_param_names(mod)
            if names is not None:
                experts.append((name, mod, names))
        if not experts:
            raise ModelError(
                f"{type(self.model).__name__} ({self.family}): no MoE layers found (no experts"
                f" module taking routed expert ids, {' / '.join(IDX_NAMES[:2])}); is this a"
                " mixture-of-experts model? Supported: transformers MoE families listed in"
                " docs/guide/hf_families.md, and moelab MoETransformer checkpoints"
            )
        used_routers: set[int] = set()
        for name, mod, names in experts:
            parent_name = name.rsplit(".", 1)[0] if "." in name else ""
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            router, index, rname = self._find_router(parent, mod, recorders, rec_classes)
            if router is not None:
                used_routers.add(id(router))
            found = list(LAYER_RE.finditer(name))
            m = found[-1] if found else None  # the innermost numbered stack
            if m is None:
                raise ModelError(
                    f"{name} ({self.family}): experts module outside a numbered layer stack;"
                    " cannot tell which transformer layer it belongs to"
                )
            block = self.model.get_submodule(name[: m.end(1)])
            self.sites.append(
                GenericSite(
                    name=name,
                    module=mod,
                    layer_index=int(m.group(1)),
                    group="encoder" if ".encoder." in f".{name}." else "decoder",
                    block=block,
                    norm=self._find_norm(block),
                    gate=self._find_gate(router),
                    router=router,
                    router_name=f"{parent_name}.{rname}" if parent_name else rname,
                    logits_index=index,
                    params=names,
                    signature=inspect.signature(inspect.unwrap(type(mod).forward)),
                )
            )
        # every router the model's own recorder knows must belong to a traced layer
        for rname, rmod in self.model.named_modules():
            if rec_classes and isinstance(rmod, rec_classes) and id(rmod) not in used_routers:
                raise ModelError(
                    f"{rname} ({type(rmod).__name__}, {self.family}): a router without an experts"
                    " module taking its expert ids; this MoE layer's routing cannot be recorded,"
                    " so the model is refused rather than traced with the layer missing"
                )
        # every `experts` module with weights must be traced (or hold a traced module)
        traced = [s.name for s in self.sites]
        for ename, emod in self.model.named_modules():
            if ename.rsplit(".", 1)[-1] != "experts" or not any(True for _ in emod.parameters()):
                continue
            if not any(t == ename or t.startswith(ename + ".") for t in traced):
                raise ModelError(
                    f"{ename} ({type(emod).__name__}, {self.family}): an experts module that is"
                    " not called with routed expert ids; its layer's routing cannot be recorded,"
                    " so the model is refused rather than traced with the layer missing"
                )
        keys = [(s.group, s.layer_index) for s in self.sites]
        if len(set(keys)) != len(keys):
            raise ModelError(
                f"{self.family}: several experts modules in one transformer layer"
                f" ({[s.name for s in self.sites]}); not supported"
            )
        self.sites.sort(key=lambda s: (s.group != "encoder", s.layer_index))

    @staticmethod
    def _find_router(
        parent: nn.Module,
        experts: nn.Module,
        recorders: list[tuple[type, str | None, int]],
        rec_classes: tuple[type, ...],
    ) -> tuple[nn.Module | None, int | None, str]:
        """The router beside the experts module: a recorder target, else a gate/router child
        (module, index of the logits in its output, path below the parent)."""
        for name, mod in parent.named_modules():
            if mod is experts or mod is parent or name.startswith(("experts.", "shared")):
                continue
            for cls, layer_name, index in recorders:
                if isinstance(mod, cls) and (layer_name is None or name.endswith(layer_name)):
                    return mod, index, name
        for attr in ("gate", "router"):
            mod = getattr(parent, attr, None)
            if isinstance(mod, nn.Module) and mod is not experts:
                return mod, None, attr
        return None, None, ""

    @staticmethod
    def _find_norm(block: nn.Module) -> nn.Module | None:
        for attr in ("post_attention_layernorm", "pre_feedforward_layernorm", "ffn_norm"):
            n = getattr(block, attr, None)
            if isinstance(n, nn.Module):
                return n
        return None

    @staticmethod
    def _find_gate(router: nn.Module | None) -> Any:
        """The router's projection: the module if it owns a 2-D weight, else its only Linear."""
        if router is None:
            return None
        w = getattr(router, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            return router
        linears = [c for c in router.modules() if isinstance(c, nn.Linear)]
        return linears[0] if len(linears) == 1 else router

    def _static_sizes(self) -> None:
        """E and k from the modules, cross-checked with the config (refined on the first batch)."""
        counts = {real_experts(s.module) for s in self.sites}
        if None in counts or len(counts) != 1:
            raise ModelError(
                f"{self.family}: cannot read the number of experts from the experts modules"
                f" ({sorted(str(c) for c in counts)}); expected one count for every MoE layer"
            )
        self.real_experts = int(next(iter(counts)))  # type: ignore[arg-type]
        total = self.real_experts + int(getattr(self.sites[0].module, "zero_expert_num", 0) or 0)
        self.num_experts = total
        cfg_e = config_value(self.config, E_KEYS)
        if cfg_e is not None and cfg_e[1] not in (self.real_experts, total):
            raise ModelError(
                f"{self.family}: config {cfg_e[0]}={cfg_e[1]} but the experts modules hold"
                f" {self.real_experts} experts; config and weights disagree, nothing traced"
            )
        cfg_k = config_value(self.config, K_KEYS)
        self.top_k = cfg_k[1] if cfg_k is not None else 0  # 0: known after the first batch
        self._cfg_k = cfg_k
        self.d_model = int(
            next(
                (
                    getattr(self.config, n)
                    for n in ("hidden_size", "d_model")
                    if getattr(self.config, n, None)
                ),
                0,
            )
        )
        sb = getattr(self.sites[0].router, "e_score_correction_bias", None)
        fn = str(getattr(self.config, "scoring_func", "") or "")
        self.score_fn = (
            "sigmoid" if (fn == "sigmoid" or isinstance(sb, torch.Tensor)) else "softmax"
        )

    # -- decoding -------------------------------------------------------------------------
    def decode_capture(self, site: RouterSite, cap: dict[str, Any]) -> Decoded:
        assert isinstance(site, GenericSite)
        args, kwargs = cap["experts"]
        bound = _bind(site, args, kwargs)
        idx_name, w_name = site.params
        ids = bound.get(idx_name)
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
            raise ModelError(
                f"{site.name}: experts module got {idx_name}={type(ids).__name__}"
                f"{'' if not isinstance(ids, torch.Tensor) else ' ' + str(ids.dtype)};"
                " expected integer expert ids"
            )
        x = bound.get("hidden_states", args[0] if args else None)
        T = int(x.reshape(-1, x.shape[-1]).shape[0]) if isinstance(x, torch.Tensor) else None
        ids = ids.reshape(T if T is not None else ids.shape[0], -1)
        w = bound.get(w_name) if w_name else None
        if not isinstance(w, torch.Tensor):
            raise ModelError(f"{site.name}: experts module got no routing weights ({w_name})")
        w = w.reshape(ids.shape[0], -1)
        if w.shape[1] != ids.shape[1]:  # dense [T, E] weights: gather the chosen
            if w.shape[1] != self.num_experts:
                raise ModelError(
                    f"{site.name}: routing weights {tuple(w.shape)} fit neither k={ids.shape[1]}"
                    f" nor E={self.num_experts}"
                )
            w = w.gather(1, ids.long())
        logits = None
        if site.router is not None and cap.get("router") is not None:
            logits = _logits_from(site, cap["router"], self.num_experts)
            if logits is not None:
                logits = logits.reshape(-1, logits.shape[-1])
                if logits.shape[0] != ids.shape[0]:
                    logits = None
        ids = ids.long()
        if self.family in MASKED_NULL and self.null_experts:
            # the block masks a chosen skip expert to (id 0, weight 0) before the experts run
            ids = torch.where(w == 0, torch.full_like(ids, self.null_experts[0]), ids)
        return Decoded(logits=logits, expert_ids=ids, weights=w)

    def router_input(self, args: tuple, kwargs: dict) -> torch.Tensor:
        x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
        return x.reshape(-1, x.shape[-1])

    def check_first(self, decoded: list[Decoded], want_logits: bool) -> None:
        """Validate the first batch against the static sizes; fix k; find null experts."""
        ks = {int(d.expert_ids.shape[1]) for d in decoded}
        if len(ks) != 1:
            raise ModelError(f"{self.family}: MoE layers choose different numbers of experts {ks}")
        k = ks.pop()
        if self._cfg_k is not None and self._cfg_k[1] != k:
            raise ModelError(
                f"{self.family}: config {self._cfg_k[0]}={self._cfg_k[1]} but the experts modules"
                f" receive {k} expert ids per token; nothing was traced"
            )
        self.top_k = k
        widths = {int(d.logits.shape[1]) for d in decoded if d.logits is not None}
        if want_logits and (len(widths) != 1 or any(d.logits is None for d in decoded)):
            missing = [s.name for s, d in zip(self.sites, decoded, strict=True) if d.logits is None]
            raise ModelError(
                f"{self.family}: --logits asked for, but router logits are not available for"
                f" {missing or 'every layer with one width'}; trace with --no-logits"
            )
        if widths:
            width = widths.pop() if len(widths) == 1 else max(widths)
            if width < self.real_experts:
                raise ModelError(
                    f"{self.family}: router logits have {width} columns for"
                    f" {self.real_experts} experts; cannot record this router"
                )
            self.num_experts = width
        if self.num_experts > self.real_experts:
            self.null_experts = list(range(self.real_experts, self.num_experts))
        hi = max(int(d.expert_ids.max()) for d in decoded if d.expert_ids.numel())
        lo = min(int(d.expert_ids.min()) for d in decoded if d.expert_ids.numel())
        if lo < 0 or hi >= self.num_experts:
            raise ModelError(
                f"{self.family}: expert ids in [{lo}, {hi}] outside [0, {self.num_experts});"
                " nothing was traced"
            )

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        kw: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if getattr(self.config, "use_cache", None) is not None:
            kw["use_cache"] = False
        base = getattr(self.model, "base_model", None) or self.model
        base(**kw)

    def gate_set(self) -> Any:
        """Routers as arrays when every router is one [E, D] projection (else None)."""
        for s in self.sites:
            w = getattr(s.gate, "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[0] != self.num_experts:
                return None
        return super().gate_set()
