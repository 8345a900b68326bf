"""Autoregressive decoding: prefill the prompts once, then one token a step inside jit.

Transformers keep a KV cache and recurrent models (LSTM, GRU, Hawk) their carried state in
the flax `cache` collection, so each new token costs one row of work whatever the length.
`use_cache=False` instead recomputes the whole (fixed-size) sequence at every step: the
ground truth for tests and the baseline of `jaxlm bench decode`.

Prompts of different lengths share a batch by left padding: every row ends at the same
column, so one scalar step counter indexes the cache for all rows. Padding gets segment id
0 and real tokens segment 1, which the attention mask (same segment only) and the recurrent
layers (state reset where the segment changes) already honour; each row's positions count
from its own first real token. A row thus decodes exactly as it would alone.

Decoding runs in chunks of `chunk_size` steps, each one jit-compiled `lax.scan`; between
chunks the host may print the new tokens (streaming) or stop early (EOS, stop strings).

The parameters stay where they are (sharded, maybe over several hosts). Given the mesh they
live on, the batch is laid over its data-parallel axes and the heads over its tensor axis
by the models' logical constraints, the batch padded to a multiple of data*fsdp rows. Every
process passes the same prompts and gets every row's tokens back.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.models import build_model
from jaxlm.parallel.distributed import to_host
from jaxlm.parallel.sharding import LOGICAL_RULES, data_parallel_size, mesh_context


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is picked from the logits (hashable: a static jit argument)."""

    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    no_repeat_ngram_size: int = 0  # 0: off

    def check(self) -> None:
        """Refuse values that have no meaning, one sentence each."""
        if self.temperature < 0:
            raise ConfigError(f"--temperature {self.temperature} is negative; use 0 for greedy.")
        if self.top_k < 0:
            raise ConfigError(f"--top-k {self.top_k} is negative; use 0 to keep every token.")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top-p {self.top_p} must lie in (0, 1]; use 1 to turn it off.")
        if self.no_repeat_ngram_size < 0:
            raise ConfigError(
                f"--no-repeat-ngram-size {self.no_repeat_ngram_size} is negative; use 0 for off."
            )


# --------------------------------------------------------------------------- token choice


def banned_by_ngrams(tokens_BxT: jax.Array, start_B: jax.Array, cur: jax.Array, n: int, vocab: int):
    """bool_BxV: tokens that would complete an n-gram already present in the row.

    The row's text is columns [start_B, cur); the candidate n-gram is its last n-1 tokens
    plus the next one, so any earlier n-gram with the same first n-1 tokens bans its last.
    """
    b, t = tokens_BxT.shape
    j = t - n + 1  # candidate start columns 0..t-n
    prefix_BxM = jax.lax.dynamic_slice(tokens_BxT, (0, jnp.maximum(cur - (n - 1), 0)), (b, n - 1))
    match_BxJ = jnp.ones((b, j), bool)
    for k in range(n - 1):
        match_BxJ &= tokens_BxT[:, k : k + j] == prefix_BxM[:, k : k + 1]
    col_J = jnp.arange(j)
    valid_BxJ = (col_J[None] >= start_B[:, None]) & (col_J[None] + n - 1 < cur)
    valid_BxJ &= (cur - (n - 1) >= start_B)[:, None]  # the row has n-1 tokens to match
    last_BxJ = tokens_BxT[:, n - 1 : n - 1 + j]
    hits_BxV = jnp.zeros((b, vocab), jnp.int32)
    hits_BxV = hits_BxV.at[jnp.arange(b)[:, None], last_BxJ].max((match_BxJ & valid_BxJ) * 1)
    return hits_BxV > 0


def filter_logits(logits_BxV: jax.Array, sampling: Sampling) -> jax.Array:
    """Logits / temperature with everything outside top-k and the top-p nucleus at -inf."""
    logits_BxV = logits_BxV.astype(jnp.float32) / sampling.temperature
    v = logits_BxV.shape[-1]
    if 0 < sampling.top_k < v:
        kth_Bx1 = jax.lax.top_k(logits_BxV, sampling.top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if sampling.top_p < 1.0:
        sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # Keep a token while the mass of the tokens before it is below p (the first always).
        keep_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < sampling.top_p
        n_keep_B = jnp.sum(keep_BxV, axis=-1)
        cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, n_keep_B[:, None] - 1, axis=-1)
        logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    return logits_BxV


