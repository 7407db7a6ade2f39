"""`trace_model`: run an MoE model over documents and write every router decision to a TraceStore.

Documents are tokenized in order (doc_id = index in the given list), a BOS token is prepended
when the tokenizer has one (row flagged is_bos), and the token budget `max_tokens` cuts the
stream in document order. A document longer than the context `seq_len` is split into chunks of
`seq_len` tokens that are run as independent sequences (the model sees at most `seq_len` tokens
of context); `position` keeps counting across chunks, so it is the token's index in the
tokenized document. Under torchrun each process takes the documents with doc_id % world_size ==
rank and writes its own shards. Padding (right-padded batches) is never recorded.
"""

from __future__ import annotations

import json
import sys
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

import moelab
from moelab._io import atomic_write_text, atomic_write_with
from moelab.data.sampling import interleave_by_domain
from moelab.errors import ConfigError, DataError, ModelError, TraceError
from moelab.trace.adapters import FAMILIES, UNSUPPORTED, Adapter, get_adapter, unsupported_message
from moelab.trace.schema import TraceMeta
from moelab.trace.store import TraceStore, TraceWriter
from moelab.trace.tracer import Tracer

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Map "float32"/"bf16"/... (or a torch.dtype) to a torch.dtype; None keeps the saved one."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ModelError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)} or 'auto'") from None


def model_class_for(hf_cfg: Any, model_class: str | None = None) -> Any:
    """The transformers class to load a config with: `model_class` (a transformers class name)
    if given, else the first of `config.architectures` that transformers defines, else the
    auto-class mapping of the model type (causal LM, seq2seq LM, then the bare model)."""
    import transformers

    mt = getattr(hf_cfg, "model_type", "?")
    if model_class:
        cls = getattr(transformers, model_class, None)
        if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
            raise ModelError(
                f"--model-class {model_class!r}: not a transformers model class (e.g."
                " MixtralForCausalLM, AutoModelForCausalLM); nothing was traced"
            )
        return cls
    for arch in getattr(hf_cfg, "architectures", None) or []:
        cls = getattr(transformers, str(arch), None)
        if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
            return cls
    for auto in (
        transformers.AutoModelForCausalLM,
        transformers.AutoModelForSeq2SeqLM,
        transformers.AutoModel,
    ):
        if type(hf_cfg) in auto._model_mapping:
            return auto
    raise ModelError(
        f"model_type={mt!r}: no transformers class found (config.architectures ="
        f" {getattr(hf_cfg, 'architectures', None)}); pass --model-class NAME"
    )


def load_model(
    path: str | Path,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    model_class: str | None = None,
) -> nn.Module:
    """Load a moelab checkpoint dir or a local transformers model dir (never the network);
    transformers models load with `model_class_for` (config.architectures, auto mapping or
    the `model_class` override)."""
    path = Path(path)
    if not path.exists():
        raise ModelError(
            f"{path}: model path does not exist (expected a moelab checkpoint or HF model dir)"
        )
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{cfg_file}: not found; expected a model directory with config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{cfg_file}: not valid JSON ({exc})") from None
    td = resolve_dtype(dtype)
    model_type = cfg.get("model_type")
    if model_type == "moelab_transformer":
        from moelab.models.transformer import MoETransformer

        return MoETransformer.load(path, device=device, dtype=td)
    if model_type in UNSUPPORTED:
        raise ModelError(f"{cfg_file}: {unsupported_message(str(model_type))}")
    try:
        from transformers import AutoConfig
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise ModelError(
            f"{path}: tracing transformers models needs `pip install moelab[hf]` ({exc})"
        ) from None
    try:
        hf_cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelError(
            f"{cfg_file}: unknown model family model_type={model_type!r} ({exc}); supported: "
            f"moelab_transformer, {', '.join(FAMILIES)} and other transformers MoE families"
        ) from None
    auto = model_class_for(hf_cfg, model_class)
    kw: dict[str, Any] = {"local_files_only": True}
    if td is not None:
        kw["dtype"] = td
    try:
        model = auto.from_pretrained(str(path), **kw)
    except Exception as exc:  # noqa: BLE001 - any loading failure is reported with the path
        raise ModelError(
            f"{path}: could not load the {model_type} model with {auto.__name__}"
            f" ({type(exc).__name__}: {exc}); pass --model-class NAME to choose the class"
        ) from None
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# tokenization and planning
# ---------------------------------------------------------------------------------------------
def check_router_params(adapter: Adapter) -> None:
    """Refuse a model whose router projections (weight, bias, selection bias) hold NaN/Inf."""
    for li, site in enumerate(adapter.sites):
        gate = site.gate
        if not isinstance(gate, nn.Module):
            continue
        tensors = list(gate.named_parameters(recurse=False)) + list(
            gate.named_buffers(recurse=False)
        )
        for name, t in tensors:
            if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
                n_bad = int((~torch.isfinite(t.detach())).sum())
                raise ModelError(
                    f"{getattr(site, 'router_name', '') or site.name} (MoE layer {li},"
                    f" transformer layer {site.layer_index}): router parameter {name!r} {tuple(t.shape)} holds {n_bad} non-finite values"
                    " (NaN/Inf); every token would be routed by NaN. Fix or re-export the model"
                    " weights; nothing was traced"
                )


