"""Tests for jaxlm.config: loading, overrides, family defaults, round trips, validation, the
runtime/architecture marking of model fields and the shipped configs."""

import dataclasses
import re
from pathlib import Path

import pytest
from conftest import RECURRENT, RUNTIME_FIELDS, assert_one_sentence

from jaxlm.config import (
    FAMILY_DEFAULTS,
    ModelConfig,
    RunConfig,
    architecture_fields,
    describe,
    from_dict,
    layout_fields,
    load_config,
    parse_overrides,
    resolve,
    runtime_fields,
    to_yaml,
    validate,
)
from jaxlm.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- loading ---------------------------------------------------------------------------------


def test_defaults_load_resolve_and_validate():
    cfg = load_config(None, [])
    assert isinstance(cfg, RunConfig)
    validate(cfg)  # idempotent: a loaded config is valid
    family = FAMILY_DEFAULTS[cfg.model.family]
    for key, value in family.items():
        assert getattr(cfg.model, key) == value
    # An unresolved default config still has the family options open.
    assert RunConfig().model.norm is None


def test_yaml_file_plus_overrides(tmp_path):
    path = _write(
        tmp_path,
        "model:\n  n_layers: 2\n  n_kv_heads: 2\n  d_model: 64\noptimizer:\n  lr: 0.01\n  warmup_steps: 5\n"
        "train:\n  steps: 50\n  batch_size: 4\n",
    )
    cfg = load_config(path, ["model.n_layers=4", "optimizer.lr=1e-3", "model.n_kv_heads=null"])
    assert cfg.model.n_layers == 4  # override beats the file
    assert cfg.model.d_model == 64  # file value kept where not overridden
    assert cfg.train.steps == 50 and cfg.train.batch_size == 4
    assert isinstance(cfg.optimizer.lr, float) and cfg.optimizer.lr == pytest.approx(1e-3)
    assert cfg.model.n_kv_heads is None and cfg.model.kv_heads == cfg.model.n_heads
    assert cfg.optimizer.warmup_steps == 5
    assert cfg.data == RunConfig().data  # untouched section = defaults


def test_override_values_are_parsed_by_type():
    cfg = load_config(
        None,
        [
            "train.steps=1_000",
            "model.dropout=0",
            "checkpoint.async_save=off",
            "data.tokenizer=~/tok.model",
            "train.sample_prompt=12",
            "model.d_ff=192.0",
        ],
    )
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)
    assert cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)
    assert cfg.checkpoint.async_save is False
    assert cfg.data.tokenizer == "~/tok.model"
    assert cfg.train.sample_prompt == "12"
    assert cfg.model.d_ff == 192 and isinstance(cfg.model.d_ff, int)


@pytest.mark.parametrize(
    "text, value", [("true", True), ("yes", True), ("on", True), ("false", False), ("no", False)]
)
def test_bool_spellings(text, value):
    assert load_config(None, [f"model.tie_embeddings={text}"]).model.tie_embeddings is value


def test_override_value_keeps_everything_after_first_equals():
    assert parse_overrides(["train.sample_prompt=a=b"]) == {"train": {"sample_prompt": "a=b"}}


@pytest.mark.parametrize("family", sorted(FAMILY_DEFAULTS))
def test_family_defaults_fill_the_open_options(family):
    cfg = load_config(None, [f"model.family={family}"])
    expected = {
        "gpt2": dict(
            norm="layernorm", position="learned", mlp="gelu", tie_embeddings=True, bias=True
        ),
        "llama": dict(
            norm="rmsnorm", position="rope", mlp="swiglu", tie_embeddings=False, bias=False
        ),
    }[family]
    assert {k: getattr(cfg.model, k) for k in expected} == expected


