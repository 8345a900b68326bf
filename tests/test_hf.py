"""Hugging Face interop: logits parity with transformers, exact round trips, tokenizers.

Models are tiny and random-initialised inside the test (no download); tokenizers are
trained on a few lines of text here too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="Hugging Face parity tests need torch (pip install -e '.[test]')"
)
transformers = pytest.importorskip(
    "transformers", reason="Hugging Face parity tests need transformers (pip install -e '.[test]')"
)

from jaxlm.cli import main  # noqa: E402
from jaxlm.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from jaxlm.errors import ConfigError  # noqa: E402
from jaxlm.hf.convert import from_hf, to_hf  # noqa: E402
from jaxlm.models import build_model  # noqa: E402
from jaxlm.runs import load_run  # noqa: E402

VOCAB = 320  # embedding rows; the tokenizers below have 300 (HF pads embeddings like this)
TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
    "Über den Wolken muss die Freiheit wohl grenzenlos sein. Ça va très bien, merci!\n"
    "東京は日本の首都です。 Привет, как дела? 🙂 Numbers: 12345 67.89 and tabs\tand  spaces.\n"
)
STRINGS = [
    "Hello world",
    "  leading spaces and trailing  ",
    "naïve café – “quotes” — ½ ∑ 😀",
    "東京 Привет\nnew line\ttab",
    "",
    "<|endoftext|> is special",
]


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory) -> Path:
    """A GPT-2 style byte-level BPE tokenizer.json trained on TEXT."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT] * 4, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    (path.parent / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory) -> Path:
    """A jaxlm SentencePiece tokenizer.model (byte fallback, at most VOCAB pieces)."""
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    train_tokenizer([TEXT.splitlines()[0]] * 20, str(path), vocab_size=VOCAB)
    return path


def hf_model(kind: str, tie: bool | None = None, bias: bool = False):
    """A small random GPT2LMHeadModel or LlamaForCausalLM (float32, eval mode)."""
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
            eos_token_id=0, tie_word_embeddings=True if tie is None else tie,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(cfg).eval()
    else:
        cfg = transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=64,
            rms_norm_eps=1e-5, rope_theta=5000.0, tie_word_embeddings=bool(tie),
            attention_bias=bias, mlp_bias=bias, bos_token_id=2, eos_token_id=3,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norm scales start at 1 and biases at 0: make them matter
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_hf(model, directory: Path, tokenizer: Path, shard: bool = False) -> Path:
    kwargs = {"max_shard_size": "100KB"} if shard else {}
    model.save_pretrained(directory, **kwargs)
    for f in tokenizer.parent.iterdir():
        shutil.copyfile(f, directory / f.name)
    return directory


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def jax_logits(directory: Path, tokens: np.ndarray) -> np.ndarray:
    run = load_run(directory)
    model = build_model(run.cfg.model)
    return np.asarray(model.apply({"params": run.params}, jnp.asarray(tokens, jnp.int32)))