def check_trace_options(
    seq_len: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1,
    shard_tokens: int = 1,
    hidden_rate: float = 0.0,
) -> None:
    """ConfigError (naming the CLI flag) for a value that would trace nothing or fail later."""
    checks = [
        ("--seq-len", seq_len, seq_len is None or seq_len >= 1, "an integer >= 1 (tokens)"),
        (
            "--max-tokens",
            max_tokens,
            max_tokens is None or max_tokens >= 1,
            "an integer >= 1 (or leave it out for no cap)",
        ),
        ("--batch-size", batch_size, batch_size >= 1, "an integer >= 1"),
        ("--shard-tokens", shard_tokens, shard_tokens >= 1, "an integer >= 1"),
        ("--hidden-rate", hidden_rate, 0.0 <= hidden_rate <= 1.0, "a fraction in [0, 1]"),
    ]
    for flag, value, ok, want in checks:
        if not ok:
            raise ConfigError(f"{flag} {value}: expected {want}; nothing was traced")


def _remove_new_entries(out: Path, existed: bool, before: set[str]) -> None:
    """Delete what a failed first run created in `out` (the whole folder if it made it)."""
    import shutil

    if not out.exists():
        return
    if not existed:
        shutil.rmtree(out, ignore_errors=True)
        return
    for p in out.iterdir():
        if p.name not in before:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def make_encoder(tokenizer: Any) -> tuple[Callable[[str], list[int]], int | None, str]:
    """(encode(text) -> ids without specials, bos id or None, description) for a tokenizer."""
    if tokenizer is None:
        raise DataError("trace_model: a tokenizer is needed to tokenize documents")
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover
        Tokenizer = None  # type: ignore[assignment,misc]  # noqa: N806
    if Tokenizer is not None and isinstance(tokenizer, Tokenizer):
        from moelab.data.tokenizer import special_ids

        bos = special_ids(tokenizer).bos
        return (
            (lambda t: tokenizer.encode(t, add_special_tokens=False).ids),
            bos,
            "tokenizers.Tokenizer",
        )
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "bos_token_id"):
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        return (
            (lambda t: tokenizer.encode(t, add_special_tokens=False)),
            tokenizer.bos_token_id,
            str(name),
        )
    if callable(tokenizer):
        return tokenizer, None, getattr(tokenizer, "__name__", "callable")
    raise DataError(
        f"tokenizer of type {type(tokenizer).__name__} not understood (expected tokenizers.Tokenizer, "
        "a transformers tokenizer or a callable text -> ids)"
    )


TOKENIZER_FILE = "tokenizer.json"  # copy of the tokenizer inside a trace store (for analyze)


