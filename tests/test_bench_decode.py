"""`jaxlm bench decode`: cached and recomputed decoding, same tokens, one table row each."""

import json

from jaxlm import cli


def test_bench_decode_compares_cache_and_recompute(tmp_path, capsys):
    out = tmp_path / "decode.json"
    model = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.vocab_size=320"]
    argv = ["bench", "decode", *model, "--prompt-lens", "4", "--new-tokens", "6", "--iters", "1"]
    assert cli.main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in rows] == ["cache", "recompute"]
    assert all(r["same_tokens"] and r["tokens_per_s"] > 0 for r in rows)
    assert "| llama | recompute |" in capsys.readouterr().out
