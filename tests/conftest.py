"""Session-wide test settings."""

import os

import pytest

# Several test workers describe TPU topologies (ahead-of-time compiles, no TPU) at once; by
# default libtpu allows one process per machine and the second fails on its lockfile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


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
    from jaxlm import cli

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
