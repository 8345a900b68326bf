"""The training loop: config -> data + model -> compiled step -> metrics and checkpoints.

Everything a run writes lives in its workdir: config.yaml (resolved, with jaxlm's version),
metrics.jsonl, tensorboard/, checkpoints/ (Orbax steps), checkpoints.damaged/ (unreadable
steps and interrupted saves, moved aside, never deleted), tokens/ and tokenizer.model (when
made here), profile/ (traces), train.lock while it runs.

Started again on the same workdir, a run resumes from its newest readable checkpoint and
continues bitwise as if it had never stopped; metrics logged after that checkpoint are
dropped from metrics.jsonl because the resumed run logs those steps again.

`train` reads as its steps: set up (every check on user input, before any compilation),
restore or initialise the state, then the step loop. Fine-tuning is not its business: a
caller that starts from other parameters passes `init_params`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh
from tqdm import tqdm

from jaxlm import config as config_lib
from jaxlm.config import RunConfig
from jaxlm.config.version import version_header
from jaxlm.data import pipeline
from jaxlm.data.dataset import Corpus, prepare_corpus
from jaxlm.errors import ConfigError, NonFiniteError
from jaxlm.models import build_model
from jaxlm.parallel.sharding import data_shards, make_mesh, process_rows, put_batch, validate_mesh
from jaxlm.paths import Path, as_path
from jaxlm.perf.flops import flops_per_token, inactive_params
from jaxlm.perf.peak import device_peak
from jaxlm.train.checkpoint import Checkpointer, abstract_with_shardings
from jaxlm.train.guard import StepBoundary, skip_nonfinite, tree_all_finite
from jaxlm.train.lock import hold_workdir
from jaxlm.train.metrics import MetricsWriter
from jaxlm.train.optimizer import optimizer_for
from jaxlm.train.resume import (
    IDENTITY_KEY,
    changed_settings,
    check_resumable,
    check_same_data,
    data_identity,
    keep_tokenizer,
    rewind_metrics,
)
from jaxlm.train.state import TrainState, init_train_state, param_count, state_shardings
from jaxlm.train.status import last_train_step, run_status
from jaxlm.train.step import jit_eval_step, jit_train_step, make_eval_step, train_step_for
from jaxlm.train.steplog import StepLog
from jaxlm.train.timing import Breakdown, Profiler, profile_windows

logger = logging.getLogger(__name__)

# Parameters to start from instead of a fresh initialisation (fine-tuning): called with the
# parameter shardings, returns parameters laid out with them.
InitParams = Callable[[Any], Any]


@dataclasses.dataclass
class Job:
    """What one training run works with; built and checked before anything compiles."""

    cfg: RunConfig
    workdir: Path
    mesh: Mesh
    data: Corpus
    train_iter: Any  # checkpointable iterator over this process's rows of each global batch
    eval_batches: list[dict[str, np.ndarray]]
    model: nn.Module
    tx: optax.GradientTransformation
    ckpt: Checkpointer
    abstract: TrainState  # shapes and dtypes of every state leaf
    shardings: TrainState  # NamedShardings of every state leaf
    identity: dict[str, Any] | None = None  # tokenizer and corpus fingerprints (resume.py)
    started: float = 0.0  # time.time() when `train` was called
    recomputed: int = 0  # steps logged before a crash that this session must do again


def train(
    cfg: RunConfig,
    workdir: str | Path,
    *,
    init_params: InitParams | None = None,
    progress: bool = True,
    stop: threading.Event | None = None,
    allow_data_change: bool = False,
) -> dict[str, Any]:
    """Train (or resume) the run in `workdir`; returns a summary of what happened.

    Setting `stop` (the CLI does on SIGTERM/SIGINT) saves a checkpoint at the next step
    boundary and returns early with `stopped_at` set to that step. The workdir is locked
    against other runs throughout (train.lock). `allow_data_change` resumes even when the
    tokenizer or corpus content differs from the checkpoint's.
    """
    started = time.time()
    workdir = as_path(workdir, "--workdir")
    with hold_workdir(workdir):
        job = set_up(cfg, workdir)
        job.started = started
        state, restored_step = restore_or_init(job, init_params, allow_data_change)
        start_step = int(jax.device_get(state.step))
        summary: dict[str, Any] = {
            "params": param_count(state.params),
            "active_params": param_count(state.params) - inactive_params(cfg.model),
            "flops_per_token": flops_per_token(cfg.model, cfg.data.seq_len),
            "start_step": start_step,
            "stopped_at": None,
            "tokenizer": job.data.tokenizer,
        }
        if start_step >= cfg.train.steps:
            job.ckpt.close()
            logger.info(
                "The run is complete at step %d; raise train.steps to train further.", start_step
            )
            return {**summary, "tokens_per_sec": None, "state": state}
        return _Loop(job, state, restored_step, summary, progress, stop).run()


def set_up(cfg: RunConfig, workdir: Path) -> Job:
    """Mesh, data, model, optimizer and checkpointer; every check on user input happens here."""
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(cfg.mesh)
    validate_mesh(cfg, mesh)
    n_shards, shard = data_shards(mesh)  # processes holding the same rows load the same
    data = prepare_corpus(cfg, workdir, shard=(shard, n_shards))
    if not data.train_docs:
        raise ConfigError(f"data.corpus={cfg.data.corpus!r} produced no training documents.")
    t = cfg.train
    train_iter = pipeline.make_train_iterator(
        data.sources or data.train_docs,
        cfg.data.seq_len,
        t.batch_size,
        cfg.data.seed,
        shard_index=shard,
        shard_count=n_shards,
        streams=data.streams,
        prefetch=cfg.data.prefetch,
        workers=cfg.data.workers,
    )
    eval_batches = pipeline.make_eval_batches(
        data.val_docs, cfg.data.seq_len, t.batch_size, max_batches=t.eval_batches or None
    )
    model = build_model(cfg.model)
    tx = optimizer_for(cfg, t.steps)
    abstract, shardings = state_shardings(model, tx, cfg.data.seq_len, mesh)
    return Job(
        cfg=cfg,
        workdir=workdir,
        mesh=mesh,
        data=data,
        train_iter=train_iter,
        eval_batches=[process_rows(b, mesh) for b in eval_batches],
        model=model,
        tx=tx,
        ckpt=Checkpointer(workdir / "checkpoints", cfg.checkpoint),
        abstract=abstract,
        shardings=shardings,
    )


def restore_or_init(
    job: Job, init_params: InitParams | None, allow_data_change: bool = False
) -> tuple[TrainState, int | None]:
    """(state, step it was restored from or None): the newest readable checkpoint, else new.

    The checkpoint's config and data are checked first and damaged newer steps are moved
    aside; the data iterator goes back to where that checkpoint left it.
    """
    cfg, workdir = job.cfg, job.workdir
    job.identity = identity = data_identity(cfg, job.data.tokenizer)

    def check(saved: dict[str, Any]) -> None:
        check_resumable(saved, cfg, workdir)
        check_same_data(saved, identity, cfg, workdir, allow_data_change)

    restored = job.ckpt.restore_latest(
        abstract_with_shardings(job.abstract, job.shardings),
        job.train_iter,
        check_config=check,
        move_damaged=True,
        log=logger.info,
    )
    if jax.process_index() == 0:  # only now, after every check: a refused command must not
        (workdir / "config.yaml").write_text(version_header() + config_lib.to_yaml(cfg), "utf-8")
        keep_tokenizer(job.data.tokenizer.path, workdir)
        resumed_at = -1 if restored is None else restored.step
        job.recomputed = max(0, last_train_step(workdir / "metrics.jsonl") - max(resumed_at, 0))
        dropped = rewind_metrics(workdir / "metrics.jsonl", resumed_at)
        if dropped:
            logger.info(
                "Dropped %d metrics records written after step %d.", dropped, max(resumed_at, 0)
            )
    if restored is not None:
        logger.info("Resumed from checkpoint step %d in %s", restored.step, job.ckpt.directory)
        changes = changed_settings(restored.config, cfg)
        if changes:
            logger.info("Settings changed since that checkpoint: %s", "; ".join(changes))
        return restored.state, restored.step
    state, _ = init_train_state(job.model, job.tx, cfg.data.seq_len, cfg.train.seed, job.mesh)
    if init_params is not None:  # e.g. a pretrained model's; optimizer and step start fresh
        state = state.replace(params=init_params(job.shardings.params))
    return state, None


def evaluate(eval_fn, params, batches: list[dict[str, np.ndarray]], mesh) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over the given validation batches."""
    loss_sum, tokens = 0.0, 0.0
    outs = [eval_fn(params, put_batch(b, mesh)) for b in batches]  # dispatch all, then read
    for out in jax.device_get(outs):
        loss_sum += float(out["loss_sum"])
        tokens += float(out["tokens"])
    loss = loss_sum / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


