"""Every MoE family of the installed transformers, as tiny random-init models (self-tests).

`moe_model_types()` lists the model types whose config class declares routed experts
(num_experts / num_local_experts / n_routed_experts / moe_* / *expert* fields), so a family
that a new transformers release adds shows up by itself. `build_tiny(model_type, out)` makes
a model of it small enough for CI (hidden 64, 2 layers, 8 experts, k = 2), gives every
router and selection bias non-zero values (so that the model's choice differs from the top-k
of its raw logits wherever it has a bias, groups, a hash table, ...) and saves it with
`save_pretrained`. `ExpertsRecorder` records, independently of moelab's tracer, which experts
each MoE layer ran (the ids and weights its experts module was called with). Used by
tests/trace/test_trace_families.py and tools/gen_hf_families.py.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

L = 2  # transformer layers of a tiny model
E = 8  # routed experts
K = 2  # experts per token
SMALL: dict[str, int] = {
    "vocab_size": 300,
    "unpadded_vocab_size": 300,
    "hidden_size": 64,
    "d_model": 64,
    "intermediate_size": 64,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32,
    "shared_intermediate_size": 32,
    "moe_hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 128,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "num_experts_per_tok": K,
    "num_experts_per_token": K,
    "moe_topk": K,
    "moe_k": K,
    "top_k_experts": K,
    "n_group": 2,
    "num_expert_group": 2,
    "topk_group": 1,
    "first_k_dense_replace": 0,
    "moe_layer_start_index": 0,
    "num_dense_layers": 0,
    "num_shared_experts": 1,
    "n_shared_experts": 1,
    "num_layers": L,
    "num_decoder_layers": L,
    "d_ff": 64,
    "d_kv": 16,
    "num_heads": 4,
    "zero_expert_num": 2,
}
E_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
# per-family settings the generic shrinking cannot guess (validated by the config classes)
OVERRIDES: dict[str, Any] = {
    "zaya": {"num_experts_per_tok": 1},  # ZAYA supports top-1 only
    "deepseek_ocr2_text": {"mlp_layer_types": ["sparse"] * L},
    "deepseek_v4": {"mlp_layer_types": ["hash_moe", "moe"]},  # one hash-routed layer
    "glm5_next_text": {"qk_rope_head_dim": 0},  # its DSA layers are NoPE
    "hy_v4": {"indexer_types": ["full"] * L},
    "qwen3_omni_moe_talker_text": {"shared_expert_intermediate_size": 32},
    "qwen4_exp_text": {"layer_types": ["linear_attention"] * L},
    "step3p5": {"sliding_window": 8},
    "hy_v4_vl_text": {"indexer_types": ["full"] * L},
    "mistral4": {"head_dim": 16},  # nope + rope
    "nemotron_h": {"n_groups": 1},  # Mamba groups must divide its 4 heads
    "granitemoehybrid": {"mamba_n_heads": 8, "mamba_d_head": 16},  # heads x dim = 2 x hidden
    # 3-D rope sections must fill the rotary half of a 16-dim head
    "glm4v_moe_text": lambda d: {
        "rope_parameters": {**(d.get("rope_parameters") or {}), "mrope_section": [2, 1, 1]}
    },
    "ernie4_5_vl_moe_text": lambda d: {
        "rope_parameters": {**(d.get("rope_parameters") or {}), "mrope_section": [3, 3, 2]}
    },
    "switch_transformers": {
        "expert_capacity": 4,
        "num_sparse_encoder_layers": 1,
        "num_sparse_decoder_layers": 1,
    },
}
# families whose block masks a chosen null (skip) expert to (id 0, weight 0) before the
# experts module: model -> the null expert's id
MASKED_NULL: dict[str, Any] = {"zaya": lambda model: int(model.config.num_experts)}
# families the generator cannot build a tiny model of yet (reason shown in the docs table)
NOT_BUILT: dict[str, str] = {}


def _fields(cls: type) -> set[str]:
    """Field names a config class declares (dataclass fields or __init__ parameters)."""
    import inspect

    names: set[str] = set()
    for c in cls.__mro__:
        names |= set(getattr(c, "__dataclass_fields__", {}) or {})
        names |= set(getattr(c, "__annotations__", {}) or {})
    try:
        names |= set(inspect.signature(cls.__init__).parameters)
    except (TypeError, ValueError):
        pass
    return names


def is_moe_config_class(cls: type) -> bool:
    """True if a config class declares routed experts (counts, top-k or moe_* fields)."""
    f = _fields(cls)
    return bool(f & set(E_FIELDS)) or any(("moe" in n or "expert" in n) for n in f)


def moe_model_types() -> list[str]:
    """Model types of the installed transformers whose config declares MoE fields."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    out = []
    for mt in CONFIG_MAPPING.keys():  # noqa: SIM118 - a lazy mapping
        try:
            cls = CONFIG_MAPPING[mt]
        except Exception:  # noqa: BLE001 - a broken entry is not ours to judge
            continue
        if is_moe_config_class(cls):
            out.append(mt)
    return sorted(out)


