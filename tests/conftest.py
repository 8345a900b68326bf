"""Session-wide test settings, and what several test files share: tiny model and run configs,
the tiny runs they train, text to train on, and small helpers.

Each test file is named after the module it tests (`test_<layer>_<module>.py`) and takes what
it shares with other files from here (`from conftest import ...`); a test file run as a script
(the sharding workers) imports it the same way.
"""

# ruff: noqa: E402 - the environment below is set before JAX is imported

import functools
import gzip
import json
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

# Several test workers describe TPU topologies (ahead-of-time compiles, no TPU) at once; by
# default libtpu allows one process per machine and the second fails on its lockfile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import cli
from jaxlm.config import (
    DataConfig,
    MeshConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    load_config,
    resolve,
)
from jaxlm.data.pipeline import BATCH_KEYS
from jaxlm.data.tokenizer import train_tokenizer
from jaxlm.data.tokenizer_base import Tokenizer
from jaxlm.models import build_model
from jaxlm.parallel.sharding import make_mesh
from jaxlm.train.loss import cross_entropy_sums
from jaxlm.train.optimizer import make_optimizer
from jaxlm.train.state import init_train_state

TRANSFORMERS = ("gpt2", "llama")
RECURRENT = ("lstm", "gru", "hawk")
FAMILIES = TRANSFORMERS + RECURRENT
# The model fields that may change between a checkpoint and the run that reads it.
RUNTIME_FIELDS = {"attention", "dtype", "remat", "scan_layers", "matmul_precision", "dropout"}
RUNTIME_FIELDS |= {"moe_aux_loss_weight", "moe_z_loss_weight", "moe_capacity_factor"}
RUNTIME_FIELDS |= {"lora_rank", "lora_alpha", "lora_targets", "context_parallel"}

# Lower LLVM effort for subprocesses that mostly compile: the codegen level does not change HLO.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


# --- models ----------------------------------------------------------------------------------


def resolved_model(
    family: str, *, gqa: bool = False, untied: bool = False, **fields
) -> ModelConfig:
    """A ModelConfig of `family` with `fields` set and the family's defaults filled in.

    gqa: Llama gets 2 kv heads (grouped-query attention). untied: every family but GPT-2 gets
    an output head of its own, so greedy output isn't the input token. `fields` win over both.
    """
    kw = {}
    if gqa and family == "llama":
        kw["n_kv_heads"] = 2
    if untied and family != "gpt2":
        kw["tie_embeddings"] = False
    return resolve(RunConfig(model=ModelConfig(family=family, **{**kw, **fields}))).model


def loaded_model(family: str, *overrides: str) -> ModelConfig:
    """Two layers, 128 wide, 4 heads, vocabulary 1024, sequence 64, plus `section.key=value`
    overrides, as load_config makes it."""
    base = [f"model.family={family}", "model.n_layers=2", "model.d_model=128", "model.n_heads=4"]
    base += ["model.vocab_size=1024", "model.max_seq_len=64", "data.seq_len=64"]
    return load_config(None, base + list(overrides)).model


def train_step_model(family: str) -> ModelConfig:
    """The two-layer model of the train step and optimizer tests (vocabulary 64, sequence 16).

    A wide init makes per-token losses differ, so a wrong token weighting would show.
    """
    return resolved_model(
        family, gqa=True, vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16,
        init_std=0.3,
    )  # fmt: skip


@functools.cache
def init_params(cfg: ModelConfig, seq_len: int, seed: int = 0, eager: bool = False):
    """Unboxed float32 parameters of `cfg`, made once per test process (jitted unless `eager`).

    The tree does not depend on the attention implementation or dtype.
    """
    init = build_model(cfg).init if eager else jax.jit(build_model(cfg).init)
    return nn.unbox(init(jax.random.PRNGKey(seed), jnp.zeros((1, seq_len), jnp.int32))["params"])


def next_token_loss(model):
    """(params, tokens_BxS) -> summed cross-entropy of every token predicting the next one."""

    def loss(params, tokens_BxS):
        logits = model.apply({"params": params}, tokens_BxS)
        return cross_entropy_sums(logits, jnp.roll(tokens_BxS, -1, 1), jnp.ones(tokens_BxS.shape))[
            0
        ]

    return loss


def random_tokens(seed: int, shape: tuple[int, ...], vocab: int) -> np.ndarray:
    """Token ids drawn uniformly from the vocabulary."""
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


