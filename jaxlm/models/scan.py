"""Speed knobs of the Transformer stack: named remat policies and scanned layers.

`remat` trades compute for memory: the backward pass recomputes what the policy does not
save. `scan_layers` runs the blocks as one `nn.scan` over stacked parameters (a leading
`layers` axis), so compile time no longer grows with depth. The stacked and per-block
parameter trees hold the same numbers; `stack_blocks` / `unstack_blocks` convert.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Names given with `checkpoint_name` inside the blocks (see jaxlm.models.attention).
ATTENTION_OUT = "attention_out"
QKV = ("query_proj", "key_proj", "value_proj")

POLICIES: dict[str, Any] = {
    "full": None,  # save nothing inside a block: recompute it all
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_output": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT),
    "save_qkv_attention": jax.checkpoint_policies.save_only_these_names(*QKV, ATTENTION_OUT),
}


def remat_block(block_cls: type[nn.Module], policy: str, scanned: bool = False) -> type:
    """`block_cls` wrapped in `nn.remat` with the named policy ("none": unchanged).

    The block's `deterministic` argument (position 4, counting self) is static. Inside a
    scan the loop already keeps XLA from merging recomputation with the forward pass, so
    CSE prevention is off there, as the JAX docs advise.
    """
    if policy == "none":
        return block_cls
    if policy not in POLICIES:
        raise ValueError(f"remat policy {policy!r} is unknown; use none or one of {list(POLICIES)}")
    return nn.remat(
        block_cls, policy=POLICIES[policy], static_argnums=(4,), prevent_cse=not scanned
    )


def scan_blocks(block_cls: type[nn.Module], n_layers: int) -> type:
    """`block_cls` repeated n_layers times by `nn.scan`; params and caches gain a layers axis."""
    return nn.scan(
        block_cls,
        variable_axes={"params": 0, "cache": 0, "moe": 0},  # moe: MoE statistics, per layer
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
        length=n_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


SCANNED = "blocks"  # name of the scanned stack; unscanned blocks are block_0 .. block_{L-1}


def stack_blocks(params: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """Per-block params (block_0, block_1, ...) -> one `blocks` tree with a leading layer axis."""
    blocks = [params[f"block_{i}"] for i in range(n_layers)]
    rest = {k: v for k, v in params.items() if not k.startswith("block_")}
    return {**rest, SCANNED: jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def unstack_blocks(params: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """The inverse of `stack_blocks`: a scanned model's params in the per-block layout."""
    rest = {k: v for k, v in params.items() if k != SCANNED}
    for i in range(n_layers):
        rest[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], params[SCANNED])
    return rest