@pytest.mark.parametrize(
    "family, key, value, parsed",
    [
        ("gpt2", "position", "rope", "rope"),
        ("gpt2", "tie_embeddings", "false", False),
        ("llama", "norm", "layernorm", "layernorm"),
        ("llama", "bias", "true", True),
    ],
)
def test_explicit_option_beats_family_default(family, key, value, parsed):
    cfg = load_config(None, [f"model.family={family}", f"model.{key}={value}"])
    assert getattr(cfg.model, key) == parsed
    assert parsed != FAMILY_DEFAULTS[family][key]  # the case really overrides something
    others = {k: v for k, v in FAMILY_DEFAULTS[family].items() if k != key}
    assert {k: getattr(cfg.model, k) for k in others} == others


def test_resolve_leaves_explicit_choices_alone():
    raw = RunConfig(model=ModelConfig(family="gpt2", mlp="swiglu"))
    model = resolve(raw).model
    assert model.mlp == "swiglu" and model.norm == "layernorm"
    assert resolve(resolve(raw)) == resolve(raw)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.family=gpt2", "model.d_ff=100", "optimizer.lr=1e-4", "mesh.data=1", "mesh.fsdp=-1"],
        [
            "model.n_kv_heads=1",
            "data.tokenizer=/tmp/x.model",
            "model.vocab_size=64",
            "train.sample_prompt='KING: yes\\n'",
            "train.z_loss=1e-4",
            "model.dtype=bfloat16",
        ],
    ],
)
def test_to_yaml_round_trip(tmp_path, overrides):
    cfg = load_config(None, overrides)
    path = _write(tmp_path, to_yaml(cfg))
    again = load_config(path, [])
    assert again == cfg
    assert to_yaml(again) == to_yaml(cfg)


def test_describe_lists_every_key_with_its_doc():
    lines = describe().splitlines()
    for section in dataclasses.fields(RunConfig):
        assert any(ln.startswith(f"{section.name}:") for ln in lines)
        for f in dataclasses.fields(type(getattr(RunConfig(), section.name))):
            line = next((ln for ln in lines if ln.startswith(f"  {f.name}:")), None)
            assert line is not None, f"{section.name}.{f.name} is missing from describe()"
            assert f.metadata["doc"] and any(f.metadata["doc"] in ln for ln in lines)


def test_describe_tags_exactly_the_runtime_model_fields():
    lines = describe().splitlines()
    model = lines[: next(i for i, ln in enumerate(lines) if ln.startswith("data:"))]
    tagged = {ln.split(":")[0].strip() for ln in model if "# [runtime] " in ln}
    assert tagged == set(runtime_fields())
    assert sum("[runtime]" in ln for ln in lines) == len(tagged) + 1  # and the section line


# --- errors ----------------------------------------------------------------------------------

