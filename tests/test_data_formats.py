"""Columnar and record inputs of `jaxlm data prepare` (jaxlm.data.formats, jaxlm.data.filters):
Parquet, ArrayRecord and Hugging Face dataset directories, the document filters, bad inputs in
one sentence, and a training run on prepared Parquet that stops and resumes bit for bit."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import pytest
from conftest import TINY_TRAIN, assert_one_sentence, cli_error, paragraph

from jaxlm import cli
from jaxlm.data.filters import make_filter
from jaxlm.data.prepare import prepare
from jaxlm.data.shards import open_prepared
from jaxlm.data.tokenizer import load_tokenizer, train_tokenizer
from jaxlm.errors import ConfigError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
array_record_module = pytest.importorskip("array_record.python.array_record_module")

LANGS = ("en", "de", "fr")


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> str:
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("tok") / "spm.model"
    train_tokenizer([paragraph(rng, 30) for _ in range(50)], str(path), vocab_size=320)
    return str(path)


def _rows(n: int, seed: int = 0) -> list[dict]:
    """Rows with a text, a language (every third one is English) and a non-text column."""
    rng = random.Random(seed)
    return [
        {"id": i, "lang": LANGS[i % 3], "text": f"Row {i}. " + paragraph(rng, 3 + i % 7)}
        for i in range(n)
    ]


def _texts(directory: Path, tok_path: str) -> list[str]:
    ds = open_prepared(directory)
    tok = load_tokenizer(tok_path)
    return [tok.decode(ds.document(i)) for i in range(len(ds))]


def _prepare(inputs: list[Path | str], tok_path: str, out: Path, **kwargs) -> dict:
    kwargs.setdefault("shard_bytes", 400)
    return prepare(
        [str(p) for p in inputs], tok_path, out, progress=False, log=lambda m: None, **kwargs
    )


def _argv(inputs: list[Path], tok_path: str, out: Path, *extra: str) -> list[str]:
    files = [str(p) for p in inputs]
    return ["data", "prepare", "--input", *files, "--tokenizer", tok_path, "--output", str(out)]


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 4, text: str = "text"):
    table = pa.table(
        {
            "id": [r["id"] for r in rows],
            "lang": [r["lang"] for r in rows],
            text: [r["text"] for r in rows],
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)


def write_array_record(path: Path, records: list[bytes]) -> None:
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:2")
    for r in records:
        writer.write(r)
    writer.close()


# --- formats ----------------------------------------------------------------------------------


def test_parquet_row_groups_text_column_and_filters_through_the_cli(tmp_path, tok_path, capsys):
    rows = _rows(30)
    rows[3]["text"] = "Hi."  # English but short: dropped by --min-chars
    write_parquet(tmp_path / "a.parquet", rows, text="body")
    assert pq.ParquetFile(tmp_path / "a.parquet").num_row_groups == 8
    argv = _argv([tmp_path / "a.parquet"], tok_path, tmp_path / "out")
    extra = ["--text-column", "body", "--where", "lang=en", "--min-chars", "10", "--no-progress"]
    assert cli.main([*argv, *extra, "--workers", "1", "--shard-mb", "0.0001"]) == 0
    wanted = [r["text"] for r in rows if r["lang"] == "en" and len(r["text"]) >= 10]
    assert _texts(tmp_path / "out", tok_path) == wanted
    manifest = open_prepared(tmp_path / "out").manifest
    assert manifest["skipped"]["filtered_out"] == 20 and manifest["skipped"]["too_short"] == 1
    assert manifest["settings"]["where"] == ["lang=en"] and len(manifest["shards"]) > 1
    assert "skipped 20 filtered out item(s) (first: " in capsys.readouterr().err
    # Other filters for the same directory mean other shards: refused, like another tokenizer.
    other = make_filter(10, None, ["lang=de"])
    with pytest.raises(ConfigError, match="where"):
        _prepare([tmp_path / "a.parquet"], tok_path, tmp_path / "out", text_field="body",
                 shard_bytes=104, doc_filter=other)  # fmt: skip


def test_parquet_is_read_a_row_group_at_a_time(tmp_path):
    from jaxlm.data.filters import NO_FILTER
    from jaxlm.data.formats import parquet_documents
    from jaxlm.data.sources import SkipCounts

    texts = [f"{i:05d} " + "x" * 4000 for i in range(4096)]  # 16 MB in 16 row groups
    pq.write_table(pa.table({"text": texts}), tmp_path / "big.parquet", row_group_size=256,
                   compression="none")  # fmt: skip
    before = pa.total_allocated_bytes()
    peak, count = 0, 0
    for text in parquet_documents(str(tmp_path / "big.parquet"), "text", NO_FILTER, SkipCounts()):
        peak = max(peak, pa.total_allocated_bytes() - before)
        count += text == texts[count]
    assert count == len(texts)
    # pyarrow's default pre-buffering held the whole 16 MB here.
    assert peak < 8 << 20, f"{peak / 2**20:.1f} MB held by Arrow while reading"


def test_length_bounds_and_alternative_values(tmp_path, tok_path):
    rows = _rows(12)
    write_parquet(tmp_path / "a.parquet", rows)
    doc_filter = make_filter(20, 60, ["lang=en", "lang=fr", "id=4", "id=5", "id=9"])
    manifest = _prepare([tmp_path / "a.parquet"], tok_path, tmp_path / "out", doc_filter=doc_filter)
    # Numbers compare in their JSON spelling; several values of one field are alternatives.
    picked = [r for r in rows if r["lang"] in ("en", "fr") and r["id"] in (4, 5, 9)]
    wanted = [r["text"] for r in picked if 20 <= len(r["text"]) <= 60]
    assert wanted and _texts(tmp_path / "out", tok_path) == wanted
    skipped = manifest["skipped"]
    assert skipped["too_short"] + skipped["too_long"] == len(picked) - len(wanted)


def test_array_record_text_and_json_records(tmp_path, tok_path):
    texts = [paragraph(random.Random(i), 6) for i in range(5)]
    write_array_record(tmp_path / "plain.array_record", [t.encode() for t in texts])
    rows = _rows(6)
    records = [json.dumps(r).encode() for r in rows]
    records += [b"{not json", json.dumps({"lang": "en", "body": "no text"}).encode(), b""]
    write_array_record(tmp_path / "rec.array_record-00000-of-00001", records)
    manifest = _prepare(
        [tmp_path / "plain.array_record", tmp_path / "rec.array_record-00000-of-00001"],
        tok_path,
        tmp_path / "out",
    )
    assert _texts(tmp_path / "out", tok_path) == texts + [r["text"] for r in rows]
    assert manifest["skipped"]["bad_json"] == 2  # the broken record and the empty one
    assert manifest["skipped"]["missing_field"] == 1
    # JSON records filter by field.
    doc_filter = make_filter(where=["lang=de"])
    _prepare(
        [tmp_path / "rec.array_record-00000-of-00001"], tok_path, tmp_path / "de",
        doc_filter=doc_filter,
    )  # fmt: skip
    assert _texts(tmp_path / "de", tok_path) == [r["text"] for r in rows if r["lang"] == "de"]


def test_hugging_face_dataset_directory_and_arrow_files(tmp_path, tok_path):
    rows = _rows(14)
    ds_dir = tmp_path / "hf"
    ds_dir.mkdir()
    names = [f"data-{i:05d}-of-00002.arrow" for i in range(2)]
    for name, part in zip(names, (rows[:9], rows[9:]), strict=True):
        table = pa.table({"text": [r["text"] for r in part], "lang": [r["lang"] for r in part]})
        with pa.ipc.new_stream(ds_dir / name, table.schema) as writer:  # as save_to_disk does
            for batch in table.to_batches(max_chunksize=4):
                writer.write_batch(batch)
    state = {"_data_files": [{"filename": n} for n in names], "_split": "train"}
    (ds_dir / "state.json").write_text(json.dumps(state))
    (ds_dir / "dataset_info.json").write_text(json.dumps({"features": {}}))
    # An Arrow IPC *file* (random-access format) is read as well.
    extra = pa.table({"text": ["Zz file format row one.", "Zz file format row two."]})
    with pa.ipc.new_file(tmp_path / "z.arrow", extra.schema) as writer:
        writer.write_table(extra)
    manifest = _prepare([ds_dir, tmp_path / "z.arrow"], tok_path, tmp_path / "out")
    wanted = [r["text"] for r in rows] + extra.column("text").to_pylist()
    assert _texts(tmp_path / "out", tok_path) == wanted
    assert [Path(s["path"]).name for s in manifest["sources"]] == [*names, "z.arrow"]
    _prepare([ds_dir], tok_path, tmp_path / "en", doc_filter=make_filter(where=["lang=en"]))
    assert _texts(tmp_path / "en", tok_path) == [r["text"] for r in rows if r["lang"] == "en"]
    # A DatasetDict directory holds several splits: the user picks one.
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(ConfigError, match="train, test"):
        _prepare([tmp_path / "dd"], tok_path, tmp_path / "o")


def test_parquet_dataset_directory_and_array_record_from_a_bucket(
    tmp_path, tok_path, s3_server, monkeypatch
):
    from conftest import new_bucket

    from jaxlm import paths

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # ArrayRecord's local copy
    local = tmp_path / "in"
    (local / "hf").mkdir(parents=True)
    write_parquet(local / "a.parquet", _rows(9))
    table = pa.table({"text": [r["text"] for r in _rows(5, seed=1)]})
    with pa.ipc.new_stream(local / "hf" / "data-00000-of-00001.arrow", table.schema) as w:
        w.write_table(table)
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}
    (local / "hf" / "state.json").write_text(json.dumps(state))
    write_array_record(local / "c.array_record", [b"Record one.", b"Record two."])
    bucket = new_bucket(s3_server)
    for f in ("a.parquet", "hf/data-00000-of-00001.arrow", "hf/state.json", "c.array_record"):
        paths.copy_file(local / f, f"{bucket}/in/{f}")
    names = ["a.parquet", "hf", "c.array_record"]
    _prepare([local / n for n in names], tok_path, tmp_path / "local")
    _prepare([f"{bucket}/in/{n}" for n in names], tok_path, tmp_path / "remote")
    texts = _texts(tmp_path / "local", tok_path)
    assert len(texts) == 9 + 5 + 2 and _texts(tmp_path / "remote", tok_path) == texts


# --- bad inputs -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    write_parquet(root / "ok.parquet", _rows(6))
    pq.write_table(pa.table({"text": [1, 2, 3]}), root / "ints.parquet")
    (root / "corrupt.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 4)
    (root / "corrupt.arrow").write_bytes(b"\xff\xff\xff\xff" + bytes(range(200)))
    (root / "corrupt.array_record").write_bytes(b"garbage " * 64)
    write_array_record(root / "protos.array_record", [b"\x0a\x80\xff\xfe", b"\x12\xc3\x28"])
    (root / "plain.txt").write_text("Some text.\n")
    return {p.name: p for p in root.iterdir()}


@pytest.mark.parametrize(
    "name, extra, words",
    [
        ("ok.parquet", ["--text-column", "body"], ["ok.parquet", "'body'", "--text-column"]),
        ("ints.parquet", [], ["ints.parquet", "int64", "--text-column"]),
        ("ok.parquet", ["--where", "language=en"], ["ok.parquet", "language", "--where"]),
        ("corrupt.parquet", [], ["corrupt.parquet", "Parquet", "fix or remove"]),
        ("corrupt.arrow", [], ["corrupt.arrow", "Arrow", "fix or remove"]),
        ("corrupt.array_record", [], ["corrupt.array_record", "ArrayRecord"]),
        ("protos.array_record", [], ["protos.array_record", "UTF-8"]),
        ("plain.txt", ["--where", "lang=en"], ["plain.txt", "--where"]),
        ("ok.parquet", ["--min-chars", "9", "--max-chars", "3"], ["--min-chars 9"]),
        ("ok.parquet", ["--where", "lang"], ["--where 'lang'", "KEY=VALUE"]),
    ],
)
def test_bad_input_is_one_sentence_naming_file_and_fix(name, extra, words, bad, tok_path, capsys):
    argv = [*_argv([bad[name]], tok_path, bad[name].parent / "out"), "--no-progress", *extra]
    line = cli_error([*argv, "--workers", "1"], capsys)
    assert_one_sentence(line.split("error: ", 1)[1])
    for word in words:
        assert word in line, line


def test_missing_pyarrow_names_the_extra(bad, tok_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` raises ImportError
    # Checked before any shard is written, though the Parquet file sorts after a text file
    # big enough for a shard of its own.
    (tmp_path / "a.txt").write_text("A text file that is read first.\n")
    shutil.copy(bad["ok.parquet"], tmp_path / "b.parquet")
    argv = _argv([tmp_path / "a.txt", tmp_path / "b.parquet"], tok_path, tmp_path / "out")
    line = cli_error([*argv, "--no-progress", "--workers", "1", "--shard-mb", "1e-5"], capsys)
    assert 'pip install "jaxlm[parquet]"' in line and "b.parquet" in line
    assert_one_sentence(line.split("error: ", 1)[1])
    assert not (tmp_path / "out" / "manifest.json").exists()


# --- end to end: prepared Parquet in a training run -------------------------------------------


def test_train_on_prepared_parquet_and_array_record_stops_and_resumes_bit_for_bit(
    tmp_path, tok_path, capsys
):
    rng = random.Random(7)
    rows = [{"id": i, "lang": "en", "text": paragraph(rng, 40)} for i in range(60)]
    write_parquet(tmp_path / "c.parquet", rows, row_group_size=16)
    records = [json.dumps({"text": paragraph(rng, 40)}).encode() for _ in range(20)]
    write_array_record(tmp_path / "d.array_record", records)
    inputs = [tmp_path / "c.parquet", tmp_path / "d.array_record"]
    _prepare(inputs, tok_path, tmp_path / "data", shard_bytes=2000)
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert sum(s["documents"] for s in manifest["shards"]) == 80  # both files' documents
    base = [*TINY_TRAIN, "model.vocab_size=320", f"data.corpus={tmp_path / 'data'}"]

    def train(workdir: Path) -> dict:
        capsys.readouterr()
        argv = ["train", "-w", str(workdir), "--no-progress", *base, "train.steps=4"]
        assert cli.main(argv) == 0, capsys.readouterr().err[-2000:]
        return json.loads(capsys.readouterr().err.strip().splitlines()[-1])

    def losses(workdir: Path) -> dict[int, tuple[float, float]]:
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        rows = [r for r in map(json.loads, lines) if r["split"] == "train"]
        assert len({r["step"] for r in rows}) == len(rows), "a step logged twice"
        return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows}

    train(tmp_path / "whole")
    whole = losses(tmp_path / "whole")
    assert sorted(whole) == [1, 2, 3, 4]
    # A run killed after its step-2 checkpoint: the same command resumes it from there (one
    # compile less than stopping a run for real; test_train_loop.py kills real processes).
    shutil.copytree(tmp_path / "whole", tmp_path / "killed")
    shutil.rmtree(tmp_path / "killed" / "checkpoints" / "4")
    assert train(tmp_path / "killed")["start_step"] == 2
    assert losses(tmp_path / "killed") == whole
