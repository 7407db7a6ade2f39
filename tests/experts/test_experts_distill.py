"""Distillation of an MoE into a dense student of its active size."""

from __future__ import annotations

import pytest
import torch
from experts_tiny import tiny_moe

from moelab.errors import ConfigError, ModelError
from moelab.experts.distill import kd_loss, mean_kl, train_student
from moelab.models import MoETransformer
from moelab.models.config import dense_baseline


def test_kd_loss_reference() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    y = torch.randint(0, 11, (2, 5), generator=g)
    loss, kl, ce = kd_loss(s, t, y, alpha=0.3, temperature=2.0)
    p = torch.softmax(t[:, :-1] / 2, -1)
    ref_kl = (p * (p.log() - torch.log_softmax(s[:, :-1] / 2, -1))).sum(-1).mean()
    ref_ce = torch.nn.functional.cross_entropy(s[:, :-1].reshape(-1, 11), y[:, 1:].reshape(-1))
    assert float(kl) == pytest.approx(float(ref_kl), rel=1e-6)
    assert float(ce) == pytest.approx(float(ref_ce), rel=1e-6)
    assert float(loss) == pytest.approx(0.3 * 4 * float(ref_kl) + 0.7 * float(ref_ce), rel=1e-6)
    assert float(kd_loss(t, t, y, 1.0)[1]) == pytest.approx(0.0, abs=1e-6)


def test_distillation_lowers_kl_to_the_teacher() -> None:
    teacher = tiny_moe(vocab=61, seed=1)
    with torch.no_grad():  # a peaky teacher distribution, far from what random text teaches
        teacher.lm_head.weight.mul_(8.0)
    g = torch.Generator().manual_seed(0)
    train = torch.randint(2, 61, (64, 24), generator=g)
    held = torch.randint(2, 61, (8, 24), generator=g)
    scfg = dense_baseline(teacher.cfg)
    assert scfg.moe is None and scfg.d_ff == teacher.cfg.moe.top_k * teacher.cfg.moe.d_ff
    distilled, alone = MoETransformer(scfg, seed=5), MoETransformer(scfg, seed=5)
    before = mean_kl(teacher, distilled, held)
    assert before == pytest.approx(mean_kl(teacher, alone, held), rel=1e-6)  # same init
    train_student(distilled, teacher, train, steps=40, batch_size=8, lr=3e-3, alpha=0.9, label="d")
    train_student(alone, None, train, steps=40, batch_size=8, lr=3e-3, alpha=0.0, label="a")
    after, alone_kl = mean_kl(teacher, distilled, held), mean_kl(teacher, alone, held)
    assert after < 0.7 * before
    assert after < alone_kl
    with pytest.raises(ConfigError):
        train_student(alone, None, train, steps=1, batch_size=2, lr=1e-3, alpha=0.5)


def test_distill_to_dense_end_to_end(prepared, model_dir, tmp_path) -> None:
    from moelab.data.dataset import pack_blocks
    from moelab.data.prepare import load_prepared
    from moelab.experts.distill import distill_to_dense
    from moelab.experts.heldout import load_sample

    t = MoETransformer.load(model_dir)
    ev = load_sample(prepared, "test", 1024, 32, t.cfg.vocab_size, model_dir / "tokenizer.json")
    blocks = pack_blocks(load_prepared(prepared).streams["train"], 32)
    r = distill_to_dense(t, blocks, ev, tmp_path / "d", steps=6, batch_size=4, lr=2e-3)
    assert set(r["loss"]) == {"teacher", "alone", "distilled"}
    assert r["tokens_trained"] == 6 * 4 * 32
    share = (r["loss"]["alone"]["all"] - r["loss"]["distilled"]["all"]) / r["gain_nats"]
    assert r["surviving_share"] == pytest.approx(share) or r["gain_nats"] <= 0
    assert (tmp_path / "d" / "alone" / "model" / "config.json").is_file()
    again = distill_to_dense(t, blocks, ev, tmp_path / "d", steps=6, batch_size=4, lr=2e-3)
    assert again["loss"] == r["loss"]  # students reloaded, not retrained
    with pytest.raises(ModelError):
        distill_to_dense(MoETransformer(dense_baseline(t.cfg)), blocks, ev, tmp_path / "x", steps=1)
