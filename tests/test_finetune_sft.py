"""`jaxlm finetune sft`: chat records, the assistant-token mask, and learning to answer."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_one_sentence, cli_error

from jaxlm import cli
from jaxlm.data import chat, pipeline
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.errors import ConfigError
from jaxlm.finetune.sft import chat_prompts
from jaxlm.inference.generate import Sampling, cut_at_eos, decode
from jaxlm.runs import load_run
from jaxlm.train.loss import cross_entropy_sums

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who art thou?"},
    {"role": "assistant", "content": "A friend."},
    {"role": "user", "content": "And then?"},
    {"role": "assistant", "content": "Farewell."},
]

# The synthetic task: "NAME, THING?" -> the thing's colour. Held-out questions pair every
# thing with names it was never asked with, so only the thing decides the answer.
COLOURS = {
    "fire": "red", "blood": "red", "sea": "blue", "sky": "blue",
    "grass": "green", "leaf": "green", "milk": "white", "snow": "white",
}  # fmt: skip
NAMES = ["Anna", "Tom", "Kate", "John", "Mary", "Paul", "Ruth", "Hal", "Jack", "Lucy"]
CHANCE = 1 / len(set(COLOURS.values()))  # guessing among the four colours
THRESHOLD = 0.75  # measured: 1.0 after 100 steps (2 vCPU CPU, about 15 s of training)


def _qa(thing: str, name: str) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": f"{name}, {thing}?"},
        {"role": "assistant", "content": COLOURS[thing]},
    ]


def _split() -> tuple[list, list]:
    train, held_out = [], []
    for i, thing in enumerate(COLOURS):
        for j, name in enumerate(NAMES):
            (held_out if (i + j) % 4 == 0 else train).append(_qa(thing, name))
    return train, held_out


def _write_jsonl(path, conversations) -> str:
    lines = [json.dumps({"messages": m}) for m in conversations]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tok(pretrained):
    return load_tokenizer(str(pretrained / "tokenizer.model"))


# --- (1) the mask ----------------------------------------------------------------------------


def test_default_template_masks_only_assistant_tokens(tok):
    template = chat.DefaultTemplate()
    ids, mask = template.encode(CONVERSATION, tok)
    assert ids[0] == tok.bos_id and len(ids) == len(mask)
    # The masked tokens are exactly the assistant contents, each followed by eos.
    answers = [
        tok.encode(m["content"]) + [tok.eos_id] for m in CONVERSATION if m["role"] == "assistant"
    ]
    spans, span = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            span.append(i)
        elif span:
            spans, span = [*spans, span], []
    spans += [span] if span else []
    assert spans == answers
    # Rendered as text, everything unmasked is the system/user turns and role markers.
    unmasked = tok.decode([i for i, m in zip(ids, mask, strict=True) if not m])
    assert "Be brief." in unmasked and "Who art thou?" in unmasked
    assert "A friend" not in unmasked and "Farewell" not in unmasked
    # The generation prompt is the training rendering up to the assistant's first token.
    prompt, _ = template.encode(CONVERSATION[:2], tok, add_generation_prompt=True)
    assert ids[: len(prompt)] == prompt and mask[len(prompt)] == 1


def _batch(docs, seq_len=64, batch_size=2):
    return pipeline.make_eval_batches(docs, seq_len, batch_size)[0]


def test_weights_gradient_and_loss_see_only_assistant_targets(tok):
    template = chat.DefaultTemplate()
    docs = [chat.encode_conversation(CONVERSATION, tok, template), chat.encode_conversation(
        _qa("sea", "Tom"), tok, template)]  # fmt: skip
    batch = _batch(docs)
    w = batch["weights"]
    # weights on target positions = the mask of the target token; packing keeps segments.
    flat_ids = np.concatenate([d["ids"][1:] for d in docs])
    flat_mask = np.concatenate([d["mask"][1:] for d in docs])
    n = len(flat_ids)
    assert n <= w.size
    np.testing.assert_array_equal(batch["targets"].reshape(-1)[:n], flat_ids)
    np.testing.assert_array_equal(w.reshape(-1)[:n], flat_mask)
    assert w.reshape(-1)[n:].sum() == 0  # padding
    assert set(np.unique(w)) == {0.0, 1.0}

    logits = jax.random.normal(jax.random.PRNGKey(0), (*batch["targets"].shape, tok.vocab_size))

    def mean_loss(lg):
        ce, _, total = cross_entropy_sums(lg, jnp.asarray(batch["targets"]), jnp.asarray(w))
        return ce / total

    loss, grad = jax.value_and_grad(mean_loss)(logits)
    masked = np.asarray(w) == 0
    assert np.all(np.asarray(grad)[masked] == 0.0)  # exactly: no gradient from prompt tokens
    assert np.all(np.abs(np.asarray(grad)[~masked]).sum(-1) > 0)
    # By hand: the mean over assistant targets of -log softmax(logits)[target].
    lg = np.asarray(logits, np.float64)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    expected = -picked[~masked].mean()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)

    # Changing a user turn changes neither the assistant-token weights nor the loss there.
    changed = [dict(m) for m in CONVERSATION]
    changed[1]["content"] = "Who goes there, friend?"
    doc2 = chat.encode_conversation(changed, tok, template)
    assert doc2["mask"].sum() == docs[0]["mask"].sum()
    shift = len(doc2["ids"]) - len(docs[0]["ids"])
    user_end = len(template.encode(changed[:2], tok)[0])
    assert not doc2["mask"][:user_end].any()
    np.testing.assert_array_equal(doc2["ids"][user_end:], docs[0]["ids"][user_end - shift :])


def test_train_iterator_carries_the_mask_and_pretraining_is_unchanged(tok):
    template = chat.DefaultTemplate()
    docs = [chat.encode_conversation(_qa(t, n), tok, template) for t in COLOURS for n in NAMES]
    it = pipeline.make_train_iterator(docs, 32, 4, seed=0)
    batch = next(it)
    assert set(batch) == set(pipeline.BATCH_KEYS)
    assert 0 < batch["weights"].sum() < (batch["segment_ids"] > 0).sum()
    # Every weighted target is a colour token or eos.
    allowed = {tok.eos_id} | {i for c in COLOURS.values() for i in tok.encode(c)}
    assert set(batch["targets"][batch["weights"] > 0].tolist()) <= allowed
    # Plain token documents still weigh every real target.
    plain = [d["ids"] for d in docs]
    pb = next(pipeline.make_train_iterator(plain, 32, 4, seed=0))
    np.testing.assert_array_equal(pb["weights"], (pb["segment_ids"] > 0).astype(np.float32))


def test_jinja_template_finds_assistant_spans(tok):
    source = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    template = chat.JinjaTemplate(source, {"bos_token": "", "eos_token": " END"})
    segs = template.segments(CONVERSATION)
    assert [t for t, target in segs if target] == ["A friend. END", "Farewell. END"]
    assert "".join(t for t, _ in segs) == template.render(CONVERSATION, False)
    ids, mask = template.encode(CONVERSATION, tok)
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]).count("END") == 2
    prompt = template.segments(CONVERSATION[:2], add_generation_prompt=True)
    assert "".join(t for t, _ in prompt).endswith("[assistant] ")


def test_hf_tokenizer_directory_chat_template_is_used(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
                "eos_token": "</s>",
            }
        )  # fmt: skip
    )
    assert isinstance(chat.load_template(str(tmp_path / "tokenizer.json")), chat.JinjaTemplate)
    assert isinstance(chat.load_template(str(tmp_path / "tokenizer.model")), chat.DefaultTemplate)


# --- (2) end to end --------------------------------------------------------------------------


def _accuracy(run, conversations) -> float:
    prompts = chat_prompts(run, [m[:1] for m in conversations])
    rows = decode(run.cfg.model, run.params, prompts, 4, Sampling())
    replies = [run.tokenizer.decode(cut_at_eos(r, run.tokenizer.eos_id)).strip() for r in rows]
    return float(
        np.mean([r == m[1]["content"] for r, m in zip(replies, conversations, strict=True)])
    )


def test_sft_learns_to_answer_held_out_questions(pretrained, tmp_path):
    train, held_out = _split()
    train_file = _write_jsonl(tmp_path / "train.jsonl", train)
    val_file = _write_jsonl(tmp_path / "val.jsonl", held_out)
    workdir = tmp_path / "sft"
    steps = 100
    argv = [
        "finetune", "sft", "--checkpoint", str(pretrained), "--train", train_file,
        "--validation", val_file, "-w", str(workdir), "--no-progress",
        f"train.steps={steps}", "train.batch_size=16", f"train.log_every={steps}",
        f"train.eval_every={steps}", "train.eval_batches=0", "optimizer.lr=1e-2",
        "optimizer.warmup_steps=10", "checkpoint.every_steps=0",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    records = map(json.loads, open(workdir / "metrics.jsonl"))
    evals = [r for r in records if r["split"] == "eval"]
    # Validation loss counts assistant tokens only: 20 answers of 2-3 tokens plus eos.
    assert [e["tokens"] for e in evals] == [80.0, 80.0]
    assert evals[-1]["loss"] < 0.2 * evals[0]["loss"]
    before = _accuracy(load_run(pretrained), held_out)
    accuracy = _accuracy(load_run(workdir), held_out)
    print(f"held-out greedy accuracy {before:.2f} -> {accuracy:.2f} (chance {CHANCE:.2f})")
    assert before < CHANCE and accuracy >= THRESHOLD, (before, accuracy)


# --- (3) bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record, says",
    [
        ({"text": "hello"}, "neither 'messages' nor 'prompt'/'completion'"),
        ({"messages": [{"role": "narrator", "content": "x"}]}, "unknown role 'narrator'"),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": " "},
                ]
            },
            "empty assistant turn",
        ),
        ({"prompt": "hi"}, "both 'prompt' and 'completion'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ],
)
def test_bad_records_are_one_sentence_naming_file_and_line(
    pretrained, tmp_path, capsys, record, says
):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "hi", "completion": "hello"})
    path.write_text(f"{good}\n\n{json.dumps(record)}\n")
    argv = ["finetune", "sft", "--checkpoint", str(pretrained), "--train", str(path)]
    err = cli_error([*argv, "-w", str(tmp_path / "out")], capsys)
    assert says in err and f"'{path}' line 3" in err, err
    assert_one_sentence(err.split("error: ", 1)[1])
    assert not (tmp_path / "out").exists()


def test_bad_json_and_missing_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{not json\n')
    with pytest.raises(ConfigError, match="line 2 is not valid JSON"):
        chat.read_records(str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        chat.read_records(str(tmp_path / "missing.jsonl"))
