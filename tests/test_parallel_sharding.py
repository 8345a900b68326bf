"""Sharding: every mesh trains like one device, FSDP really shards, bad meshes are refused.

The sharded runs need 8 devices, which XLA only fakes when told before JAX starts, so they
run in a subprocess (this file run as a script, one per model family) that prints JSON;
the pytest process itself keeps its single device. The worker imports conftest as the tests do
(the script's folder is on its path).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import (
    RECURRENT,
    assert_one_sentence,
    padded_batch,
    resolved_model,
    run_workers,
)

from jaxlm.config import MeshConfig, ModelConfig, RunConfig, TrainConfig
from jaxlm.errors import ConfigError
from jaxlm.parallel.sharding import MESH_AXES, mesh_shape, validate_mesh

S, V, B, STEPS = 16, 64, 8, 3
# Mesh sizes (data, fsdp, tensor, sequence); "single" runs on the first device only.
MESHES = {
    "single": (1, 1, 1, 1),
    "data8": (8, 1, 1, 1),
    "fsdp8": (1, 8, 1, 1),
    "d2f2t2": (2, 2, 2, 1),
    "f4t2": (1, 4, 2, 1),
}
# One extra mesh per family: sequence sharding (gpt2), kv heads replicated over tensor (llama).
EXTRA = {"gpt2": {"d2f2s2": (2, 2, 1, 2)}, "llama": {"d2t4": (2, 1, 4, 1)}}
# A mixture-of-experts Llama (4 experts, top-2) on expert-parallel meshes; the fifth size is
# mesh.expert, which also splits the batch outside the experts.
MOE_MESHES = {
    "single": (1, 1, 1, 1),
    "fsdp8": (1, 8, 1, 1),
    "d2e4": (2, 1, 1, 1, 4),
    "f2t2e2": (1, 2, 2, 1, 2),
}
MOE = dict(moe_experts=4, moe_top_k=2, moe_d_ff=16, moe_shared_experts=1)
FSDP_THRESHOLD = 4096  # parameters with more elements than this must be split by fsdp=8


def tiny_model(family: str, **kw) -> ModelConfig:
    """A one-block model whose every axis splits over the meshes above."""
    base = dict(vocab_size=V, d_model=32, n_layers=1, n_heads=8, max_seq_len=S, init_std=0.1)
    if family == "hawk":
        base.update(n_heads=4, rnn_width=64)  # RG-LRU gate blocks must divide the width
    # gqa: Llama gets 2 kv heads, 4 query heads per kv head.
    return resolved_model(family, gqa=True, **{**base, **kw})


# ------------------------------------------------------------------ worker (subprocess)


def _fixed_batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return padded_batch(rng, rng.integers(4, S + 1, B), S, V)


def _mesh_cfg(sizes: tuple[int, ...]) -> MeshConfig:
    """(data, fsdp, tensor, sequence[, expert]) sizes; expert, last in MESH_AXES, defaults to 1."""
    return MeshConfig(**dict(zip(MESH_AXES, sizes, strict=False)))


def _fsdp_report(family: str) -> dict:
    """Shard shapes and per-device bytes of a bigger model's state on fsdp=8 (init only)."""
    import jax

    from jaxlm.config import OptimizerConfig
    from jaxlm.models import build_model
    from jaxlm.parallel.sharding import make_mesh
    from jaxlm.train.optimizer import make_optimizer
    from jaxlm.train.state import init_train_state

    cfg = tiny_model(family, d_model=128, n_layers=2, vocab_size=512, n_heads=4)
    model, tx = build_model(cfg), make_optimizer(OptimizerConfig(warmup_steps=1), 10)
    state, _ = init_train_state(model, tx, S, 0, make_mesh(_mesh_cfg((1, 8, 1, 1))))
    unsplit = []
    for path, x in jax.tree_util.tree_leaves_with_path(state.params):
        shard = x.sharding.shard_shape(x.shape)
        if x.size > FSDP_THRESHOLD and np.prod(shard) * 8 != x.size:
            unsplit.append(jax.tree_util.keystr(path))
    leaves = jax.tree.leaves((state.params, state.opt_state))
    per_device = [0] * 8
    for x in leaves:
        for s in x.addressable_shards:
            per_device[s.device.id] += s.data.nbytes
    return {"unsplit": unsplit, "total": sum(x.nbytes for x in leaves), "per_device": per_device}


