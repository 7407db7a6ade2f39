"""CLI: `moelab train` flags map onto TrainConfig, `moelab topics`, `moelab corpora`, clear errors."""

from __future__ import annotations

from typer.testing import CliRunner

from moelab.cli import app
from moelab.errors import ConfigError


def test_train_topics_corpora_cli(tiny, tmp_path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["train", "--out-dir", str(out), "--data-dir", tiny["data_dir"], "--max-steps", "2", "--no-tensorboard",
            "--no-progress", "--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--d-ff", "32", "--num-experts", "4",
            "--seq-len", "32", "--batch-size", "4", "--eval-every", "2", "--eval-batches", "1", "--threads", "1",
            "--mode", "mlm", "--corpus", "python-code", "--max-bytes", "60000", "--vocab-size", "512"]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "unigram baseline perplexity" in r.output
    assert (out / "topics" / "topics.json").is_file()
    r = runner.invoke(app, ["topics", str(out), "--max-blocks", "4"])
    assert r.exit_code == 0, r.output
    assert "TV distance" in r.output
    r = runner.invoke(
        app, ["train", "--d-model", "30", "--n-heads", "4", "--out-dir", str(tmp_path / "bad")]
    )
    assert isinstance(r.exception, ConfigError) and "divisible" in str(r.exception)
    r = runner.invoke(app, ["corpora"])
    assert r.exit_code == 0 and "python-code" in r.output


def test_every_config_field_is_a_flag() -> None:
    from moelab.train.commands import _config_from_flags, _config_parameters
    from moelab.train.config import TrainConfig

    params = _config_parameters()
    names = [p.name for p in params]
    assert names == ["config", "quick", "resume", *TrainConfig.model_fields]
    # flags given -> the same values in the config; flags not given -> defaults
    given = {n: None for n in names} | {"config": None, "quick": False, "resume": True}
    given.update(d_model=64, mode="mlm", tensorboard=False, lr=0.01)
    cfg = _config_from_flags(given)
    assert (cfg.d_model, cfg.mode, cfg.tensorboard, cfg.lr) == (64, "mlm", False, 0.01)
    assert cfg.n_layers == TrainConfig().n_layers
