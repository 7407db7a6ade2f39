"""prepare_data measures bytes/token per domain and warns when a tokenizer barely covers a
domain's script (issue 14)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from moelab.data import prepare_data


def test_low_bytes_per_token_domain_is_warned(tmp_path: Path, capsys) -> None:
    rng = random.Random(0)
    en = "the expert router sends every token to two experts of the layer".split()
    ru = [chr(c) for c in range(0x0430, 0x0450)]  # Cyrillic letters
    rows = []
    for i in range(30):
        if i % 3:
            rows.append({"id": i, "domain": "en", "text": " ".join(rng.choices(en, k=80))})
        else:  # rare, varied Cyrillic: the tiny BPE learns few merges for it
            text = " ".join("".join(rng.choices(ru, k=rng.randint(3, 9))) for _ in range(40))
            rows.append({"id": i, "domain": "ru", "text": text})
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    prepared = prepare_data(str(corpus), tmp_path / "data", vocab_size=300)
    info = json.loads((tmp_path / "data" / "data.json").read_text())
    bpt = info["bytes_per_token"]
    assert bpt["ru"] < 1.5 < bpt["en"], bpt
    assert len(info["tokenizer_warnings"]) == 1 and "'ru'" in info["tokenizer_warnings"][0]
    err = capsys.readouterr().err
    assert "warning:" in err and "bytes/token" in err and "vocab" in err
    assert prepared.info["bytes_per_token"] == bpt
