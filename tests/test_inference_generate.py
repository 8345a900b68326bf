"""Decoding (jaxlm.inference.generate): KV cache / carried state vs recomputing, batched left
padding, sampling filters (top-k, top-p, no-repeat n-grams), seeds, and the `jaxlm generate`
command. Stop strings and streaming, which the command does, are in test_cli.py."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAMILIES, assert_one_sentence, cli_error, init_params, resolved_model

from jaxlm import cli
from jaxlm.config import ModelConfig
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.errors import ConfigError
from jaxlm.inference.generate import Sampling, decode, filter_logits, new_token_limits
from jaxlm.models import build_model

V = 64


def tiny_cfg(family: str) -> ModelConfig:
    # An untied head keeps greedy output off the input token.
    kw = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=48, init_std=0.3)
    return resolved_model(family, untied=True, **kw)


def prompts(seed: int, lengths) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, V, n).tolist() for n in lengths]


@functools.cache
def forward_fn(cfg: ModelConfig):
    model = build_model(cfg)
    return jax.jit(lambda p, t: model.apply({"params": p}, t))


def full_logits(cfg, params, seq: list[int]) -> np.ndarray:
    """Logits_SxV of one sequence from the plain (non-decoding) model.

    Causality lets a zero-padded row of max_seq_len stand in for it: one compile per model.
    """
    row = np.zeros((1, cfg.max_seq_len), np.int32)
    row[0, : len(seq)] = seq
    return np.asarray(forward_fn(cfg)(params, jnp.asarray(row)))[0, : len(seq)]


# --- cache == recompute, batched == alone ----------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_equals_recompute_and_batched_equals_alone(family):
    cfg, n_new = tiny_cfg(family), 10
    params = init_params(cfg, 8)
    ps = prompts(1, (3, 7))  # different lengths: the short one is left-padded by 4 more
    cached = decode(cfg, params, ps, n_new)
    recomputed = decode(cfg, params, ps, n_new, use_cache=False)
    np.testing.assert_array_equal(cached, recomputed)
    for b, p in enumerate(ps):
        alone = decode(cfg, params, [p], n_new, chunk_size=4)  # chunks change nothing either
        np.testing.assert_array_equal(cached[b], alone[0])
    assert len(set(cached[0].tolist())) > 2, "a constant continuation would make this weak"
    # And against the plain model: the first new token is the argmax after each prompt.
    for b, p in enumerate(ps):
        assert cached[b, 0] == np.argmax(full_logits(cfg, params, p)[-1])


def test_sampled_rows_do_not_depend_on_their_batch():
    cfg = tiny_cfg("llama")
    params, sampling = init_params(cfg, 8), Sampling(temperature=1.0)
    ps = prompts(2, (4, 9, 6))
    batch = decode(cfg, params, ps, 8, sampling, seed=3)
    alone = decode(cfg, params, ps[1:2], 8, sampling, seed=3, row_ids=[1])
    np.testing.assert_array_equal(batch[1], alone[0])


# --- sampling filters ------------------------------------------------------------------------


def test_filter_logits_keeps_top_k_and_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.05, 0.3, 0.15]]))
    top2 = np.isfinite(filter_logits(logits, Sampling(temperature=1.0, top_k=2)))
    assert top2.tolist() == [[True, False, True, False]]
    # 0.5 < 0.7 so the second-likeliest token joins; 0.8 >= 0.7 stops before the third.
    nucleus = np.isfinite(filter_logits(logits, Sampling(temperature=1.0, top_p=0.7)))
    assert nucleus.tolist() == [[True, False, True, False]]
    only_best = np.isfinite(filter_logits(logits, Sampling(temperature=1.0, top_p=0.4)))
    assert only_best.tolist() == [[True, False, False, False]]


def _ranks(cfg, params, ps, out) -> list[int]:
    """Rank of each sampled token under its step's logits (0 = likeliest)."""
    ranks = []
    for p, row in zip(ps, out, strict=True):
        seq = list(p) + row.tolist()
        logits = full_logits(cfg, params, seq)
        for t in range(len(p), len(seq)):
            step = logits[t - 1]
            ranks.append(int(np.sum(step > step[seq[t]])))
    return ranks


