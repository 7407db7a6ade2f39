"""Grammatical roles of experts: part-of-speech classes of routed tokens, expert usage per class
against chance, and t-SNE of routing trajectories coloured by class.

Tagger: Lingua::EN::Tagger (Coburn 2003, a probabilistic HMM tagger trained on the Penn Treebank,
Debian package ``liblingua-en-tagger-perl``, model included, installs offline), run once per call
as a ``perl`` subprocess. Its Penn tags are mapped to universal coarse classes (Petrov et al.
2012, "A Universal Part-of-Speech Tagset"). Each model token takes the class of the tagged word
that covers its last non-space character (tokenizer offsets); tokens inside no word (spaces)
are left out. Without the tagger (no perl or no package) ``tagger_available()`` says why and the
caller falls back to the heuristic classes of ``moelab.analysis.specialization.token_class``.

Usage per class: share[c, l, e] = P(e in top-k | class c) (``analysis.specialization.
group_shares``), against the overall share of e (lift = share / overall) and the uniform k/E; a
per-layer specialisation (count-weighted total-variation distance between the class and the
overall distributions) with a shuffled-label baseline, as the domain analyses do. Trajectories
are the per-token router probabilities of all MoE layers concatenated (the trajectory view of
``analysis.projections``); t-SNE (van der Maaten & Hinton 2008) of a sample, with 5-NN accuracy
of the class from the raw vectors against shuffled labels.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from moelab._io import atomic_write_with
from moelab.errors import AnalysisError, DataError

__all__ = [
    "POS_CLASSES",
    "PENN_TO_CLASS",
    "tagger_available",
    "tag_texts",
    "char_classes",
    "RoleResult",
    "expert_roles",
    "plot_roles",
]

POS_CLASSES = (
    "NOUN",
    "PROPN",
    "VERB",
    "ADJ",
    "ADV",
    "PRON",
    "DET",
    "ADP",
    "CONJ",
    "NUM",
    "PRT",
    "PUNCT",
    "X",
)
# Lingua::EN::Tagger's lower-case Penn tags (pp* = punctuation, det = DT, prps = PRP$, ...)
PENN_TO_CLASS = {
    **dict.fromkeys(("nn", "nns"), "NOUN"),
    **dict.fromkeys(("nnp", "nnps"), "PROPN"),
    **dict.fromkeys(("vb", "vbd", "vbg", "vbn", "vbp", "vbz", "md"), "VERB"),
    **dict.fromkeys(("jj", "jjr", "jjs"), "ADJ"),
    **dict.fromkeys(("rb", "rbr", "rbs", "wrb"), "ADV"),
    **dict.fromkeys(("prp", "prps", "wp", "wps", "ex"), "PRON"),
    **dict.fromkeys(("det", "pdt", "wdt"), "DET"),
    **dict.fromkeys(("in",), "ADP"),
    **dict.fromkeys(("cc",), "CONJ"),
    **dict.fromkeys(("cd",), "NUM"),
    **dict.fromkeys(("to", "rp", "pos"), "PRT"),
    **dict.fromkeys(("pp", "ppc", "ppd", "ppl", "ppr", "pps", "lrb", "rrb", "sym"), "PUNCT"),
}
_TAG_RE = re.compile(r"<([a-z$]+)>(.*?)</\1>", re.S)
_PERL = r"""
use strict; use warnings; use Lingua::EN::Tagger;
binmode(STDIN, ':utf8'); binmode(STDOUT, ':utf8');
my $p = Lingua::EN::Tagger->new(stem => 0);
$| = 1;
while (my $line = <STDIN>) { chomp $line; my $t = $p->add_tags($line); $t = '' unless defined $t; print $t, "\n"; }
"""


def tagger_available() -> tuple[bool, str]:
    """(True, version) if perl and Lingua::EN::Tagger run here, else (False, why not)."""
    perl = shutil.which("perl")
    if perl is None:
        return False, "no perl on PATH (apt-get install perl liblingua-en-tagger-perl)"
    r = subprocess.run(
        [perl, "-MLingua::EN::Tagger", "-e", "print $Lingua::EN::Tagger::VERSION"],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        return (
            False,
            "perl cannot load Lingua::EN::Tagger (apt-get install liblingua-en-tagger-perl)",
        )
    return True, f"Lingua::EN::Tagger {r.stdout.strip()}"


def tag_texts(texts: list[str]) -> list[list[tuple[str, str]]]:
    """(word, Penn tag) per word of each text (newlines read as spaces), one perl process."""
    ok, why = tagger_available()
    if not ok:
        raise DataError(f"part-of-speech tagging: {why}")
    lines = "\n".join(t.replace("\r", " ").replace("\n", " ") for t in texts) + "\n"
    r = subprocess.run(
        [shutil.which("perl") or "perl", "-e", _PERL],
        input=lines,
        capture_output=True,
        text=True,
        encoding="utf-8",
    )
    if r.returncode != 0:
        raise DataError(f"Lingua::EN::Tagger failed: {r.stderr.strip()[:300]}")
    out = r.stdout.split("\n")[: len(texts)]
    if len(out) != len(texts):
        raise DataError(f"Lingua::EN::Tagger returned {len(out)} lines for {len(texts)} texts")
    return [[(w, t) for t, w in _TAG_RE.findall(line)] for line in out]


def char_classes(text: str, tagged: list[tuple[str, str]]) -> np.ndarray:
    """[len(text)] class index per character (-1 outside tagged words): each word is found in
    order in the text; words the tagger rewrote (e.g. quotes as `` '') are skipped."""
    cls = np.full(len(text), -1, dtype=np.int16)
    cur = 0
    for word, tag in tagged:
        j = text.find(word, cur, cur + len(word) + 200)
        if j < 0:
            continue
        c = PENN_TO_CLASS.get(tag, "X")
        cls[j : j + len(word)] = POS_CLASSES.index(c)
        cur = j + len(word)
    return cls


@dataclass
class RoleResult:
    """Expert usage per part-of-speech class and trajectory projections."""

    classes: list[str]
    counts: np.ndarray  # [C] tokens per class
    share: np.ndarray  # [C, L, E] P(e in top-k | class)
    overall: np.ndarray  # [L, E]
    chance: float  # k/E
    specialization: np.ndarray  # [L] weighted TV distance class vs overall
    specialization_shuffled: np.ndarray  # [L]
    layers: list[int]
    tagger: str
    tsne: np.ndarray | None = None  # [M, 2]
    tsne_labels: np.ndarray | None = None  # [M]
    knn_accuracy: float = float("nan")
    knn_shuffled: float = float("nan")
    majority_share: float = float("nan")
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no t-SNE coordinates)."""
        lift = self.share / np.maximum(self.overall[None], 1e-12)
        return {
            "tagger": self.tagger,
            "classes": self.classes,
            "tokens_per_class": self.counts.tolist(),
            "layers": self.layers,
            "chance_k_over_E": self.chance,
            "share": self.share.tolist(),
            "lift_vs_overall": lift.tolist(),
            "specialization": self.specialization.tolist(),
            "specialization_shuffled": self.specialization_shuffled.tolist(),
            "knn_accuracy_class_from_trajectory": self.knn_accuracy,
            "knn_accuracy_shuffled_labels": self.knn_shuffled,
            "majority_class_share": self.majority_share,
            "notes": self.notes,
        }