def config_class(model_type: str) -> type:
    """The config class of a model type."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


def model_class(model_type: str) -> type:
    """The LM class of a model type: its ForCausalLM / ForConditionalGeneration / Model class."""
    from transformers.models.auto import modeling_auto as ma

    cfg_cls = config_class(model_type)
    for mapping in (
        ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    ):
        name = mapping.get(model_type)
        if name:
            import transformers

            return getattr(transformers, name)
    mod = importlib.import_module(cfg_cls.__module__.replace("configuration_", "modeling_"))
    cands = [
        getattr(mod, n)
        for n in dir(mod)
        if isinstance(getattr(mod, n), type)
        and getattr(getattr(mod, n), "config_class", None) is cfg_cls
    ]
    for suffix in ("ForCausalLM", "ForConditionalGeneration", "Model"):
        for c in cands:
            if c.__name__.endswith(suffix):
                return c
    raise LookupError(f"{model_type}: no model class with config {cfg_cls.__name__}")


# other size fields (linear attention, Mamba, indexers, per-layer embeddings): by name pattern
SIZE_PATTERNS = (
    (re.compile(r"^vocab_size_per_layer_input$"), 300),
    (re.compile(r"num_key_value_heads$"), 2),
    (re.compile(r"(num_heads|n_heads|num_attention_heads)$"), 4),
    (re.compile(r"(head_dim|d_head|d_state|state_size|chunk_size|kv_channels)$"), 16),
    (re.compile(r"(intermediate_size|ffn_hidden_size|per_layer_input|router_hidden_size)$"), 32),
    (re.compile(r"(index_topk|sliding_window|sliding_window_size|rel_extent)$"), 16),
)


def _pattern_size(key: str, value: Any) -> int | None:
    """Tiny value for an int size field not in SMALL (None: keep)."""
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    for pat, small in SIZE_PATTERNS:
        if pat.search(key):
            return small if value > small else None
    return None


def tiny_kwargs(model_type: str) -> dict[str, Any]:
    """Config overrides that make a tiny model of `model_type` (from its default config)."""
    cls = config_class(model_type)
    d = cls().to_dict()
    n0 = d.get("num_hidden_layers")
    kw: dict[str, Any] = {}
    for k, v in d.items():
        if k in E_FIELDS and (isinstance(v, int) or v is None):
            kw[k] = E
        elif k in SMALL and isinstance(v, int) and not isinstance(v, bool):
            kw[k] = SMALL[k]
        elif k in SMALL and isinstance(v, list) and v and all(isinstance(x, int) for x in v):
            kw[k] = [SMALL[k]] * len(v)
        elif k.endswith("token_id") and isinstance(v, int) and v >= SMALL["vocab_size"]:
            kw[k] = 1
        elif _pattern_size(k, v) is not None:
            kw[k] = _pattern_size(k, v)
        elif ("mlp_only" in k or "dense_layers" in k) and isinstance(v, list):
            kw[k] = []  # lists of dense layers: make every layer MoE
        elif "layers" in k and isinstance(v, list) and v and all(isinstance(x, int) for x in v):
            kw[k] = [i for i in v if i < L] or list(range(L))  # lists of layer indices
        elif isinstance(v, list) and n0 and len(v) == n0:
            kw[k] = v[-L:]  # per-layer lists: keep the last (MoE) layers
    if n0:
        kw["num_hidden_layers"] = L
    if "qk_rope_head_dim" in d:  # MLA: rotary on qk_rope_head_dim, as many kv heads as heads
        kw["head_dim"] = SMALL["qk_rope_head_dim"]
    if "kv_lora_rank" in d:
        kw["num_key_value_heads"] = SMALL["num_attention_heads"]
    for k in (
        "head_dim",
        "n_shared_experts",
        "moe_intermediate_size",
        "num_experts_per_tok",
        "top_k_experts",
    ):
        if k in d and d[k] is None:
            kw[k] = SMALL[k]
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and rp.get("mrope_section"):  # 3-D rope: sections of the rotary half
        rot = kw.get("qk_rope_head_dim") or int(
            kw.get("head_dim", SMALL["head_dim"]) * float(rp.get("partial_rotary_factor", 1.0))
        )
        half = rot // 2
        q = max(half // 4, 1)
        kw["rope_parameters"] = {**rp, "mrope_section": [half - 2 * q, q, q]}
    if "layer_types" in d and d["layer_types"] is None and model_type.startswith("lfm2"):
        kw["layer_types"] = ["conv", "full_attention"]
    for flag in ("enable_moe_block", "is_moe"):
        if flag in d:
            kw[flag] = True
    over = OVERRIDES.get(model_type, {})
    kw.update(over(d) if callable(over) else over)
    return kw


def randomize_routing(model: nn.Module, seed: int = 0) -> None:
    """Non-zero routers and selection biases (many families initialise them to zero) and a
    random token -> expert table for hash-routed layers, so every selection rule matters."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        tensors = list(model.named_parameters()) + list(model.named_buffers())
        for name, t in tensors:
            parts = name.split(".")
            leaf, path = parts[-1], parts[:-1]
            in_router = any(p in ("gate", "router", "classifier", "wg") for p in path) or any(
                "router" in p for p in path
            )
            if "tid2eid" in leaf:
                t.copy_(torch.randint(0, E, t.shape, generator=g))
            elif not t.is_floating_point():
                continue
            elif leaf in ("e_score_correction_bias", "expert_bias", "selection_bias") or (
                in_router and "bias" in leaf
            ):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            elif in_router and leaf == "weight" and t.dim() == 2:
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            elif leaf == "weight" and parts[-2:-1] in (["gate"], ["router"]) and t.dim() == 2:
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)