def tokenizer_json(tokenizer: Any) -> str | None:
    """The tokenizer as tokenizer.json text (tokenizers.Tokenizer or a fast transformers
    tokenizer), or None when it has no such form (callables, slow tokenizers)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    to_str = getattr(backend, "to_str", None)
    if tokenizer is None or not callable(to_str):
        return None
    try:
        text = to_str()
    except Exception:  # noqa: BLE001 - a tokenizer that cannot serialise is simply not copied
        return None
    return text if isinstance(text, str) else None


def find_tokenizer(model_path: str | Path) -> Any:
    """The tokenizer saved beside a model (transformers files or a tokenizer.json)."""
    p = Path(model_path)
    if not p.exists():
        raise ModelError(
            f"--model {p}: model path does not exist (expected a moelab checkpoint dir or a"
            " local transformers model dir)"
        )
    if (p / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    if (p / "tokenizer.json").exists():
        from moelab.data.tokenizer import load_tokenizer

        return load_tokenizer(p / "tokenizer.json")
    raise DataError(
        f"{p}: no tokenizer found (tokenizer.json or tokenizer_config.json); pass --tokenizer PATH"
    )


@dataclass
class Chunk:
    """A piece of one document run as one sequence."""

    doc_id: int
    start: int  # position of the first token in the document
    ids: np.ndarray  # [n] token ids
    bos: bool  # first token is the document's BOS
    domain: int


@dataclass
class Plan:
    """The documents kept under the budget and this rank's chunks."""

    chunks: list[Chunk]
    doc_table: dict[str, list[Any]]
    total_tokens: int  # all ranks


def plan_chunks(
    docs: Sequence[Any],
    encode: Callable[[str], list[int]],
    bos_id: int | None,
    seq_len: int,
    max_tokens: int | None,
    rank: int,
    world_size: int,
    domains: list[str],
    vocab_size: int | None,
) -> Plan:
    """Tokenize documents in order until the budget; cut chunks; keep this rank's share."""
    dom_code = {d: i for i, d in enumerate(domains)}
    chunks: list[Chunk] = []
    table: dict[str, list[Any]] = {"doc_id": [], "name": [], "domain": [], "num_tokens": []}
    total = 0
    for i, d in enumerate(docs):
        if max_tokens is not None and total >= max_tokens:
            break
        toks = getattr(d, "token_ids", None)
        ids = list(toks) if toks is not None else list(encode(d.text))
        if bos_id is not None:
            ids = [bos_id, *ids]
        if max_tokens is not None:
            ids = ids[: max_tokens - total]
        if not ids:
            continue
        arr = np.asarray(ids, dtype=np.int64)
        if vocab_size is not None and (arr.max() >= vocab_size or arr.min() < 0):
            raise DataError(
                f"document {getattr(d, 'doc_id', i)!r}: token id {int(arr.max())} outside the model's "
                f"vocabulary [0, {vocab_size}); the tokenizer does not match the model"
            )
        total += len(arr)
        dom = dom_code[getattr(d, "domain", "")]
        table["doc_id"].append(i)
        table["name"].append(str(getattr(d, "doc_id", i)))
        table["domain"].append(dom)
        table["num_tokens"].append(len(arr))
        if i % world_size != rank:
            continue
        for s in range(0, len(arr), seq_len):
            chunks.append(Chunk(i, s, arr[s : s + seq_len], bos_id is not None and s == 0, dom))
    return Plan(chunks, table, total)


