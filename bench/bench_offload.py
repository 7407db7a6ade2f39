"""Offloaded MoE inference benchmark (issue 7): live generation with the slow tier, and replay.

Modes: `--mode forced` (default) decodes the test text token by token with a KV cache (real
routing of real text); `--mode greedy` generates greedily from test prompts.
Model: the demo-size moelab model (TrainConfig defaults: 4 layers, d_model 128, 8 experts top-2
of hidden 256) from the newest checkpoint under runs/ if one exists, else freshly initialised
(the script says which). Prompts come from the test split of the built-in default corpus.

Live (interleaved repeats, medians; experts read through the store's slow tier, O_DIRECT when the
filesystem allows it):
  all-resident | LRU + prefetch with each live predictor at 25% resident experts per layer |
  LRU without prefetch at 25% | on-demand with no cache | everything in the cache (hook overhead).
Replay at 10% cache (one global cache; 10% per layer would be below top-2): every policy with the
best prefetch plan vs Belady + the same plan, on the test-split routing.
Simulator check: the live LRU runs' routing and prefetch requests replayed on the measured
"this-machine" hardware model; estimated vs live decode tokens/s.

Usage: .venv/bin/python bench/bench_offload.py --bench demo [--mode forced|greedy] [--repeats 3]
       [--prompts 4] [--new-tokens 32] [--out DIR]

`--bench testbed` (default, issue 17): the large-expert testbed (moelab.offload.testbed: d_model
512, 8 experts of hidden 1408, top-2, 4 MoE layers, 277 MB of fp32 experts; built with `--steps`
if missing) at 25% and 50% of the full-precision expert bytes resident, O_DIRECT tier, teacher-
forced live decode of held-out (test split) windows. The planner (moelab.offload.plan) picks,
per budget, the best configuration overall (quantised tiers and stand-ins count), the best
full-precision one with a predictor, and the best stand-in one; each runs live beside plain LRU
at full precision in interleaved repeats; ratios against LRU are per repeat, medians with their
min-max spread; the planner's predicted tokens/s is set beside the live median. A second
table splits each variant's decode time per token into load stalls, the live predictor's path
and the rest (medians over repeats). The variants run in one order on even repeats and in the
reverse order on odd ones. `--threads N` plans and decodes with N torch compute threads (0 = every
core); below the core count, plain LRU also runs at every core ("lru@all-cores", a reference
the planner does not predict), and each prefetch variant is set against it as well. Where a
predictor row runs, "oracle-prefetch" runs too: its eviction policy prefetching the windows' true
next-layer experts (recorded from an all-resident decode), the live ceiling of one-layer-ahead
prefetch that the plan's verdict predicts; `--oracle-leads 1,2,4` adds "oracle-dN-prefetch" rows
(the true experts N layers ahead in decode order, across tokens): what a longer lead would buy.
  .venv/bin/python bench/bench_offload.py --testbed runs/offload-testbed --repeats 3 --windows 2
Another model: `--testbed MODEL_DIR --trace STORE` (its held-out routing, as `moelab offload plan
--trace`), e.g. the MoEfied SmolLM2 from `moelab offload testbed --smollm2`; `--precisions` and
`--policies` narrow the plan (29 MoE layers replay ~30x longer than the 4-layer testbed).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from moelab.offload.cache import ExpertCache, usage_counts
from moelab.offload.live import OffloadedModel
from moelab.offload.prefetch import GateLookahead, Prefetcher, make_live_predictor
from moelab.offload.simulate import (
    Hardware,
    hit_rate_curves,
    merge_plans,
    oracle_plan,
    plot_curves,
    simulate,
)
from moelab.offload.store import ExpertStore

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = ["gate", "gate2", "adaptive", "gate+prev"]


# ----------------------------------------------------------------------------- model and data
def find_checkpoint() -> Path | None:
    """Newest moelab MoE checkpoint (config.json with model_type moelab_transformer) under runs/."""
    runs = ROOT / "runs"
    if not runs.exists():
        return None
    found = []
    for cfg in runs.rglob("config.json"):
        try:
            d = json.loads(cfg.read_text())
            if d.get("model_type") == "moelab_transformer" and d.get("moe"):  # MoE models only
                if (cfg.parent / "model.safetensors").exists():
                    found.append(cfg.parent)
        except (OSError, json.JSONDecodeError):
            continue
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def load_model_and_tokenizer(seed: int):
    """(model, tokenizer, description)."""
    from moelab.data import load_corpus, split_documents, train_tokenizer
    from moelab.models import MoETransformer

    ckpt = find_checkpoint()
    if ckpt is not None:
        from moelab.trace.api import find_tokenizer

        model = MoETransformer.load(ckpt)
        tok = None
        for p in [ckpt, *ckpt.parents]:
            try:
                tok = find_tokenizer(p)
                break
            except Exception:  # noqa: BLE001 - keep looking upwards
                if p == ROOT:
                    break
        if tok is not None:
            return model, tok, f"checkpoint {ckpt.relative_to(ROOT)}"
    from moelab.data.tokenizer import special_ids
    from moelab.train.config import TrainConfig

    docs = load_corpus("default", max_bytes=1_500_000, seed=seed)
    train = split_documents(docs, seed=seed)["train"]
    tok = train_tokenizer(train, vocab_size=4096)
    sp = special_ids(tok)
    cfg = TrainConfig().build_model_config(tok.get_vocab_size(), sp.pad, sp.mask, sp.bos)
    return (
        MoETransformer(cfg, seed=seed).eval(),
        tok,
        "freshly initialised (no checkpoint under runs/)",
    )


def test_tokens(tok, seed: int, split: str = "test", max_tokens: int = 4000) -> list[list[int]]:
    """Token ids of the split's documents (BOS first), longest first."""
    from moelab.data import load_corpus, split_documents
    from moelab.data.tokenizer import special_ids

    docs = split_documents(load_corpus("default", max_bytes=1_500_000, seed=seed), seed=seed)[split]
    bos = special_ids(tok).bos
    out, total = [], 0
    for d in docs:
        ids = tok.encode(d.text[:4000], add_special_tokens=False).ids
        if len(ids) >= 64:
            out.append(([bos] if bos is not None else []) + ids)
            total += len(ids)
        if total >= max_tokens:
            break
    return out