def build_tiny(model_type: str, out: Path, seed: int = 0) -> Path:
    """Tiny random-init model of `model_type` with randomised routing, saved to `out`."""
    cfg = config_class(model_type)(**tiny_kwargs(model_type))
    torch.manual_seed(seed)
    model = model_class(model_type)(cfg).eval()
    randomize_routing(model, seed)
    model.save_pretrained(str(out))
    return Path(out)


# ---------------------------------------------------------------------------------------------
# independent reference: what each experts module was called with
# ---------------------------------------------------------------------------------------------
@dataclass
class Call:
    """One experts-module call: ids [T, k] and weights [T, k] it ran with."""

    ids: torch.Tensor
    weights: torch.Tensor


@dataclass
class ExpertsRecorder:
    """Pre-hooks on every module whose class name ends in "Experts" (found by name, not by
    moelab's signature matching): the first integer tensor among its inputs is taken as the
    expert ids, the first floating tensor after the hidden states as the weights."""

    model: nn.Module
    calls: dict[str, list[Call]] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._handles: list[Any] = []
        for name, mod in self.model.named_modules():
            if type(mod).__name__.endswith("Experts") and not isinstance(mod, nn.ModuleList):
                self.names.append(name)
                self._handles.append(
                    mod.register_forward_pre_hook(self._hook(name), with_kwargs=True)
                )

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            vals = [*args, *kwargs.values()]
            ints = [v for v in vals if isinstance(v, torch.Tensor) and not v.is_floating_point()]
            flts = [v for v in vals[1:] if isinstance(v, torch.Tensor) and v.is_floating_point()]
            if not ints or not flts:
                return
            T = vals[0].reshape(-1, vals[0].shape[-1]).shape[0]
            ids = ints[0].reshape(T, -1).clone()
            w = flts[0].reshape(T, -1)
            if w.shape[1] != ids.shape[1]:
                w = w.gather(1, ids.long())
            self.calls.setdefault(name, []).append(Call(ids.long(), w.detach().float().clone()))

        return hook

    def clear(self) -> None:
        """Forget recorded calls (before the next batch)."""
        self.calls = {}

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []


def moe_layer_names(model: nn.Module) -> list[str]:
    """Module paths of the model's MoE blocks: parents of an "Experts" module or of an
    `experts` ModuleList, or modules whose class name contains Moe/MoE with a router child."""
    out = []
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        kids = dict(mod.named_children())
        has_experts = any(
            type(c).__name__.endswith("Experts") or (k == "experts" and len(list(c.children())))
            for k, c in kids.items()
        )
        moe_like = re.search(r"Mo[Ee]|Sparse", cls) is not None and any(
            k in ("gate", "router") for k in kids
        )
        if (has_experts or moe_like) and not re.search(r"attn|attention", name):
            out.append(name)  # (JetMoE's attention mixture is not a routed FFN layer)
    return [n for n in out if not any(n.startswith(o + ".") for o in out if o != n)]


# ---------------------------------------------------------------------------------------------
# one family, end to end: build, save, reload by path, trace, compare with the reference
# ---------------------------------------------------------------------------------------------
SEQ, BATCH = 16, 2


@dataclass
class FamilyResult:
    """Outcome of tracing one family: "exact", "refused" (before writing, with the reason),
    "not built" (the tiny-model generator has no config for it yet) or "failed"."""

    model_type: str
    status: str
    detail: str = ""
    num_layers: int = 0
    num_experts: int = 0
    top_k: int = 0
    null_experts: int = 0
    dropped: int = 0  # dropped slots in the traced tokens
    differs: float | None = None  # share of token-layers whose experts != top-k of the logits
    logits: bool = False
    selection_bias: bool = False  # the model has a non-zero selection bias / hash table


