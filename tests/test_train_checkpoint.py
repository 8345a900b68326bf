"""The Checkpointer: damaged steps skipped and parked, refusals that are not damage; export
of the parameters; restoring onto other meshes (8 fake CPU devices, in a subprocess)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fake_devices_env

from jaxlm import cli
from jaxlm.config import CheckpointConfig, to_yaml
from jaxlm.data.tokenizer import train_tokenizer
from jaxlm.errors import ConfigError
from jaxlm.runs import load_run
from jaxlm.train.checkpoint import Checkpointer

# --- Checkpointer -----------------------------------------------------------------------------


def _tree(v: float) -> dict[str, jax.Array]:
    return {"w": jnp.full((64,), v), "step": jnp.int32(v)}


def _abstract():
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _tree(0.0))


def test_restore_latest_skips_damaged_steps_and_parks_them(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", CheckpointConfig(keep=5))
    for step in (1, 2, 3):
        ckpt.save(step, _tree(step), None, {"step": step})
    ckpt.close()
    data = max((p for p in (tmp_path / "checkpoints/3").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)  # fmt: skip
    data.write_bytes(data.read_bytes()[:10])
    (tmp_path / "checkpoints/2/config/metadata").write_text("{not json")
    (tmp_path / "checkpoints/4.orbax-checkpoint-tmp-123").mkdir()  # an interrupted save
    messages: list[str] = []

    # Readers (eval, export) skip damaged steps but move nothing.
    reader = Checkpointer(tmp_path / "checkpoints", CheckpointConfig(), read_only=True)
    got = reader.restore_latest(_abstract(), log=messages.append)
    reader.close()
    assert got.step == 1 and float(got.state["w"][0]) == 1.0 and got.config == {"step": 1}
    assert sum("unreadable" in m for m in messages) == 2
    assert not (tmp_path / "checkpoints.damaged").exists()

    # A training run moves them aside, so new saves of those steps can't collide.
    ckpt = Checkpointer(tmp_path / "checkpoints", CheckpointConfig(keep=5))
    seen: list[dict] = []
    got = ckpt.restore_latest(_abstract(), check_config=seen.append, move_damaged=True, log=print)
    assert got.step == 1 and seen[-1] == {"step": 1}
    assert ckpt.all_steps() == [1]
    parked = sorted(p.name.split("-")[0] for p in (tmp_path / "checkpoints.damaged").iterdir())
    assert parked == ["2", "3", "4.orbax"]
    ckpt.save(2, _tree(5.0), None, {})
    ckpt.close()


def test_refused_config_is_not_mistaken_for_damage(tmp_path):
    ckpt = Checkpointer(tmp_path / "c", CheckpointConfig())
    ckpt.save(1, _tree(1.0), None, {})
    ckpt.wait()

    def refuse(saved):
        raise ConfigError("nope")

    with pytest.raises(ConfigError, match="nope"):
        ckpt.restore_latest(_abstract(), check_config=refuse, move_damaged=True)
    assert ckpt.all_steps() == [1] and not (tmp_path / "c.damaged").exists()
    ckpt.close()


def test_all_checkpoints_unreadable_is_an_error_not_a_fresh_start(tmp_path):
    ckpt = Checkpointer(tmp_path / "c", CheckpointConfig())
    ckpt.save(1, _tree(1.0), None, {})
    ckpt.close()
    (tmp_path / "c/1/config/metadata").write_text("")
    ckpt = Checkpointer(tmp_path / "c", CheckpointConfig())
    with pytest.raises(ConfigError, match="None of the checkpoints"):
        ckpt.restore_latest(_abstract(), move_damaged=True)
    assert (tmp_path / "c/1").is_dir()
    ckpt.close()


# --- export -----------------------------------------------------------------------------------


def test_export_bf16_params_and_load_them_back(tiny_state, tmp_path, capsys):
    cfg, _, _, state = tiny_state
    run = tmp_path / "run"
    ckpt = Checkpointer(run / "checkpoints", cfg.checkpoint)
    ckpt.save(7, state, None, dataclasses.asdict(cfg))
    ckpt.close()
    (run / "config.yaml").write_text(to_yaml(cfg))
    text = ["To be, or not to be, that is the question. Whether tis nobler in the mind."] * 50
    train_tokenizer(text, str(run / "tokenizer.model"), vocab_size=300)

    out = tmp_path / "exported"
    assert cli.main(["export", "-w", str(run), "-o", str(out), "--dtype", "bfloat16"]) == 0
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["step"] == 7
    assert {p.name for p in out.iterdir()} >= {"params", "config.yaml", "tokenizer.model"}
    assert not any("opt_state" in str(p) for p in out.rglob("*"))

    loaded, original = load_run(out), load_run(run)
    assert loaded.step == original.step == 7
    _assert_same(original.params, state.params)
    as_bf16 = jax.tree.map(lambda x: np.asarray(x.astype(jnp.bfloat16), np.float32), state.params)
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(as_bf16), strict=True):
        assert a.dtype == jnp.float32 and np.array_equal(a, b)
    assert loaded.tokenizer.encode("To be") == original.tokenizer.encode("To be")

    assert cli.main(["export", "-w", str(run), "-o", str(out)]) == 2  # never overwrites
    assert cli.main(["export", "-w", str(run), "-o", str(tmp_path / "x"), "--step", "3"]) == 2
    assert "choose one of 7" in capsys.readouterr().err


def _assert_same(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


# --- restore onto another mesh (8 fake CPU devices, in a subprocess) ---------------------------

RESHARD = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    from jaxlm.train.checkpoint import Checkpointer, abstract_with_shardings
    from jaxlm.config import CheckpointConfig, MeshConfig, ModelConfig, RunConfig, resolve
    from jaxlm.models import build_model
    from jaxlm.parallel.sharding import make_mesh
    from jaxlm.train.optimizer import make_optimizer
    from jaxlm.train.state import init_train_state, state_shardings

    assert jax.device_count() == 8
    m = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=16)
    model = build_model(resolve(RunConfig(model=m)).model)
    tx = make_optimizer(RunConfig().optimizer, 10)
    state, _ = init_train_state(model, tx, 16, 0, make_mesh(MeshConfig(data=1, fsdp=8)))
    split = lambda tree: sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(tree))
    assert split(state) > 0
    ckpt = Checkpointer(sys.argv[1], CheckpointConfig())
    ckpt.save(1, state, None, {})
    ckpt.wait()
    want = jax.device_get(state)
    for mesh_cfg, devices in ((MeshConfig(data=2, tensor=4), None),
                              (MeshConfig(data=1), jax.devices()[:1])):
        mesh = make_mesh(mesh_cfg, devices)
        abstract, shardings = state_shardings(model, tx, 16, mesh)
        got = ckpt.restore(1, abstract_with_shardings(abstract, shardings))
        for x, s in zip(jax.tree.leaves(got), jax.tree.leaves(shardings)):
            assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
        assert devices or split(got) > 0
        for x, y in zip(jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(want)):
            assert x.dtype == y.dtype and np.array_equal(x, y)
        print("restored onto", dict(mesh.shape), "with", len(mesh.devices.flat), "devices")
    ckpt.close()
    """
)


def test_checkpoint_from_fsdp8_restores_onto_other_meshes(tmp_path):
    env = fake_devices_env(8)
    out = subprocess.run(
        [sys.executable, "-c", RESHARD, str(tmp_path / "ckpt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("restored onto") == 2
