"""The model commands on s3:// (a moto S3 server on 127.0.0.1, the `s3_server` fixture): eval
and generate with data, checkpoints and outputs in a bucket, convert to-hf / from-hf through
a bucket, LM and classifier fine-tuning from (and into) a bucket, and one-sentence errors for
a bucket that is not there."""

from __future__ import annotations

import json
import os

import boto3
import pytest
from conftest import MEMORISED_TEXT, assert_one_sentence, cli_error, new_bucket

from jaxlm import cli
from jaxlm.paths import as_path
from jaxlm.runs import export_params

EVAL = ["eval", "--no-progress", "--batch-size", "2"]


def _json_out(argv: list[str], capsys) -> dict:
    capsys.readouterr()
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _loss(checkpoint, data, capsys) -> dict:
    """The eval result of one --data file."""
    (res,) = _json_out([*EVAL, "--checkpoint", str(checkpoint), "--data", str(data)], capsys)[
        "results"
    ]
    return res


def _keys(url: str) -> list[str]:
    """The object names under a bucket folder, relative to it."""
    bucket, _, prefix = url[len("s3://") :].partition("/")
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    return sorted(o["Key"][len(prefix) + 1 :] for o in listed)


@pytest.fixture(scope="module")
def bucket_export(s3_server, pretrained) -> str:
    """A bucket holding an export of the `pretrained` run under export/."""
    bucket = new_bucket(s3_server)
    export_params(pretrained, f"{bucket}/export")
    return bucket