# ----------------------------------------------------------------------------- live runs
class PhaseTimer:
    """Prefill/decode wall time of an all-resident model via forward hooks."""

    def __init__(self, model):
        self.t = {"prefill": 0.0, "decode": 0.0}
        self.n = {"prefill": 0, "decode": 0}
        self._t0, self._ph = 0.0, "prefill"
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._post)

    def _pre(self, m, args):
        self._ph = "prefill" if args[0].shape[1] > 1 else "decode"
        self._t0 = time.perf_counter()

    def _post(self, m, args, out):
        self.t[self._ph] += time.perf_counter() - self._t0
        self.n[self._ph] += args[0].numel()


def forced_decode(model, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Teacher-forced decoding of a test sequence: prefill the prompt, then feed the true next
    tokens one at a time with a KV cache -> greedy predictions [1, S - prompt_len + 1]."""
    from moelab.models import KVCache

    cache = KVCache()
    with torch.no_grad():
        preds = [model(seq[:, :prompt_len], cache=cache).logits[:, -1].argmax(-1)]
        for i in range(prompt_len, seq.shape[1]):
            preds.append(model(seq[:, i : i + 1], cache=cache).logits[:, -1].argmax(-1))
    return torch.stack(preds, 1)


def run_seq(model, x, new_tokens, mode, prompt_len, om=None):
    """Greedy generation, or teacher-forced decoding along the test text."""
    if mode == "greedy":
        return om.generate(x, new_tokens) if om is not None else model.generate(x, new_tokens)
    if om is not None:
        om.new_sequence()
    return forced_decode(model, x, prompt_len)


def run_variant(
    name,
    base,
    store_dir,
    prompts,
    new_tokens,
    resident,
    k,
    L,
    E,
    record=False,
    mode="forced",
    plen=24,
):
    """One pass over the prompts; returns (decode/prefill stats, outputs, extra)."""
    model = copy.deepcopy(base)
    if name == "all-resident":
        pt = PhaseTimer(model)
        outs = [run_seq(model, x, new_tokens, mode, plen) for x in prompts]
        return (
            {
                "decode": {
                    "tokens_per_s": pt.n["decode"] / pt.t["decode"],
                    "tokens": pt.n["decode"],
                },
                "prefill": {"tokens_per_s": pt.n["prefill"] / pt.t["prefill"]},
            },
            outs,
            {},
        )
    st = ExpertStore(store_dir, tier="auto")
    cap = E if name == "in-cache" else resident
    cache = ExpertCache(
        cap, "lru", num_layers=L, num_experts=E, expert_bytes=st.expert_nbytes(0), top_k=k
    )
    pred = None
    if name.startswith("lru+"):
        pred = make_live_predictor(name[4:])
    pf = Prefetcher(st, cache, pred)
    if record:
        pf.log = []
    om = OffloadedModel(model, st, cache, pf, keep=name != "on-demand")
    if name == "in-cache":
        for layer in range(L):
            for e in range(E):
                cache.preload((layer, e), st.read(layer, e))
    outs, logs, steps = [], [], []
    for x in prompts:
        n0 = len(pf.log) if record else 0
        outs.append(run_seq(model, x, new_tokens, mode, plen, om))
        if record:
            logs.append(pf.log[n0:])
            steps.append(plen)
    s = om.stats()
    s["store_stats"] = st.stats()
    extra = {"ids": om.recorded_expert_ids(), "logs": logs, "prompt_lens": steps} if record else {}
    om.close()
    pf.close()
    st.close()
    return s, outs, extra


def decode_steps_split(extra, new_tokens: int):
    """Row groups of a recorded live run: prefill group then one row per decode step."""
    steps, timed, plan = [], [], {}
    row = 0
    for plen, log in zip(extra["prompt_lens"], extra["logs"], strict=True):
        base = len(steps)
        steps.append(np.arange(row, row + plen))
        timed.append(False)
        row += plen
        for _ in range(new_tokens - 1):
            steps.append(np.array([row]))
            timed.append(True)
            row += 1
        for s, layer, ts, tl, ex in log:
            plan.setdefault((base + s, layer), []).append((base + ts, tl, ex))
    return steps, timed, plan


# ----------------------------------------------------------------------------- replay
def replay_routing(model, seqs, L):
    """All-resident forward over token sequences -> expert_ids [N, L, k] and router inputs [N, L, D]."""
    from moelab.offload.sites import find_expert_sites

    sites = find_expert_sites(model)
    xs: dict[int, list[torch.Tensor]] = {s.layer: [] for s in sites}
    hs = [
        s.router.register_forward_hook(lambda m, a, o, i=s.layer: xs[i].append(a[0].detach()))
        for s in sites
    ]
    ids = []
    with torch.no_grad():
        for seq in seqs:
            out = model(torch.tensor([seq[: model.cfg.max_seq_len]]))
            ids.append(torch.stack([r.expert_ids for r in out.routing if r is not None], 1))
    for h in hs:
        h.remove()
    x = torch.stack([torch.cat(xs[i]) for i in range(L)], 1)
    return (
        torch.cat(ids).numpy().astype(np.int16),
        x,
        [min(len(s), model.cfg.max_seq_len) for s in seqs],
    )


def gate_plan(model, x, ids, distances=(1,), prev=False):
    """Replay plan of gate lookahead (and optionally previous-token) from recorded router inputs."""
    from moelab.offload.sites import find_expert_sites

    pred = GateLookahead(distances)
    pred.bind(find_expert_sites(model))
    plan = {}
    N, L, _ = ids.shape
    with torch.no_grad():
        for layer in range(L):
            for d in distances:
                t = layer + d
                if t >= L:
                    continue
                logits = x[:, layer].float() @ pred._w[t].float().t()
                top = torch.topk(logits, ids.shape[2], -1).indices.numpy()
                for n in range(N):
                    plan.setdefault((n, layer), []).append((n, t, top[n].tolist()))
    if prev:
        pp = {}
        for n in range(N - 1):
            for layer in range(L):
                pp[(n, layer)] = [(n + 1, layer, [int(e) for e in ids[n, layer] if e >= 0])]
        plan = merge_plans(plan, pp)
    return plan


def adaptive_plan(model, x, ids, seq_lens):
    """Replay plan of the AdaptiveLookahead live predictor, run row by row over each sequence."""
    from moelab.offload.prefetch import AdaptiveLookahead
    from moelab.offload.sites import find_expert_sites

    plan, row = {}, 0
    sites = find_expert_sites(model)
    for n_rows in seq_lens:
        pred = AdaptiveLookahead()
        pred.bind(sites)
        for n in range(row, row + n_rows):
            for layer in range(ids.shape[1]):
                e = torch.from_numpy(ids[n : n + 1, layer].astype(np.int64))
                for _, t, ex in pred.on_layer(n, layer, x[n : n + 1, layer], e):
                    plan.setdefault((n, layer), []).append((n, t, ex))
        row += n_rows
    return plan


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", choices=["testbed", "demo"], default="testbed")
    ap.add_argument("--testbed", type=Path, default=ROOT / "runs" / "offload-testbed")
    ap.add_argument("--steps", type=int, default=50, help="testbed training budget if built")
    ap.add_argument("--windows", type=int, default=2, help="held-out windows decoded per run")
    ap.add_argument("--memory", default="25%,50%")
    ap.add_argument("--tokens", type=int, default=0, help="cut evaluation windows to N tokens")
    known, _ = ap.parse_known_args()
    if known.bench == "testbed":
        return main_testbed(known)
    main_demo()


def main_testbed(args) -> None:
    """Issue 17 targets on the large-expert testbed (see the module docstring)."""
    import sys

    from moelab.offload.measure import paired_change, run_live
    from moelab.offload.plan_commands import Context, make_plan
    from moelab.offload.testbed import build_testbed

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tier", default="auto")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench_offload_testbed")
    ap.add_argument(
        "--predictors",
        default="",
        help="live predictors the plan tries (default: plan.PLAN_PREDICTORS); a saved "
        "`moelab predict fit` directory fitted on the testbed model's train-split trace works too",
    )
    ap.add_argument("--threads", type=int, default=0,
                    help="torch compute threads of the plan and the live runs (0 = every core)")  # fmt: skip
    ap.add_argument("--oracle-leads", default="1",
                    help="layers of lead of the perfect-prefetch rows (1 = oracle-prefetch)")  # fmt: skip
    ap.add_argument("--trace", type=Path, default=None,
                    help="held-out routing (TraceStore) to plan and decode: with --testbed naming "
                    "any moelab/transformers model dir, e.g. the SmolLM2 testbed's moefy model")  # fmt: skip
    ap.add_argument("--precisions", default="", help="precisions the plan tries (default: all)")
    ap.add_argument("--policies", default="", help="policies the plan tries (default: all)")
    ap.add_argument("--compare-loaders", action="store_true",
                    help="also run every prefetching row with its reads done by a thread of the "
                    "decoding process (rows '...@thread-loader'; default: the helper process)")  # fmt: skip
    extra, _ = ap.parse_known_args(sys.argv[1:])
    from moelab.offload.plan_commands import use_threads

    all_cores = use_threads(0)
    threads = use_threads(extra.threads)
    if extra.trace is None and not (args.testbed / "testbed.json").exists():
        print(f"building the testbed in {args.testbed} ({args.steps} steps) ...", flush=True)
        build_testbed(args.testbed, steps=args.steps)
    ctx = Context(args.testbed, extra.trace)
    W = args.windows
    n_cal = len(ctx.workload.tokens) // 2
    # replay exactly the windows decoded live (calibration = the first half of the held-out set)
    ctx.workload = ctx.workload.subset(list(range(n_cal)) + list(range(n_cal, n_cal + W)))
    ctx.workload.calib_fraction = n_cal / (n_cal + W)
    if args.tokens:  # shorter evaluation windows (a busy machine); calibration windows stay whole
        from moelab.offload.plan import Workload

        w, b = ctx.workload, ctx.workload.bounds
        keep = [np.arange(a, e) if i < n_cal else np.arange(a, min(e, a + args.tokens))
                for i, (a, e) in enumerate(b)]  # fmt: skip
        rows = np.concatenate(keep)
        ctx.workload = Workload(
            [w.tokens[i][: len(k)] for i, k in enumerate(keep)], w.expert_ids[rows],
            w.router_input[rows], w.source + f", evaluation windows cut to {args.tokens} tokens",
            w.calib_fraction,
        )  # fmt: skip
    calib, ev = ctx.workload.split()
    assert len(ev.tokens) == W
    info = ctx.shape
    t0 = time.perf_counter()
    mems = [m.strip() for m in args.memory.split(",")]
    from moelab.offload.plan import PLAN_PREDICTORS, is_bound_predictor

    preds = [p.strip() for p in extra.predictors.split(",") if p.strip()] or list(PLAN_PREDICTORS)
    leads = sorted({int(d) for d in extra.oracle_leads.split(",") if d.strip()})
    if not leads or min(leads) < 1:
        raise SystemExit(f"--oracle-leads {extra.oracle_leads!r}: expected layer counts >= 1")
    # variant name -> (lead, predictor spec) of the perfect-prefetch rows
    oracles = {("oracle-prefetch" if d == 1 else f"oracle-d{d}-prefetch"):
               (d, "oracle" if d == 1 else f"oracle:d={d}") for d in leads}  # fmt: skip

    def names(text):
        return [x.strip() for x in text.split(",") if x.strip()] or None

    # + perfect predictors with those leads: planned, and run live as the "oracle*-prefetch" rows
    rep = make_plan(args.testbed, mems, tier=extra.tier, ctx=ctx, precisions=names(extra.precisions),
                    policy_names=names(extra.policies),
                    predictors=preds + [spec for _, spec in oracles.values()])  # fmt: skip
    plan_s = time.perf_counter() - t0
    m = rep.machine
    print(f"testbed {args.testbed}: L={info.num_layers} E={info.num_experts} k={info.top_k}, expert "
          f"{info.expert_bytes('full') / 1e6:.2f} MB full / {info.expert_bytes('int8') / 1e6:.2f} int8 / "
          f"{info.expert_bytes('int4') / 1e6:.2f} int4; all experts {info.full_bytes / 1e6:.0f} MB; "
          f"tier {m['tier']}; {threads} of {all_cores} cores compute; plan took {plan_s:.0f} s")  # fmt: skip
    from moelab.offload.plan_commands import machine_line

    print("measured: " + machine_line(m))
    print(
        f"held-out perplexity ratio (static tiers; {m['heldout_scored']}): "
        + ", ".join(
            f"{p} {v:.4f}±{m['ppl_ratio_se'][p]:.4f} (routing kept {m['routing_agreement'][p]:.3f})"
            for p, v in m["ppl_ratio"].items()
        )
    )
    for v in rep.verdicts:
        print("- " + v)
    stores = ctx.stores(["full", "int8", "int4"])
    counts = usage_counts(calib.expert_ids, info.num_experts)
    # reference greedy predictions (all-resident) for the identity check
    base = ctx.load()
    from moelab.offload.measure import teacher_forced

    ref = [teacher_forced(base, w)[0] for w in ev.tokens]
    # the windows' full-precision routing (all-resident, live), which the oracle rows prefetch
    routing = run_live(ctx.load, stores, ev.tokens, "full", "lru", "none", info.num_experts,
                       extra.tier)["routing"]  # fmt: skip
    variants: dict[str, tuple] = {}
    for mem in mems:
        rows = [r for r in rep.rows if r.memory_spec == mem and not is_bound_predictor(r.predictor)]
        pick = {
            "lru": next(
                r for r in rows if (r.precision, r.policy, r.predictor) == ("full", "lru", "none")
            ),
            "best": rows[0],
        }
        full_pred = [r for r in rows if r.precision == "full" and r.predictor != "none"]
        if full_pred:
            pick["best-full-prefetch"] = full_pred[0]
        lru_pred = [
            r for r in rows if r.precision == "full" and r.policy == "lru" and r.predictor != "none"
        ]
        if lru_pred:
            pick["lru+prefetch"] = lru_pred[0]
        stand = [r for r in rows if "+" in r.precision]
        if stand:
            pick["best-standin"] = stand[0]
        if full_pred:  # the live ceiling of prefetch with that lead and that row's eviction
            pol = pick["best-full-prefetch"].policy
            for name, (_, spec) in oracles.items():
                pick[name] = next(
                    r for r in rep.rows if r.memory_spec == mem and r.predictor == spec
                    and r.precision == "full" and r.policy == pol
                )  # fmt: skip
        for name, r in pick.items():
            variants[f"{mem} {name}"] = (r, mem)
        if extra.compare_loaders:  # the same prefetching rows with the reads done by a thread
            for name, r in pick.items():
                if r.predictor != "none":
                    variants[f"{mem} {name}{THREAD_TWIN}"] = (r, mem)
        if threads < all_cores:  # the reference at every core: what one thread gives up, if any
            variants[f"{mem} lru@all-cores"] = (pick["lru"], mem)
    ref_cores = {v for v in variants if v.endswith("lru@all-cores")}
    # rows the plan does not price: the all-cores reference, and the thread-loader twins (the
    # plan's background term is the default loader's)
    no_plan = ref_cores | {v for v in variants if v.endswith(THREAD_TWIN)}
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    planned: dict[str, list[float]] = {v: [] for v in variants}
    for rep_i in range(extra.repeats):
        # the planner's machine measured again in this repeat, so planned and live tokens/s
        # compare numbers taken minutes (not a whole run) apart
        mach = remeasure(ctx, stores, ev, extra.tier, m.get("predictor_seconds") or {})
        print(f"  repeat {rep_i} machine: {machine_line(asdict(mach))}", flush=True)
        for v, (r, mem) in variants.items():
            planned[v].append(float("nan") if v in no_plan else replan(ctx, mach, r, mem))
        # forward on even repeats, reversed on odd ones: a drift of the machine within a repeat
        # then favours no variant (a fixed order put the same rows late in every repeat)
        order = list(variants.items())
        for v, (r, _mem) in order if rep_i % 2 == 0 else order[::-1]:
            torch.set_num_threads(all_cores if v in ref_cores else threads)
            s = run_live(ctx.load, stores, ev.tokens, r.precision, r.policy, r.predictor, r.slots,
                         extra.tier, counts, ref, routing,
                         "thread" if v.endswith(THREAD_TWIN) else "auto")  # fmt: skip
            torch.set_num_threads(threads)
            s.pop("predictions")
            s.pop("routing")
            runs[v].append(s)
            print(f"  repeat {rep_i} {v:>26} ({r.precision} {r.policy} {r.predictor}): "
                  f"{s['decode']['tokens_per_s']:.2f} tok/s", flush=True)  # fmt: skip

    def med(v, key):
        return statistics.median(x["decode"][key] for x in runs[v])

    print(
        "\n| budget | variant | precision | policy | predictor | slots/layer | live tok/s | planned tok/s | "
        "planned/live | planned/live, same repeat | hit | MB/token | stand-in | ppl ratio | identical | "
        "x LRU (median, min-max) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = {}
    for v, (r, mem) in variants.items():
        lru_v = f"{mem} lru"
        ratios = [a["decode"]["tokens_per_s"] / b["decode"]["tokens_per_s"]
                  for a, b in zip(runs[v], runs[lru_v], strict=True)]  # fmt: skip
        live = med(v, "tokens_per_s")
        same_repeat = [
            p / x["decode"]["tokens_per_s"] for p, x in zip(planned[v], runs[v], strict=True)
        ]
        ppl = statistics.median(x["ppl"] for x in runs[v]) / statistics.median(
            x["ppl"] for x in runs[lru_v]
        )
        # paired over windows against the full-precision LRU run (first repeats)
        _, ppl_se = paired_change(runs[v][0]["window_nll"], runs[lru_v][0]["window_nll"],
                                  runs[v][0]["window_tokens"])  # fmt: skip
        ppl_se *= ppl
        ident = all(x.get("identical", False) for x in runs[v])
        results[v] = {
            "config": r.to_dict(), "live_tokens_per_s": live, "planned_tokens_per_s": r.tokens_per_s,
            "planned_per_repeat": planned[v], "planned_over_live_same_repeat": statistics.median(same_repeat),
            "ratio_vs_lru": statistics.median(ratios), "ratio_spread": [min(ratios), max(ratios)],
            "ppl_ratio_vs_full": ppl, "ppl_ratio_se": ppl_se, "identical": ident, "runs": runs[v],
            "threads": all_cores if v in ref_cores else threads, "loader": runs[v][0]["loader"],
        }  # fmt: skip
        planned_s = "-" if v in no_plan else f"{r.tokens_per_s:.2f}"
        over_s = "-" if v in no_plan else f"{r.tokens_per_s / live:.2f}"
        same_s = "-" if v in no_plan else f"{statistics.median(same_repeat):.2f}"
        print(f"| {mem} | {v.split(' ', 1)[1]} | {r.precision} | {r.policy} | {r.predictor} | {r.slots} | "
              f"{live:.2f} | {planned_s} | {over_s} | {same_s} | {med(v, 'hit_rate'):.3f} | "
              f"{med(v, 'bytes_per_token') / 1e6:.2f} | {med(v, 'standin_rate'):.3f} | {ppl:.4f}±{ppl_se:.4f} | {ident} | "
              f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")  # fmt: skip
    print_breakdown(variants, runs)
    print("\ntargets:")
    for mem in mems:
        b = results[f"{mem} best"]
        print(f"  {mem}: best ({b['config']['precision']} {b['config']['policy']} {b['config']['predictor']}) "
              f"{b['ratio_vs_lru']:.2f}x LRU (target >= 1.5), ppl ratio {b['ppl_ratio_vs_full']:.4f}±{b['ppl_ratio_se']:.4f}")  # fmt: skip
        for name in ("lru+prefetch", "best-full-prefetch", *oracles):
            if f"{mem} {name}" in results:
                x = results[f"{mem} {name}"]
                what = (
                    f"the live ceiling of prefetch {oracles[name][0]} layer(s) ahead with this "
                    "eviction"
                    if name in oracles
                    else "target >= 1.15 where loads can be hidden, else not slower beyond the spread"
                )
                print(f"  {mem}: {name} ({x['config']['policy']}+{x['config']['predictor']}) {x['ratio_vs_lru']:.2f}x LRU "
                      f"(spread {x['ratio_spread'][0]:.2f}-{x['ratio_spread'][1]:.2f}; {what})")  # fmt: skip
                if f"{mem} lru@all-cores" in runs:
                    rs = [a["decode"]["tokens_per_s"] / b["decode"]["tokens_per_s"] for a, b in
                          zip(runs[f"{mem} {name}"], runs[f"{mem} lru@all-cores"], strict=True)]  # fmt: skip
                    x["ratio_vs_lru_all_cores"] = statistics.median(rs)
                    print(f"  {mem}: {name} at {threads} thread(s) {statistics.median(rs):.2f}x LRU at all "
                          f"{all_cores} cores (spread {min(rs):.2f}-{max(rs):.2f})")  # fmt: skip
        planned_rows = [x for k, x in results.items() if k.startswith(mem) and k not in no_plan]
        errs = [abs(x["planned_tokens_per_s"] / x["live_tokens_per_s"] - 1) for x in planned_rows]
        same = [abs(x["planned_over_live_same_repeat"] - 1) for x in planned_rows]
        print(
            f"  {mem}: planner vs live tokens/s: max |planned/live - 1| = {max(errs):.1%} with the plan"
            f" made before the live runs, {max(same):.1%} with the machine measured again in each"
            " repeat (median over repeats; target <= 15%)"
        )
    extra.out.mkdir(parents=True, exist_ok=True)
    (extra.out / "results.json").write_text(json.dumps(
        {"machine": m, "threads": threads, "all_cores": all_cores, "verdicts": rep.verdicts,
         "results": results, "skipped": rep.skipped,
         "bounds": rep.bounds, "plan_rows": [r.to_dict() for r in rep.rows]},
        indent=1, default=float))  # fmt: skip
    print(f"wrote {extra.out / 'results.json'}")


THREAD_TWIN = "@thread-loader"


def decode_breakdown(run: dict) -> dict[str, float]:
    """One live run's decode time per token, split: stalled on loads, in the live predictor
    (its map, the cache hint and the queue), and the rest (compute, hooks, interpreter)."""
    d = run["decode"]  # PhaseStats.to_dict: its stall_ms_per_token uses the same max(tokens, 1)
    t = max(d["tokens"], 1)
    wall, pred = 1e3 * d["seconds"] / t, 1e3 * d["predictor_seconds"] / t
    stall = d["stall_ms_per_token"]
    return {"wall": wall, "stall": stall, "predictor": pred, "rest": wall - stall - pred,
            "reads": (d["misses"] + d["late"]) / t}  # fmt: skip


def print_breakdown(variants: dict, runs: dict) -> None:
    """Where each variant's decode time goes (ms per token, medians over repeats), so a ratio
    can be read as fewer stalls, a costlier predictor or a slower rest."""
    print("\n| budget | variant | policy | predictor | wall ms/token | stall | predictor | rest | "
          "demand+late reads/token |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for v, (r, mem) in variants.items():
        b = [decode_breakdown(x) for x in runs[v]]
        m = {k: statistics.median(x[k] for x in b) for k in b[0]}
        print(f"| {mem} | {v.split(' ', 1)[1]} | {r.policy} | {r.predictor} | {m['wall']:.2f} | "
              f"{m['stall']:.2f} | {m['predictor']:.2f} | {m['rest']:.2f} | {m['reads']:.2f} |")  # fmt: skip


def remeasure(ctx, stores, ev, tier, predictor_seconds=None):
    """The planner's Machine measured now (moelab.offload.measure.measure_machine); the live
    predictor cost per call is taken from the up-front plan."""
    from moelab.offload.measure import measure_machine

    return measure_machine(ctx.load, stores, ev.tokens[0], tier, (), predictor_seconds)


def replan(ctx, machine, row, mem) -> float:
    """Planned tokens/s of one configuration under `machine` (same replay as make_plan)."""
    from moelab.offload.plan import plan_configs

    rep = plan_configs(ctx.shape, ctx.sites, machine, ctx.workload, [(mem, row.memory)],
                       [row.precision], [row.predictor], [row.policy])  # fmt: skip
    return rep.best(
        precision=row.precision, policy=row.policy, predictor=row.predictor
    ).tokens_per_s


def main_demo() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", choices=["testbed", "demo"], default="demo")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument(
        "--out", type=Path, default=Path(tempfile.gettempdir()) / "moelab_bench_offload"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--mode",
        choices=["forced", "greedy"],
        default="forced",
        help="forced: decode the test text token by token (real routing); greedy: generate",
    )
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)

    model, tok, desc = load_model_and_tokenizer(args.seed)
    model.eval()
    moe = model.cfg.moe
    L, E, k = len(model.moe_layer_indices()), moe.num_experts, moe.top_k
    resident = max(k, round(0.25 * E))
    seqs = test_tokens(tok, args.seed)
    if args.mode == "greedy":
        prompts = [torch.tensor([s[: args.prompt_len]]) for s in seqs[: args.prompts]]
    else:  # prompt, then the test text's next new_tokens - 1 tokens fed one at a time
        n = args.prompt_len + args.new_tokens - 1
        prompts = [torch.tensor([s[:n]]) for s in seqs if len(s) >= n][: args.prompts]
    store_dir = args.out / "store"
    ExpertStore.write(model, store_dir)
    with ExpertStore(store_dir, tier="auto") as st:
        tier, nb = st.tier, st.expert_nbytes(0)
    print(f"model: {desc}; L={L} MoE layers, E={E}, k={k}, expert {nb / 1e3:.0f} kB; tier {tier}")
    print(
        f"live: {len(prompts)} test prompts x {args.prompt_len} tokens, {args.new_tokens} new tokens, "
        f"resident {resident}/{E} experts per layer, {args.repeats} interleaved repeats"
    )

    variants = ["all-resident", *[f"lru+{c}" for c in CANDIDATES], "lru", "on-demand", "in-cache"]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    extras: dict[str, dict] = {}
    ref_outs = None
    identical = {v: True for v in variants}
    for r in range(args.repeats):
        for v in variants:
            rec = r == args.repeats - 1 and (v == "lru" or v.startswith("lru+"))
            s, outs, extra = run_variant(
                v,
                model,
                store_dir,
                prompts,
                args.new_tokens,
                resident,
                k,
                L,
                E,
                rec,
                args.mode,
                args.prompt_len,
            )
            if v == "all-resident" and ref_outs is None:
                ref_outs = outs
            identical[v] &= all(torch.equal(a, b) for a, b in zip(outs, ref_outs, strict=True))
            runs[v].append(s)
            if rec:
                extras[v] = extra
            print(
                f"  repeat {r} {v:>16}: decode {s['decode']['tokens_per_s']:.1f} tok/s", flush=True
            )

    def med(v, ph, key):
        vals = [x[ph].get(key, float("nan")) for x in runs[v]]
        return statistics.median(vals)

    # best = highest timely-hit rate (a property of the routing and the predictor; decode tok/s
    # differences between predictors are within the noise of a shared machine)
    best = max(CANDIDATES, key=lambda c: med(f"lru+{c}", "decode", "timely_hit_rate"))
    bv = f"lru+{best}"
    print(
        "\n| variant | decode tok/s | prefill tok/s | stall ms/token | kB loaded/token | timely-hit | hit | identical |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for v in variants:
        row = [med(v, "decode", "tokens_per_s"), med(v, "prefill", "tokens_per_s")]
        if v == "all-resident":
            print(f"| {v} | {row[0]:.1f} | {row[1]:.0f} | - | - | - | - | ref |")
            continue
        print(
            f"| {v} | {row[0]:.1f} | {row[1]:.0f} | {med(v, 'decode', 'stall_ms_per_token'):.2f} | "
            f"{med(v, 'decode', 'bytes_per_token') / 1e3:.0f} | {med(v, 'decode', 'timely_hit_rate'):.3f} | "
            f"{med(v, 'decode', 'hit_rate'):.3f} | {identical[v]} |"
        )
    ar = med("all-resident", "decode", "tokens_per_s")
    b = med(bv, "decode", "tokens_per_s")
    ratios = {
        f"{bv} timely-hit (target >= 0.90)": med(bv, "decode", "timely_hit_rate"),
        f"{bv} / all-resident (target >= 0.8)": b / ar,
        f"{bv} / lru (target >= 1.5)": b / med("lru", "decode", "tokens_per_s"),
        f"{bv} / on-demand (target >= 3)": b / med("on-demand", "decode", "tokens_per_s"),
        "in-cache / all-resident (hook overhead)": med("in-cache", "decode", "tokens_per_s") / ar,
    }
    print(f"\nbest predictor: {best}")
    for key, val in ratios.items():
        print(f"  {key}: {val:.3f}")
    store_bps = statistics.median([x["store_stats"]["bytes_per_s"] for x in runs["lru"]])
    print(
        f"  store tier {tier}: {store_bps / 1e6:.0f} MB/s measured over single-expert reads (lru runs)"
    )

    # ---------------------------------------------------------------- simulator vs live
    in_cache_tps = med("in-cache", "decode", "tokens_per_s")
    print("\nsimulator vs live (same routing, same prefetch requests, policy lru, this-machine):")
    sim_rows = {}
    for v, ex in extras.items():
        last = runs[v][-1]
        ss = last["store_stats"]
        pred_s = last["decode"]["predictor_seconds"] / max(1, last["decode"]["steps"] * L)
        hw = Hardware(
            "this-machine",
            bandwidth=ss["bytes_per_s"],
            latency=0.0,
            layer_compute=1.0 / in_cache_tps / L,
            predict_overhead=pred_s,
            expert_bytes=nb,
            description="measured: store reads of this run, per-layer time of the in-cache run",
        )
        steps, timed, plan = decode_steps_split(ex, args.new_tokens)
        sim = simulate(
            ex["ids"], E, resident, "lru", hw, plan, steps=steps, timed=timed, expert_bytes=nb
        )
        live = last["decode"]["tokens_per_s"]
        sim_rows[v] = (
            live,
            sim.tokens_per_s,
            sim.timely_hit_rate,
            last["decode"]["timely_hit_rate"],
        )
        print(
            f"  {v:>16}: live {live:.1f} tok/s, simulated {sim.tokens_per_s:.1f} tok/s "
            f"(sim/live {sim.tokens_per_s / live:.2f}); timely-hit sim {sim.timely_hit_rate:.3f} "
            f"live {last['decode']['timely_hit_rate']:.3f}"
        )

    # ---------------------------------------------------------------- replay at 10%
    ids, x, seq_lens = replay_routing(model, seqs, L)
    train_ids, _, _ = replay_routing(model, test_tokens(tok, args.seed, "train", 4000), L)
    counts = usage_counts(train_ids, E)
    cap10 = max(k, round(0.10 * L * E))
    hw = Hardware(
        "this-machine",
        bandwidth=store_bps,
        latency=0.0,
        layer_compute=1.0 / in_cache_tps / L,
        expert_bytes=nb,
    )
    plans = {
        "none": None,
        "gate": gate_plan(model, x, ids),
        "gate2": gate_plan(model, x, ids, (1, 2)),
        "gate+prev": gate_plan(model, x, ids, prev=True),
        "adaptive": adaptive_plan(model, x, ids, seq_lens),
        "oracle": oracle_plan(ids, 1),
    }
    print(
        f"\nreplay of {ids.shape[0]} test tokens, global cache of {cap10} experts "
        f"(10% of {L}x{E}), this-machine hardware:"
    )
    print("| policy | " + " | ".join(f"{p} hit / timely" for p in plans) + " |")
    print("|---|" + "---|" * len(plans))
    res10 = {}
    for pol in ("lru", "lfu", "lfru", "static", "belady"):
        cells = []
        for pname, plan in plans.items():
            r = simulate(
                ids, E, cap10, pol, hw, plan, per_layer=False, expert_bytes=nb, static_counts=counts
            )
            res10[(pol, pname)] = r
            cells.append(f"{r.hit_rate:.3f} / {r.timely_hit_rate:.3f}")
        print(f"| {pol} | " + " | ".join(cells) + " |")
    stay = np.mean(
        [
            len(set(ids[n, layer]) & set(ids[n - 1, layer])) / k
            for n in range(1, ids.shape[0])
            for layer in range(L)
        ]
    )
    acc = np.mean(
        [
            len(set(ex) & set(ids[n, t].tolist())) / k
            for (n, _), preds in plans["gate"].items()
            for (_, t, ex) in preds
        ]
    )
    print(
        f"  routing diagnostics: previous token's experts reused at the same layer {stay:.3f}; "
        f"gate lookahead d=1 top-{k} precision {acc:.3f}"
    )
    real = [p for p in plans if p not in ("none", "oracle")]
    bp = max(
        real,
        key=lambda p: max(res10[(pol, p)].hit_rate for pol in ("lru", "lfu", "lfru", "static")),
    )
    bpol = max(("lru", "lfu", "lfru", "static"), key=lambda pol: res10[(pol, bp)].hit_rate)
    gap = res10[("belady", bp)].hit_rate - res10[(bpol, bp)].hit_rate
    print(
        f"  best policy + prefetch: {bpol}+{bp} {res10[(bpol, bp)].hit_rate:.3f} vs belady+{bp} "
        f"{res10[('belady', bp)].hit_rate:.3f}: gap {100 * gap:.1f} points (target <= 5)"
    )

    curves = hit_rate_curves(
        ids, E, [2, 3, 4, 6], ["lru", "lfu", "lfru", "static", "belady"], plans[bp], hw, nb, counts
    )
    png = plot_curves(
        curves, E, args.out / "hit_rate_vs_cache.png", f"per-layer caches, {bp} prefetch"
    )
    print(f"  hit-rate curves (per-layer cache 2..6 of {E}): {png}")
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "model": desc,
                "runs": runs,
                "ratios": ratios,
                "best": best,
                "sim_vs_live": sim_rows,
                "replay10": {f"{a}+{b}": r.to_dict() for (a, b), r in res10.items()},
                "curves": curves,
            },
            indent=1,
            default=float,
        )
    )


if __name__ == "__main__":
    main()