def worker(family: str) -> dict:
    """Train STEPS steps on every mesh from the same init; report losses and init agreement."""
    import jax

    from jaxlm.config import OptimizerConfig
    from jaxlm.models import build_model
    from jaxlm.parallel.sharding import make_mesh, put_batch
    from jaxlm.train.optimizer import make_optimizer
    from jaxlm.train.state import init_train_state
    from jaxlm.train.step import jit_train_step, make_train_step

    assert len(jax.devices()) == 8, jax.devices()
    moe = family == "moe"
    model_cfg = tiny_model("llama", **MOE) if moe else tiny_model(family)
    cfg = RunConfig(model=model_cfg, train=TrainConfig(batch_size=B))
    model, tx = build_model(cfg.model), make_optimizer(OptimizerConfig(warmup_steps=1), 10)
    batch, out, reference = _fixed_batch(), {}, None
    meshes = MOE_MESHES if moe else {**MESHES, **EXTRA.get(family, {})}
    for name, sizes in meshes.items():
        devices = jax.devices()[:1] if name == "single" else None
        mesh = make_mesh(_mesh_cfg(sizes), devices)
        validate_mesh(cfg, mesh)
        state, shardings = init_train_state(model, tx, S, 0, mesh)
        params = jax.device_get(state.params)
        reference = params if reference is None else reference
        init_diff = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference), strict=True)
        )
        step = jit_train_step(make_train_step(model, tx), shardings, mesh)
        losses = []
        for _ in range(STEPS):
            state, metrics = step(state, put_batch(batch, mesh))
            losses.append(float(metrics["loss"]))
        kv_spec = None
        if family == "llama":
            kv_spec = str(shardings.params["block_0"]["attn"]["key"]["kernel"].spec)
        out[name] = {"losses": losses, "init_diff": init_diff, "kv_spec": kv_spec}
    if family in RECURRENT or moe:
        return {"meshes": out}
    return {"meshes": out, "fsdp": _fsdp_report(family)}


# ------------------------------------------------------------------------ the tests


def _run_workers(families: tuple[str, ...]) -> dict[str, dict]:
    return run_workers(__file__, families, timeout=600)


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    """The Transformer families on every mesh, and a MoE Llama on the expert meshes."""
    return _run_workers(("gpt2", "llama", "moe"))


@pytest.fixture(scope="module")
def recurrent_runs() -> dict[str, dict]:
    """The recurrent families on the required meshes."""
    return _run_workers(RECURRENT)