def _tv_specialization(
    share: np.ndarray, counts: np.ndarray, overall: np.ndarray, k: int
) -> np.ndarray:
    w = counts / max(counts.sum(), 1)
    # shares sum to k per layer (k slots): normalise to distributions before the TV distance
    tv = 0.5 * np.abs(share / k - overall[None] / k).sum(-1)  # [C, L]
    return (w[:, None] * tv).sum(0)


@torch.no_grad()
def _route(model: nn.Module, chunks: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(expert ids [T, L, k], router probabilities [T, L, E]) of every token of the chunks."""
    from moelab.experts.heldout import forward_logits
    from moelab.trace.adapters import get_adapter

    ad = get_adapter(model)
    ids_out: list[list[np.ndarray]] = [[] for _ in ad.sites]
    probs_out: list[list[np.ndarray]] = [[] for _ in ad.sites]
    handles = []
    for li, s in enumerate(ad.sites):

        def hook(_m, args, out, li=li, s=s):
            d = ad.decode(s, args, out)
            ids_out[li].append(d.expert_ids.cpu().numpy())
            lg = d.logits.float()
            p = lg.sigmoid() if ad.score_fn == "sigmoid" else lg.softmax(-1)
            probs_out[li].append(p.cpu().numpy())

        handles.append(s.module.register_forward_hook(hook))
    try:
        model.eval()
        for c in chunks:
            forward_logits(model, torch.as_tensor([c], dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    ids = np.stack([np.concatenate(x) for x in ids_out], axis=1)
    probs = np.stack([np.concatenate(x) for x in probs_out], axis=1)
    return ids, probs


def expert_roles(
    model: nn.Module,
    encode_offsets: Any,
    texts: list[str],
    bos: int | None,
    seq_len: int = 128,
    max_tokens: int = 20000,
    tsne_points: int = 1500,
    seed: int = 0,
    heuristic_decode: Any = None,
) -> RoleResult:
    """Expert usage per POS class of the tokens of `texts` (English prose); `encode_offsets(text)
    -> (ids, [(start, end)])`; with no tagger, `heuristic_decode(id) -> str` gives the
    heuristic classes instead (or AnalysisError if it is None)."""
    from moelab.analysis.specialization import TOKEN_CLASSES, group_shares, token_class
    from moelab.trace.adapters import get_adapter
    from moelab.trace.schema import NO_EXPERT

    ok, tagger = tagger_available()
    notes = []
    if ok:
        tagged = tag_texts(texts)
        names = list(POS_CLASSES)
    elif heuristic_decode is not None:
        tagged = None
        names = list(TOKEN_CLASSES)
        notes.append(f"no part-of-speech tagger ({tagger}): heuristic token classes used")
        tagger = "heuristic token classes (moelab.analysis.specialization.token_class)"
    else:
        raise AnalysisError(f"expert roles: {tagger}")
    chunks: list[list[int]] = []
    labels: list[int] = []
    total = 0
    body = seq_len - (1 if bos is not None else 0)
    for t_i, text in enumerate(texts):
        ids, offsets = encode_offsets(text)
        if tagged is not None:
            cc = char_classes(text, tagged[t_i])
            lab = []
            for a, b in offsets:
                piece = text[a:b].rstrip()
                end = a + len(piece) - 1
                lab.append(int(cc[end]) if piece and 0 <= end < len(cc) else -1)
        else:
            lab = [TOKEN_CLASSES.index(token_class(heuristic_decode(int(i)))) for i in ids]
        for s in range(0, len(ids), body):
            piece_ids, piece_lab = list(ids[s : s + body]), lab[s : s + body]
            if len(piece_ids) < 2:
                continue
            chunks.append(([bos] if bos is not None else []) + piece_ids)
            labels.extend(([-1] if bos is not None else []) + piece_lab)
            total += len(piece_ids)
            if total >= max_tokens:
                break
        if total >= max_tokens:
            break
    if not chunks:
        raise AnalysisError("expert roles: no tokens in the given texts")
    eids, probs = _route(model, chunks)
    y = np.asarray(labels, dtype=np.int64)
    keep = y >= 0
    eids, probs, y = eids[keep], probs[keep], y[keep]
    if y.size < 10:
        raise AnalysisError(f"expert roles: only {y.size} tagged tokens")
    ad = get_adapter(model)
    E, k = ad.num_experts, ad.top_k
    present = np.unique(y)
    remap = np.full(len(names), -1, dtype=np.int64)
    remap[present] = np.arange(present.size)
    g = remap[y]
    names = [names[c] for c in present]
    counts = np.bincount(g, minlength=len(names)).astype(np.float64)
    share = group_shares(eids, g, len(names), E)
    overall = np.stack(
        [
            np.bincount(eids[:, li][eids[:, li] != NO_EXPERT], minlength=E) / max(len(g), 1)
            for li in range(eids.shape[1])
        ]
    )
    spec = _tv_specialization(share, counts, overall, k)
    rng = np.random.default_rng(seed)
    g_shuf = rng.permutation(g)
    spec_shuf = _tv_specialization(group_shares(eids, g_shuf, len(names), E), counts, overall, k)
    res = RoleResult(
        classes=names,
        counts=counts,
        share=share,
        overall=overall,
        chance=k / E,
        specialization=spec,
        specialization_shuffled=spec_shuf,
        layers=ad.layer_indices(),
        tagger=tagger,
        notes=notes,
    )
    _project(res, probs.reshape(len(g), -1), g, tsne_points, seed)
    return res


def _project(res: RoleResult, x: np.ndarray, g: np.ndarray, points: int, seed: int) -> None:
    from sklearn.manifold import TSNE
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(seed)
    idx = rng.choice(len(g), size=min(points, len(g)), replace=False)
    xs, ys = x[idx], g[idx]
    cls, cnt = np.unique(ys, return_counts=True)
    common = np.isin(ys, cls[cnt >= 5])  # kNN over the classes with >= 5 sampled tokens
    if (~common).any():
        res.notes.append(
            f"kNN accuracy leaves out {int((~common).sum())} sampled tokens of classes with < 5"
        )
    xk, yk = xs[common], ys[common]
    _, cnt_k = np.unique(yk, return_counts=True)
    if cnt_k.size >= 2:
        res.majority_share = float(cnt_k.max() / cnt_k.sum())
        cv = StratifiedKFold(n_splits=int(min(5, cnt_k.min())), shuffle=True, random_state=seed)
        knn = KNeighborsClassifier(n_neighbors=5)
        res.knn_accuracy = float(cross_val_score(knn, xk, yk, cv=cv).mean())
        res.knn_shuffled = float(cross_val_score(knn, xk, rng.permutation(yk), cv=cv).mean())
    else:
        res.notes.append("fewer than 2 classes with >= 5 sampled tokens: no kNN accuracy")
    if len(ys) >= 10:
        perp = float(min(30.0, (len(ys) - 1) / 3))
        res.tsne = TSNE(
            n_components=2, perplexity=perp, random_state=seed, init="pca", max_iter=500
        ).fit_transform(xs)
        res.tsne_labels = ys


def plot_roles(res: RoleResult, path: str | os.PathLike[str]) -> None:
    """PNG: lift of each expert per class (last MoE layer), specialisation per layer, t-SNE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    lift = res.share[:, -1] / np.maximum(res.overall[-1][None], 1e-12)
    im = axes[0].imshow(
        np.log2(np.maximum(lift, 1e-3)), cmap="RdBu_r", vmin=-2, vmax=2, aspect="auto"
    )
    axes[0].set_yticks(
        range(len(res.classes)),
        [f"{c} ({int(n)})" for c, n in zip(res.classes, res.counts, strict=True)],
    )
    axes[0].set_xlabel("expert")
    axes[0].set_title(f"log2 lift P(e|class)/P(e), layer {res.layers[-1]}")
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    x = np.arange(len(res.layers))
    axes[1].plot(x, res.specialization, marker="o", label="POS class")
    axes[1].plot(x, res.specialization_shuffled, marker="x", ls="--", label="shuffled classes")
    axes[1].set_xticks(x, [str(li) for li in res.layers])
    axes[1].set_xlabel("layer")
    axes[1].set_ylabel("weighted TV distance to overall usage")
    axes[1].legend()
    axes[1].set_title("specialisation by class")
    if res.tsne is not None:
        cmap = plt.get_cmap("tab20")
        for c in range(len(res.classes)):
            m = res.tsne_labels == c
            if m.any():
                axes[2].scatter(*res.tsne[m].T, s=5, color=cmap(c % 20), label=res.classes[c])
        axes[2].legend(markerscale=3, fontsize=7, ncol=2)
        axes[2].set_title(
            f"t-SNE of trajectories; 5-NN acc {res.knn_accuracy:.2f} "
            f"(shuffled {res.knn_shuffled:.2f}, majority {res.majority_share:.2f})"
        )
    fig.suptitle(f"expert roles by {res.tagger}")
    fig.tight_layout()
    atomic_write_with(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
