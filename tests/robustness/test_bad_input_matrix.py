"""Bad-input matrix: every `moelab` command against missing, empty, garbage and wrong-format
inputs, out-of-range numeric options and mismatched model/store/predictor. Each case must end
with exit code 2, one `error:` line naming what was wrong (no traceback) and nothing left
half-written in the output folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moelab.cli import main

sys.path.insert(0, str(Path(__file__).parent.parent / "trace"))

GARBAGE = bytes(range(256)) * 4


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The real entry point (moelab.cli.main: MoelabError -> one line, exit 2)."""
    old = sys.argv
    sys.argv = ["moelab", *args]
    try:
        with pytest.raises(SystemExit) as exc:
            main()
    finally:
        sys.argv = old
    cap = capsys.readouterr()
    code = exc.value.code
    return (0 if code is None else int(code) if isinstance(code, int) else 1), cap.out + cap.err


def assert_refused(code: int, output: str, out: Path | None, *needles: str) -> None:
    assert code == 2, output
    assert "Traceback" not in output, output
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("error:") or "Error" in ln or "Invalid" in ln]
    assert errs, output
    for n in needles:  # the option as a flag (--top-k) or as its parameter (top_k=)
        flat = output.lower()
        assert n.lower() in flat or n.lstrip("-").replace("-", "_") in flat, (n, output)
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.rglob("*"))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny inputs: a model, a trace of it, a second model's trace, a predictor, bad files."""
    from trace_testutil import build_moelab

    from moelab.data import train_tokenizer

    tmp = tmp_path_factory.mktemp("matrix")
    words = "alpha beta gamma delta router expert token layer mixture gate sparse dense".split()
    rows = [
        {"id": i, "domain": ["a", "b"][i % 2], "text": " ".join(words[i % 7 :] + words) * 2}
        for i in range(12)
    ]
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in rows))
    ckpt = build_moelab(tmp)
    train_tokenizer([r["text"] for r in rows], vocab_size=290, out_path=ckpt / "tokenizer.json")
    other = build_moelab(tmp / "other", seed=1)
    (other / "tokenizer.json").write_bytes((ckpt / "tokenizer.json").read_bytes())
    paths = {"corpus": corpus, "model": ckpt, "other_model": other}
    for name, model in (("store", ckpt), ("other_store", other)):
        code = _quiet_main(
            [
                "trace",
                "--model",
                str(model),
                "--corpus",
                str(corpus),
                "--split",
                "all",
                "--max-tokens",
                "400",
                "--seq-len",
                "32",
                "--out",
                str(tmp / name),
            ]
        )
        assert code == 0
        paths[name] = tmp / name
    pred = tmp / "pred"
    assert _quiet_main(["predict", "fit", "--train", str(paths["store"]), "--out", str(pred)]) == 0
    paths["predictor"] = pred
    (tmp / "empty.bin").write_bytes(b"")
    (tmp / "garbage.bin").write_bytes(GARBAGE)
    (tmp / "list.json").write_text("[1, 2, 3]")
    (tmp / "empty_dir").mkdir()
    garbage_dir = tmp / "garbage_dir"
    garbage_dir.mkdir()
    for f in ("meta.json", "config.json", "predictor.json", "model.safetensors", "tokenizer.json"):
        (garbage_dir / f).write_bytes(GARBAGE)
    json_dir = tmp / "json_dir"
    json_dir.mkdir()
    for f in ("meta.json", "config.json", "predictor.json", "tokenizer.json"):
        (json_dir / f).write_text("[1, 2, 3]")
    (json_dir / "model.safetensors").write_text('{"not": "safetensors"}')
    paths.update(
        empty=tmp / "empty.bin",
        garbage=tmp / "garbage.bin",
        list_json=tmp / "list.json",
        empty_dir=tmp / "empty_dir",
        garbage_dir=garbage_dir,
        json_dir=json_dir,
        missing=tmp / "does-not-exist",
        tmp=tmp,
    )
    return paths


def _quiet_main(args: list[str]) -> int:
    old = sys.argv
    sys.argv = ["moelab", *args]
    try:
        main()
    except SystemExit as exc:
        return 0 if exc.code is None else int(exc.code)
    finally:
        sys.argv = old
    return 0


BAD = ["missing", "empty", "garbage", "list_json", "empty_dir", "garbage_dir", "json_dir"]