def padded_batch(
    rng: np.random.Generator, lengths, seq_len: int, vocab: int
) -> dict[str, np.ndarray]:
    """A train-step batch: row i holds lengths[i] random tokens, then padding (segment 0,
    weight 0)."""
    b = len(lengths)
    real_BxS = np.arange(seq_len)[None, :] < np.asarray(lengths)[:, None]
    return {
        "inputs": rng.integers(0, vocab, (b, seq_len)).astype(np.int32),
        "targets": rng.integers(0, vocab, (b, seq_len)).astype(np.int32),
        "segment_ids": real_BxS.astype(np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (b, seq_len)).copy(),
        "weights": real_BxS.astype(np.float32),
    }


def assert_trees_close(a, b, atol: float, rtol: float = 1e-5) -> None:
    """Every leaf of `a` is close to the same leaf of `b`."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


# --- runs ------------------------------------------------------------------------------------


def tiny_run_config(**train) -> RunConfig:
    """A resolved one-block run (vocabulary 300, sequence 16, 200 steps); `train` sets more of
    TrainConfig."""
    model = ModelConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=4, max_seq_len=16)
    data = DataConfig(seq_len=16)
    return resolve(RunConfig(model=model, data=data, train=TrainConfig(steps=200, **train)))


@pytest.fixture(scope="session")
def tiny_state():
    """(config, model, optimizer, initial train state) of tiny_run_config() on one device."""
    cfg = tiny_run_config()
    model, tx = build_model(cfg.model), make_optimizer(cfg.optimizer, cfg.train.steps)
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    state, _ = init_train_state(model, tx, cfg.data.seq_len, 0, mesh)
    return cfg, model, tx, state


# The smallest model the CLI and resume tests train (a few seconds on 2 cores); each test adds
# its own train/checkpoint overrides.
TINY_MODEL = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.vocab_size=512",
    "model.max_seq_len=32",
    "data.seq_len=32",
]

# A 3-step one-block Llama for runs launched as several processes: the work is start-up.
TINY_HOSTS = [
    "model.family=llama",
    "model.vocab_size=384",
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=4",
    "model.max_seq_len=32",
    "data.seq_len=32",
    "optimizer.warmup_steps=1",
    "train.steps=3",
    "train.batch_size=8",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
]

# A few-step run of the tiny model, checkpointed every 2 steps: the resume, lock and
# integrity tests train it, kill it and resume it.
TINY_TRAIN = [
    *TINY_MODEL,
    "train.batch_size=4",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    "optimizer.warmup_steps=1",
    "checkpoint.every_steps=2",
]

# The run the fine-tuning tests start from (`pretrained`) and build their models from.
TINY_LM = [
    *TINY_MODEL,
    "train.batch_size=8",
    "train.steps=30",
    "train.log_every=10",
    "train.eval_every=0",
    "train.eval_batches=2",
    "train.sample_tokens=0",
    "optimizer.lr=1e-2",
    "optimizer.warmup_steps=3",
    "checkpoint.every_steps=0",
]


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """A tiny Transformer LM trained for 30 steps on the bundled corpus (TINY_LM)."""
    workdir = tmp_path_factory.mktemp("pre") / "run"
    extra = ["train.eval_every=30", "checkpoint.every_steps=30"]
    assert cli.main(["train", "-w", str(workdir), "--no-progress", *TINY_LM, *extra]) == 0
    return workdir


# A short text that the shared tiny run below memorises: greedy decoding must reproduce it
# and scoring must find it far likelier than unseen text.
MEMORISED_TEXT = (
    "The quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire.\n\n"
    "A small bird sings a song of spring, and the old farmer smiles at the morning sun.\n\n"
)


@pytest.fixture(scope="session")
def memorised_run(tmp_path_factory):
    """A tiny Llama run that has memorised MEMORISED_TEXT (about 20 s on 2 CPU cores).

    Shared by the eval and generate tests, which only read it; it keeps checkpoints 30 and 60.
    """
    root = tmp_path_factory.mktemp("memorised")
    (root / "text").mkdir()
    for name in ("a", "b"):
        (root / "text" / f"{name}.txt").write_text(MEMORISED_TEXT * 20)
    overrides = [
        "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.vocab_size=320",
        "model.max_seq_len=64", "data.seq_len=64", "data.validation_fraction=0.5",
        f"data.corpus={root}/text/*.txt", "train.batch_size=8", "train.steps=60",
        "train.log_every=60", "train.eval_every=0", "train.eval_batches=1",
        "train.sample_tokens=0", "optimizer.warmup_steps=5", "optimizer.lr=1e-2",
        "checkpoint.every_steps=30",
    ]  # fmt: skip
    assert cli.main(["train", "-w", str(root / "run"), "--no-progress", *overrides]) == 0
    return root / "run"


# --- text ------------------------------------------------------------------------------------

_VERSE_WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly banjo "
    "players and then they sing of kings, queens, swords; what light through yonder window"
).split()


def tiny_texts(n_texts: int = 10, lines: int = 20) -> list[str]:
    """Seeded texts of capitalised 12-word lines."""
    rng = random.Random(0)
    return [
        "\n".join(
            " ".join(rng.choice(_VERSE_WORDS) for _ in range(12)).capitalize() + "."
            for _ in range(lines)
        )
        for _ in range(n_texts)
    ]


@pytest.fixture(scope="session")
def tiny_tok(tmp_path_factory) -> Tokenizer:
    """A 400-piece SentencePiece tokenizer trained on tiny_texts()."""
    path = tmp_path_factory.mktemp("tok") / "tiny.model"
    return train_tokenizer(tiny_texts(), str(path), vocab_size=400)


_PROSE_WORDS = (
    "the quick brown fox jumps over a lazy dog while kings sing of swords and light".split()
)


def paragraph(rng: random.Random, words: int = 12) -> str:
    """One capitalised sentence of `words` random words."""
    return " ".join(rng.choice(_PROSE_WORDS) for _ in range(words)).capitalize() + "."


def write_corpus(root: Path, seed: int = 0) -> dict[str, list[str]]:
    """Text, blank-line text, JSONL and gzip inputs; returns each file's expected documents."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    docs: dict[str, list[str]] = {}
    for i in range(3):
        text = f"Document {i}, naïve 東京.\n{paragraph(rng)}\n"
        (root / f"a{i}.txt").write_text(text, encoding="utf-8")
        docs[f"a{i}.txt"] = [text]
    records = [{"text": paragraph(rng, 20), "id": j} for j in range(12)]
    (root / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), "utf-8")
    docs["b.jsonl"] = [r["text"] for r in records]
    gz_records = [{"text": paragraph(rng, 8)} for _ in range(5)]
    with gzip.open(root / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in gz_records)
    docs["c.jsonl.gz"] = [r["text"] for r in gz_records]
    with gzip.open(root / "d.txt.gz", "wt", encoding="utf-8") as f:
        f.write("Zipped text.\n")
    docs["d.txt.gz"] = ["Zipped text.\n"]
    return docs