def test_eval_reads_data_and_checkpoints_in_a_bucket(pretrained, bucket_export, tmp_path, capsys):
    # The same text as a .txt file, as JSONL and prepared, here and in the bucket.
    text, docs = tmp_path / "val.txt", tmp_path / "docs.jsonl"
    text.write_text(MEMORISED_TEXT, encoding="utf-8")
    lines = [json.dumps({"text": t}) + "\n" for t in MEMORISED_TEXT.split("\n\n") if t]
    docs.write_text("".join(lines), encoding="utf-8")
    data = f"{bucket_export}/data"
    as_path(f"{data}/val.txt").write_text(MEMORISED_TEXT, encoding="utf-8")
    as_path(f"{data}/docs.jsonl").write_text("".join(lines), encoding="utf-8")
    argv = ["data", "prepare", "--input", str(docs), "--no-progress", "--output", f"{data}/prep"]
    assert cli.main([*argv, "--tokenizer", str(pretrained / "tokenizer.model")]) == 0

    argv = [*EVAL, "--checkpoint", str(pretrained), "--data"]
    here = _json_out([*argv, str(text), str(docs)], capsys)["results"]
    remote = [f"{data}/val.txt", f"{data}/docs.jsonl", f"{data}/prep"]
    there = _json_out([*argv, *remote], capsys)["results"]
    assert [r["data"] for r in there] == remote
    for a, b in zip(here + here[1:], there, strict=True):
        assert a["documents"] == b["documents"]
        for key in ("tokens", "loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), key

    # A float32 export in the bucket scores exactly like the run it came from; the report
    # goes into the bucket too.
    report = f"{data}/eval.json"
    argv = [*EVAL, "--checkpoint", f"{bucket_export}/export", "--data", remote[0], "-o", report]
    assert cli.main(argv) == 0
    (res,) = json.loads(as_path(report).read_text())["results"]
    assert res["loss"] == pytest.approx(here[0]["loss"], rel=1e-6)


def test_generate_from_a_bucket_checkpoint_into_a_bucket(bucket_export, capsys):
    out = f"{bucket_export}/samples.jsonl"
    argv = ["generate", "--checkpoint", f"{bucket_export}/export", "--prompt", "The"]
    assert cli.main([*argv, "--max-new-tokens", "4", "--temperature", "0", "-o", out]) == 0
    (record,) = [json.loads(line) for line in as_path(out).read_text().splitlines()]
    assert record["prompt"] == "The" and record["text"]


def test_convert_round_trips_through_a_bucket(pretrained, s3_server, tmp_path, capsys):
    bucket = new_bucket(s3_server)
    hf = f"{bucket}/hf"
    # Shards of about 20 kB: several safetensors files and their index, each put whole.
    argv = ["convert", "to-hf", str(pretrained), "--output", hf, "--max-shard-gb", "0.00002"]
    info = _json_out(argv, capsys)
    keys = _keys(hf)
    n = info["safetensors_files"]
    assert n > 1
    shards = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert keys == sorted(
        ["config.json", "model.safetensors.index.json", "tokenizer.model"]
        + ["tokenizer_config.json", *shards]
    )
    assert json.loads(as_path(f"{hf}/config.json").read_text())["vocab_size"] == 512

    # from-hf reads the bucket's shards and writes an export back into the bucket, which
    # scores like the original run.
    back = f"{bucket}/back"
    assert cli.main(["convert", "from-hf", hf, "--output", back]) == 0
    assert "export.json" in _keys(back)
    data = tmp_path / "val.txt"
    data.write_text(MEMORISED_TEXT, encoding="utf-8")
    expected = _loss(pretrained, data, capsys)["loss"]
    assert _loss(back, data, capsys)["loss"] == pytest.approx(expected, rel=1e-5)


def test_lm_finetune_starts_from_a_bucket(bucket_export, tmp_path):
    # train.init_from stays the URL (no local absolute path is made of it).
    src = f"{bucket_export}/export"
    out = tmp_path / "ft"
    argv = ["finetune", "lm", "--checkpoint", src, "-w", str(out), "--no-progress"]
    argv += ["train.steps=1", "train.eval_every=0", "train.sample_tokens=0"]
    argv += ["checkpoint.every_steps=0", "optimizer.warmup_steps=0", "train.batch_size=4"]
    assert cli.main(argv) == 0
    saved = (out / "config.yaml").read_text()
    assert f"init_from: {src}" in saved and f"{src}/tokenizer.model" in saved


def test_classifier_trains_from_and_into_a_bucket(bucket_export, tmp_path, capsys):
    src = f"{bucket_export}/export"
    rows = [(f"the {w} king", "pos") for w in ("good", "great", "fine", "fair")]
    rows += [(f"the {w} king", "neg") for w in ("bad", "poor", "sad", "vile")]
    train = tmp_path / "train.tsv"
    train.write_text("".join(f"{t}\t{y}\n" for t, y in rows * 4), encoding="utf-8")
    clf = f"{bucket_export}/clf"
    argv = ["finetune", "classify", "--checkpoint", src, "-w", clf, "--train", str(train)]
    assert cli.main([*argv, "--epochs", "1", "--batch-size", "8", "--max-len", "8"]) == 0
    keys = _keys(clf)
    assert {"classifier.json", "metrics.json", "tokenizer.model"} <= set(keys)
    assert any(k.startswith("classifier/") for k in keys)
    assert json.loads(as_path(f"{clf}/classifier.json").read_text())["source"] == src
    texts = tmp_path / "texts.txt"
    texts.write_text("the good king\nthe bad king\n", encoding="utf-8")
    capsys.readouterr()
    assert cli.main(["finetune", "predict", "-w", clf, "--input", str(texts)]) == 0
    preds = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(preds) == 2 and all(p["label"] in ("pos", "neg") for p in preds)


def test_a_missing_bucket_is_one_sentence(s3_server, pretrained, tmp_path, capsys):
    missing = "s3://no-such-bucket/run"
    for argv in (
        ["eval", "--checkpoint", missing],
        ["generate", "--checkpoint", missing],
        ["eval", "--checkpoint", str(pretrained), "--data", "s3://no-such-bucket/val.txt"],
        ["convert", "to-hf", str(pretrained), "--output", "s3://no-such-bucket/hf"],
        ["convert", "from-hf", "s3://no-such-bucket/hf", "--output", str(tmp_path / "x")],
        ["finetune", "lm", "--checkpoint", missing, "-w", str(tmp_path / "ft")],
    ):
        err = cli_error(argv, capsys)
        assert "no-such-bucket" in err and "Traceback" not in err, argv
        assert_one_sentence(err.split(": error: ", 1)[1])
    # A bucket that exists, holding no such file.
    bucket = new_bucket(s3_server)
    err = cli_error([*EVAL, "-w", str(pretrained), "--data", f"{bucket}/nope.txt"], capsys)
    assert "does not exist" in err
    err = cli_error(["eval", "--checkpoint", f"{bucket}/run"], capsys)
    assert f"{bucket}/run" in err