def test_top_k_never_samples_outside_the_k_best():
    cfg, k = tiny_cfg("llama"), 3
    params = init_params(cfg, 8)
    ps = prompts(3, (5, 5, 5, 5))
    hot = Sampling(temperature=3.0, top_k=k)  # flat distribution: without top-k ranks spread
    ranks = _ranks(cfg, params, ps, decode(cfg, params, ps, 12, hot, seed=0))
    assert max(ranks) < k
    assert len(set(ranks)) == k, "every allowed rank should occur at this temperature"
    free = _ranks(cfg, params, ps, decode(cfg, params, ps, 12, Sampling(temperature=3.0), seed=0))
    assert max(free) >= k, "without top-k some samples fall outside: the check is not vacuous"


@pytest.mark.parametrize("n", [2, 3])
def test_no_repeat_ngram_size_never_repeats_an_ngram(n):
    cfg = tiny_cfg("gpt2")
    params = init_params(cfg, 8)
    ps = [[5, 6, 5, 6, 5], [1, 2, 3], [7] * 4, [9, 9, 8, 9, 9, 8]]  # prompts full of repeats

    def ngrams(seq):
        return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]

    for seed, temp in ((0, 0.0), (1, 1.0), (2, 1.0)):
        out = decode(
            cfg, params, ps, 20, Sampling(temperature=temp, no_repeat_ngram_size=n), seed=seed
        )
        for p, row in zip(ps, out, strict=True):
            seq = list(p) + row.tolist()
            new = ngrams(seq)[len(ngrams(p)) :]  # n-grams that end in a generated token
            seen = ngrams(seq)
            assert all(seen.count(g) == 1 for g in new), (seed, seq)
    # Without the ban the greedy model does repeat itself, so the property is not vacuous.
    free = decode(cfg, params, ps, 20, Sampling())
    repeats = [
        len(set(ngrams(list(p) + r.tolist()))) < len(ngrams(list(p) + r.tolist()))
        for p, r in zip(ps, free, strict=True)
    ]
    assert sum(repeats) >= 2


