"""Context parallelism (model.context_parallel): ring and all-gather attention over
mesh.sequence equal single-device attention, training with them equals single-device
training, the ring never all-gathers q/k/v, and bad settings are refused in one sentence.

The sharded runs need 8 devices, which XLA fakes only when told before JAX starts, so they
run in subprocesses (this file run as a script) that print JSON, as in
test_parallel_sharding. Shapes are tiny: the Pallas kernels run in the CPU interpreter.
"""

from __future__ import annotations

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    assert_one_sentence,
    padded_batch,
    resolved_model,
    run_workers,
)
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm.bench.context import Shape, layer_memory
from jaxlm.config import DataConfig, MeshConfig, OptimizerConfig, RunConfig, TrainConfig, validate
from jaxlm.errors import ConfigError
from jaxlm.kernels.flash_attention import (
    flash_attention_backward,
    flash_attention_lse,
    reference_attention,
)
from jaxlm.kernels.ring_attention import zigzag, zigzag_order
from jaxlm.models import build_model
from jaxlm.models.context_attention import context_attention
from jaxlm.parallel.sharding import (
    BATCH_AXES,
    MESH_AXES,
    make_mesh,
    mesh_context,
    put_batch,
    validate_mesh,
)
from jaxlm.train.optimizer import make_optimizer
from jaxlm.train.state import init_train_state
from jaxlm.train.step import (
    context_layout,
    jit_eval_step,
    jit_train_step,
    make_eval_step,
    make_train_step,
)

B, S, H, KV, E = 2, 64, 4, 2, 8  # batch, tokens, query heads, kv heads (GQA), head dim
TRAIN_S, V, TRAIN_B, STEPS = 32, 64, 4, 3
# (mesh, strategy, causal, dtype[, tokens per kernel call]): the default run covers each
# strategy, both meshes and both maskings (~14 s per case, mostly compiling interpreted
# kernels), and a ring whose pairs are cut into tiles (as on TPU, where VMEM bounds one
# kernel call); the rest of the cross product, bfloat16 included, is marked slow.
MESHES = {"s8": dict(data=1, sequence=8), "f2s4": dict(data=1, fsdp=2, sequence=4)}
FAST_CASES = [
    ("s8", "ring", True, "float32"),
    ("f2s4", "all_gather", True, "float32"),
    ("f2s4", "ring", False, "float32"),
    ("f2s4", "ring", True, "float32", 8),  # 16 tokens per device: 2 tiles per pair side
]
SLOW_CASES = [
    (m, s, c, d)
    for m in MESHES
    for s in ("ring", "all_gather")
    for c in (True, False)
    for d in ("float32", "bfloat16")
    if (m, s, c, d) not in FAST_CASES
] + [("f2s4", "all_gather", True, "bfloat16", 8)]
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}


# ------------------------------------------------------------------ worker (subprocess)


def _inputs(dtype):
    """q, k, v, packed segment ids (3 documents, then padding as segment 0), a cotangent."""

    rng = np.random.default_rng(0)
    qkv = [rng.normal(size=(B, S, h, E)) for h in (H, KV, KV)]
    seg = np.sort(rng.integers(1, 4, (B, S)), axis=1)
    seg[:, -5:] = 0
    ct = rng.normal(size=(B, S, H, E))
    return [jnp.asarray(x, dtype) for x in qkv], jnp.asarray(seg, jnp.int32), jnp.asarray(ct)


def _attention_case(
    mesh_name: str, strategy: str, causal: bool, dtype: str, tile_len: int | None = None
) -> dict:
    """Max |difference| of output and dq, dk, dv from the float32 reference, and whether the
    compiled program all-gathers and collective-permutes."""

    mesh = make_mesh(MeshConfig(**MESHES[mesh_name]))
    n = mesh.shape["sequence"]
    (q, k, v), seg, ct = _inputs(dtype)

    def ref_loss(q, k, v):
        out = reference_attention(
            q, k, v, q_segment_ids_BxS=seg, kv_segment_ids_BxT=seg, causal=causal
        )
        return jnp.sum(out * ct), out

    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (_, ref_out), ref_grads = jax.value_and_grad(ref_loss, (0, 1, 2), has_aux=True)(*f32)

    def loss(q, k, v, seg, ct):  # everything in zig-zag order, split over the sequence
        with mesh_context(mesh):
            out = context_attention(
                q, k, v, seg, strategy=strategy, causal=causal, tile_len=tile_len
            )
        return jnp.sum(out.astype(jnp.float32) * ct), out

    spec = lambda x: NamedSharding(mesh, P(BATCH_AXES, "sequence"))  # noqa: E731
    args = [zigzag(x, n) for x in (q, k, v, seg, ct)]
    args = [jax.device_put(x, spec(x)) for x in args]
    step = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))
    compiled = step.lower(*args).compile()
    (_, out), grads = compiled(*args)
    hlo = compiled.as_text()
    err = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - zigzag(b, n))))  # noqa: E731
    return {
        "out": err(out, ref_out),
        "grads": [err(g, r) for g, r in zip(grads, ref_grads, strict=True)],
        "scale": float(max(jnp.max(jnp.abs(r)) for r in (ref_out, *ref_grads))),
        "all_gathers": len(re.findall(r"all-gather(-start)?\(", hlo)),
        "permutes": len(re.findall(r"collective-permute(-start)?\(", hlo)),
    }


