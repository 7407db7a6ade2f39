"""CLI: `moelab ablate`, `moelab distill` and `moelab experts similarity|roles|prune|merge|sweep`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from moelab.errors import ConfigError, DataError

CORPUS_HELP = (
    "a prepared data folder (the data/ that `moelab train` wrote; its tokenizer must be the "
    "model's) or a corpus name/path (split by document as `moelab train` splits it)"
)


def _ints(text: str | None, what: str) -> list[int] | None:
    if text is None or text == "":
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what}={text!r}: expected comma-separated integers") from None


def _load(model_dir: Path, threads: int) -> Any:
    import torch

    from moelab.trace.api import load_model

    if threads > 0:
        torch.set_num_threads(threads)
    return load_model(model_dir)


def _seq_len(model: Any, seq_len: int) -> int:
    cfg = getattr(model, "cfg", None)
    limit = (
        cfg.max_seq_len
        if cfg is not None
        else getattr(model.config, "max_position_embeddings", None)
    )
    if limit is not None and seq_len > int(limit):
        raise ConfigError(f"--seq-len {seq_len}: the model accepts at most {limit} positions")
    return seq_len


def _vocab(model: Any) -> int | None:
    cfg = getattr(model, "cfg", None)
    return int(cfg.vocab_size) if cfg is not None else getattr(model.config, "vocab_size", None)


def _sample(model: Any, model_dir: Path, corpus: str, split: str, sample: int, seq_len: int):
    from moelab.experts.heldout import load_corpus_sample, load_sample
    from moelab.trace.api import find_tokenizer

    seq_len = _seq_len(model, seq_len)
    tokens = None if sample <= 0 else sample
    p = Path(corpus)
    if p.is_dir() and (p / "data.json").is_file():
        return load_sample(p, split, tokens, seq_len, _vocab(model), model_dir / "tokenizer.json")
    return load_corpus_sample(
        corpus, find_tokenizer(model_dir), split, tokens, seq_len, vocab_size=_vocab(model)
    )


def _require_moelab(model: Any, what: str) -> None:
    from moelab.models.transformer import MoETransformer

    if not isinstance(model, MoETransformer):
        raise ConfigError(
            f"{what}: needs a moelab model dir (model_type moelab_transformer); `moelab ablate` "
            "works on transformers MoE models too"
        )


def register(app: typer.Typer) -> None:
    """Add `ablate`, `distill` and the `experts` sub-commands."""

    @app.command("ablate")
    def ablate_cmd(
        model: Path = typer.Option(
            ..., help="moelab model dir or local transformers MoE model dir"
        ),
        corpus: str = typer.Option(..., help=CORPUS_HELP),
        out: Path = typer.Option(Path("runs/ablate"), help="output folder"),
        split: str = typer.Option("test", help="held-out split to score"),
        sample: int = typer.Option(8192, help="tokens scored per ablation (0 = the whole split)"),
        seq_len: int = typer.Option(128, help="tokens per scored sequence"),
        modes: str = typer.Option(
            "reroute,zero", help="reroute (mask the router logit) and/or zero (drop its output)"
        ),
        layers: str = typer.Option(None, help="MoE-layer positions to ablate (default all)"),
        batch_size: int = typer.Option(16, help="sequences per forward"),
        threads: int = typer.Option(0, help="torch threads (0 = torch default)"),
    ) -> None:
        """Remove each expert in turn; held-out loss change per domain, importance heatmap."""
        from moelab._io import atomic_write_json
        from moelab.experts.ablate import (
            MODES,
            ablation_importance,
            plot_importance,
            top_experts_by_domain,
        )

        mode_list = [m.strip() for m in modes.split(",") if m.strip()]
        for m in mode_list:
            if m not in MODES:
                raise ConfigError(f"--modes {m!r}: expected a comma list of {MODES}")
        m = _load(model, threads)
        s = _sample(m, model, corpus, split, sample, seq_len)
        out.mkdir(parents=True, exist_ok=True)
        res = ablation_importance(
            m, s, mode_list, _ints(layers, "--layers"), batch_size, cache=out / "partial.json"
        )
        top = {mode: top_experts_by_domain(res, mode) for mode in mode_list}
        atomic_write_json(out / "ablation.json", {**res.to_dict(), "top_by_domain": top})
        plot_importance(res, out / "importance.png")
        con = Console()
        con.print(
            f"{res.split}: {res.tokens} tokens in {res.sequences} sequences; base loss "
            f"{res.base.value['all']:.4f} ± {res.base.se['all']:.4f} nats/token; "
            f"{res.seconds:.1f} s ({res.extra['path']})"
        )
        for mode in mode_list:
            t = Table(
                title=f"{mode}: the experts whose removal costs each domain most (Δ loss ± SE)"
            )
            t.add_column("domain")
            for r in range(3):
                t.add_column(f"#{r + 1}")
            for dom, rows in top[mode].items():
                t.add_row(
                    dom,
                    *[
                        f"L{x['layer']} e{x['expert']}: {x['delta']:+.4f}±{x['se']:.4f}"
                        for x in rows
                    ],
                )
            con.print(t)
        con.print(f"numbers: {out / 'ablation.json'}  heatmap: {out / 'importance.png'}")

    @app.command("distill")
    def distill_cmd(
        teacher: Path = typer.Option(..., help="moelab MoE model dir (the teacher)"),
        student: str = typer.Option(
            "dense", help="student kind: 'dense' (the teacher's active size)"
        ),
        data: Path = typer.Option(..., help="prepared data folder (train split to train on)"),
        out: Path = typer.Option(Path("runs/distill"), help="output folder"),
        steps: int = typer.Option(300, help="training steps of each student"),
        batch_size: int = typer.Option(8, help="sequences per step"),
        seq_len: int = typer.Option(128, help="tokens per sequence"),
        lr: float = typer.Option(1e-3, help="peak learning rate"),
        alpha: float = typer.Option(0.5, help="weight of the KL term (1 - alpha on cross-entropy)"),
        temperature: float = typer.Option(1.0, help="distillation temperature"),
        split: str = typer.Option("test", help="held-out split to score"),
        sample: int = typer.Option(16384, help="held-out tokens scored"),
        seed: int = typer.Option(0, help="seed of the students' init and batch order"),
        threads: int = typer.Option(0, help="torch threads (0 = torch default)"),
    ) -> None:
        """Dense student trained on the MoE's next-token distribution vs trained alone."""
        from moelab.data.dataset import pack_blocks
        from moelab.data.prepare import load_prepared
        from moelab.experts.distill import distill_to_dense

        if student != "dense":
            raise ConfigError(f"--student {student!r}: only 'dense' is implemented")
        t = _load(teacher, threads)
        _require_moelab(t, "distill --teacher")
        evals = _sample(t, teacher, str(data), split, sample, seq_len)
        prepared = load_prepared(data)
        if "train" not in prepared.streams:
            raise DataError(f"{data}: no train split to distil on")
        blocks = pack_blocks(prepared.streams["train"], seq_len)
        r = distill_to_dense(t, blocks, evals, out, steps, batch_size, lr, alpha, temperature, seed)
        tab = Table(
            title=f"distillation to dense ({r['tokens_trained']:,} training tokens each; {r['split']})"
        )
        for c in ("model", "params", "held-out loss", "ppl", "KL to teacher"):
            tab.add_column(c, justify="right")
        tab.add_row(
            "teacher (MoE)",
            f"{r['teacher_params']:,}",
            f"{r['loss']['teacher']['all']:.4f}",
            f"{r['ppl']['teacher']:.2f}",
            "0",
        )
        for arm in ("alone", "distilled"):
            tab.add_row(
                f"dense {arm}",
                f"{r['student_params']:,}",
                f"{r['loss'][arm]['all']:.4f}",
                f"{r['ppl'][arm]:.2f}",
                f"{r['kl_to_teacher'][arm]:.4f}",
            )
        con = Console()
        con.print(tab)
        ci = r["surviving_share_bootstrap_95"]
        con.print(
            f"share of the MoE-over-dense gain that survives: {r['surviving_share']:.1%}"
            + (f" (bootstrap 95% {ci[0]:.1%} .. {ci[1]:.1%})" if ci else "")
        )

    exp = typer.Typer(help="What experts are and what they are worth.", no_args_is_help=True)
    app.add_typer(exp, name="experts")

    @exp.command("similarity")
    def similarity_cmd(
        model: Path = typer.Option(..., help="moelab or transformers MoE model dir"),
        corpus: str = typer.Option(..., help=CORPUS_HELP),
        out: Path = typer.Option(Path("runs/experts"), help="output folder"),
        split: str = typer.Option("test", help="split whose tokens feed the experts"),
        tokens: int = typer.Option(2048, help="tokens for the output similarities"),
        seq_len: int = typer.Option(128, help="tokens per sequence"),
        across_layers: bool = typer.Option(True, help="also compare experts of different layers"),
        threads: int = typer.Option(0, help="torch threads"),
    ) -> None:
        """Expert similarity by aligned weights and by outputs (CKA, cosine), as heatmaps."""
        from moelab._io import atomic_write_json
        from moelab.experts.access import capture_router_inputs, layer_experts
        from moelab.experts.similarity import expert_similarity, plot_heatmaps

        m = _load(model, threads)
        s = _sample(m, model, corpus, split, tokens, seq_len)
        sim = expert_similarity(
            layer_experts(m), capture_router_inputs(m, s.input_ids), across_layers, tokens
        )
        out.mkdir(parents=True, exist_ok=True)
        summ = sim.summary()
        atomic_write_json(
            out / "similarity.json",
            {"layers": sim.layers, "num_experts": sim.num_experts, "tokens": sim.tokens,
             "split": s.split, "summary": summ,
             **{k: getattr(sim, k).tolist() for k in ("weight_cos_raw", "weight_cos_aligned",
                                                      "neuron_corr", "output_cka", "output_cos")}},
        )  # fmt: skip
        plot_heatmaps(sim, out / "similarity.png")
        t = Table(title=f"mean off-diagonal similarity ({sim.tokens} tokens of {s.split})")
        for c in ("measure", "within layer", "across layers"):
            t.add_column(c, justify="right")
        for k, v in summ.items():
            if "value" in v:
                t.add_row(k, f"{v['value']:.3f}", "")
            else:
                t.add_row(k, f"{v['within_layer']:.3f}", f"{v['across_layers']:.3f}")
        Console().print(t)

    @exp.command("roles")
    def roles_cmd(
        model: Path = typer.Option(..., help="moelab or transformers MoE model dir"),
        corpus: str = typer.Option(..., help=CORPUS_HELP),
        out: Path = typer.Option(Path("runs/experts"), help="output folder"),
        split: str = typer.Option("test", help="split whose documents are tagged"),
        domains: str = typer.Option(
            None, help="comma list of domains (default: those named english*)"
        ),
        tokens: int = typer.Option(20000, help="tokens routed and tagged"),
        tsne_points: int = typer.Option(1500, help="tokens in the t-SNE picture"),
        seq_len: int = typer.Option(128, help="tokens per sequence"),
        threads: int = typer.Option(0, help="torch threads"),
    ) -> None:
        """Expert usage per part-of-speech class against chance; t-SNE of trajectories by class."""
        from moelab._io import atomic_write_json
        from moelab.experts.roles import expert_roles, plot_roles

        m = _load(model, threads)
        texts, encode_offsets, bos, decode = _role_texts(model, corpus, split, domains)
        r = expert_roles(
            m,
            encode_offsets,
            texts,
            bos,
            _seq_len(m, seq_len),
            tokens,
            tsne_points,
            heuristic_decode=decode,
        )
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "roles.json", {"split": split, "corpus": corpus, **r.to_dict()})
        plot_roles(r, out / "roles.png")
        t = Table(title=f"specialisation by class ({r.tagger})")
        for c in ("layer", "TV to overall", "shuffled classes"):
            t.add_column(c, justify="right")
        for li, a, b in zip(r.layers, r.specialization, r.specialization_shuffled, strict=True):
            t.add_row(str(li), f"{a:.3f}", f"{b:.3f}")
        con = Console()
        con.print(t)
        con.print(
            f"class from trajectory, 5-NN: {r.knn_accuracy:.3f} (shuffled {r.knn_shuffled:.3f}, "
            f"majority {r.majority_share:.3f}); {out / 'roles.png'}"
        )
        for n in r.notes:
            con.print(f"[yellow]note[/yellow] {n}")

    @exp.command("prune")
    def prune_cmd(
        model: Path = typer.Option(..., help="moelab MoE model dir"),
        corpus: str = typer.Option(..., help=CORPUS_HELP),
        keep: int = typer.Option(..., help="experts kept per MoE layer"),
        out: Path = typer.Option(..., help="output model dir"),
        by: str = typer.Option(
            "importance", help="importance | frequency | gate_mass | index | merge"
        ),
        calib_split: str = typer.Option("validation", help="split the selection is computed on"),
        sample: int = typer.Option(8192, help="calibration tokens"),
        seq_len: int = typer.Option(128, help="tokens per sequence"),
        export_hf: Path = typer.Option(None, help="also export the result in transformers format"),
        threads: int = typer.Option(0, help="torch threads"),
    ) -> None:
        """Prune (or merge, --by merge) to KEEP experts per layer; save as a normal model."""
        import shutil

        from moelab._io import atomic_write_json
        from moelab.experts.shrink import shrink_model

        m = _load(model, threads)
        _require_moelab(m, "experts prune")
        calib = _sample(m, model, corpus, calib_split, sample, seq_len)
        new, info = shrink_model(m, by, keep, calib)
        new.save(out)
        if (model / "tokenizer.json").is_file():
            shutil.copyfile(model / "tokenizer.json", out / "tokenizer.json")
        atomic_write_json(out / "shrink.json", {"source": str(model), "method": by, "keep": keep,
                                                "calibration": calib.split, **info})  # fmt: skip
        if export_hf is not None:
            from moelab.models.export import export_hf as do_export

            do_export(new, export_hf)
        Console().print(f"{by}: {m.cfg.moe.num_experts} -> {keep} experts per layer; saved {out}")

    @exp.command("sweep")
    def sweep_cmd(
        model: Path = typer.Option(..., help="moelab MoE model dir"),
        corpus: str = typer.Option(..., help=CORPUS_HELP),
        out: Path = typer.Option(Path("runs/experts"), help="output folder"),
        sizes: str = typer.Option(None, help="experts per layer to try (default E*3/4, E/2, E/4)"),
        methods: str = typer.Option("importance,frequency,gate_mass,index,merge", help="methods"),
        calib_split: str = typer.Option("validation", help="split the selection is computed on"),
        eval_split: str = typer.Option("test", help="held-out split scored"),
        sample: int = typer.Option(8192, help="tokens of each split used"),
        seq_len: int = typer.Option(128, help="tokens per sequence"),
        importance: Path = typer.Option(
            None, help="ablation.json (reroute) from `moelab ablate` on the calibration split"
        ),
        threads: int = typer.Option(0, help="torch threads"),
    ) -> None:
        """Held-out perplexity vs experts per layer for pruning criteria and merging: table + plot."""
        import json

        import numpy as np

        from moelab._io import atomic_write_json
        from moelab.experts.shrink import METHODS, plot_sweep, shrink_sweep

        m = _load(model, threads)
        _require_moelab(m, "experts sweep")
        E, k = m.cfg.moe.num_experts, m.cfg.moe.top_k
        size_list = _ints(sizes, "--sizes") or sorted(
            {max(k, E * 3 // 4), max(k, E // 2), max(k, E // 4)}, reverse=True
        )
        meth = tuple(x.strip() for x in methods.split(",") if x.strip())
        for x in meth:
            if x not in METHODS:
                raise ConfigError(f"--methods {x!r}: expected a comma list of {METHODS}")
        calib = _sample(m, model, corpus, calib_split, sample, seq_len)
        evalset = _sample(m, model, corpus, eval_split, sample, seq_len)
        if calib.split == evalset.split:
            raise ConfigError("--calib-split and --eval-split must differ (held-out scoring)")
        imp = None
        if importance is not None:
            d = json.loads(importance.read_text(encoding="utf-8"))
            if "reroute" not in d.get("delta", {}):
                raise DataError(f"{importance}: no reroute importance in this ablation.json")
            if d.get("split") != calib.split:
                raise DataError(f"{importance}: computed on {d.get('split')}, not on {calib.split}")
            imp = np.asarray(d["delta"]["reroute"])[:, :, -1]
        r = shrink_sweep(m, calib, evalset, size_list, meth, imp)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "sweep.json", r)
        plot_sweep(r, out / "sweep.png")
        t = Table(
            title=f"held-out perplexity vs experts per layer (full model {r['full_ppl']:.2f}; {r['eval_split']})"
        )
        for c in ("method", "experts", "top-k", "ppl", "Δ loss ± SE"):
            t.add_column(c, justify="right")
        for row in r["rows"]:
            t.add_row(row["method"], str(row["experts"]), str(row["top_k"]), f"{row['ppl']:.2f}",
                      f"{row['delta_loss']:+.4f} ± {row['delta_loss_se']:.4f}")  # fmt: skip
        Console().print(t)
        Console().print(f"{out / 'sweep.json'}  {out / 'sweep.png'}")


def _role_texts(model_dir: Path, corpus: str, split: str, domains: str | None):
    """(texts, encode_offsets, bos, decode) for the roles analysis."""
    from moelab.data.corpora import load_corpus
    from moelab.data.splits import split_documents
    from moelab.trace.api import find_tokenizer

    tok = find_tokenizer(model_dir)
    p = Path(corpus)
    if p.is_dir() and (p / "data.json").is_file():
        from moelab.data.prepare import load_prepared

        prep = load_prepared(p)
        st = prep.streams.get(split)
        if st is None:
            raise DataError(f"{p}: no {split} split")
        import numpy as np

        docs = []
        for j in np.unique(st.doc):
            sel = st.doc == j
            ids = st.ids[sel]
            ids = ids[st.pos[sel] > 0]
            docs.append((st.domains[int(st.domain[sel][0])], prep.tokenizer.decode(ids.tolist())))
    else:
        docs = [(d.domain, d.text) for d in split_documents(load_corpus(corpus))[split]]
    names = sorted({d for d, _ in docs})
    want = (
        [x.strip() for x in domains.split(",")]
        if domains
        else [d for d in names if d.startswith("english")] or names
    )
    texts = [t for d, t in docs if d in want]
    if not texts:
        raise DataError(f"roles: no documents of domains {want} (the split has {names})")
    from tokenizers import Tokenizer

    if isinstance(tok, Tokenizer):
        from moelab.data.tokenizer import special_ids

        def enc(text: str):
            e = tok.encode(text, add_special_tokens=False)
            return e.ids, e.offsets

        return texts, enc, special_ids(tok).bos, lambda i: tok.decode([i])

    def enc_hf(text: str):
        e = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return e["input_ids"], e["offset_mapping"]

    return texts, enc_hf, tok.bos_token_id, lambda i: tok.decode([i])
