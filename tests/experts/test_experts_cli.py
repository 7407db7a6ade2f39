"""`moelab ablate`, `moelab distill` and `moelab experts ...` end to end on a tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from moelab.cli import main
from moelab.models import MoETransformer


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    old = sys.argv
    sys.argv = ["moelab", *args]
    try:
        with pytest.raises(SystemExit) as exc:
            main()
    finally:
        sys.argv = old
    cap = capsys.readouterr()
    code = exc.value.code
    return (0 if code is None else int(code)), cap.out + cap.err


def test_ablate_cli(prepared: Path, model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ab"
    code, text = run_cli(["ablate", "--model", str(model_dir), "--corpus", str(prepared), "--out", str(out),
                          "--sample", "512", "--seq-len", "32", "--threads", "1"], capsys)  # fmt: skip
    assert code == 0, text
    r = json.loads((out / "ablation.json").read_text())
    assert r["modes"] == ["reroute", "zero"] and r["domains"] == ["code", "english-toy", "all"]
    assert len(r["delta"]["zero"]) == 2 and len(r["delta"]["zero"][0]) == 6
    assert r["split"].startswith("test split of")
    assert r["path"] == "batched" and "(batched)" in text
    assert (out / "importance.png").is_file()
    code, text = run_cli(["ablate", "--model", str(model_dir), "--corpus", str(prepared), "--out", str(out),
                          "--modes", "drop"], capsys)  # fmt: skip
    assert code == 2 and "--modes" in text
    code, text = run_cli(["ablate", "--model", str(model_dir), "--corpus", str(prepared), "--split", "nope",
                          "--seq-len", "32", "--out", str(out)], capsys)  # fmt: skip
    assert code == 2 and "--split" in text


def test_prune_sweep_similarity_roles_cli(
    prepared: Path, model_dir: Path, tmp_path: Path, capsys
) -> None:
    common = [
        "--model",
        str(model_dir),
        "--corpus",
        str(prepared),
        "--seq-len",
        "32",
        "--threads",
        "1",
    ]
    code, text = run_cli(["experts", "prune", *common, "--keep", "3", "--by", "frequency", "--sample", "512",
                          "--out", str(tmp_path / "p")], capsys)  # fmt: skip
    assert code == 0, text
    assert MoETransformer.load(tmp_path / "p").cfg.moe.num_experts == 3
    assert (tmp_path / "p" / "tokenizer.json").is_file()
    code, text = run_cli(["experts", "sweep", *common, "--sizes", "4,2", "--sample", "512",
                          "--methods", "importance,index,merge", "--out", str(tmp_path / "s")], capsys)  # fmt: skip
    assert code == 0, text
    r = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert len(r["rows"]) == 6 and r["calibration_split"] != r["eval_split"]
    assert (tmp_path / "s" / "sweep.png").is_file()
    code, text = run_cli(
        ["experts", "similarity", *common, "--tokens", "256", "--out", str(tmp_path / "m")], capsys
    )
    assert code == 0, text
    assert json.loads((tmp_path / "m" / "similarity.json").read_text())["num_experts"] == 6
    code, text = run_cli(
        [
            "experts",
            "roles",
            *common,
            "--tokens",
            "600",
            "--tsne-points",
            "150",
            "--out",
            str(tmp_path / "m"),
        ],
        capsys,
    )
    assert code == 0, text
    roles = json.loads((tmp_path / "m" / "roles.json").read_text())
    assert sum(roles["tokens_per_class"]) > 100 and len(roles["share"][0]) == 2  # [class][layer][E]
    assert roles["tagger"].startswith(("Lingua", "heuristic"))
    code, text = run_cli(
        ["experts", "prune", *common, "--keep", "9", "--out", str(tmp_path / "q")], capsys
    )
    assert code == 2 and "keep" in text


def test_distill_cli(prepared: Path, model_dir: Path, tmp_path: Path, capsys) -> None:
    code, text = run_cli(["distill", "--teacher", str(model_dir), "--data", str(prepared), "--steps", "3",
                          "--batch-size", "2", "--seq-len", "32", "--sample", "512", "--threads", "1",
                          "--out", str(tmp_path / "d")], capsys)  # fmt: skip
    assert code == 0, text
    r = json.loads((tmp_path / "d" / "distill.json").read_text())
    assert r["tokens_trained"] == 3 * 2 * 32 and "surviving_share" in r
    code, text = run_cli(["distill", "--teacher", str(model_dir), "--student", "moe", "--data", str(prepared),
                          "--out", str(tmp_path / "d")], capsys)  # fmt: skip
    assert code == 2 and "--student" in text
