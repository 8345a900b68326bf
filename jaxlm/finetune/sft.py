"""Supervised fine-tuning (SFT) on conversations: `jaxlm finetune sft`.

An SFT run is an LM fine-tuning run (finetune/lm.py: `train.init_from`, the checkpoint's
model config and tokenizer, a fresh optimizer) whose data is `data.chat`: JSONL
conversations rendered with the tokenizer's chat template (data/chat.py). The packed rows
carry a target mask, so the loss, its gradient and the validation loss count assistant
tokens only. It trains, shards, checkpoints and resumes exactly as `jaxlm train`.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxlm.config import RunConfig
from jaxlm.data.chat import Message, load_template, read_records
from jaxlm.finetune.lm import lm_finetune_config
from jaxlm.paths import absolute
from jaxlm.runs import Run


def sft_finetune_config(
    checkpoint: str,
    train_file: str,
    validation_file: str | None,
    config_path: str | None,
    overrides: list[str],
) -> RunConfig:
    """The run config of SFT from `checkpoint` on `train_file` (and `validation_file`).

    The chat files are read here once, so a bad record stops the command before JAX starts.
    """
    for path in (train_file, validation_file):
        if path is not None:
            read_records(path)
    chat = [f"data.chat={absolute(train_file)}"]
    if validation_file is not None:
        chat.append(f"data.chat_validation={absolute(validation_file)}")
    return lm_finetune_config(checkpoint, config_path, [*overrides, *chat])


def chat_prompts(run: Run, conversations: Sequence[Sequence[Message]]) -> list[list[int]]:
    """Token ids of each conversation followed by the assistant's turn marker, rendered with
    the run's chat template exactly as SFT rendered its training data."""
    template = load_template(run.tokenizer.path)
    return [
        template.encode(list(m), run.tokenizer, add_generation_prompt=True)[0]
        for m in conversations
    ]