@pytest.mark.slow  # ~95 s of workers; the Transformer families run on every mesh by default
@pytest.mark.parametrize("family", RECURRENT)
def test_recurrent_models_match_single_device_on_every_mesh(recurrent_runs, family):
    meshes = recurrent_runs[family]["meshes"]
    assert set(meshes) == set(MESHES)
    single = meshes["single"]["losses"]
    assert len(single) == STEPS and single[0] > single[-1]  # it trains
    for name, rec in meshes.items():
        assert rec["init_diff"] == 0.0, f"{family} init differs on mesh {name}"
        np.testing.assert_allclose(rec["losses"], single, rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_mesh_matches_single_device(runs, family):
    meshes = runs[family]["meshes"]
    ref = meshes["single"]["losses"]
    assert len(ref) == STEPS and ref[0] > ref[-1]  # it trains
    assert set(meshes) == set(MESHES) | set(EXTRA[family])
    for name, r in meshes.items():
        assert r["init_diff"] == 0.0, f"{name}: initial params differ by {r['init_diff']}"
        np.testing.assert_allclose(r["losses"], ref, rtol=0, atol=1e-5, err_msg=name)


def test_expert_parallel_moe_matches_single_device(runs):
    meshes = runs["moe"]["meshes"]
    ref = meshes["single"]["losses"]
    assert set(meshes) == set(MOE_MESHES) and ref[0] > ref[-1]
    for name, r in meshes.items():
        assert r["init_diff"] == 0.0, f"{name}: initial params differ by {r['init_diff']}"
        np.testing.assert_allclose(r["losses"], ref, rtol=0, atol=1e-5, err_msg=name)


def test_kv_heads_fewer_than_tensor_are_replicated(runs):
    meshes = runs["llama"]["meshes"]
    assert "tensor" in meshes["d2f2t2"]["kv_spec"]  # 2 kv heads split over tensor=2
    assert "tensor" not in meshes["d2t4"]["kv_spec"]  # 2 kv heads kept whole on tensor=4


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fsdp8_shards_params_and_optimizer_state(runs, family):
    rep = runs[family]["fsdp"]
    assert rep["unsplit"] == [], f"large parameters not sharded: {rep['unsplit']}"
    ideal = rep["total"] / 8
    for dev, nbytes in enumerate(rep["per_device"]):
        assert abs(nbytes - ideal) <= 0.05 * ideal, f"device {dev}: {nbytes} B vs {ideal:.0f} B"


# ------------------------------------------------------------- refusals (no devices needed)


def _abstract_mesh(data=1, fsdp=1, tensor=1, sequence=1, expert=1):
    from jax.sharding import AbstractMesh, AxisType

    sizes = (data, fsdp, tensor, sequence, expert)
    return AbstractMesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _cfg(family="llama", batch_size=8, microbatches=1, seq_len=16, **model) -> RunConfig:
    from jaxlm.config import DataConfig

    return RunConfig(
        model=tiny_model(family, **model),
        data=DataConfig(seq_len=seq_len),
        train=TrainConfig(batch_size=batch_size, microbatches=microbatches),
    )


@pytest.mark.parametrize(
    "cfg_kw, mesh_kw, expected",
    [
        (dict(batch_size=12), dict(data=2, fsdp=4), r"batch_size=12 .* multiple of 8"),
        (dict(batch_size=8, microbatches=2), dict(data=8), r"4 rows.* multiple of 16"),
        (dict(n_heads=4, n_kv_heads=None), dict(tensor=8), r"model.n_heads=4 .*tensor=8"),
        (dict(d_ff=100), dict(tensor=8), r"model.d_ff=100 .*tensor=8"),
        (dict(vocab_size=60), dict(tensor=8), r"model.vocab_size=60 .*tensor=8"),
        (dict(d_model=24, n_heads=4, batch_size=16), dict(fsdp=16), r"model.d_model=24 .*fsdp=16"),
        (dict(seq_len=12), dict(sequence=8), r"data.seq_len=12 .*sequence=8"),
        (dict(moe_experts=6), dict(expert=4, data=2), r"model.moe_experts=6 .*expert=4"),
        (dict(moe_experts=4, moe_d_ff=12), dict(tensor=8), r"model.moe_d_ff=12 .*tensor=8"),
        (dict(batch_size=12), dict(data=2, expert=4), r"batch_size=12 .* multiple of 8"),
    ],
)
def test_bad_mesh_is_refused_in_one_sentence(cfg_kw, mesh_kw, expected):
    model_keys = {"n_heads", "n_kv_heads", "d_ff", "vocab_size", "d_model", "moe_experts"}
    model_keys |= {"moe_d_ff"}
    model = {k: v for k, v in cfg_kw.items() if k in model_keys}
    rest = {k: v for k, v in cfg_kw.items() if k not in model_keys}
    with pytest.raises(ConfigError, match=expected) as err:
        validate_mesh(_cfg(**rest, **model), _abstract_mesh(**mesh_kw))
    assert_one_sentence(str(err.value))


def test_good_mesh_passes_and_kv_heads_may_be_fewer_than_tensor():
    validate_mesh(_cfg(batch_size=16), _abstract_mesh(data=2, fsdp=2, tensor=2, sequence=2))
    validate_mesh(_cfg(n_kv_heads=1), _abstract_mesh(tensor=8))  # kv heads get replicated


@pytest.mark.parametrize(
    "mesh, n, expected",
    [
        (MeshConfig(data=2, fsdp=2), 8, r"has 4 devices but 8 are available"),
        (MeshConfig(data=-1, tensor=3), 8, r"multiply to 3, which does not divide the 8"),
    ],
)
def test_mesh_that_does_not_cover_the_devices_is_refused(mesh, n, expected):
    with pytest.raises(ConfigError, match=expected) as err:
        mesh_shape(mesh, n)
    assert_one_sentence(str(err.value))


def test_minus_one_takes_the_remaining_devices():
    assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 16) == {
        "data": 4,
        "fsdp": 2,
        "tensor": 2,
        "sequence": 1,
        "expert": 1,
    }


def test_kv_heads_replicated_in_state_shardings_when_fewer_than_tensor():
    from jaxlm.config import OptimizerConfig
    from jaxlm.models import build_model
    from jaxlm.train.optimizer import make_optimizer
    from jaxlm.train.state import state_shardings

    model = build_model(tiny_model("llama", n_kv_heads=2))
    tx = make_optimizer(OptimizerConfig(warmup_steps=1), 10)
    specs = {}
    for tensor in (2, 4):
        _, sh = state_shardings(model, tx, S, _abstract_mesh(tensor=tensor, data=8 // tensor))
        attn = sh.params["block_0"]["attn"]
        specs[tensor] = (tuple(attn["key"]["kernel"].spec), tuple(attn["query"]["kernel"].spec))
    assert specs[2] == (("fsdp", "tensor", None), ("fsdp", "tensor", None))
    assert specs[4] == (("fsdp", None, None), ("fsdp", "tensor", None))


if __name__ == "__main__":
    print(json.dumps(worker(sys.argv[1])))