def _train_batch() -> dict[str, np.ndarray]:
    """Rows of two packed documents each, then padding."""
    rng = np.random.default_rng(0)
    batch = padded_batch(rng, rng.integers(TRAIN_S // 2, TRAIN_S + 1, TRAIN_B), TRAIN_S, V)
    first = np.arange(TRAIN_S)[None, :] < TRAIN_S // 3
    batch["segment_ids"] = np.where(first, 1, 2) * batch["segment_ids"]
    return batch


def _train_case(mesh_sizes: dict | None, context: str) -> dict:
    """Losses of STEPS train steps, and all-gathers in the compiled (forward-only) eval step."""

    model_cfg = resolved_model(
        "llama",
        gqa=True,
        vocab_size=V,
        d_model=32,
        n_layers=1,
        n_heads=4,
        max_seq_len=TRAIN_S,
        init_std=0.1,
        # The single-device run is the plain reference attention: the ground truth.
        attention="reference" if context == "none" else "pallas",
        context_parallel=context,
    )
    cfg = RunConfig(
        model=model_cfg, train=TrainConfig(batch_size=TRAIN_B), data=DataConfig(seq_len=TRAIN_S)
    )
    model, tx = build_model(model_cfg), make_optimizer(OptimizerConfig(warmup_steps=1), 10)
    single = mesh_sizes is None
    mesh = make_mesh(
        MeshConfig() if single else MeshConfig(**mesh_sizes), jax.devices()[:1] if single else None
    )
    validate_mesh(cfg, mesh)
    state, shardings = init_train_state(model, tx, TRAIN_S, 0, mesh)
    batch = put_batch(_train_batch(), mesh)
    hlo = ""
    if not single:
        evaluate = jit_eval_step(make_eval_step(model), shardings.params, mesh)
        hlo = evaluate.lower(state.params, batch).compile().as_text()
    step = jit_train_step(make_train_step(model, tx), shardings, mesh)
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return {"losses": losses, "eval_all_gathers": len(re.findall(r"all-gather(-start)?\(", hlo))}


def worker(kind: str) -> dict:

    assert len(jax.devices()) == 8, jax.devices()
    if kind == "train":
        shape = Shape(seq_len=8192, heads=4, kv_heads=2, head_dim=32)
        return {
            "single": _train_case(None, "none"),
            "ring": _train_case(dict(data=2, sequence=4), "ring"),
            "memory": {n: layer_memory(shape, n, "ring")["temp_mib"] for n in (4, 8)},
        }
    if kind == "train-slow":
        return {"all_gather": _train_case(dict(fsdp=2, sequence=4), "all_gather")}
    cases = FAST_CASES if kind == "attention" else SLOW_CASES
    return {"|".join(map(str, c)): _attention_case(*c) for c in cases}


# ------------------------------------------------------------------------ the tests


def _run_workers(kinds: tuple[str, ...]) -> dict[str, dict]:
    return run_workers(__file__, kinds, timeout=900)


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    """The default attention cases and the train comparison, in two parallel workers."""
    return _run_workers(("attention", "train"))


def _check_case(result: dict, dtype: str) -> None:
    tol = TOLERANCE[dtype]
    if dtype == "bfloat16":  # inputs rounded to bfloat16: relative to the values' size
        tol *= max(1.0, result["scale"])
    assert result["out"] <= tol, result
    assert max(result["grads"]) <= tol, result


@pytest.mark.parametrize("case", FAST_CASES, ids=lambda c: "-".join(map(str, c)))
def test_context_attention_equals_single_device_attention(runs, case):
    _check_case(runs["attention"]["|".join(map(str, case))], case[3])


@pytest.mark.slow  # ~2 min of interpret-mode kernels: the rest of the cross product
def test_every_context_case_equals_single_device_attention():
    results = _run_workers(("attention-slow",))["attention-slow"]
    for case in SLOW_CASES:
        _check_case(results["|".join(map(str, case))], case[3])


def test_ring_moves_kv_by_collective_permute_and_never_all_gathers(runs):
    for case in FAST_CASES:
        r = runs["attention"]["|".join(map(str, case))]
        if case[1] == "ring":  # forward and backward: only neighbour-to-neighbour sends
            assert r["all_gathers"] == 0 and r["permutes"] > 0, (case, r)
        else:  # the all-gather strategy gathers K/V (and segment ids) instead
            assert r["all_gathers"] > 0 and r["permutes"] == 0, (case, r)


def test_training_with_ring_attention_equals_single_device(runs):
    single, ring = runs["train"]["single"], runs["train"]["ring"]
    assert single["losses"][0] > single["losses"][-1]  # it trains
    np.testing.assert_allclose(ring["losses"], single["losses"], rtol=0, atol=1e-5)
    # The model's forward pass (the eval step) needs no gather along the sequence at all.
    assert ring["eval_all_gathers"] == 0


@pytest.mark.slow  # another ~30 s of interpret-mode kernels
def test_training_with_all_gather_attention_equals_single_device(runs):
    other = _run_workers(("train-slow",))["train-slow"]["all_gather"]
    np.testing.assert_allclose(other["losses"], runs["train"]["single"]["losses"], atol=1e-5)


def test_pairwise_kernels_merge_to_the_whole_attention_and_its_gradients():
    """Single device: out/lse of two key halves merge to the whole attention, and the pair
    backward of each half, given the whole rows' out, lse and d_out, sums to its gradients."""

    (q, k, v), seg, ct = _inputs("float32")
    q, k, v, seg, ct = (x[:, :16] for x in (q, k, v, seg, ct))
    kw = dict(causal=False)
    ref, vjp = jax.vjp(
        lambda q, k, v: reference_attention(
            q, k, v, q_segment_ids_BxS=seg, kv_segment_ids_BxT=seg, **kw
        ),
        q,
        k,
        v,
    )
    halves = [slice(0, 8), slice(8, 16)]
    parts = [
        flash_attention_lse(
            q, k[:, h], v[:, h], q_segment_ids_BxS=seg, kv_segment_ids_BxT=seg[:, h], **kw
        )
        for h in halves
    ]
    lse = jnp.logaddexp(parts[0][1], parts[1][1])
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    out = sum(o * jnp.exp(p - safe)[..., None] for o, p in parts)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    grads = [
        flash_attention_backward(
            q,
            k[:, h],
            v[:, h],
            ref,
            lse,
            ct,
            q_segment_ids_BxS=seg,
            kv_segment_ids_BxT=seg[:, h],
            **kw,
        )
        for h in halves
    ]
    dq, dk, dv = vjp(ct)
    np.testing.assert_allclose(grads[0][0] + grads[1][0], dq, atol=1e-5)
    np.testing.assert_allclose(jnp.concatenate([g[1] for g in grads], axis=1), dk, atol=1e-5)
    np.testing.assert_allclose(jnp.concatenate([g[2] for g in grads], axis=1), dv, atol=1e-5)


def test_ring_memory_per_device_falls_as_one_over_the_sequence_devices(runs):
    memory = runs["train"]["memory"]  # compiled temp MiB of attention fwd+bwd (jaxlm.bench)
    assert 0.45 <= memory["8"] / memory["4"] <= 0.56, memory  # 1/n: 0.5 (measured 0.51)


def test_zigzag_gives_device_i_chunks_i_and_2n_minus_1_minus_i():
    order = zigzag_order(16, 4)  # 8 chunks of 2 tokens; device i holds 4 tokens
    np.testing.assert_array_equal(order[:4], [0, 1, 14, 15])
    np.testing.assert_array_equal(order[4:8], [2, 3, 12, 13])
    np.testing.assert_array_equal(order[12:], [6, 7, 8, 9])
    np.testing.assert_array_equal(np.sort(order), np.arange(16))
    np.testing.assert_array_equal(zigzag_order(8, 1), np.arange(8))  # one pair: unchanged


def test_context_none_leaves_the_batch_alone():
    batch = {"inputs": np.arange(8)[None]}
    assert context_layout(batch, "none") is batch


def _cfg(seq_len=64, sequence=4, **model) -> RunConfig:
    m = resolved_model("llama", **{"attention": "pallas", "context_parallel": "ring", **model})
    return RunConfig(
        model=m, data=DataConfig(seq_len=seq_len), mesh=MeshConfig(data=-1, sequence=sequence)
    )


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (_cfg(seq_len=36), r"model\.context_parallel=ring .*data\.seq_len=36.* multiple of 8"),
        (_cfg(attention="xla"), r"model\.context_parallel=ring .*model\.attention=pallas"),
        (_cfg(context_parallel="zigzag"), r"model\.context_parallel='zigzag' is not supported"),
        (
            RunConfig(
                model=resolved_model("lstm", context_parallel="ring"),
                data=DataConfig(seq_len=64),
                mesh=MeshConfig(data=-1, sequence=4),
            ),
            r"model\.context_parallel=ring splits attention, which the recurrent family lstm",
        ),
    ],
)
def test_bad_context_parallel_settings_are_refused_in_one_sentence(cfg, expected):
    with pytest.raises(ConfigError, match=expected) as err:
        validate(cfg)
    assert_one_sentence(str(err.value))


def test_mesh_check_catches_a_sequence_axis_resolved_from_minus_one():
    cfg = _cfg(seq_len=36, sequence=-1, n_heads=4, d_model=64)
    cfg = RunConfig(model=cfg.model, data=cfg.data, mesh=MeshConfig(data=1, sequence=-1))
    validate(cfg)  # -1: the size is only known with the devices
    mesh = AbstractMesh((1, 1, 1, 4, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 5)
    cfg = RunConfig(model=cfg.model, data=cfg.data, train=TrainConfig(batch_size=4))
    with pytest.raises(ConfigError, match=r"data\.seq_len=36 does not divide|multiple of 8"):
        validate_mesh(cfg, mesh)


if __name__ == "__main__":
    print(json.dumps(worker(sys.argv[1])))