class _Loop:
    """The step loop of one run: compiled steps, and when to log, evaluate, save and stop."""

    def __init__(
        self,
        job: Job,
        state: TrainState,
        last_saved: int | None,
        summary: dict[str, Any],
        progress: bool,
        stop: threading.Event | None,
    ):
        cfg, t = job.cfg, job.cfg.train
        self.job, self.state, self.last_saved, self.summary = job, state, last_saved, summary
        self.start = summary["start_step"]
        is_main = jax.process_index() == 0
        fpt = summary["flops_per_token"]
        peak, peak_source = device_peak(cfg.model.dtype)  # MFU's denominator
        logger.info(
            "jaxlm: %s model, %.2fM parameters, %.1f MFLOPs/token (training), %d device(s) "
            "mesh %s, %s",
            cfg.model.family,
            summary["params"] / 1e6,
            fpt / 1e6,
            len(jax.devices()),
            dict(job.mesh.shape),
            job.data.sizes(),
        )
        logger.info("peak %.3g TFLOP/s per device (%s)", peak / 1e12, peak_source)
        if cfg.model.moe_experts:
            logger.info("mixture of experts: %.2fM parameters active per token (of %.2fM)",
                        summary["active_params"] / 1e6, summary["params"] / 1e6)  # fmt: skip

        step_fn = train_step_for(cfg, job.model, job.tx)
        if t.nan_policy == "skip":
            step_fn = skip_nonfinite(step_fn)
        self.step_fn = jit_train_step(step_fn, job.shardings, job.mesh)
        self.eval_fn = jit_eval_step(
            make_eval_step(job.model, cfg.train.loss_chunk), job.shardings.params, job.mesh
        )
        self.config_dict = {**config_lib.to_dict(cfg), IDENTITY_KEY: job.identity}
        self.writer = MetricsWriter.for_run(job.workdir, cfg.logging, self.config_dict, is_main)
        self.bar = None
        if progress and is_main:
            self.bar = tqdm(
                total=t.steps,
                initial=self.start,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )
        tokens_per_step = t.batch_size * cfg.data.seq_len
        self.timing = Breakdown()
        self.log = StepLog(
            self.writer, self.bar, self.start, tokens_per_step, fpt, t.nan_policy, peak,
            max_skipped=t.max_skipped_steps, timing=self.timing,
        )  # fmt: skip
        windows = profile_windows(t.profile_steps or [])
        self.profiler = Profiler(windows, job.workdir / "profile", t.profile_all_processes)
        setup_s = time.time() - job.started  # each start of the run: goodput's sessions
        session = {"start_step": self.start, "recomputed_steps": job.recomputed}
        self.writer.write(self.start, {**session, "setup_s": setup_s}, "session")
        self.done = self.start
        self.boundary = StepBoundary(stop, cfg.checkpoint.every_minutes, cfg.checkpoint.agree_every)
        self.history: list[tuple[int, float]] = []

    def evaluate(self, step: int) -> dict[str, float]:
        """Validation loss now; written, remembered and shown."""
        ev = evaluate(self.eval_fn, self.state.params, self.job.eval_batches, self.job.mesh)
        self.writer.write(step, ev, "eval")
        self.history.append((step, ev["loss"]))
        logger.info("step %d: val loss %.4f (perplexity %.1f)", step, ev["loss"], ev["perplexity"])
        return ev

    def save(self, step: int) -> None:
        """Checkpoint the state (never a non-finite one) with the data position and config."""
        if not bool(tree_all_finite(self.state)):
            raise NonFiniteError(
                f"The train state at step {step} holds non-finite values, so it was not saved "
                f"(last checkpoint: {self.last_saved}); lower optimizer.lr or raise warmup_steps."
            )
        self.job.ckpt.save(step, self.state, self.job.train_iter, self.config_dict)
        self.boundary.saved()
        self.last_saved = step

    def run(self) -> dict[str, Any]:
        """Steps from the current one to train.steps (or a stop signal); the final summary."""
        t, job, summary = self.job.cfg.train, self.job, self.summary
        first_eval = final_eval = None
        wait_for_saves = True
        try:
            if self.start == 0 and job.eval_batches:
                with self.timing.timed("eval"):
                    first_eval = self.evaluate(0)
            for step in range(self.start, t.steps):
                self.profiler.before_step(step + 1)
                with self.timing.timed("data"):
                    batch = put_batch(next(job.train_iter), job.mesh)
                with self.timing.timed("dispatch"):
                    self.state, metrics = self.step_fn(self.state, batch)
                self.done = step + 1
                self.profiler.after_step(step + 1, self.state)
                if self._after_step(step + 1, metrics):
                    logger.info("Stopped by a signal at step %d; checkpoint saved.", step + 1)
                    summary["stopped_at"] = step + 1
                    break
            else:
                if self.bar is not None:
                    self.bar.close()
                with self.timing.timed("eval"):
                    final_eval = self.evaluate(t.steps) if job.eval_batches else None
                if self.last_saved != t.steps:
                    with self.timing.timed("checkpoint"):
                        self.save(t.steps)
        except NonFiniteError:
            raise  # every process saw the same metrics and stops here: saves can finish
        except BaseException:
            # With several processes, an error here is usually a failed collective (a peer
            # died); a save in flight then waits for that peer forever, so don't wait for it.
            wait_for_saves = jax.process_count() == 1
            raise
        finally:
            self.profiler.close()
            if self.bar is not None:
                self.bar.close()
            if wait_for_saves:
                with self.timing.timed("checkpoint"):
                    job.ckpt.close()
            end = {f"{k}_s": v for k, v in self.timing.session.items()} | self.log.seconds()
            end |= {"steps": self.done - self.start, "wall_s": time.time() - job.started}
            self.writer.write(self.done, end, "session_end")
            self.writer.close()
        return {
            **summary,
            "tokens_per_sec": self.log.median_tokens_per_sec(),
            "skipped_steps": self.log.skipped,
            "first_eval_loss": None if first_eval is None else first_eval["loss"],
            "final_eval_loss": None if final_eval is None else final_eval["loss"],
            "eval_history": self.history,
            "goodput": run_status(job.workdir).get("goodput") if jax.process_index() == 0 else None,
            "state": self.state,
        }

    def _after_step(self, done: int, metrics: dict[str, jax.Array]) -> bool:
        """Log, evaluate and save as due after step `done`; True when a signal says stop."""
        t, every = self.job.cfg.train, self.job.cfg.checkpoint.every_steps
        self.log.add(done, metrics)
        stop_now, timed = self.boundary.poll(done)
        do_save = bool(every and done % every == 0) or timed or stop_now
        do_log = done % t.log_every == 0 or done == t.steps or stop_now
        do_eval = bool(self.job.eval_batches and t.eval_every and done % t.eval_every == 0)
        do_eval = do_eval and done != t.steps and not stop_now
        if do_log or do_save or do_eval:
            # Reading metrics blocks on the device; doing it only at these boundaries keeps
            # dispatch asynchronous in between. Every step's loss and gradient norm are thus
            # checked before any save.
            self.log.flush(self.last_saved)
        if do_log:
            self.log.perf(done)
        with self.log.paused():  # evaluating and starting a save are not training time
            if do_eval:
                with self.timing.timed("eval"):
                    self.evaluate(done)
            if do_save:
                with self.timing.timed("checkpoint"):
                    self.save(done)
        return stop_now
