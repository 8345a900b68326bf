"""The training loop: config -> data + model -> compiled step -> metrics, checkpoints, samples.

Everything a run writes lives in its workdir:
  config.yaml       the resolved config          tokenizer.model/.vocab  (when trained here)
  metrics.jsonl     one JSON record per log/eval  tensorboard/            event files
  checkpoints/      Orbax steps                   samples.txt             end-of-run samples
  checkpoints.damaged/  unreadable steps and interrupted saves, moved aside (never deleted)

Started again on the same workdir, a run resumes from its newest readable checkpoint and
continues bitwise as if it had never stopped; metrics logged after that checkpoint are
dropped from metrics.jsonl because the resumed run logs those steps again.
"""

from __future__ import annotations

import math
import sys
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlm import config as config_lib
from jaxlm.config import RunConfig
from jaxlm.data import pipeline
from jaxlm.data.dataset import prepare_corpus
from jaxlm.errors import ConfigError, NonFiniteError
from jaxlm.finetune.lm import load_init_params, resolve_init_from
from jaxlm.inference.samples import write_samples
from jaxlm.models import build_model
from jaxlm.parallel.sharding import make_mesh, put_batch, validate_mesh
from jaxlm.perf.flops import flops_per_token
from jaxlm.perf.peak import device_peak
from jaxlm.train.checkpoint import Checkpointer, abstract_with_shardings
from jaxlm.train.guard import StepBoundary, skip_nonfinite, tree_all_finite
from jaxlm.train.metrics import MetricsWriter
from jaxlm.train.optimizer import make_optimizer
from jaxlm.train.resume import changed_settings, check_resumable, rewind_metrics
from jaxlm.train.state import init_train_state, param_count, state_shardings
from jaxlm.train.step import jit_eval_step, jit_train_step, make_eval_step, train_step_for
from jaxlm.train.steplog import StepLog


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