# command line with {bad} where the bad path goes and {out} for a fresh output folder
PATH_COMMANDS = {
    "trace-verify": ["trace-verify", "{bad}"],
    "trace-export": ["trace-export", "{bad}", "--out", "{out}"],
    "analyze": ["analyze", "{bad}", "--out", "{out}", "--no-figures"],
    "predict-fit": ["predict", "fit", "--train", "{bad}", "--out", "{out}"],
    "predict-eval-model": ["predict", "eval", "--model", "{bad}", "--trace", "{store}"],
    "predict-eval-trace": ["predict", "eval", "--model", "{predictor}", "--trace", "{bad}"],
    "predict-compare": ["predict", "compare", "--train", "{bad}", "--out", "{out}"],
    "offload-simulate": ["offload", "simulate", "--trace", "{bad}", "--out", "{out}"],
    "topics": ["topics", "{bad}", "--out", "{out}"],
    "export": ["export", "{bad}", "{out}"],
    "trace-model": ["trace", "--model", "{bad}", "--corpus", "{corpus}", "--out", "{out}"],
    "trace-corpus": ["trace", "--model", "{model}", "--corpus", "{bad}", "--out", "{out}"],
    "generate": ["generate", "--model", "{bad}", "--prompt", "hi"],
    "calc-config": ["calc", "--config", "{bad}"],
    "moefy": ["moefy", "--model", "{bad}", "--out", "{out}"],
    "upcycle": ["upcycle", "--model", "{bad}", "--out", "{out}"],
    "analyze-compare": ["analyze", "{store}", "--out", "{out}", "--compare", "{bad}"],
    "analyze-tokenizer": ["analyze", "{store}", "--out", "{out}", "--tokenizer", "{bad}"],
    "trace-tokenizer": [
        "trace",
        "--model",
        "{model}",
        "--corpus",
        "{corpus}",
        "--tokenizer",
        "{bad}",
        "--out",
        "{out}",
    ],
    "offload-static-from": [
        "offload",
        "simulate",
        "--trace",
        "{store}",
        "--static-from",
        "{bad}",
        "--out",
        "{out}",
    ],
    "offload-predictor": [
        "offload",
        "simulate",
        "--trace",
        "{store}",
        "--predictor",
        "{bad}",
        "--out",
        "{out}",
    ],
    "predict-compare-test": [
        "predict",
        "compare",
        "--train",
        "{store}",
        "--test",
        "{bad}",
        "--out",
        "{out}",
    ],
}


def fill(template: list[str], world: dict[str, Path], bad: Path, out: Path) -> list[str]:
    subs = {k: str(v) for k, v in world.items()} | {"bad": str(bad), "out": str(out)}
    return [a.format(**subs) for a in template]


@pytest.mark.parametrize("kind", BAD)
@pytest.mark.parametrize("command", sorted(PATH_COMMANDS))
def test_bad_path(command: str, kind: str, world, capsys, tmp_path: Path) -> None:
    if kind == "json_dir" and command == "trace-corpus":
        pytest.skip("a folder of .json files is a valid corpus of code/text documents")
    out = tmp_path / "out"
    code, output = run_cli(fill(PATH_COMMANDS[command], world, world[kind], out), capsys)
    assert_refused(code, output, out)