def hidden_sample(doc_id: np.ndarray, position: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """Deterministic Bernoulli(rate) per (doc_id, position) via splitmix64 (same on resume/ranks)."""
    if rate <= 0:
        return np.zeros(doc_id.shape, bool)
    if rate >= 1:
        return np.ones(doc_id.shape, bool)
    with np.errstate(over="ignore"):
        z = (doc_id.astype(np.uint64) << np.uint64(32)) ^ position.astype(np.uint64)
        z = z + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < rate


def dist_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size) from the arguments, torch.distributed, or the torchrun environment."""
    import os

    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_device(device: str, world_size: int) -> str:
    """Under torchrun with several processes, a bare "cuda" means this process's GPU
    (cuda:LOCAL_RANK), so N processes use N GPUs instead of all loading onto GPU 0."""
    import os

    if world_size > 1 and device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0)))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def make_batch(
    chunks: list[Chunk], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray], torch.Tensor]:
    """Right-padded input_ids/attention_mask, row columns and flat indices of real tokens."""
    S = max(len(c.ids) for c in chunks)
    B = len(chunks)
    ids = np.zeros((B, S), np.int64)
    mask = np.zeros((B, S), np.int64)
    for b, c in enumerate(chunks):
        ids[b, : len(c.ids)] = c.ids
        mask[b, : len(c.ids)] = 1
    rows = {
        "doc_id": np.concatenate([np.full(len(c.ids), c.doc_id, np.int64) for c in chunks]),
        "position": np.concatenate(
            [c.start + np.arange(len(c.ids), dtype=np.int32) for c in chunks]
        ),
        "token_id": np.concatenate([c.ids for c in chunks]).astype(np.int32),
        "domain": np.concatenate([np.full(len(c.ids), c.domain, np.int16) for c in chunks]),
    }
    bos = np.zeros(len(rows["doc_id"]), bool)
    off = 0
    for c in chunks:
        bos[off] = c.bos
        off += len(c.ids)
    rows["is_bos"] = bos
    sel = torch.from_numpy(np.flatnonzero(mask.reshape(-1))).to(device)
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device), rows, sel


def iter_batches(chunks: list[Chunk], batch_size: int) -> list[list[Chunk]]:
    """Consecutive groups of `batch_size` chunks (fixed, so a resumed run sees the same batches)."""
    return [chunks[i : i + batch_size] for i in range(0, len(chunks), batch_size)]


# ---------------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------------
def trace_model(
    model_or_path: nn.Module | str | Path,
    docs: Sequence[Any],
    tokenizer: Any,
    out: str | Path,
    split: str = "test",
    logits: bool = True,
    hidden_layers: Sequence[int] | None = None,
    hidden_rate: float = 0.0,
    hidden_points: Sequence[str] = ("router_input",),
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    shard_tokens: int = 65536,
    corpus: str = "",
    add_bos: bool = True,
    bos_token_id: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    command: str = "",
    model_class: str | None = None,
    logits_dtype: str = "float16",
    _stop_after_batches: int | None = None,
) -> TraceStore:
    """Trace `docs` through the model into the store at `out` (resumes an interrupted run).

    docs: objects with .doc_id, .text, .domain (moelab.data.Document) or with .token_ids.
    hidden_layers: MoE layers whose hidden states are sampled (None = all) at `hidden_rate`.
    model_class: transformers class name to load a model directory with (default: the
    config's architectures / auto mapping). logits_dtype: "float16" (default; rounding up to
    about 1e-3 relative, 3.5e-3 absolute at |logit| ~ 8) or "float32" (exact, twice the bytes).
    The first batch is run and checked (sizes, ids in range, logits present) before anything
    is written: a model whose routing cannot be recorded leaves no store behind.
    """
    check_trace_options(seq_len, max_tokens, batch_size, shard_tokens, hidden_rate)
    if logits_dtype not in ("float16", "float32"):
        raise ConfigError(
            f"--logits-dtype {logits_dtype}: expected float16 or float32; nothing was traced"
        )
    torch.manual_seed(seed)
    rank, world_size = dist_info(rank, world_size)
    device = local_device(device, world_size)
    model_name = (
        str(model_or_path)
        if isinstance(model_or_path, (str, Path))
        else type(model_or_path).__name__
    )
    model = (
        model_or_path
        if isinstance(model_or_path, nn.Module)
        else load_model(model_or_path, device, dtype, model_class=model_class)
    )
    model.eval()
    adapter = get_adapter(model)
    check_router_params(adapter)
    dev = next(model.parameters()).device
    if seq_len is None:
        seq_len = min(adapter.max_positions() or 2048, 2048)
    if adapter.max_positions() and seq_len > adapter.max_positions():
        raise TraceError(
            f"seq_len={seq_len} exceeds the model's maximum of {adapter.max_positions()} positions"
        )
    any_tokenized = all(getattr(d, "token_ids", None) is not None for d in docs)
    if any_tokenized and tokenizer is None:
        encode, tok_bos, tok_name = (lambda t: []), None, "pretokenized"
    else:
        encode, tok_bos, tok_name = make_encoder(tokenizer)
    tok_json = tokenizer_json(tokenizer)
    bos = None
    if add_bos:  # explicit id, else the tokenizer's BOS, else the model config's
        bos = next(
            (b for b in (bos_token_id, tok_bos, adapter.bos_token_id()) if b is not None), None
        )
    domains = list(dict.fromkeys(str(getattr(d, "domain", "")) for d in docs))
    if max_tokens is not None:  # a cap takes documents round-robin by domain, not corpus order
        docs = interleave_by_domain(docs, seed=seed)
    plan = plan_chunks(
        docs, encode, bos, seq_len, max_tokens, rank, world_size, domains, adapter.vocab_size()
    )
    if plan.total_tokens == 0:
        raise DataError(
            f"nothing to trace: the {len(docs)} document(s) given tokenize to 0 tokens"
            " (none given, or every text is empty); nothing was written"
        )
    points = tuple(hidden_points) if hidden_rate > 0 else ()
    # run the first batch once and validate it against the sizes meta.json will declare
    first = iter_batches(plan.chunks, batch_size)[0] if plan.chunks else None
    has_dropped = False
    if first is not None:
        p_ids, p_mask, _, p_sel = make_batch(first, dev)
        with Tracer(adapter, logits=False) as probe, torch.inference_mode():
            try:
                adapter.run(p_ids, p_mask)
            except Exception as exc:  # noqa: BLE001 - reported with the family, nothing written
                raise ModelError(
                    f"{adapter.family}: the model's forward pass failed on the first batch"
                    f" ({type(exc).__name__}: {str(exc)[:300]}); nothing was traced"
                ) from exc
            decoded = probe.decode_all()
        adapter.check_first(decoded, logits)
        has_dropped = any(d.dropped is not None for d in decoded)
    meta = TraceMeta(
        num_layers=len(adapter.sites),
        num_experts=adapter.num_experts,
        top_k=adapter.top_k,
        layer_indices=adapter.layer_indices(),
        model=model_name,
        family=adapter.family,
        tokenizer=tok_name,
        corpus=corpus,
        split=split,
        domains=domains,
        score_fn=adapter.score_fn,
        d_model=adapter.d_model,
        moelab_version=moelab.__version__,
        command=command or " ".join(sys.argv),
        extra={
            "layer_groups": [s.group for s in adapter.sites],
            "layer_names": [s.name for s in adapter.sites],
            "num_hidden_layers": adapter.num_model_layers(),
            "null_experts": list(getattr(adapter, "null_experts", [])),
            "dropped": has_dropped,
            "logits_dtype": logits_dtype,
            "decoder_input": getattr(adapter, "decoder_input", None),
            "tokenizer_file": TOKENIZER_FILE if tok_json is not None else None,
            "run": {
                "seq_len": seq_len,
                "batch_size": batch_size,
                "max_tokens": max_tokens,
                "sampling": (
                    f"round-robin by domain, seed {seed}" if max_tokens is not None else "all"
                ),
                "bos_token_id": bos,
                "hidden_rate": hidden_rate,
                "seed": seed,
                "num_docs": len(plan.doc_table["doc_id"]),
                "total_tokens": plan.total_tokens,
                "model_fingerprint": adapter.fingerprint(),
            },
        },
    )
    out = Path(out)
    # A first run that fails before committing a shard (NaN routers, an undecodable router
    # output, a bad option) removes what it created, so nothing half-written blocks a rerun.
    fresh = not (out / "meta.json").exists()
    existed = out.exists()
    before = {p.name for p in out.iterdir()} if existed and out.is_dir() else set()
    writer: TraceWriter | None = None
    try:
        writer = TraceWriter(
            out,
            meta,
            shard_tokens=shard_tokens,
            rank=rank,
            world_size=world_size,
            logits=logits,
            hidden_points=points,
            hidden_layers=hidden_layers,
        )
        if writer.repair_note and progress:
            print(f"repairing: {writer.repair_note}", file=sys.stderr)
        if rank == 0:
            if tok_json is not None and not (out / TOKENIZER_FILE).exists():
                atomic_write_text(out / TOKENIZER_FILE, tok_json)
            gs = adapter.gate_set()
            if gs is not None and not (out / "gates.safetensors").exists():
                gs.save(out / "gates.safetensors")
            if not (out / "documents.parquet").exists():
                tab = pa.table(
                    {
                        "doc_id": pa.array(plan.doc_table["doc_id"], pa.int64()),
                        "name": pa.array(plan.doc_table["name"], pa.string()),
                        "domain": pa.array(plan.doc_table["domain"], pa.int16()),
                        "num_tokens": pa.array(plan.doc_table["num_tokens"], pa.int64()),
                    }
                )
                atomic_write_with(
                    out / "documents.parquet", lambda tmp: pq.write_table(tab, str(tmp))
                )
        if not writer.is_done:
            _run(
                adapter,
                writer,
                plan,
                batch_size,
                logits,
                points,
                hidden_layers,
                hidden_rate,
                seed,
                dev,
                progress and rank == 0,
                _stop_after_batches,
                DTYPES[logits_dtype],
            )
    except Exception:
        if fresh and world_size == 1 and (writer is None or writer.next_index == 0):
            _remove_new_entries(out, existed, before)
        raise
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return TraceStore.open(out)


def _run(
    adapter: Adapter,
    writer: TraceWriter,
    plan: Plan,
    batch_size: int,
    logits: bool,
    points: tuple[str, ...],
    hidden_layers: Sequence[int] | None,
    hidden_rate: float,
    seed: int,
    dev: torch.device,
    progress: bool,
    stop_after: int | None,
    logits_dtype: torch.dtype = torch.float16,
) -> None:
    """The tracing loop: skip batches already in complete shards, record the rest."""
    from tqdm.auto import tqdm

    batches = iter_batches(plan.chunks, batch_size)
    sizes = np.array([sum(len(c.ids) for c in b) for b in batches], np.int64)
    ends = np.cumsum(sizes)
    done = writer.rows_done
    start = 0
    if done:
        hit = np.flatnonzero(ends == done)
        if hit.size == 0:
            raise TraceError(
                f"{writer.path}: {done} rows already written by rank {writer.rank} do not end at a batch "
                "boundary of this run; the store was written with different options"
            )
        start = int(hit[0]) + 1
        last = batches[start - 1][-1]
        want = (last.doc_id, last.start + len(last.ids) - 1)
        if writer.last_key != want:
            raise TraceError(
                f"{writer.path}: last stored row is (doc_id, position)={writer.last_key} but this run "
                f"expects {want}; the store belongs to a different corpus or options"
            )
    bar = tqdm(
        total=int(ends[-1]) if len(ends) else 0,
        initial=done,
        unit="tok",
        unit_scale=True,
        disable=not progress,
        desc="trace",
    )
    pool = ThreadPoolExecutor(max_workers=1)
    pending: deque[Future[None]] = deque()
    try:
        with Tracer(
            adapter,
            logits=logits,
            hidden_points=points,
            hidden_layers=None if hidden_layers is None else list(hidden_layers),
            logits_dtype=logits_dtype,
        ) as tracer:
            for bi in range(start, len(batches)):
                if stop_after is not None and bi - start >= stop_after:
                    raise KeyboardInterrupt(f"simulated kill after {stop_after} batches")
                ids, mask, rows, sel = make_batch(batches[bi], dev)
                hmask = hidden_sample(rows["doc_id"], rows["position"], hidden_rate, seed)
                hrows = np.flatnonzero(hmask)
                hsel = sel[torch.from_numpy(hrows).to(dev)] if points else None
                rec = tracer.record(ids, mask, sel, hsel)
                while len(pending) >= 2:
                    pending.popleft().result()
                pending.append(
                    pool.submit(
                        writer.append,
                        **rows,
                        expert_ids=rec.expert_ids,
                        weights=rec.weights,
                        logits=rec.logits,
                        hidden=rec.hidden or None,
                        hidden_rows=hrows if points else None,
                        dropped=rec.dropped,
                    )
                )
                bar.update(int(sizes[bi]))
            while pending:
                pending.popleft().result()
            writer.close(done=True)
    finally:
        while pending:
            pending.popleft().result()
        pool.shutdown(wait=True)
        bar.close()