def train(
    cfg: RunConfig,
    workdir: str | Path,
    *,
    progress: bool = True,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Train (or resume) the run in `workdir`; returns a summary of what happened.

    Setting `stop` (the CLI does on SIGTERM/SIGINT) saves a checkpoint at the next step
    boundary and returns early with `stopped_at` set to that step.
    """
    workdir = Path(workdir)
    if cfg.train.init_from:  # fine-tuning: the source's tokenizer, its model config checked
        cfg = resolve_init_from(cfg)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
    t, m = cfg.train, cfg.model

    # Everything that can fail on user input is checked before the first compilation.
    mesh = make_mesh(cfg.mesh)
    validate_mesh(cfg, mesh)
    data = prepare_corpus(cfg, workdir)
    if not data.train_docs:
        raise ConfigError(f"data.corpus={cfg.data.corpus!r} produced no training documents.")
    n_proc, proc = jax.process_count(), jax.process_index()
    train_iter = pipeline.make_train_iterator(
        data.sources or data.train_docs,
        cfg.data.seq_len,
        t.batch_size,
        cfg.data.seed,
        shard_index=proc,
        shard_count=n_proc,
        streams=data.streams,
        prefetch=cfg.data.prefetch,
    )
    eval_batches = pipeline.make_eval_batches(
        data.val_docs, cfg.data.seq_len, t.batch_size, max_batches=t.eval_batches or None
    )
    eval_batches = [_process_rows(b, proc, n_proc) for b in eval_batches]

    model = build_model(m)
    tx = make_optimizer(cfg.optimizer, t.steps)
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    abstract, shardings = state_shardings(model, tx, cfg.data.seq_len, mesh)
    # The newest readable checkpoint, its config checked first; damaged newer ones are moved
    # aside. This also puts the data iterator back where that checkpoint left it.
    restored = ckpt.restore_latest(
        abstract_with_shardings(abstract, shardings),
        train_iter,
        check_config=lambda saved: check_resumable(saved, cfg, workdir),
        move_damaged=True,
        log=_log,
    )
    if is_main:  # only now, after every check: a refused command must not touch the run
        (workdir / "config.yaml").write_text(config_lib.to_yaml(cfg), encoding="utf-8")
        resumed_at = -1 if restored is None else restored.step
        dropped = rewind_metrics(workdir / "metrics.jsonl", resumed_at)
        if dropped:
            _log(f"Dropped {dropped} metrics records written after step {max(resumed_at, 0)}.")
    if restored is not None:
        state = restored.state
        _log(f"Resumed from checkpoint step {restored.step} in {ckpt.directory}")
        changes = changed_settings(restored.config, cfg)
        if changes:
            _log("Settings changed since that checkpoint: " + "; ".join(changes))
    else:
        state, _ = init_train_state(model, tx, cfg.data.seq_len, t.seed, mesh)
        if t.init_from:  # the source's parameters; optimizer and step start fresh
            state = state.replace(params=load_init_params(cfg, shardings.params))

    n_params = param_count(state.params)
    fpt = flops_per_token(m, cfg.data.seq_len)
    start_step = int(jax.device_get(state.step))
    summary: dict[str, Any] = {
        "params": n_params,
        "flops_per_token": fpt,
        "start_step": start_step,
        "stopped_at": None,
    }
    if start_step >= t.steps:
        ckpt.close()
        _log(f"The run is complete at step {start_step}; raise train.steps to train further.")
        return {**summary, "tokens_per_sec": None, "state": state}
    peak, peak_source = device_peak(m.dtype)  # MFU's denominator; cached per machine on CPU
    _log(
        f"jaxlm: {m.family} model, {n_params / 1e6:.2f}M parameters, "
        f"{fpt / 1e6:.1f} MFLOPs/token (training), {len(jax.devices())} device(s) "
        f"mesh {dict(mesh.shape)}, {len(data.train_docs)} train / {len(data.val_docs)} val docs"
    )
    _log(f"peak {peak / 1e12:.3g} TFLOP/s per device ({peak_source})")

    step_fn = train_step_for(cfg, model, tx)
    if t.nan_policy == "skip":
        step_fn = skip_nonfinite(step_fn)
    step_fn = jit_train_step(step_fn, shardings, mesh)
    eval_fn = jit_eval_step(make_eval_step(model), shardings.params, mesh)
    writer = MetricsWriter(workdir, enabled=is_main)
    config_dict = config_lib.to_dict(cfg)
    bar = _progress_bar(progress and is_main, start_step, t.steps)
    log = StepLog(writer, bar, start_step, t.batch_size * cfg.data.seq_len, fpt, t.nan_policy, peak)
    boundary = StepBoundary(stop, cfg.checkpoint.every_minutes)
    last_saved = None if restored is None else restored.step
    history: list[tuple[int, float]] = []

    def run_eval(step: int) -> dict[str, float]:
        ev = evaluate(eval_fn, state.params, eval_batches, mesh)
        writer.write(step, ev, "eval")
        history.append((step, ev["loss"]))
        _log_eval(bar, step, ev)
        return ev

    def save(step: int) -> None:
        nonlocal last_saved
        if not bool(tree_all_finite(state)):
            raise NonFiniteError(
                f"The train state at step {step} holds non-finite values, so it was not saved "
                f"(last checkpoint: {last_saved}); lower optimizer.lr or raise warmup_steps."
            )
        ckpt.save(step, state, train_iter, config_dict)
        boundary.saved()
        last_saved = step

    first_eval = final_eval = None
    every = cfg.checkpoint.every_steps
    wait_for_saves = True
    try:
        if start_step == 0 and eval_batches:
            first_eval = run_eval(0)
        for step in range(start_step, t.steps):
            state, metrics = step_fn(state, put_batch(next(train_iter), mesh))
            done = step + 1
            log.add(done, metrics)
            stop_now, timed = boundary.poll()
            do_save = bool(every and done % every == 0) or timed or stop_now
            do_log = done % t.log_every == 0 or done == t.steps or stop_now
            do_eval = bool(eval_batches and t.eval_every and done % t.eval_every == 0)
            do_eval = do_eval and done != t.steps and not stop_now
            if do_log or do_save or do_eval:
                # Reading metrics blocks on the device; doing it only at these boundaries
                # keeps dispatch asynchronous in between. Every step's loss and gradient
                # norm are thus checked before any save.
                log.flush(last_saved)
            if do_log:
                log.perf(done)
            with log.paused():  # evaluating and starting a save are not training time
                if do_eval:
                    run_eval(done)
                if do_save:
                    save(done)
            if stop_now:
                _log(f"Stopped by a signal at step {done}; checkpoint saved.")
                summary["stopped_at"] = done
                break
        else:
            if bar is not None:
                bar.close()
            if eval_batches:
                final_eval = run_eval(t.steps)
            if last_saved != t.steps:
                save(t.steps)
    except NonFiniteError:
        raise  # every process saw the same metrics and stops here: saves can finish
    except BaseException:
        # With several processes, an error here is usually a failed collective (a peer
        # died); a save in flight then waits for that peer forever, so don't wait for it.
        wait_for_saves = n_proc == 1
        raise
    finally:
        if bar is not None:
            bar.close()
        if wait_for_saves:
            ckpt.close()
        writer.close()

    samples = {}
    if summary["stopped_at"] is None and t.sample_tokens:
        samples = write_samples(cfg, state.params, data.tokenizer, workdir)
    return {
        **summary,
        "tokens_per_sec": log.median_tokens_per_sec(),
        "skipped_steps": log.skipped,
        "first_eval_loss": None if first_eval is None else first_eval["loss"],
        "final_eval_loss": None if final_eval is None else final_eval["loss"],
        "eval_history": history,
        "samples": samples,
        "state": state,
    }


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