def test_same_seed_same_text_different_seed_different_text():
    cfg = tiny_cfg("llama")
    params, s = init_params(cfg, 8), Sampling(temperature=1.0, top_p=0.95)
    ps = prompts(4, (6,))
    a, b = decode(cfg, params, ps, 16, s, seed=7), decode(cfg, params, ps, 16, s, seed=7)
    c = decode(cfg, params, ps, 16, s, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# --- the command -----------------------------------------------------------------------------


def test_generate_streams_the_memorised_text_and_cuts_at_a_stop(memorised_run, capsys):
    capsys.readouterr()
    argv = [
        "generate",
        "--checkpoint",
        str(memorised_run),
        "--prompt",
        "The quick",
        "--temperature",
        "0",
    ]
    assert cli.main([*argv, "--max-new-tokens", "30"]) == 0
    assert capsys.readouterr().out.startswith("The quick brown fox jumps over")
    assert cli.main([*argv, "--max-new-tokens", "30", "--stop", " over"]) == 0
    assert capsys.readouterr().out == "The quick brown fox jumps\n"


def test_generate_batches_prompts_and_writes_json_lines(memorised_run, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("The quick\nA small bird\n")
    out = tmp_path / "out.jsonl"
    argv = ["generate", "-w", str(memorised_run), "--prompts-file", str(tmp_path / "p.txt")]
    argv += [
        "--num-return-sequences",
        "2",
        "--max-new-tokens",
        "12",
        "--top-k",
        "5",
        "-o",
        str(out),
    ]
    assert cli.main(argv) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt_index"], r["sample"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert records[0]["prompt"] == "The quick" and records[2]["prompt"] == "A small bird"
    assert all(r["text"] for r in records)
    assert "--- prompt 1, sample 1 ---" in capsys.readouterr().out


def test_generate_errors_are_one_line(memorised_run, tmp_path, capsys):
    err = cli_error(["generate", "--checkpoint", str(tmp_path / "nope")], capsys)
    assert "nope" in err
    err = cli_error(["generate", "-w", str(memorised_run), "--top-p", "0"], capsys)
    assert "--top-p" in err
    (tmp_path / "bad.jsonl").write_text('"fine"\n{"prompt": 3}\n')
    err = cli_error(
        ["generate", "-w", str(memorised_run), "--prompts-file", str(tmp_path / "bad.jsonl")],
        capsys,
    )
    assert "line 2" in err


# --- --max-length: the total length, the prompt's included ---------------------------------


def test_new_token_limits_from_max_length_and_their_errors():
    cfg = tiny_cfg("llama")  # max_seq_len 48
    assert new_token_limits(cfg, [3, 7], 10, None) == [10, 10]
    assert new_token_limits(cfg, [3, 7], None, 20) == [17, 13]
    assert new_token_limits(cfg, [5], 15, 20) == [15]  # both given and agreeing
    with pytest.raises(ConfigError, match="--max-length 49 exceeds model.max_seq_len=48") as e:
        new_token_limits(cfg, [3], None, 49)
    assert_one_sentence(str(e.value))
    with pytest.raises(ConfigError, match="no room after the 7-token prompt") as e:
        new_token_limits(cfg, [3, 7], None, 7)
    assert_one_sentence(str(e.value))
    with pytest.raises(ConfigError, match="--max-length 20 and --max-new-tokens 10 disagree") as e:
        new_token_limits(cfg, [5], 10, 20)
    assert_one_sentence(str(e.value))
    assert new_token_limits(tiny_cfg("lstm"), [3], None, 500) == [497]  # no length limit


def test_row_limits_cap_each_row_and_keep_long_prompts_whole():
    cfg = tiny_cfg("llama")
    params = init_params(cfg, 8)
    ps = prompts(3, (30, 4))  # max_length 40: 10 and 36 new tokens; the long prompt stays whole
    out = decode(cfg, params, ps, 36, row_limits=[10, 36])
    np.testing.assert_array_equal(out[0, :10], decode(cfg, params, ps[:1], 10)[0])
    np.testing.assert_array_equal(out[1], decode(cfg, params, ps[1:], 36)[0])


def test_generate_max_length_counts_the_prompt(memorised_run, capsys):
    tok = load_tokenizer(str(memorised_run / "tokenizer.model"))
    n_prompt = len(tok.encode("The quick", bos=True))
    argv = ["generate", "-w", str(memorised_run), "--prompt", "The quick", "--temperature", "0"]
    capsys.readouterr()
    assert cli.main([*argv, "--max-length", str(n_prompt + 6)]) == 0
    by_length = capsys.readouterr().out
    assert cli.main([*argv, "--max-new-tokens", "6"]) == 0
    assert by_length == capsys.readouterr().out
    assert by_length.startswith("The quick brown")
    both = [*argv, "--max-new-tokens", "6", "--max-length", str(n_prompt + 6)]
    assert cli.main(both) == 0 and capsys.readouterr().out == by_length


def test_generate_max_length_errors_are_one_line(memorised_run, capsys):
    argv = ["generate", "-w", str(memorised_run), "--prompt", "The quick"]
    err = cli_error([*argv, "--max-length", "65"], capsys)
    assert "--max-length 65 exceeds model.max_seq_len=64" in err
    err = cli_error([*argv, "--max-length", "2"], capsys)
    assert "--max-length 2 leaves no room" in err
    err = cli_error([*argv, "--max-length", "40", "--max-new-tokens", "40"], capsys)
    assert "disagree" in err and "give only one of them" in err
    err = cli_error([*argv, "--max-length", "0"], capsys)
    assert "--max-length 0 must be at least 1" in err