def tiny_docs(n: int = 3, seed: int = 0) -> list[Any]:
    """Pre-tokenized documents (ids 3..299), one longer than SEQ so it is chunked."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(seed)
    lens = [SEQ + 7, 9, 12][:n]
    return [
        SimpleNamespace(
            doc_id=f"d{i}",
            domain="x",
            token_ids=torch.randint(3, 300, (ln,), generator=g).tolist(),
        )
        for i, ln in enumerate(lens)
    ]


def _shift_right(ids: torch.Tensor, start: int) -> torch.Tensor:
    return torch.cat([torch.full_like(ids[:, :1], start), ids[:, :-1]], dim=1)


def reference_routing(model: nn.Module, docs: list[Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ids [N, L, k], weights [N, L, k], number of MoE layers seen) of the real tokens, from
    independent hooks, batch by batch exactly as the tracer batches them."""
    from moelab.trace.api import iter_batches, make_batch, plan_chunks

    plan = plan_chunks(docs, lambda t: [], 2, SEQ, None, 0, 1, ["x"], None)
    mt = model.config.model_type
    rec = ExpertsRecorder(model)
    routers: list[tuple[str, nn.Module]] = []
    if mt in ("switch_transformers", "jetmoe", "llama4_text"):
        rec.remove()
        for name, mod in model.named_modules():
            cls = type(mod).__name__
            if (mt == "jetmoe" and name.endswith("mlp.router")) or (
                mt != "jetmoe" and cls.endswith(("Top1Router", "Router"))
            ):
                routers.append((name, mod))
    outs: dict[str, list[Any]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o, n=n: outs.setdefault(n, []).append(o))
        for n, m in routers
    ]
    all_ids, all_w = [], []
    n_layers = 0
    try:
        for batch in iter_batches(plan.chunks, BATCH):
            inp, mask, _, sel = make_batch(batch, torch.device("cpu"))
            rec.clear()
            outs.clear()
            with torch.no_grad():
                if mt == "switch_transformers":
                    start = getattr(model.config, "decoder_start_token_id", None)
                    start = getattr(model.config, "pad_token_id", 0) if start is None else start
                    model(
                        input_ids=inp,
                        attention_mask=mask,
                        decoder_input_ids=_shift_right(inp, start or 0),
                        decoder_attention_mask=mask,
                    )
                else:
                    model(input_ids=inp, attention_mask=mask, use_cache=False)
            per_layer = []
            if routers:
                for name, _ in routers:  # encoder first, then decoder (module order)
                    (o,) = outs[name]
                    if mt == "switch_transformers":
                        onehot, probs, logits = o
                        Ex = logits.shape[-1]
                        kept = onehot.reshape(-1, Ex).sum(-1) > 0
                        i = logits.reshape(-1, Ex).argmax(-1, keepdim=True)
                        w = torch.where(kept, probs.reshape(-1), 0.0)[:, None]
                    elif mt == "llama4_text":
                        scores = o[0]  # experts used: the non-zero scores, by score
                        i = (scores > 0).nonzero()[:, 1].reshape(scores.shape[0], -1)
                        w = scores.gather(1, i)
                        order = torch.argsort(-w, dim=1, stable=True)
                        i, w = i.gather(1, order), w.gather(1, order)
                    else:  # jetmoe: (index_sorted, batch_index, gates, expert_size, logits)
                        index_sorted, _bi, gates, sizes, lg = o
                        T, Ex = lg.shape
                        flat = torch.empty(index_sorted.numel(), dtype=torch.long)
                        flat[index_sorted] = torch.repeat_interleave(
                            torch.arange(Ex), torch.as_tensor(sizes)
                        )
                        fw = torch.empty(index_sorted.numel())
                        fw[index_sorted] = gates.float()
                        i, w = flat.view(T, -1), fw.view(T, -1)
                    per_layer.append((i, w.float()))
            else:
                for name in rec.names:
                    calls = rec.calls.get(name, [])
                    if not calls:  # an "Experts" module that takes no ids (shared experts)
                        continue
                    if len(calls) != 1:
                        raise AssertionError(f"{name}: called {len(calls)} times in one forward")
                    per_layer.append((calls[0].ids, calls[0].weights))
            n_layers = len(per_layer)
            all_ids.append(torch.stack([i[sel] for i, _ in per_layer], 1))
            all_w.append(torch.stack([w[sel] for _, w in per_layer], 1))
    finally:
        rec.remove()
        for h in hooks:
            h.remove()
    return torch.cat(all_ids), torch.cat(all_w), n_layers