# numeric options: (command template, option, predicate of a bad value, what the error names)
NUMERIC = {
    "layers-demo --tokens": (["layers-demo", "--tokens", "{v}"], lambda v: v < 1),
    "layers-demo --experts": (["layers-demo", "--experts", "{v}"], lambda v: v < 1),
    "layers-demo --top-k": (["layers-demo", "--top-k", "{v}"], lambda v: v < 1),
    "calc --seq-len": (["calc", "--preset", "mixtral-8x7b", "--seq-len", "{v}"], lambda v: v < 1),
    "calc --memory-gb": (
        ["calc", "--preset", "mixtral-8x7b", "--memory-gb", "{v}"],
        lambda v: v <= 0,
    ),
    "trace --max-tokens": (
        [
            "trace",
            "--model",
            "{model}",
            "--corpus",
            "{corpus}",
            "--max-tokens",
            "{v}",
            "--out",
            "{out}",
        ],
        lambda v: v < 1,
    ),
    "predict fit --holdout": (
        ["predict", "fit", "--train", "{store}", "--holdout", "{v}", "--out", "{out}"],
        lambda v: not 0 < v < 1,
    ),
    "predict compare --epochs": (
        ["predict", "compare", "--train", "{store}", "--epochs", "{v}", "--out", "{out}"],
        lambda v: v < 1,
    ),
    "predict compare --holdout": (
        ["predict", "compare", "--train", "{store}", "--holdout", "{v}", "--out", "{out}"],
        lambda v: not 0 < v < 1,
    ),
    "trace --seq-len": (
        [
            "trace",
            "--model",
            "{model}",
            "--corpus",
            "{corpus}",
            "--seq-len",
            "{v}",
            "--out",
            "{out}",
        ],
        lambda v: v < 1,
    ),
    "trace --batch-size": (
        [
            "trace",
            "--model",
            "{model}",
            "--corpus",
            "{corpus}",
            "--batch-size",
            "{v}",
            "--out",
            "{out}",
        ],
        lambda v: v < 1,
    ),
    "offload simulate --expert-bytes": (
        ["offload", "simulate", "--trace", "{store}", "--expert-bytes", "{v}", "--out", "{out}"],
        lambda v: v < 1,
    ),
    "offload simulate --cache": (
        ["offload", "simulate", "--trace", "{store}", "--cache", "{v}", "--out", "{out}"],
        lambda v: v < 1,
    ),
    "moefy --experts": (
        ["moefy", "--model", "{model}", "--out", "{out}", "--experts", "{v}"],
        lambda v: v < 1,
    ),
    "upcycle --experts": (
        ["upcycle", "--model", "{model}", "--out", "{out}", "--experts", "{v}"],
        lambda v: v < 1,
    ),
    "analyze --n": (["analyze", "{store}", "--out", "{out}", "--n", "{v}"], lambda v: v < 1),
    "analyze --max-points": (
        ["analyze", "{store}", "--out", "{out}", "--max-points", "{v}"],
        lambda v: v < 1,
    ),
}
BAD_INTS = st.one_of(st.integers(-(10**12), 0), st.just(-1), st.just(0))


@pytest.mark.parametrize("name", sorted(NUMERIC))
@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(value=BAD_INTS)
def test_bad_number(name: str, value: int, world, capsys, tmp_path_factory) -> None:
    template, is_bad = NUMERIC[name]
    if "holdout" in name or "memory-gb" in name:
        value = float(value)
    assert is_bad(value)
    out = tmp_path_factory.mktemp("num") / "out"
    args = [
        a.format(**({k: str(v) for k, v in world.items()} | {"v": str(value), "out": str(out)}))
        for a in template
    ]
    code, output = run_cli(args, capsys)
    assert_refused(code, output, out, name.split()[-1])


@pytest.mark.parametrize(
    "template",
    [
        ["predict", "eval", "--model", "{predictor}", "--test", "{other_store}"],
        ["predict", "compare", "--train", "{store}", "--test", "{other_store}", "--out", "{out}"],
        [
            "offload",
            "simulate",
            "--trace",
            "{other_store}",
            "--predictor",
            "{predictor}",
            "--out",
            "{out}",
        ],
        [
            "offload",
            "simulate",
            "--trace",
            "{store}",
            "--predictor",
            "{empty_dir}",
            "--out",
            "{out}",
        ],
        [
            "trace",
            "--model",
            "{other_model}",
            "--corpus",
            "{corpus}",
            "--split",
            "all",
            "--out",
            "{store}",
        ],
    ],
    ids=[
        "eval-other-trace",
        "compare-other-test",
        "simulate-predictor-of-other-model",
        "simulate-bad-predictor",
        "resume-other-model",
    ],
)
def test_mismatch(template: list[str], world, capsys, tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = sorted(p.name for p in world["store"].rglob("*"))
    code, output = run_cli(fill(template, world, world["missing"], out), capsys)
    assert_refused(code, output, out)
    assert sorted(p.name for p in world["store"].rglob("*")) == before


@pytest.mark.parametrize("kind", ["garbage", "empty_dir", "empty"])
def test_train_config_unreadable(kind: str, world, capsys) -> None:
    code, output = run_cli(["train", "--config", str(world[kind])], capsys)
    assert_refused(code, output, None, "config")


def test_layers_demo_top_k_above_experts(capsys) -> None:
    code, output = run_cli(["layers-demo", "--experts", "4", "--top-k", "5"], capsys)
    assert_refused(code, output, None, "--top-k", "--experts")