def choose_tokens(logits_BxV: jax.Array, keys_B: jax.Array, sampling: Sampling) -> jax.Array:
    """Greedy at temperature 0, else one sample per row from the filtered distribution."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = filter_logits(logits_BxV, sampling)
    return jax.vmap(jax.random.categorical)(keys_B, logits_BxV).astype(jnp.int32)


# --------------------------------------------------------------------------- the decode loop


class DecodeState(NamedTuple):
    """Everything one decode step reads and writes."""

    cache: Any  # the model's `cache` collection (None when recomputing)
    tokens_BxT: jax.Array  # left-padded prompts, then the tokens decoded so far
    start_B: jax.Array  # first real column of each row
    cur: jax.Array  # scalar: the column the next token goes to
    logits_BxV: jax.Array  # next-token logits (float32)
    keys_B: jax.Array  # one PRNG key per row


def _row_layout(cfg: ModelConfig, start_B: jax.Array, cols: jax.Array):
    """Per-row positions (clipped to the position table) and segment ids of some columns."""
    pos_BxC = jnp.clip(cols[None, :] - start_B[:, None], 0, cfg.max_seq_len - 1)
    seg_BxC = (cols[None, :] >= start_B[:, None]).astype(jnp.int32)
    return pos_BxC.astype(jnp.int32), seg_BxC


def _full_logits(cfg: ModelConfig, params: Any, tokens_BxT: jax.Array, start_B: jax.Array):
    """Logits of every column of the padded buffer, computed from scratch."""
    pos_BxT, seg_BxT = _row_layout(cfg, start_B, jnp.arange(tokens_BxT.shape[1]))
    return build_model(cfg).apply({"params": params}, tokens_BxT, pos_BxT, seg_BxT)


@contextlib.contextmanager
def _layout(mesh: Mesh | None):
    """Inside a trace: apply the models' logical constraints on `mesh` (None: no constraints,
    the layout follows the parameters)."""
    if mesh is None:
        yield
        return
    with mesh_context(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield


@partial(jax.jit, static_argnames=("cfg", "total", "use_cache", "mesh"))
def _prefill(cfg, params, prompt_BxP, start_B, seed, rows_B, total: int, use_cache: bool, mesh):
    """Run the prompts once; the state holds the logits for the first new token."""
    with _layout(mesh):
        return _prefill_body(cfg, params, prompt_BxP, start_B, seed, rows_B, total, use_cache)


def _prefill_body(cfg, params, prompt_BxP, start_B, seed, rows_B, total: int, use_cache: bool):
    b, p = prompt_BxP.shape
    keys_B = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(seed), rows_B)
    tokens_BxT = jnp.zeros((b, total), jnp.int32).at[:, :p].set(prompt_BxP)
    cur = jnp.asarray(p, jnp.int32)
    if not use_cache:
        logits_BxV = _full_logits(cfg, params, tokens_BxT, start_B)[:, p - 1]
        return DecodeState(None, tokens_BxT, start_B, cur, logits_BxV.astype(jnp.float32), keys_B)
    model = build_model(cfg, decode=True)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens_BxT)["cache"])
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    pos_BxP, seg_BxP = _row_layout(cfg, start_B, jnp.arange(p))
    logits_BxPxV, vars_ = model.apply(
        {"params": params, "cache": cache}, prompt_BxP, pos_BxP, seg_BxP, mutable=["cache"]
    )
    logits_BxV = logits_BxPxV[:, -1].astype(jnp.float32)
    return DecodeState(vars_["cache"], tokens_BxT, start_B, cur, logits_BxV, keys_B)


@partial(jax.jit, static_argnames=("cfg", "sampling", "steps", "mesh"))
def _decode_chunk(cfg, params, state: DecodeState, sampling: Sampling, steps: int, mesh):
    """`steps` new tokens per row: choose from the logits, write, run the model on it."""
    with _layout(mesh):
        return _decode_chunk_body(cfg, params, state, sampling, steps)


def _decode_chunk_body(cfg, params, state: DecodeState, sampling: Sampling, steps: int):
    model = build_model(cfg, decode=True)

    def step(state: DecodeState, _):
        logits_BxV = state.logits_BxV
        n = sampling.no_repeat_ngram_size
        if n:
            banned_BxV = banned_by_ngrams(
                state.tokens_BxT, state.start_B, state.cur, n, logits_BxV.shape[-1]
            )
            logits_BxV = jnp.where(banned_BxV, -jnp.inf, logits_BxV)
        step_keys_B = jax.vmap(jax.random.fold_in, (0, None))(state.keys_B, state.cur)
        token_B = choose_tokens(logits_BxV, step_keys_B, sampling)
        tokens_BxT = jax.lax.dynamic_update_slice(
            state.tokens_BxT, token_B[:, None], (0, state.cur)
        )
        if state.cache is None:
            all_BxTxV = _full_logits(cfg, params, tokens_BxT, state.start_B)
            next_BxV, cache = jax.lax.dynamic_index_in_dim(all_BxTxV, state.cur, 1, False), None
        else:
            pos_Bx1, seg_Bx1 = _row_layout(cfg, state.start_B, state.cur[None])
            logits_Bx1xV, vars_ = model.apply(
                {"params": params, "cache": state.cache},
                token_B[:, None],
                pos_Bx1,
                seg_Bx1,
                mutable=["cache"],
            )
            next_BxV, cache = logits_Bx1xV[:, 0], vars_["cache"]
        new = DecodeState(
            cache,
            tokens_BxT,
            state.start_B,
            state.cur + 1,
            next_BxV.astype(jnp.float32),
            state.keys_B,
        )
        return new, token_B

    state, tokens_NxB = jax.lax.scan(step, state, None, length=steps)
    return state, tokens_NxB.T


def _left_pad(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_BxP right-aligned, start_B: the column where each row's prompt begins)."""
    p = 8 * -(-max(len(x) for x in prompts) // 8)  # fewer distinct shapes to compile
    out = np.zeros((len(prompts), p), np.int32)
    start = np.zeros(len(prompts), np.int32)
    for i, ids in enumerate(prompts):
        out[i, p - len(ids) :] = ids
        start[i] = p - len(ids)
    return out, start


def fit_prompt(cfg: ModelConfig, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """The prompt's end that leaves room for the new tokens within model.max_seq_len."""
    if cfg.recurrent:  # a carried state of fixed size: no length limit
        room = max(len(prompt_ids), 1)
    else:
        room = cfg.max_seq_len - max_new_tokens
    if room < 1:
        raise ConfigError(
            f"--max-new-tokens {max_new_tokens} leaves no room for the prompt within "
            f"model.max_seq_len={cfg.max_seq_len}; ask for fewer new tokens."
        )
    return list(prompt_ids)[-room:] or [0]


def new_token_limits(
    cfg: ModelConfig,
    prompt_lens: Sequence[int],
    max_new_tokens: int | None,
    max_length: int | None,
) -> list[int]:
    """New tokens for each prompt: `max_new_tokens`, or `max_length` (the total length, the
    prompt's tokens and BOS included, as Hugging Face's `max_length`) minus the prompt's.

    Given both, they must agree for every prompt. Refuses a total that leaves no room after
    a prompt or, for a Transformer, exceeds model.max_seq_len; one sentence each.
    """
    if max_length is None:
        return [max_new_tokens] * len(prompt_lens)
    if not cfg.recurrent and max_length > cfg.max_seq_len:
        raise ConfigError(
            f"--max-length {max_length} exceeds model.max_seq_len={cfg.max_seq_len}; "
            f"give at most {cfg.max_seq_len}, or use --max-new-tokens."
        )
    longest = max(prompt_lens, default=0)
    if max_length <= longest:
        raise ConfigError(
            f"--max-length {max_length} leaves no room after the {longest}-token prompt "
            f"(BOS included); give more than {longest}."
        )
    limits = [max_length - n for n in prompt_lens]
    for n, limit in zip(prompt_lens, limits, strict=True):
        if max_new_tokens is not None and limit != max_new_tokens:
            raise ConfigError(
                f"--max-length {max_length} and --max-new-tokens {max_new_tokens} disagree "
                f"for a {n}-token prompt ({limit} new tokens); give only one of them."
            )
    return limits


def decode(
    cfg: ModelConfig,
    params: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    *,
    seed: int = 0,
    row_ids: Sequence[int] | None = None,
    use_cache: bool = True,
    chunk_size: int | None = None,
    on_chunk: Callable[[np.ndarray], bool] | None = None,
    mesh: Mesh | None = None,
    row_limits: Sequence[int] | None = None,
) -> np.ndarray:
    """New tokens_BxN for a batch of prompts (trimmed by `fit_prompt`), uncut at EOS.

    `row_limits` (each at most max_new_tokens) caps row b at row_limits[b] new tokens: its
    prompt is fitted to that cap, and its tokens past the cap are filler to cut off.

    Row b samples with key fold_in(PRNGKey(seed), row_ids[b]) (default: b), so a row's
    tokens depend on its prompt and id only, not on what else shares the batch.
    `on_chunk(tokens_BxN_so_far)` runs after each chunk; returning True stops decoding
    early (the result then holds only the tokens decoded so far). With several processes,
    every one must call this with the same arguments.

    `mesh`, the mesh the parameters live on, lays the batch over its data-parallel axes; a
    mesh with a sequence axis is not used (the decode step is one token long).
    """
    sampling.check()
    limits = [max_new_tokens] * len(prompts) if row_limits is None else row_limits
    prompts = [fit_prompt(cfg, p, n) for p, n in zip(prompts, limits, strict=True)]
    b = len(prompts)
    if max_new_tokens <= 0:
        return np.zeros((b, 0), np.int32)
    chunk = max(1, min(chunk_size or max_new_tokens, max_new_tokens))
    n_chunks = -(-max_new_tokens // chunk)
    rows_B = np.arange(b) if row_ids is None else np.asarray(row_ids)
    if mesh is not None and mesh.shape.get("sequence", 1) != 1:
        mesh = None
    if mesh is not None:  # repeat the first row until the batch splits evenly; dropped below
        extra = -b % data_parallel_size(mesh)
        prompts = prompts + [prompts[0]] * extra
        rows_B = np.concatenate([rows_B, np.repeat(rows_B[:1], extra)])
    prompt_BxP, start_B = _left_pad(prompts)
    total = prompt_BxP.shape[1] + n_chunks * chunk
    seed = np.int32(seed)
    state = _prefill(cfg, params, prompt_BxP, start_B, seed, rows_B, total, use_cache, mesh)
    pieces: list[np.ndarray] = []
    for _ in range(n_chunks):
        state, new_BxC = _decode_chunk(cfg, params, state, sampling, chunk, mesh)
        pieces.append(to_host(new_BxC)[:b])
        so_far = np.concatenate(pieces, axis=1)[:, :max_new_tokens]
        if on_chunk is not None and on_chunk(so_far):
            return so_far
    return np.concatenate(pieces, axis=1)[:, :max_new_tokens]


def cut_at_eos(row: Sequence[int], eos_id: int | None) -> list[int]:
    """The tokens before the first EOS."""
    row = [int(t) for t in row]
    return row[: row.index(eos_id)] if eos_id is not None and eos_id in row else row


def generate(
    cfg: ModelConfig,
    params: Any,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    eos_id: int | None = None,
    num_samples: int = 1,
    mesh: Mesh | None = None,
) -> list[list[int]]:
    """Continue one prompt `num_samples` times; each continuation stops before EOS."""
    if max_new_tokens <= 0:
        return [[] for _ in range(num_samples)]
    out = decode(
        cfg,
        params,
        [prompt_ids] * num_samples,
        max_new_tokens,
        Sampling(temperature=float(temperature), top_k=int(top_k)),
        seed=seed,
        mesh=mesh,
    )
    return [cut_at_eos(row, eos_id) for row in out]