# (overrides on top of the defaults, text the message must contain)
BAD_OVERRIDES = [
    # _coerce: wrong types and nulls
    (["model.n_layers=abc"], "model.n_layers"),
    (["model.n_layers=2.5"], "model.n_layers"),
    (["model.n_layers=true"], "model.n_layers"),
    (["model.n_layers=null"], "model.n_layers"),
    (["model.n_layers=[1, 2]"], "model.n_layers"),
    (["model.n_kv_heads=abc"], "model.n_kv_heads"),
    (["model.tie_embeddings=maybe"], "model.tie_embeddings"),
    (["model.tie_embeddings=2"], "model.tie_embeddings"),
    (["optimizer.lr=fast"], "optimizer.lr"),
    (["optimizer.lr=true"], "optimizer.lr"),
    (["model.family=[a, b]"], "model.family"),
    (["data.tokenizer={a: 1}"], "data.tokenizer"),
    (["model.family=null"], "model.family"),
    # parse_overrides: malformed overrides
    (["model.n_layers"], "model.n_layers"),
    (["n_layers=4"], "n_layers"),
    (["model.attn.impl=xla"], "model.attn.impl"),
    ([".n_layers=4"], ".n_layers"),
    (["modle.n_layers=4"], "modle"),
    # unknown key
    (["model.nlayers=4"], "model.nlayers"),
    # resolve
    (["model.family=gpt3"], "model.family"),
    # validate: model
    *[
        ([f"model.{k}=0"], f"model.{k}")
        for k in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "d_ff",
            "max_seq_len",
            "rope_theta",
            "norm_eps",
            "init_std",
        )
    ],
    (["model.n_heads=3"], "model.n_heads"),
    (["model.n_heads=4", "model.n_kv_heads=3"], "model.n_kv_heads"),
    (["model.norm=batchnorm"], "model.norm"),
    (["model.position=alibi"], "model.position"),
    (["model.mlp=relu"], "model.mlp"),
    (["model.attention=flash"], "model.attention"),
    (["model.dtype=int8"], "model.dtype"),
    (["model.position=rope", "model.d_model=20", "model.n_heads=4"], "model.d_model"),
    (["model.dropout=1.0"], "model.dropout"),
    (["model.dropout=-0.1"], "model.dropout"),
    (["model.vocab_size=100"], "model.vocab_size"),
    # validate: data
    (["data.seq_len=0"], "data.seq_len"),
    (["data.doc_chars=0"], "data.doc_chars"),
    (["data.seq_len=512", "model.max_seq_len=256"], "data.seq_len"),
    (["data.validation_fraction=0"], "data.validation_fraction"),
    (["data.validation_fraction=1"], "data.validation_fraction"),
    # validate: optimizer
    (["optimizer.lr=0"], "optimizer.lr"),
    (["optimizer.warmup_steps=-1"], "optimizer.warmup_steps"),
    (["optimizer.warmup_steps=5000", "train.steps=100"], "optimizer.warmup_steps"),
    (["optimizer.min_lr_ratio=1.5"], "optimizer.min_lr_ratio"),
    (["optimizer.b1=1.0"], "optimizer.b1"),
    (["optimizer.b2=-0.1"], "optimizer.b2"),
    (["optimizer.eps=0"], "optimizer.eps"),
    (["optimizer.weight_decay=-1"], "optimizer.weight_decay"),
    (["optimizer.grad_clip=-1"], "optimizer.grad_clip"),
    # validate: mesh
    (["mesh.data=0"], "mesh.data"),
    (["mesh.tensor=-2"], "mesh.tensor"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "fsdp"),
    # validate: checkpoint
    (["checkpoint.every_steps=-1"], "checkpoint.every_steps"),
    (["checkpoint.keep=0"], "checkpoint.keep"),
    # validate: train
    (["train.steps=0", "optimizer.warmup_steps=0"], "train.steps"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.microbatches=0"], "train.microbatches"),
    (["train.log_every=0"], "train.log_every"),
    (["train.batch_size=32", "train.microbatches=5"], "train.microbatches"),
    (["train.eval_every=-1"], "train.eval_every"),
    (["train.eval_batches=-1"], "train.eval_batches"),
    (["train.sample_tokens=-1"], "train.sample_tokens"),
    (["train.top_k=-1"], "train.top_k"),
    (["train.z_loss=-0.1"], "train.z_loss"),
    (["train.temperature=0"], "train.temperature"),
]


@pytest.mark.parametrize(
    "overrides, key", BAD_OVERRIDES, ids=[" ".join(o) for o, _ in BAD_OVERRIDES]
)
def test_bad_override_raises_one_sentence_naming_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert key in message
    assert_one_sentence(message)


def test_mesh_error_names_every_auto_axis():
    with pytest.raises(ConfigError, match="mesh") as info:
        load_config(None, ["mesh.data=-1", "mesh.tensor=-1"])
    assert "data" in str(info.value) and "tensor" in str(info.value)