def check_family(model_type: str, tmp: Path) -> FamilyResult:
    """Build, save, reload by path, trace and compare one family (see FamilyResult)."""
    import numpy as np

    from moelab.errors import MoelabError
    from moelab.trace.api import load_model, trace_model

    res = FamilyResult(model_type, "failed")
    if model_type in NOT_BUILT:
        res.status, res.detail = "not built", NOT_BUILT[model_type]
        return res
    from moelab.trace.adapters import UNSUPPORTED

    try:
        mdir = build_tiny(model_type, tmp / "model")
    except Exception as exc:  # noqa: BLE001 - reported as the family's status
        if model_type not in UNSUPPORTED:
            res.detail = f"tiny model not built: {type(exc).__name__}: {str(exc)[:160]}"
            return res
        # an unsupported family must be refused from its config.json alone
        import json

        mdir = tmp / "model"
        mdir.mkdir(parents=True, exist_ok=True)
        (mdir / "config.json").write_text(json.dumps({"model_type": model_type}))
    docs = tiny_docs()
    out = tmp / "trace"
    store = None
    for want_logits in (True, False):
        try:
            store = trace_model(
                mdir,
                docs,
                None,
                out,
                seq_len=SEQ,
                batch_size=BATCH,
                logits=want_logits,
                bos_token_id=2,
                progress=False,
                shard_tokens=20,
            )
            break
        except MoelabError as exc:
            msg = str(exc)
            if want_logits and "--logits" in msg and "--no-logits" in msg:
                continue
            if out.exists():
                res.detail = f"refused but left {sorted(p.name for p in out.iterdir())}: {msg}"
                return res
            if model_type not in msg:
                res.detail = f"refusal does not name the family: {msg}"
                return res
            res.status, res.detail = "refused", msg
            return res
        except Exception as exc:  # noqa: BLE001 - a crash is a failure of the family
            res.detail = f"crash: {type(exc).__name__}: {str(exc)[:200]}"
            return res
    assert store is not None
    tr = store.load()
    m = store.meta
    res.num_layers, res.num_experts, res.top_k = m.num_layers, m.num_experts, m.top_k
    res.null_experts = len(m.extra.get("null_experts") or [])
    res.logits = store.has_logits
    model = load_model(mdir)
    res.selection_bias = any(
        any(b in n for b in ("e_score_correction_bias", "expert_bias", "tid2eid", "balancing"))
        for n, _ in [*model.named_buffers(), *model.named_parameters()]
    )
    try:
        ref_ids, ref_w, n_ref = reference_routing(model, docs)
        if model_type in MASKED_NULL:  # the block hands a masked skip slot over as (0, 0.0)
            ref_ids = torch.where(ref_w == 0, MASKED_NULL[model_type](model), ref_ids)
    except Exception as exc:  # noqa: BLE001 - the reference itself could not be taken
        res.detail = f"reference hooks failed: {type(exc).__name__}: {str(exc)[:160]}"
        return res
    n_blocks = len(moe_layer_names(model))
    problems = []
    if m.family != model_type:
        problems.append(f"meta family {m.family!r}")
    if not (m.num_layers == n_ref == n_blocks):
        problems.append(f"MoE layers: trace {m.num_layers}, reference {n_ref}, blocks {n_blocks}")
    elif tuple(ref_ids.shape) != tr.expert_ids.shape:
        problems.append(f"shapes: trace {tr.expert_ids.shape}, reference {tuple(ref_ids.shape)}")
    else:
        if not np.array_equal(tr.expert_ids, ref_ids.numpy()):
            bad = int((tr.expert_ids != ref_ids.numpy()).any(-1).sum())
            problems.append(f"expert ids differ for {bad} token-layers")
        rw = ref_w.numpy().astype(np.float16).astype(np.float32)
        if not np.array_equal(tr.weights, rw):
            problems.append(f"weights differ (max {np.abs(tr.weights - rw).max():.3g})")
    if tr.dropped is not None:
        res.dropped = int(tr.dropped.sum())
    if tr.logits is not None and m.top_k and not problems:
        top = np.sort(np.argsort(-tr.logits, axis=-1)[..., : m.top_k], axis=-1)
        res.differs = float((np.sort(tr.expert_ids, axis=-1) != top).any(-1).mean())
    if problems:
        res.detail = "; ".join(problems)
        return res
    res.status = "exact"
    res.detail = f"{m.num_layers} MoE layers x {m.num_experts} experts, k={m.top_k}"
    return res
