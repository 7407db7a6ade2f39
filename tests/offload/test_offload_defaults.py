"""`moelab offload simulate` with its default cache sizes works on every shape moelab builds:
percentages are raised to top_k experts per layer (one token's experts); counts below refused."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from moelab.cli import main
from moelab.errors import ConfigError
from moelab.offload.cache import parse_capacity
from moelab.trace.schema import NO_EXPERT, TraceMeta
from moelab.trace.store import TraceStore, TraceWriter
from moelab.trace.store import write_trace as write_store


def run(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """Run the real entry point (moelab.cli.main); (exit code, stdout + stderr)."""
    monkeypatch.setattr(sys, "argv", ["moelab", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    cap = capsys.readouterr()
    return (0 if exc.value.code is None else int(exc.value.code)), cap.out + cap.err


def write_trace(path, num_layers: int, num_experts: int, top_k: int, n: int = 300, seed: int = 0):
    """A store of n tokens whose routing picks top_k distinct experts per layer."""
    rng = np.random.default_rng(seed)
    ids = np.stack(
        [
            np.stack([rng.permutation(num_experts)[:top_k] for _ in range(num_layers)])
            for _ in range(n)
        ]
    ).astype(np.int64)
    meta = TraceMeta(num_layers=num_layers, num_experts=num_experts, top_k=top_k, domains=["x"])
    w = TraceWriter(path, meta, logits=False)
    w.append(
        doc_id=np.repeat(np.arange(3), n // 3),
        position=np.tile(np.arange(n // 3), 3).astype(np.int32),
        token_id=rng.integers(0, 50, n).astype(np.int32),
        domain=np.zeros(n, np.int16),
        is_bos=np.tile(np.arange(n // 3) == 0, 3),
        expert_ids=ids,
        weights=np.full(ids.shape, 1.0 / top_k, np.float16),
    )
    w.close()
    return path


@pytest.mark.parametrize(("E", "k"), [(4, 2), (2, 2), (8, 2), (4, 1), (16, 4)])
def test_defaults_work_on_small_models(tmp_path, capsys, monkeypatch, E: int, k: int) -> None:
    store = write_trace(tmp_path / "t", 2, E, k)
    out = tmp_path / "sim"
    code, output = run(
        ["offload", "simulate", "--trace", str(store), "--out", str(out)], capsys, monkeypatch
    )
    assert code == 0, output
    res = json.loads((out / "offload_sim.json").read_text())
    caps = {r["capacity"] for rows in res["curves"].values() for r in rows}
    assert min(caps) >= k and max(caps) <= E
    assert {"lru", "lfu", "belady"} <= set(res["curves"])
    if round(0.1 * E) < k:
        assert f"note: cache 10% of {E} experts is fewer than top_k={k}" in output


def test_parse_capacity_minimum_is_top_k() -> None:
    assert parse_capacity("10%", 2, 4, top_k=2) == 2  # 0.4 experts -> one token's 2 experts
    assert parse_capacity("50%", 2, 4, top_k=2) == 2
    assert parse_capacity("100%", 2, 4, top_k=2) == 4
    assert parse_capacity("25%", 4, 8) == 2  # without top_k: as before
    with pytest.raises(ConfigError, match="1 experts per layer cannot hold one token's top_k=2"):
        parse_capacity("1", 2, 4, top_k=2)
    with pytest.raises(ConfigError, match="give a count >= 1"):
        parse_capacity(0, 2, 4)


def test_explicit_count_below_top_k_is_a_clear_cli_error(tmp_path, capsys, monkeypatch) -> None:
    store = write_trace(tmp_path / "t", 2, 4, 2)
    out = tmp_path / "sim"
    code, output = run(
        ["offload", "simulate", "--trace", str(store), "--cache", "1,2", "--out", str(out)],
        capsys,
        monkeypatch,
    )
    assert code == 2 and "Traceback" not in output
    assert "capacity '1': 1 experts per layer cannot hold one token's top_k=2" in output
    assert not out.exists()


def test_capacity_dropped_slots_load_nothing(tmp_path, capsys, monkeypatch) -> None:
    tr = TraceStore.open(write_trace(tmp_path / "t", 2, 8, 2, n=300, seed=3)).load()
    dropped = np.random.default_rng(1).random(tr.expert_ids.shape) < 0.3
    flagged = tr.select(np.arange(tr.num_tokens))
    flagged.dropped = dropped
    gone = tr.select(np.arange(tr.num_tokens))
    gone.expert_ids = np.where(dropped, NO_EXPERT, tr.expert_ids)
    np.testing.assert_array_equal(flagged.computed_expert_ids(), gone.expert_ids)
    curves = {}
    for name, t in (("flagged", flagged), ("gone", gone), ("intended", tr)):
        write_store(t, tmp_path / name, logits=False)
        code, output = run(["offload", "simulate", "--trace", str(tmp_path / name), "--cache",
                            "2,4", "--policies", "lru,lfu", "--out", str(tmp_path / f"o{name}")],
                           capsys, monkeypatch)  # fmt: skip
        assert code == 0, output
        curves[name] = json.loads((tmp_path / f"o{name}" / "offload_sim.json").read_text())[
            "curves"
        ]
    # a dropped slot's expert (kept in expert_ids as the router's choice) never ran: not loaded
    assert curves["flagged"] == curves["gone"] != curves["intended"]
