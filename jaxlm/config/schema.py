"""The run configuration's schema: frozen dataclasses, one per section, each field with its
default and a one-line description (the `doc` metadata), and the allowed values.

Each model field is also marked *architecture* (the default: it decides which parameters
exist or what they mean, so a checkpoint's parameters fit only the same value) or
*runtime* (how the model runs: may change when resuming or fine-tuning from a checkpoint).
`layout` marks a runtime field that changes the parameter tree around the same base
parameters (stacked layers, LoRA adapters): `train.init_from` converts, a resume can't."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


def _f(default: Any, doc: str, *, runtime: bool = False, layout: bool = False) -> Any:
    """A field with its default and doc; model fields: runtime or architecture, and layout."""
    return field(default=default, metadata={"doc": doc, "runtime": runtime, "layout": layout})


FAMILY_DEFAULTS = {
    "gpt2": dict(norm="layernorm", position="learned", mlp="gelu", tie_embeddings=True, bias=True),
    "llama": dict(norm="rmsnorm", position="rope", mlp="swiglu", tie_embeddings=False, bias=False),
}


# Recurrent families mix time with a recurrence instead of attention, so the attention and
# position options are unused (left null). `hawk` is the RG-LRU model of De et al. (2024).
RECURRENT_DEFAULTS = {
    "lstm": dict(norm="layernorm", tie_embeddings=True, bias=True),
    "gru": dict(norm="layernorm", tie_embeddings=True, bias=True),
    "hawk": dict(norm="rmsnorm", mlp="swiglu", tie_embeddings=True, bias=False),
}


ATTENTION_IMPLS = ("reference", "xla", "dense", "cudnn", "splash", "pallas", "auto")

# How attention crosses mesh.sequence (jaxlm.models.context_attention).
CONTEXT_PARALLEL = ("none", "all_gather", "ring")

DTYPES = ("float32", "bfloat16", "float16")

NAN_POLICIES = ("stop", "skip")

REMAT_POLICIES = (
    "none",
    "full",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "save_attention_output",
    "save_qkv_attention",
)

MATMUL_PRECISIONS = ("default", "high", "highest")

MOE_ROUTERS = ("softmax", "sigmoid")

LORA_TARGETS = ("q", "k", "v", "o", "mlp")


@dataclass(frozen=True)
class ModelConfig:
    """The language model (a Transformer or RNN); [runtime] keys may differ from a checkpoint's."""

    family: str = _f(
        "llama", "gpt2 | llama (Transformers), lstm | gru | hawk (recurrent): fills in nulls"
    )
    vocab_size: int = _f(2048, "tokenizer vocabulary size; must equal the tokenizer's")
    d_model: int = _f(256, "residual stream width")
    n_layers: int = _f(4, "number of Transformer blocks or recurrent layers")
    n_heads: int = _f(4, "query heads; must divide d_model (hawk: blocks of the RG-LRU gates)")
    n_kv_heads: int | None = _f(None, "key/value heads for grouped-query attention (null: n_heads)")
    d_ff: int | None = _f(None, "MLP hidden width (null: 4*d_model for gelu, ~8/3*d_model swiglu)")
    max_seq_len: int = _f(
        256, "longest sequence a Transformer accepts (learned positions); recurrent: no limit"
    )
    norm: str | None = _f(None, "layernorm | rmsnorm (null: family default)")
    position: str | None = _f(None, "learned | rope (null: family default)")
    mlp: str | None = _f(None, "gelu | swiglu (null: family default)")
    tie_embeddings: bool | None = _f(None, "share input embedding and output head")
    bias: bool | None = _f(None, "biases in dense layers and norms")
    rope_theta: float = _f(10000.0, "rotary base frequency")
    norm_eps: float = _f(1e-5, "epsilon inside LayerNorm/RMSNorm")
    dropout: float = _f(0.0, "dropout rate on residual branches and embeddings", runtime=True)
    init_std: float = _f(0.02, "std of the normal initialiser (output projections scaled by depth)")
    attention: str = _f(
        "xla",
        "attention: reference | xla | dense | cudnn (GPU) | splash (TPU) | pallas | auto (best)",
        runtime=True,
    )
    context_parallel: str = _f(
        "none", "across mesh.sequence: none | all_gather | ring (attention=pallas)", runtime=True
    )
    dtype: str = _f(
        "float32", "compute dtype: float32 | bfloat16 | float16 (params stay float32)", runtime=True
    )
    rnn_residual: bool = _f(True, "lstm/gru: add each recurrent layer's input to its output")
    rnn_width: int | None = _f(
        None, "hawk: width of the RG-LRU state (null: ~4/3*d_model, a multiple of 8*n_heads)"
    )
    conv_width: int = _f(4, "hawk: taps of the causal depthwise conv before the RG-LRU")
    # The same parameters, but stacked under one name (jaxlm.models.scan): another tree.
    scan_layers: bool = _f(
        False,
        "Transformers: the blocks as one nn.scan (compile time independent of depth); init_from "
        "restacks a checkpoint's blocks, a resume can't",
        runtime=True,
        layout=True,
    )
    remat: str = _f(
        "none",
        "recompute in backward: " + " | ".join(REMAT_POLICIES) + " (jaxlm.models.scan)",
        runtime=True,
    )
    matmul_precision: str = _f(
        "default",
        "matmul precision: default | high | highest (f32 passes on TPU/GPU)",
        runtime=True,
    )
    # Mixture of experts (jaxlm.models.moe): Transformer families only; 0 experts = dense.
    moe_experts: int = _f(0, "experts per MoE layer (0: dense MLPs everywhere)")
    moe_top_k: int = _f(2, "experts each token is routed to")
    moe_d_ff: int | None = _f(None, "hidden width of each expert's MLP (null: d_ff)")
    moe_shared_experts: int = _f(
        0, "always-active shared experts per MoE layer, as one dense MLP of this many widths"
    )
    moe_every: int = _f(1, "every N-th block is MoE (blocks N-1, 2N-1, ...), the rest dense")
    moe_router: str = _f("softmax", "gate scores: softmax | sigmoid (top-k renormalised if k>1)")
    moe_aux_loss_weight: float = _f(
        0.01, "weight of the load-balancing loss (mean over MoE layers)", runtime=True
    )
    moe_z_loss_weight: float = _f(
        0.001, "weight of the router z-loss, mean log(Z)^2 of the router logits", runtime=True
    )
    moe_capacity_factor: float = _f(
        0.0,
        "0: dropless (grouped matmuls); c > 0: each expert takes at most c*tokens*top_k/experts "
        "tokens, the rest are dropped (counted in moe_dropped)",
        runtime=True,
    )
    # LoRA (jaxlm.models.lora): frozen base, trainable low-rank adapters; Transformers only.
    lora_rank: int = _f(
        0,
        "LoRA adapter rank (0: off); the base parameters are then frozen",
        runtime=True,
        layout=True,
    )
    lora_alpha: float = _f(16.0, "LoRA scale: adapters add (alpha/lora_rank) A B", runtime=True)
    lora_targets: str = _f(
        "q,v",
        "comma list of the kernels LoRA adapts: q, k, v, o (attention), mlp (dense MLPs)",
        runtime=True,
        layout=True,
    )

    @property
    def recurrent(self) -> bool:
        return self.family in RECURRENT_DEFAULTS

    @property
    def rnn_dim(self) -> int:
        if self.rnn_width:
            return self.rnn_width
        m = 8 * self.n_heads  # whole gate blocks of a tidy size
        return m * -(-4 * self.d_model // (3 * m))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def lora_target_set(self) -> frozenset[str]:
        """The kernels LoRA adapts (none when lora_rank is 0)."""
        names = str(self.lora_targets).split(",") if self.lora_rank else []
        return frozenset(t.strip() for t in names if t.strip())

    @property
    def moe_ff_dim(self) -> int:
        return self.moe_d_ff or self.ff_dim

    def is_moe_layer(self, i: int) -> bool:
        """Whether block i (from 0) has a mixture-of-experts MLP."""
        return self.moe_experts > 0 and (i + 1) % self.moe_every == 0

    @property
    def moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp == "swiglu":  # 2/3 of 4d keeps the parameter count of a gelu MLP
            return 64 * -(-int(8 * self.d_model / 3) // 64)
        return 4 * self.d_model


def runtime_fields() -> tuple[str, ...]:
    """Model fields that change how the model runs, not which parameters it has."""
    return tuple(f.name for f in fields(ModelConfig) if f.metadata["runtime"])


def architecture_fields() -> tuple[str, ...]:
    """Model fields that decide which parameters exist or what they mean."""
    return tuple(f.name for f in fields(ModelConfig) if not f.metadata["runtime"])


def layout_fields() -> tuple[str, ...]:
    """Runtime fields that store the same parameters in another tree (scan_layers)."""
    return tuple(f.name for f in fields(ModelConfig) if f.metadata["layout"])


def model_changes(old: Mapping[str, Any], new: ModelConfig) -> dict[str, tuple[Any, Any]]:
    """{field: (old, new)} for each model field that differs from `old` (a saved model dict).

    A field only one side has was added or removed since `old` was written: not a change.
    """
    return {
        f.name: (old[f.name], getattr(new, f.name))
        for f in fields(ModelConfig)
        if f.name in old and old[f.name] != getattr(new, f.name)
    }


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes batches."""

    corpus: str = _f(
        "builtin",
        "builtin (bundled Shakespeare), a glob of UTF-8 .txt files, or a `jaxlm data prepare` dir",
    )
    streaming: bool = _f(False, "corpus: raw files or globs (Parquet, JSONL...) tokenized as read")
    sources: list[dict[str, Any]] | None = _f(
        None,
        "mixture of prepared dirs, [{path: DIR, weight: W}, ...], W = token share; replaces corpus",
    )
    tokenizer: str | None = _f(
        None,
        "SentencePiece .model path (null: train one, cache in workdir; prepared data: its own)",
    )
    seq_len: int = _f(256, "tokens per packed training row")
    validation_fraction: float = _f(
        0.1, "share held out for validation: whole works (text), documents (prepared data)"
    )
    doc_chars: int = _f(2000, "works are cut into documents of about this many characters")
    seed: int = _f(0, "seed of the shuffle and of the train/validation split")
    streams: int | None = _f(
        None,
        "independent packed streams per global batch; divides batch_size. null: prepared data "
        "gets one per row (batch_size, fewer if a source has fewer documents), so any process "
        "count dividing the batch packs disjoint streams; in-memory text gets 1; a resumed run "
        "keeps what its checkpoints were saved with",
    )
    prefetch: int = _f(2, "batches prepared ahead in a background thread (0: off)")
    workers: int = _f(0, "processes reading and packing the streams (0: this one); same batches")
    cache_dir: str | None = _f(
        None,
        "local directory where shards read from gs:// or s3:// are copied once and "
        "memory-mapped (null: ~/.cache/jaxlm/objects, or $XDG_CACHE_HOME/jaxlm/objects)",
    )
    chat: str | None = _f(None, "SFT: JSONL conversation files, comma-separated; replaces corpus")
    chat_validation: str | None = _f(None, "SFT: JSONL validation conversations (null: a share)")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup and cosine decay."""

    lr: float = _f(3e-3, "peak learning rate")
    warmup_steps: int = _f(100, "linear warmup from 0 to lr")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of lr (cosine decay end)")
    b1: float = _f(0.9, "Adam beta1")
    b2: float = _f(0.95, "Adam beta2")
    eps: float = _f(1e-8, "Adam epsilon")
    weight_decay: float = _f(0.1, "decoupled weight decay on matrices (not norms or biases)")
    grad_clip: float = _f(1.0, "global-norm gradient clipping threshold (0: off)")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; one may be -1 meaning 'all remaining devices'.

    On several slices or nodes, dcn_data * dcn_fsdp must equal their number: those factors
    are the outer, slow part of the data and fsdp axes, the rest runs over the fast
    interconnect inside each one."""

    data: int = _f(-1, "data-parallel axis size, in total over all slices/nodes")
    fsdp: int = _f(1, "fully-sharded data-parallel axis size (params/optimizer sharded), in total")
    tensor: int = _f(1, "tensor-parallel axis size (heads and MLP sharded)")
    sequence: int = _f(1, "sequence-parallel axis size (activation length sharded)")
    expert: int = _f(
        1,
        "expert-parallel axis size: MoE experts' weights split over it; elsewhere it splits "
        "the batch like mesh.data (it must divide model.moe_experts)",
    )
    dcn_data: int = _f(
        1,
        "how many slices/nodes (granules: TPU slices, else processes) the data axis spans "
        "across the slow data-centre network; it must divide mesh.data, whose outer factor "
        "it is, and each granule holds mesh.data/dcn_data of the axis (1: one granule)",
    )
    dcn_fsdp: int = _f(
        1,
        "how many slices/nodes (granules) the fsdp axis spans across the data-centre network; "
        "it must divide mesh.fsdp and each granule holds mesh.fsdp/dcn_fsdp of it (1: one "
        "granule, so FSDP's all-gathers stay inside it)",
    )


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing of train state and data position."""

    every_steps: int = _f(500, "save every N steps (0: only at the end)")
    keep: int = _f(3, "keep the newest N checkpoints")
    async_save: bool = _f(True, "write checkpoints in the background")
    every_minutes: float = _f(30.0, "also save after this many minutes without a save (0: off)")
    keep_every: int = _f(0, "also keep every checkpoint whose step is a multiple of N (0: off)")
    agree_every: int = _f(
        10,
        "multi-process runs agree on stop signals and timed saves every N steps (each "
        "agreement waits for the device); one process checks every step",
    )


@dataclass(frozen=True)
class TrainConfig:
    """The training loop."""

    steps: int = _f(1000, "optimizer steps")
    batch_size: int = _f(32, "global batch size in rows of data.seq_len tokens")
    microbatches: int = _f(1, "gradient accumulation: split each batch into this many parts")
    seed: int = _f(0, "seed of parameter init and dropout")
    z_loss: float = _f(0.0, "weight of the log(Z)^2 auxiliary loss (0: off)")
    loss_chunk: int = _f(0, "apply head+loss N tokens at a time, never all logits (0: off)")
    log_every: int = _f(10, "write metrics every N steps")
    eval_every: int = _f(200, "evaluate on the validation split every N steps (0: only at end)")
    eval_batches: int = _f(16, "max validation batches per evaluation (0: the whole split)")
    sample_prompt: str = _f("ROMEO.\n", "prompt continued at the end of training")
    sample_tokens: int = _f(64, "tokens generated for each end-of-training sample")
    temperature: float = _f(0.8, "sampling temperature of the sampled continuation")
    top_k: int = _f(40, "top-k of the sampled continuation (0: off)")
    nan_policy: str = _f("stop", "non-finite loss or grad norm: stop (the run) | skip (the update)")
    max_skipped_steps: int = _f(
        10, "with nan_policy=skip, stop the run after this many skipped steps in a row"
    )
    init_from: str | None = _f(
        None, "fine-tune: start from this run/export/converted dir's params (fresh optimizer)"
    )
    profile_steps: list[Any] | None = _f(
        None,
        "take a jax.profiler trace of steps [first, last] (or a list of such windows) into "
        "WORKDIR/profile/, for TensorBoard's profile view or Perfetto (null: off)",
    )
    profile_all_processes: bool = _f(False, "every process writes a trace, not only process 0")


WANDB_MODES = ("online", "offline")


@dataclass(frozen=True)
class LoggingConfig:
    """Where a run's metrics go besides WORKDIR/metrics.jsonl (always written)."""

    tensorboard: bool = _f(True, "write TensorBoard event files into WORKDIR/tensorboard/")
    wandb_project: str | None = _f(
        None, "also log to this Weights & Biases project (pip install 'jaxlm[wandb]'; null: off)"
    )
    wandb_mode: str = _f("online", "online | offline (no network; upload later with wandb sync)")


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


_SECTION_CLASSES = {
    "model": ModelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "mesh": MeshConfig,
    "checkpoint": CheckpointConfig,
    "train": TrainConfig,
    "logging": LoggingConfig,
}