# --- errors and processes --------------------------------------------------------------------


def cli_error(argv: list[str], capsys) -> str:
    """Run `jaxlm ARGV`, which must exit with 2 and one line on stderr; returns that line."""
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, f"expected one line, got: {err!r}"
    return err


def assert_one_sentence(message: str) -> None:
    """A user-facing error is one line, ends with a full stop and holds no second sentence."""
    assert "\n" not in message, f"error spans several lines: {message!r}"
    assert message.endswith("."), message
    assert not re.search(r"[.!?]\s+[A-Z]", message), f"more than one sentence: {message!r}"


def fake_devices_env(n: int, *xla_flags: str) -> dict[str, str]:
    """The environment of a subprocess whose JAX sees `n` CPU devices.

    XLA reads the device count once, when it starts, so only a new process gets more devices
    than this one.
    """
    flags = " ".join([f"--xla_force_host_platform_device_count={n}", *xla_flags])
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}


def run_workers(script: str, kinds: tuple[str, ...], timeout: float) -> dict[str, dict]:
    """`python script KIND` for each kind, on 8 fake devices, started together; each
    worker's last stdout line is its JSON result."""
    env = fake_devices_env(8, FAST_XLA)
    procs = {
        kind: subprocess.Popen(
            [sys.executable, script, kind],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for kind in kinds
    }
    results = {}
    for kind, p in procs.items():
        stdout, stderr = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"{kind} worker failed:\n{stderr[-4000:]}"
        results[kind] = json.loads(stdout.strip().splitlines()[-1])
    return results


# --- token documents (data pipeline and views) -----------------------------------------------

BOS, EOS = 2, 3


def numbered_docs(
    n_docs: int, base: int, lo: int = 2, hi: int = 30, seed: int = 0
) -> list[np.ndarray]:
    """[bos, distinct ids..., eos]; document j's ids are base + 1000*j + (0, 1, ...)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi, size=n_docs)
    return [
        np.asarray([BOS, *range(base + 1000 * j, base + 1000 * j + n - 2), EOS], np.int32)
        for j, n in enumerate(lengths)
    ]


def assert_same_batches(a, b) -> None:
    """Two lists of batches hold the same arrays under every batch key."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k])


class RecordingDocs:
    """A document list that remembers which documents were read."""

    def __init__(self, docs):
        self.docs, self.read = docs, set()

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        self.read.add(int(i))
        return self.docs[i]


# --- object stores ---------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on 127.0.0.1 for this test session.

    Yields the environment a client (this process or a `jaxlm` subprocess) needs to reach it;
    the variables are also set in this process while the session lasts. Skips only when the
    server can't start. Make a bucket per test with `new_bucket()`.
    """
    import logging

    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        pytest.skip(f"moto[server] is not installed ({e})")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    try:
        server.start()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"the S3 test server did not start ({e})")
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "jaxlm-test-key",
        "AWS_SECRET_ACCESS_KEY": "jaxlm-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        try:
            yield env
        finally:
            server.stop()


_BUCKETS = iter(range(1_000_000))


def new_bucket(env: dict[str, str]) -> str:
    """A fresh, empty bucket on the test server; returns 's3://NAME'."""
    import boto3

    name = f"jaxlm-test-{os.getpid()}-{next(_BUCKETS)}"
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def gcs_server():
    """A GCS emulator (gcp-storage-emulator, in memory) on 127.0.0.1 for this test session.

    Yields the environment that points every gs:// client at it: gcsfs and google-cloud-storage
    read STORAGE_EMULATOR_HOST, tensorstore (Orbax's array data) TENSORSTORE_GCS_HTTP_URL and a
    fixed token from GOOGLE_AUTH_TOKEN_FOR_TESTING; gcsfs's bucket-layout probe, which would go
    to Google's control API, is off. The variables are also set in this process while the
    session lasts. Skips only when the emulator can't start. Make a bucket per test with
    `new_gcs_bucket()`.
    """
    import logging

    try:
        import gcsfs
        from gcp_storage_emulator.server import create_server
    except ImportError as e:
        pytest.skip(f"gcp-storage-emulator or gcsfs is not installed ({e})")
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    api = getattr(server, "_api", None)  # the emulator's server thread (a private attribute)
    if api is not None:
        api.daemon = True  # a session that fails must not hang on it at exit
    try:
        server.start()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"the GCS emulator did not start ({e})")
    if getattr(api, "_httpd", None) is not None:
        # Clients that hang up early would print a BrokenPipe traceback per request.
        api._httpd.handle_error = lambda request, client_address: None
    host = f"http://127.0.0.1:{port}"
    env = {
        "STORAGE_EMULATOR_HOST": host,
        "TENSORSTORE_GCS_HTTP_URL": host,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "jaxlm-test-token",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    # gcsfs may have been imported with its extended filesystem, which probes each bucket's
    # layout through Google's gRPC control API; the plain one serves gs:// for the session.
    registry = sys.modules["fsspec.registry"]._registry
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        for protocol in ("gs", "gcs"):
            mp.setitem(registry, protocol, gcsfs.core.GCSFileSystem)
        _forget_gcs_clients()  # clients read the endpoint when they are made
        try:
            yield env
        finally:
            server.stop()
            _forget_gcs_clients()


def _forget_gcs_clients() -> None:
    """Drop the cached gs:// clients (gcsfs's and epath's own cache of them)."""
    import gcsfs
    from etils import epath

    gcsfs.core.GCSFileSystem.clear_instance_cache()
    epath.backend.fsspec_backend._get_filesystem.cache_clear()


def new_gcs_bucket(env: dict[str, str]) -> str:
    """A fresh, empty bucket on the GCS emulator; returns 'gs://NAME'."""
    import fsspec

    name = f"jaxlm-test-{os.getpid()}-{next(_BUCKETS)}"
    fsspec.filesystem("gs", endpoint_url=env["STORAGE_EMULATOR_HOST"]).mkdir(name)
    return f"gs://{name}"
