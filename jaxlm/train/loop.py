"""The training loop: config -> data + model -> compiled step -> metrics, checkpoints, samples.

Everything a run writes lives in its workdir:
  config.yaml       the resolved config          tokenizer.model/.vocab  (when trained here)
  metrics.jsonl     one JSON record per log/eval  tensorboard/            event files
  checkpoints/      Orbax steps                   samples.txt             end-of-run samples
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlm import config as config_lib
from jaxlm.checkpoint import Checkpointer, abstract_with_shardings
from jaxlm.config import ConfigError, RunConfig
from jaxlm.data import corpus, pipeline
from jaxlm.data.tokenizer import Tokenizer, load_or_train_tokenizer
from jaxlm.generate import generate
from jaxlm.metrics import MetricsWriter, flops_per_token
from jaxlm.models.transformer import build_model
from jaxlm.sharding import check_divisibility, make_mesh, put_batch
from jaxlm.train.optimizer import lr_schedule, make_optimizer
from jaxlm.train.state import init_train_state, param_count, state_shardings
from jaxlm.train.step import jit_eval_step, jit_train_step, make_eval_step, make_train_step


@dataclasses.dataclass
class Corpus:
    """Tokenised train/validation documents and the tokenizer that made them."""

    tokenizer: Tokenizer
    train_docs: list[np.ndarray]
    val_docs: list[np.ndarray]
    train_works: list[str]
    val_works: list[str]


def prepare_corpus(cfg: RunConfig, workdir: Path) -> Corpus:
    """Read works, split by whole works, load or train the tokenizer, tokenise documents."""
    d = cfg.data
    works = (
        corpus.load_builtin_works() if d.corpus == "builtin" else corpus.read_text_works(d.corpus)
    )
    train_works, val_works = corpus.train_validation_split(works, d.validation_fraction, d.seed)

    def split_docs(ws):
        return [doc for w in ws for doc in corpus.split_documents(w.text, d.doc_chars)]

    train_text, val_text = split_docs(train_works), split_docs(val_works)
    tok = load_or_train_tokenizer(
        d.tokenizer, str(workdir / "tokenizer.model"), lambda: train_text, cfg.model.vocab_size
    )
    return Corpus(
        tokenizer=tok,
        train_docs=pipeline.tokenize_documents(train_text, tok),
        val_docs=pipeline.tokenize_documents(val_text, tok),
        train_works=[w.name for w in train_works],
        val_works=[w.name for w in val_works],
    )


def evaluate(eval_fn, params, batches: list[dict[str, np.ndarray]], mesh) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over the given validation batches."""
    loss_sum, tokens = 0.0, 0.0
    outs = [eval_fn(params, put_batch(b, mesh)) for b in batches]  # dispatch all, then read
    for out in jax.device_get(outs):
        loss_sum += float(out["loss_sum"])
        tokens += float(out["tokens"])
    loss = loss_sum / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def train(cfg: RunConfig, workdir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the run in `workdir`; returns a summary of what happened."""
    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
    t, m = cfg.train, cfg.model

    # Everything that can fail on user input is checked before the first compilation.
    mesh = make_mesh(cfg.mesh)
    check_divisibility(mesh, t.batch_size, t.microbatches)
    data = prepare_corpus(cfg, workdir)
    if not data.train_docs:
        raise ConfigError(f"data.corpus={cfg.data.corpus!r} produced no training documents.")
    n_proc, proc = jax.process_count(), jax.process_index()
    train_iter = pipeline.make_train_iterator(
        data.train_docs,
        cfg.data.seq_len,
        t.batch_size,
        cfg.data.seed,
        shard_index=proc,
        shard_count=n_proc,
    )
    eval_batches = pipeline.make_eval_batches(data.val_docs, cfg.data.seq_len, t.batch_size)
    if t.eval_batches:
        eval_batches = eval_batches[: t.eval_batches]
    eval_batches = [_process_rows(b, proc, n_proc) for b in eval_batches]

    model = build_model(m)
    tx = make_optimizer(cfg.optimizer, t.steps)
    schedule = lr_schedule(cfg.optimizer, t.steps)
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    latest = ckpt.latest_step()
    if latest is not None:
        check_resumable(ckpt.restore_config(latest), cfg, workdir)
    if is_main:  # only now, after every check: a refused command must not touch the run
        (workdir / "config.yaml").write_text(config_lib.to_yaml(cfg), encoding="utf-8")
    if latest is not None:
        abstract, shardings = state_shardings(model, tx, cfg.data.seq_len, mesh)
        state = ckpt.restore(latest, abstract_with_shardings(abstract, shardings), train_iter)
        _log(f"Resumed from checkpoint step {latest} in {ckpt.directory}")
    else:
        state, shardings = init_train_state(model, tx, cfg.data.seq_len, t.seed, mesh)

    n_params = param_count(state.params)
    fpt = flops_per_token(m, cfg.data.seq_len)
    tokens_per_step = t.batch_size * cfg.data.seq_len
    _log(
        f"jaxlm: {m.family} model, {n_params / 1e6:.2f}M parameters, "
        f"{fpt / 1e6:.1f} MFLOPs/token (training), {len(jax.devices())} device(s) "
        f"mesh {dict(mesh.shape)}, {len(data.train_docs)} train / {len(data.val_docs)} val docs"
    )

    step_fn = jit_train_step(
        make_train_step(
            model,
            tx,
            microbatches=t.microbatches,
            z_loss=t.z_loss,
            dropout=m.dropout > 0,
            schedule=schedule,
        ),
        shardings,
        mesh,
    )
    eval_fn = jit_eval_step(make_eval_step(model), shardings.params, mesh)
    writer = MetricsWriter(workdir, enabled=is_main)
    config_dict = config_lib.to_dict(cfg)

    start_step = int(jax.device_get(state.step))
    history: dict[str, list] = {"eval": []}
    bar = _progress_bar(progress and is_main, start_step, t.steps)
    pending: list[tuple[int, Any]] = []
    window_start, window_tokens, throughput = time.perf_counter(), 0, []
    first_eval = None
    if start_step == 0 and eval_batches:
        first_eval = evaluate(eval_fn, state.params, eval_batches, mesh)
        writer.write(0, first_eval, "eval")
        history["eval"].append((0, first_eval["loss"]))
        _log(f"step 0: val loss {first_eval['loss']:.4f}")
    for step in range(start_step, t.steps):
        batch = put_batch(next(train_iter), mesh)
        state, metrics = step_fn(state, batch)
        pending.append((step + 1, metrics))
        window_tokens += tokens_per_step
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
            # Reading metrics blocks on the device; doing it every log_every steps keeps
            # dispatch asynchronous in between.
            values = jax.device_get([mt for _, mt in pending])
            elapsed = time.perf_counter() - window_start
            tok_s = window_tokens / max(elapsed, 1e-9)
            if step + 1 - len(pending) > start_step:  # skip the window holding compilation
                throughput.append(tok_s)
            for (s, _), v in zip(pending, values, strict=True):
                writer.write(s, v, "train")
            last = values[-1]
            writer.write(
                done,
                {
                    "tokens_per_sec": tok_s,
                    "tflops_per_sec_per_device": tok_s * fpt / 1e12 / len(jax.devices()),
                },
                "perf",
            )
            if bar is not None:
                bar.set_postfix(
                    loss=f"{float(last['loss']):.3f}", tok_s=f"{tok_s:,.0f}", refresh=False
                )
                bar.update(len(pending))
            elif is_main:
                _log(f"step {done}: loss {float(last['loss']):.4f} {tok_s:,.0f} tok/s")
            pending, window_start, window_tokens = [], time.perf_counter(), 0
        do_eval = bool(eval_batches and t.eval_every and done % t.eval_every == 0)
        do_eval = do_eval and done != t.steps
        do_save = bool(cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0)
        if do_eval or do_save:
            jax.block_until_ready(state.step)  # finish training work before the pause clock
        paused = time.perf_counter()
        if do_eval:
            ev = evaluate(eval_fn, state.params, eval_batches, mesh)
            writer.write(done, ev, "eval")
            history["eval"].append((done, ev["loss"]))
            _log_eval(bar, done, ev)
        if do_save:
            ckpt.save(done, state, train_iter, config_dict)
        # Time spent evaluating or starting a save is not training time: keep it out of tok/s.
        window_start += time.perf_counter() - paused
    if bar is not None:
        bar.close()
    final_eval = None
    if eval_batches:
        final_eval = evaluate(eval_fn, state.params, eval_batches, mesh)
        writer.write(t.steps, final_eval, "eval")
        history["eval"].append((t.steps, final_eval["loss"]))
        _log(
            f"step {t.steps}: val loss {final_eval['loss']:.4f} "
            f"(perplexity {final_eval['perplexity']:.1f})"
        )
    if ckpt.latest_step() != t.steps:
        ckpt.save(t.steps, state, train_iter, config_dict)
    ckpt.close()
    writer.close()

    samples = write_samples(cfg, state.params, data.tokenizer, workdir) if t.sample_tokens else {}
    tok_s = float(np.median(throughput)) if throughput else None
    return {
        "params": n_params,
        "flops_per_token": fpt,
        "tokens_per_sec": tok_s,
        "first_eval_loss": None if first_eval is None else first_eval["loss"],
        "final_eval_loss": None if final_eval is None else final_eval["loss"],
        "eval_history": history["eval"],
        "samples": samples,
        "state": state,
    }


# Keys that fix the shapes or meaning of the saved state/data; everything else may change.
RESUME_CRITICAL = (
    "model",
    "data.seq_len",
    "data.corpus",
    "data.tokenizer",
    "data.seed",
    "data.validation_fraction",
    "data.doc_chars",
    "train.batch_size",
)


def check_resumable(saved: dict[str, Any], cfg: RunConfig, workdir: Path) -> None:
    """Refuse to resume a run whose checkpoint was written with an incompatible config."""
    now = config_lib.to_dict(cfg)
    for key in RESUME_CRITICAL:
        section, _, name = key.partition(".")
        old_v, new_v = saved.get(section, {}), now[section]
        if name:
            old_v, new_v = old_v.get(name), new_v[name]
        if old_v != new_v:
            if not name:  # name the first differing model field
                diff = [k for k in new_v if old_v.get(k) != new_v[k]]
                key, old_v, new_v = f"model.{diff[0]}", old_v.get(diff[0]), new_v[diff[0]]
            raise ConfigError(
                f"{key}={new_v!r} differs from the checkpoint in '{workdir}' ({old_v!r}), so "
                f"the run can't resume; restore the old value or use a new --workdir."
            )


def write_samples(cfg: RunConfig, params, tok: Tokenizer, workdir: Path) -> dict[str, str]:
    """A greedy and a sampled continuation of the configured prompt; printed and saved."""
    t = cfg.train
    prompt_ids = tok.encode(t.sample_prompt, bos=True)
    params = jax.device_get(params)  # decoding runs unsharded on one device
    out = {}
    for name, temp, top_k in (("greedy", 0.0, 0), ("sampled", t.temperature, t.top_k)):
        ids = generate(
            cfg.model,
            params,
            prompt_ids,
            t.sample_tokens,
            temperature=temp,
            top_k=top_k,
            seed=t.seed,
            eos_id=tok.eos_id,
        )[0]
        out[name] = t.sample_prompt + tok.decode(ids)
    if jax.process_index() == 0:
        text = "".join(
            f"--- {name} (temperature {temp}) ---\n{out[name]}\n\n"
            for name, temp in (("greedy", 0.0), ("sampled", t.temperature))
        )
        (workdir / "samples.txt").write_text(text, encoding="utf-8")
        print(text, end="", flush=True)
    return out


def _process_rows(batch: dict[str, np.ndarray], index: int, count: int) -> dict[str, np.ndarray]:
    """This process's contiguous block of rows of a global batch."""
    if count == 1:
        return batch
    n = next(iter(batch.values())).shape[0] // count
    return {k: v[index * n : (index + 1) * n] for k, v in batch.items()}


def _progress_bar(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr
    )


def _log_eval(bar, step: int, ev: dict[str, float]) -> None:
    msg = f"step {step}: val loss {ev['loss']:.4f} (perplexity {ev['perplexity']:.1f})"
    if bar is not None:
        bar.write(msg, file=sys.stderr)
    else:
        _log(msg)
