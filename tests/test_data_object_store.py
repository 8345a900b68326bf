"""The data layer on an object store (issue 16): `jaxlm data prepare` into s3://, prepared
shards read from s3:// through a local cache, and a run's tokenizer and token cache kept in
an s3:// workdir. A moto server stands in for S3 (the `s3_server` fixture)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import new_bucket, tiny_texts, write_corpus

from jaxlm import cli, paths
from jaxlm.config import load_config
from jaxlm.data import pipeline, text_cache
from jaxlm.data.dataset import prepare_corpus
from jaxlm.data.prepare import prepare
from jaxlm.data.shards import MANIFEST, open_prepared
from jaxlm.data.tokenizer import load_or_train_tokenizer, load_tokenizer, train_tokenizer
from jaxlm.errors import ConfigError


def _quiet(msg: str) -> None:
    pass


def _upload(local: Path, url: str) -> None:
    """Copy every file under `local` to the same names under `url`."""
    for p in sorted(local.rglob("*")):
        if p.is_file():
            paths.as_path(f"{url}/{p.relative_to(local).as_posix()}").write_bytes(p.read_bytes())


def _docs(ds) -> list[list[int]]:
    return [ds.document(i).tolist() for i in range(len(ds))]


@pytest.fixture
def remote_prepared(tmp_path, tiny_tok, s3_server):
    """A corpus prepared locally and the same one prepared from and into a bucket."""
    write_corpus(tmp_path / "in")
    bucket = new_bucket(s3_server)
    _upload(tmp_path / "in", f"{bucket}/in")
    tok_url = f"{bucket}/tok/tiny.model"
    paths.as_path(tok_url).write_bytes(Path(tiny_tok.path).read_bytes())
    kwargs = dict(shard_bytes=300, progress=False, log=_quiet)
    local = prepare([str(tmp_path / "in" / "*")], tiny_tok.path, tmp_path / "out", **kwargs)
    remote = prepare([f"{bucket}/in/*"], tok_url, f"{bucket}/out", **kwargs)
    return tmp_path / "out", f"{bucket}/out", local, remote


def test_prepare_into_s3_gives_the_shards_of_a_local_prepare(remote_prepared, tmp_path):
    local_dir, url, local, remote = remote_prepared
    assert remote["complete"] and len(remote["shards"]) > 2
    assert remote["shards"] == local["shards"]  # same cut, same text hashes, same counts
    assert remote["tokenizer"]["path"].startswith("s3://")
    assert [s["path"].rsplit("/", 1)[1] for s in remote["sources"]] == [
        Path(s["path"]).name for s in local["sources"]
    ]
    stored = {p.name for p in paths.as_path(url).iterdir()}
    named = {f"{s['name']}.{kind}.npy" for s in remote["shards"] for kind in ("tokens", "offsets")}
    assert stored == named | {MANIFEST}  # whole files only, no temporary names
    ds = open_prepared(url, cache_dir=tmp_path / "cache")
    assert _docs(ds) == _docs(open_prepared(local_dir))
    # A re-run finds every shard in the bucket and writes none again.
    again = prepare(
        [f"{url.rsplit('/', 1)[0]}/in/*"], remote["tokenizer"]["path"], url,
        shard_bytes=300, progress=False, log=_quiet,
    )  # fmt: skip
    assert again["_run"]["written"] == 0 and again["_run"]["reused"] == len(remote["shards"])


def test_cli_prepare_writes_to_a_bucket(tmp_path, tiny_tok, s3_server):
    (tmp_path / "a.txt").write_text("One small document.\n", encoding="utf-8")
    url = f"{new_bucket(s3_server)}/cli"
    argv = ["data", "prepare", "--input", str(tmp_path / "a.txt"), "--tokenizer", tiny_tok.path]
    assert cli.main([*argv, "--output", url, "--workers", "1", "--no-progress"]) == 0
    ds = open_prepared(url, cache_dir=tmp_path / "cache")
    assert tiny_tok.decode(ds.document(0)) == "One small document.\n"


def test_remote_shards_are_copied_once_into_the_cache_dir(remote_prepared, tmp_path):
    local_dir, url, _, _ = remote_prepared
    cache = tmp_path / "cache"
    ds = open_prepared(url, cache_dir=cache)
    expected = _docs(open_prepared(local_dir))
    assert _docs(ds) == expected
    copies = sorted(cache.rglob("*.npy"))
    assert len(copies) == 2 * len(ds.manifest["shards"])
    stamps = {p: p.stat().st_mtime_ns for p in copies}
    # A Grain worker gets the source pickled: it reopens by URL and reads the same copies.
    clone = pickle.loads(pickle.dumps(ds))
    assert _docs(clone) == expected
    assert {p: p.stat().st_mtime_ns for p in sorted(cache.rglob("*.npy"))} == stamps


def test_a_run_reads_prepared_sources_from_a_bucket_through_data_cache_dir(
    remote_prepared, tmp_path
):
    _, url, _, _ = remote_prepared
    cache = tmp_path / "run-cache"
    cfg = load_config(
        None,
        [
            f"data.sources=[{{path: '{url}', weight: 1.0}}]",
            f"data.cache_dir={cache}",
            "model.vocab_size=400",
            "data.validation_fraction=0.2",
            "train.batch_size=4",
            "data.seq_len=16",
        ],
    )
    c = prepare_corpus(cfg, tmp_path / "run")
    assert c.tokenizer.path.startswith("s3://")
    assert len(c.train_docs) + len(c.val_docs) > 0 and c.train_docs[0][0] == c.tokenizer.bos_id
    assert list(cache.rglob("*.npy"))


def test_remote_directory_without_manifest_is_a_config_error(tmp_path, s3_server):
    bucket = new_bucket(s3_server)
    paths.as_path(f"{bucket}/half/shard-00000.tokens.npy").write_bytes(b"not trusted")
    with pytest.raises(ConfigError, match="manifest.json"):
        open_prepared(f"{bucket}/half", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        open_prepared("s3://jaxlm-no-such-bucket/data", cache_dir=tmp_path)


def test_tokenizer_trained_into_and_loaded_from_s3(s3_server):
    url = f"{new_bucket(s3_server)}/run/tokenizer.model"
    tok = train_tokenizer(tiny_texts(), url, vocab_size=400)
    assert tok.path == url and paths.as_path(url[: -len(".model")] + ".vocab").is_file()
    loaded = load_tokenizer(url)
    assert loaded.sha256 == tok.sha256 and loaded.vocab_size == 400
    text = "Sing of swords and light.\n"
    assert loaded.encode(text) == tok.encode(text) and loaded.decode(loaded.encode(text)) == text

    def refuse():
        raise AssertionError("trained again although the bucket holds the tokenizer")

    assert load_or_train_tokenizer(None, url, refuse, 400).sha256 == tok.sha256


def test_text_run_keeps_tokenizer_and_token_cache_in_an_s3_workdir(
    tmp_path, s3_server, monkeypatch
):
    bucket = new_bucket(s3_server)
    for i, text in enumerate(tiny_texts()):
        paths.as_path(f"{bucket}/corpus/w{i}.txt").write_text(text, encoding="utf-8")
    cfg = load_config(
        None,
        [
            f"data.corpus={bucket}/corpus/*.txt",
            f"data.cache_dir={tmp_path / 'cache'}",
            "model.vocab_size=400",
            "data.doc_chars=300",
            "data.validation_fraction=0.3",
            "train.batch_size=4",
            "data.seq_len=16",
        ],
    )
    workdir = f"{bucket}/run"
    first = prepare_corpus(cfg, workdir)
    assert first.tokenizer.path == f"{workdir}/tokenizer.model"
    assert paths.as_path(f"{workdir}/tokenizer.model").is_file()
    assert len(list(paths.as_path(f"{workdir}/tokens").iterdir())) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized although the bucket holds the token ids")

    monkeypatch.setattr(text_cache, "tokenize_documents", refuse)
    monkeypatch.setattr(pipeline, "tokenize_documents", refuse)
    again = prepare_corpus(cfg, workdir)
    assert again.tokenizer.sha256 == first.tokenizer.sha256
    for a, b in ((again.train_docs, first.train_docs), (again.val_docs, first.val_docs)):
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