def assert_parity(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def tokens(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (2, 24))


@pytest.mark.parametrize(
    "kind,tie,bias,shard",
    [
        ("gpt2", True, True, False),
        ("gpt2", False, True, False),
        ("llama", False, False, False),
        ("llama", True, False, True),
        ("llama", False, True, False),
    ],
    ids=["gpt2", "gpt2-untied", "llama-untied", "llama-tied-sharded", "llama-bias"],
)
def test_from_hf_logits_match_transformers(tmp_path, bpe_file, kind, tie, bias, shard):
    model = hf_model(kind, tie, bias)
    src = save_hf(model, tmp_path / "hf", bpe_file, shard=shard)
    if shard:
        assert (src / "model.safetensors.index.json").is_file()
    from_hf(src, tmp_path / "jax")
    toks = tokens()
    assert_parity(jax_logits(tmp_path / "jax", toks), hf_logits(model, toks))
    cfg = load_run(tmp_path / "jax").cfg.model
    assert (cfg.family, cfg.vocab_size, cfg.tie_embeddings, cfg.bias) == (kind, VOCAB, tie, bias)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_to_hf_round_trip_is_identity(tmp_path, bpe_file, kind):
    model = hf_model(kind)
    from_hf(save_hf(model, tmp_path / "hf", bpe_file), tmp_path / "a")
    to_hf(tmp_path / "a", tmp_path / "hf2")
    from_hf(tmp_path / "hf2", tmp_path / "b")
    a, b = load_run(tmp_path / "a"), load_run(tmp_path / "b")
    assert a.cfg.model == b.cfg.model
    leaves_a, tree_a = jax.tree.flatten(a.params)
    leaves_b, tree_b = jax.tree.flatten(b.params)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert a.tokenizer.sha256 == b.tokenizer.sha256
    # transformers loads what to-hf wrote and computes the same logits as the original.
    cls = type(model)
    reloaded = cls.from_pretrained(tmp_path / "hf2").eval()
    toks = tokens(1)
    assert np.array_equal(hf_logits(reloaded, toks), hf_logits(model, toks))


def test_to_hf_unstacks_scanned_layers(tmp_path, bpe_file):
    """A model trained with model.scan_layers=true writes the same HF tensors."""
    import dataclasses

    import orbax.checkpoint as ocp
    from safetensors.numpy import load_file

    from jaxlm.config import to_yaml

    scan = pytest.importorskip("jaxlm.models.scan", reason="this jaxlm has no scan_layers")
    from_hf(save_hf(hf_model("llama"), tmp_path / "hf", bpe_file), tmp_path / "a")
    run = load_run(tmp_path / "a")
    scanned = shutil.copytree(
        tmp_path / "a", tmp_path / "s", ignore=shutil.ignore_patterns("params")
    )
    model = dataclasses.replace(run.cfg.model, scan_layers=True)
    (scanned / "config.yaml").write_text(to_yaml(dataclasses.replace(run.cfg, model=model)))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save((scanned / "params").absolute(), scan.stack_blocks(run.params, model.n_layers))
    to_hf(tmp_path / "a", tmp_path / "hf_a")
    to_hf(scanned, tmp_path / "hf_s")
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("hf_a", "hf_s"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_bfloat16_conversion_rounds_once(tmp_path, bpe_file):
    import ml_dtypes
    from safetensors import safe_open

    model = hf_model("llama")
    from_hf(save_hf(model, tmp_path / "hf", bpe_file), tmp_path / "bf16", dtype="bfloat16")
    params = load_run(tmp_path / "bf16").params
    want = model.model.embed_tokens.weight.detach().numpy().astype(ml_dtypes.bfloat16)
    assert np.array_equal(np.asarray(params["embed"]["embedding"]), want.astype(np.float32))
    to_hf(tmp_path / "bf16", tmp_path / "hf2", dtype="bfloat16")
    with safe_open(str(tmp_path / "hf2" / "model.safetensors"), framework="pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}  # noqa: SIM118


def test_gpt2_legacy_tensor_names_convert(tmp_path, bpe_file):
    """Original GPT-2 files: no `transformer.` prefix, plus causal-mask buffers."""
    from safetensors.numpy import load_file, save_file

    model = hf_model("gpt2")
    src = save_hf(model, tmp_path / "hf", bpe_file)
    tensors = load_file(src / "model.safetensors")
    legacy = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    legacy["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    save_file(legacy, str(src / "model.safetensors"), metadata={"format": "pt"})
    from_hf(src, tmp_path / "jax")
    toks = tokens()
    assert_parity(jax_logits(tmp_path / "jax", toks), hf_logits(model, toks))


def test_bpe_tokenizer_encodes_like_transformers(tmp_path, bpe_file):
    src = save_hf(hf_model("gpt2"), tmp_path / "hf", bpe_file)
    from_hf(src, tmp_path / "jax")
    ours = load_run(tmp_path / "jax").tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(src)
    for s in STRINGS:
        ids = ours.encode(s)
        assert ids == theirs(s)["input_ids"], s
        assert ours.decode(ids) == s.replace("<|endoftext|>", "")  # specials decode to nothing
    assert ours.encode_batch(STRINGS) == [theirs(s)["input_ids"] for s in STRINGS]
    assert ours.eos_id == ours.bos_id == theirs.eos_token_id
    assert ours.pad_id == -1  # GPT-2 names no padding token
    alone = tmp_path / "alone" / "tokenizer.json"  # no tokenizer_config.json beside it
    alone.parent.mkdir()
    shutil.copyfile(bpe_file, alone)
    assert (load_tokenizer(str(alone)).bos_id, load_tokenizer(str(alone)).eos_id) == (0, 0)
    assert ours.encode("hi", bos=True, eos=True) == [ours.bos_id, *ours.encode("hi"), ours.eos_id]
    # ... and the tokenizer to-hf writes back loads in transformers the same way.
    to_hf(tmp_path / "jax", tmp_path / "hf2")
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf2")
    assert [again(s)["input_ids"] for s in STRINGS] == [ours.encode(s) for s in STRINGS]
    assert again.eos_token_id == ours.eos_id


def test_sentencepiece_tokenizer_comes_along(tmp_path, spm_file):
    model = hf_model("llama")
    src = save_hf(model, tmp_path / "hf", spm_file)
    from_hf(src, tmp_path / "jax")
    run = load_run(tmp_path / "jax")
    spm = load_tokenizer(str(spm_file))
    assert run.tokenizer.sha256 == spm.sha256
    assert run.tokenizer.encode(STRINGS[2]) == spm.encode(STRINGS[2])
    to_hf(tmp_path / "jax", tmp_path / "hf2")
    assert (tmp_path / "hf2" / "tokenizer.model").read_bytes() == spm_file.read_bytes()
    hf_cfg = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"]) == (spm.bos_id, spm.eos_id)


def test_cli_eval_and_generate_match_transformers(tmp_path, bpe_file, capsys):
    """`jaxlm eval` scores and `jaxlm generate` continues exactly as transformers does."""
    from jaxlm.inference.scoring import read_documents

    model = hf_model("gpt2")
    src = save_hf(model, tmp_path / "hf", bpe_file)
    out = tmp_path / "jax"
    assert main(["convert", "from-hf", str(src), "--output", str(out)]) == 0
    theirs = transformers.AutoTokenizer.from_pretrained(src)

    text = tmp_path / "eval.txt"
    text.write_text("Über den Wolken, the lazy dog.\n\nPack my box: 東京 🙂\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--data", str(text), "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    nats = n = 0.0
    eos = theirs.eos_token_id  # GPT-2 begins and ends a document with <|endoftext|>
    for doc in read_documents(text, load_run(out).cfg.data.doc_chars):
        ids = torch.tensor([[eos, *theirs(doc)["input_ids"], eos]])
        with torch.no_grad():
            loss = model(ids, labels=ids).loss.item()
        nats, n = nats + loss * (ids.shape[1] - 1), n + ids.shape[1] - 1
    assert result["tokens"] == n
    assert abs(result["loss"] - nats / n) <= 1e-4

    prompt, gen = "The quick brown", tmp_path / "gen.jsonl"
    args = ["generate", "--checkpoint", str(out), "--prompt", prompt, "--output", str(gen)]
    assert main([*args, "--max-new-tokens", "8", "--temperature", "0"]) == 0
    ours = json.loads(gen.read_text().splitlines()[0])["text"]
    ids = torch.tensor([[eos, *theirs(prompt)["input_ids"]]])
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=eos)
    assert ours == theirs.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
    assert prompt + ours in capsys.readouterr().out


@pytest.mark.parametrize(
    "edit,field",
    [
        ({"model_type": "bert"}, "model_type"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 32}, "head_dim"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, bpe_file, edit, field):
    src = save_hf(hf_model("llama"), tmp_path / "hf", bpe_file)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(ConfigError, match=field):
        from_hf(src, tmp_path / "jax")
    assert not (tmp_path / "jax").exists()


def test_missing_files_are_refused(tmp_path, bpe_file, capsys):
    src = save_hf(hf_model("gpt2"), tmp_path / "hf", bpe_file)
    (src / "tokenizer.json").unlink()
    assert main(["convert", "from-hf", str(src), "-o", str(tmp_path / "jax")]) == 2
    assert "tokenizer" in capsys.readouterr().err
    (src / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="model.safetensors"):
        from_hf(src, tmp_path / "jax", tokenizer=str(bpe_file))
    assert not (tmp_path / "jax").exists()
    assert not list(tmp_path.glob(".jax.*"))  # no half-written output left behind
