"""jaxlm.train.resume: which config changes block a resume or `train.init_from` (architecture
must match, runtime may change), the rewind of metrics.jsonl, unit checks and tiny real runs."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from conftest import RUNTIME_FIELDS, TINY_TRAIN, cli_error, tiny_run_config

from jaxlm import cli
from jaxlm.config import architecture_fields, load_config, to_dict
from jaxlm.errors import ConfigError
from jaxlm.finetune.lm import check_same_model
from jaxlm.train.resume import changed_settings, check_resumable, rewind_metrics

TINY = TINY_TRAIN


# --- unit checks of the rules ----------------------------------------------------------------


def test_field_newer_than_the_checkpoint_does_not_block_resume():
    cfg = load_config(None, [])
    saved = to_dict(cfg)
    del saved["model"]["rnn_residual"]  # as written by a jaxlm that had no such field
    check_resumable(saved, cfg, Path("run"))


def test_changed_model_field_is_named():
    cfg = load_config(None, [])
    saved = to_dict(load_config(None, ["model.d_model=128"]))
    with pytest.raises(ConfigError, match=r"model\.d_model=256 .*\(128\)"):
        check_resumable(saved, cfg, Path("run"))


@pytest.mark.parametrize("name", sorted(set(architecture_fields())))
def test_every_architecture_change_is_refused_by_resume_and_init_from(name):
    cfg = load_config(None, [])
    saved = to_dict(cfg)
    saved["model"][name] = "the checkpoint's"
    with pytest.raises(ConfigError, match=rf"^model\.{name}=.*\(\"the checkpoint's\"\)"):
        check_resumable(saved, cfg, Path("run"))
    old = dataclasses.replace(cfg.model, **{name: "the checkpoint's"})
    with pytest.raises(ConfigError, match=rf"^model\.{name}=.*\(\"the checkpoint's\"\)"):
        check_same_model(cfg.model, old, "src")


@pytest.mark.parametrize(
    "name", sorted(RUNTIME_FIELDS - {"scan_layers", "lora_rank", "lora_targets"})
)
def test_runtime_changes_resume_and_are_listed(name):
    cfg = load_config(None, [])
    saved = to_dict(cfg)
    saved["model"][name] = "the checkpoint's"
    check_resumable(saved, cfg, Path("run"))
    new = getattr(cfg.model, name)
    assert changed_settings(saved, cfg) == [f'model.{name}: "the checkpoint\'s" -> {new!r}']
    check_same_model(cfg.model, dataclasses.replace(cfg.model, **{name: "x"}), "src")


def test_scan_layers_is_refused_by_resume_saying_why_but_not_by_init_from():
    cfg = load_config(None, ["model.scan_layers=true"])
    saved = to_dict(load_config(None, []))
    with pytest.raises(ConfigError, match=r"model\.scan_layers=True .*restack.*init_from=run"):
        check_resumable(saved, cfg, Path("run"))
    check_same_model(cfg.model, load_config(None, []).model, "src")


def test_changed_batch_size_is_refused_but_steps_are_not():
    cfg = load_config(None, ["train.steps=2000"])
    check_resumable(to_dict(load_config(None, [])), cfg, Path("run"))
    with pytest.raises(ConfigError, match="train.batch_size"):
        check_resumable(to_dict(load_config(None, ["train.batch_size=64"])), cfg, Path("run"))


# --- metrics and the list of changes -------------------------------------------------------


def test_rewind_metrics_drops_later_and_torn_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "split": sp} for s in range(6) for sp in ("train", "perf")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "spl')
    assert rewind_metrics(path, 3) == 5
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [
        0, 0, 1, 1, 2, 2, 3, 3
    ]  # fmt: skip
    assert rewind_metrics(path, 3) == 0
    assert rewind_metrics(path, -1) == 8 and path.read_text() == ""
    assert rewind_metrics(tmp_path / "absent.jsonl", 0) == 0


def test_harmless_changes_are_listed_and_shape_changes_refused(tmp_path):
    cfg = tiny_run_config()
    saved = dataclasses.asdict(cfg)
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=400, log_every=5))
    check_resumable(saved, longer, tmp_path)
    assert changed_settings(saved, longer) == [
        "train.steps: 200 -> 400",
        "train.log_every: 10 -> 5",
    ]
    wider = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=64))
    with pytest.raises(ConfigError, match="model.d_model=64"):
        check_resumable(saved, wider, tmp_path)


# --- real runs: resume and init_from ---------------------------------------------------------


def _records(workdir: Path, split: str) -> dict[int, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r.get("loss") for r in map(json.loads, lines) if r["split"] == split}


def _train(workdir: Path, capsys, *extra: str) -> tuple[dict, str]:
    """Train to the end; (the printed summary, everything logged)."""
    capsys.readouterr()
    assert cli.main(["train", "-w", str(workdir), "--no-progress", *TINY, *extra]) == 0
    err = capsys.readouterr().err
    return json.loads(err.strip().splitlines()[-1]), err


def _error(workdir: Path, capsys, *extra: str) -> str:
    return cli_error(["train", "-w", str(workdir), "--no-progress", *TINY, *extra], capsys)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A tiny run of 2 steps with a checkpoint at step 2."""
    workdir = tmp_path_factory.mktemp("base") / "run"
    assert cli.main(["train", "-w", str(workdir), "--no-progress", *TINY, "train.steps=2"]) == 0
    return workdir


def test_resume_with_other_runtime_settings_continues(base_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    extra = ["train.steps=3", "model.remat=full", "model.attention=reference"]
    summary, err = _train(run, capsys, *extra)
    assert summary["start_step"] == 2
    assert "model.remat: 'none' -> 'full'" in err and "model.attention: 'xla' -> 'reference'" in err
    assert sorted(_records(run, "train")) == [1, 2, 3]
    assert load_config(run / "config.yaml").model.remat == "full"


def test_architecture_change_is_refused_and_leaves_the_run_alone(base_run, capsys):
    before = (base_run / "config.yaml").read_text()
    err = _error(base_run, capsys, "train.steps=3", "model.d_model=64")
    assert "model.d_model=64" in err and "(32)" in err and "--workdir" in err
    err = _error(base_run, capsys, "train.steps=3", "model.scan_layers=true")
    assert "model.scan_layers=True" in err and f"train.init_from={base_run}" in err
    assert (base_run / "config.yaml").read_text() == before


def test_init_from_restacks_blocks_and_takes_runtime_changes(base_run, tmp_path, capsys):
    init = f"train.init_from={base_run}"
    err = _error(tmp_path / "wide", capsys, "train.steps=1", "model.d_model=64", init)
    assert "model.d_model=64" in err and "(32)" in err
    assert not (tmp_path / "wide").exists()
    extra = ["model.scan_layers=true", "model.remat=full", "model.attention=reference"]
    summary, _ = _train(tmp_path / "ft", capsys, "train.steps=1", init, *extra)
    # Step 0 evaluates the source's parameters, restacked, on the same validation batch.
    assert summary["first_eval_loss"] == pytest.approx(_records(base_run, "eval")[2], rel=1e-5)