# (file text, overrides, text the message must contain; {path} is the file's path)
BAD_FILES = [
    ("model: [1, 2\n", [], "{path}"),  # not YAML
    ("- model\n- train\n", [], "{path}"),  # a list, not a mapping
    ("just a string\n", [], "{path}"),
    ("trainer:\n  steps: 3\n", [], "trainer"),  # unknown section
    ("model:\n  layers: 3\n", [], "model.layers"),  # unknown key
    ("model: 3\n", [], "model"),  # section not a mapping
    ("model: 3\n", ["model.n_layers=2"], "model"),  # ... also when an override extends it
    ("model:\n  n_layers: four\n", [], "model.n_layers"),
    ("model:\n  n_heads: 3\n", [], "model.n_heads"),
]


@pytest.mark.parametrize(
    "text, overrides, key", BAD_FILES, ids=[repr(t) + " ".join(o) for t, o, _ in BAD_FILES]
)
def test_bad_config_file_raises_one_sentence_naming_key(tmp_path, text, overrides, key):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert key.format(path=path) in message
    assert_one_sentence(message)


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, [])
    assert str(path) in str(info.value)
    assert_one_sentence(str(info.value))


def test_directory_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path))):
        load_config(tmp_path, [])


def test_empty_file_means_defaults(tmp_path):
    assert load_config(_write(tmp_path, ""), []) == load_config(None, [])
    assert load_config(_write(tmp_path, "model:\n", "b.yaml"), []) == load_config(None, [])


def test_python_tags_are_refused_not_executed(tmp_path):
    marker = tmp_path / "executed"
    path = _write(tmp_path, f"model: !!python/object/apply:os.mkdir ['{marker}']\n")
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_config(path, [])
    assert not marker.exists()


def test_from_dict_rejects_non_mapping():
    with pytest.raises(ConfigError, match="mapping"):
        from_dict(["model"])
    assert from_dict(None) == RunConfig()


def test_validate_catches_directly_built_configs():
    bad = resolve(RunConfig(model=ModelConfig(d_model=30, n_heads=4)))
    with pytest.raises(ConfigError, match="model.n_heads"):
        validate(bad)


# --- runtime fields, speed knobs, checkpoint settings, shipped recurrent configs --------------


def test_every_model_field_is_architecture_or_runtime():
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(runtime_fields()) == RUNTIME_FIELDS
    assert set(architecture_fields()) == names - RUNTIME_FIELDS
    assert set(layout_fields()) == {"scan_layers", "lora_rank", "lora_targets"}


def test_knob_validation():
    with pytest.raises(ConfigError, match="model.remat='sometimes'"):
        load_config(None, ["model.remat=sometimes"])
    with pytest.raises(ConfigError, match="model.matmul_precision"):
        load_config(None, ["model.matmul_precision=fastest"])
    with pytest.raises(ConfigError, match="Transformer families only"):
        load_config(None, ["model.family=lstm", "model.scan_layers=true"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("checkpoint.every_minutes=-1", "checkpoint.every_minutes"),
        ("checkpoint.keep_every=-5", "checkpoint.keep_every"),
        ("checkpoint.keep_every=15", "checkpoint.keep_every=15"),  # every_steps is 10
        ("train.nan_policy=ignore", "train.nan_policy"),
    ],
)
def test_new_checkpoint_and_nan_settings_are_validated(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, ["checkpoint.every_steps=10", override])
    assert load_config(None, ["checkpoint.keep_every=30", "checkpoint.every_steps=10"])


@pytest.mark.parametrize("family", RECURRENT)
def test_shipped_config_loads(family):
    cfg = load_config(CONFIGS / f"{family}-tiny.yaml")
    assert cfg.model.family == family and cfg.model.recurrent


def test_recurrent_configs_skip_transformer_only_checks():
    # 3 heads don't divide d_model=256, which only matters to attention.
    cfg = load_config(None, ["model.family=lstm", "model.n_heads=3", "data.seq_len=1024"])
    assert cfg.model.position is None and cfg.model.tie_embeddings is True
    with pytest.raises(ConfigError, match="model.rnn_width"):
        load_config(None, ["model.family=hawk", "model.rnn_width=100", "model.n_heads=8"])
    with pytest.raises(ConfigError, match="model.family"):
        load_config(None, ["model.family=rnn"])
