"""A conversation with a language model: turns -> prompt ids -> one streamed reply at a time.

The turns are encoded with the chat template fine-tuning trains with (jaxlm.data.chat: the
tokenizer's own Hugging Face template when it has one, else the default role markers, each
assistant turn closed by EOS), and kept within the context window by dropping the oldest exchanges: the prompt always starts
at a user turn, and the newest user turn is always kept (`fit_prompt` keeps the end of one
that alone is too long). Recurrent models carry a state of fixed size and keep every turn.

A reply ends at EOS, at `max_new_tokens`, or where the model starts a new turn (a header of
the template, `STOPS`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh

from jaxlm.config import ModelConfig
from jaxlm.data.chat import ChatTemplate, DefaultTemplate, load_template
from jaxlm.data.tokenizer_base import Tokenizer
from jaxlm.inference.generate import Sampling, cut_at_eos, decode

USER, ASSISTANT = "user", "assistant"
STOPS = ("<|user|>", "<|assistant|>")  # where the model starts a turn of its own
STREAM_CHUNK = 4  # tokens decoded between two prints of a streamed reply

GREEDY = Sampling()

Turn = tuple[str, str]  # (role: "user" | "assistant", content)


def prompt_ids(template: ChatTemplate, tokenizer: Tokenizer, turns: Sequence[Turn]) -> list[int]:
    """The ids of `turns` as the template renders them for training, then the opening of
    the assistant's reply."""
    messages = [{"role": role, "content": content} for role, content in turns]
    return template.encode(messages, tokenizer, add_generation_prompt=True)[0]


def prompt_room(cfg: ModelConfig, max_new_tokens: int) -> int | None:
    """How many prompt tokens fit beside the reply (None: no limit, a recurrent model)."""
    return None if cfg.recurrent else cfg.max_seq_len - max_new_tokens


def fit_turns(
    tokenizer: Tokenizer,
    turns: Sequence[Turn],
    room: int | None,
    template: ChatTemplate | None = None,
) -> tuple[list[int], int]:
    """(prompt ids of the turns from the oldest user turn that fits `room`; the number of
    turns dropped before it). The newest user turn is always kept. Default: DefaultTemplate."""
    template = template or DefaultTemplate()
    starts = [i for i, (role, _) in enumerate(turns) if role == USER] or [0]
    for start in starts:
        ids = prompt_ids(template, tokenizer, turns[start:])
        if room is None or len(ids) <= room:
            return ids, start
    return ids, starts[-1]


def reply_text(tokenizer: Tokenizer, row: Sequence[int]) -> str:
    """A reply's text: its tokens before EOS, cut where a new turn starts, stripped."""
    text = tokenizer.decode(cut_at_eos(row, tokenizer.eos_id))
    hits = [i for i in (text.find(s) for s in STOPS) if i >= 0]
    return (text[: min(hits)] if hits else text).strip()


class Chat:
    """One conversation with a loaded model; `turns` is the history the next prompt holds.

    Reply n (counted from the last reset) samples with seed `seed` and row id n, so a
    conversation replays exactly, also after a reset.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        params: Any,
        tokenizer: Tokenizer,
        sampling: Sampling = GREEDY,
        max_new_tokens: int = 100,
        *,
        seed: int = 0,
        mesh: Mesh | None = None,
        template: ChatTemplate | None = None,
    ) -> None:
        sampling.check()
        self.template = template or load_template(tokenizer.path)
        self.cfg, self.params, self.tokenizer, self.mesh = cfg, params, tokenizer, mesh
        self.sampling, self.max_new_tokens, self.seed = sampling, max_new_tokens, seed
        self.turns: list[Turn] = []
        self.replies = 0

    def reset(self) -> None:
        """Forget the history."""
        self.turns, self.replies = [], 0

    def prompt(self, user_text: str) -> tuple[list[int], list[Turn]]:
        """(prompt ids, the turns they hold) for the next reply to `user_text`."""
        turns = [*self.turns, (USER, user_text)]
        room = prompt_room(self.cfg, self.max_new_tokens)
        ids, dropped = fit_turns(self.tokenizer, turns, room, self.template)
        return ids, turns[dropped:]

    def reply(self, user_text: str, on_chunk: Callable[[np.ndarray], bool] | None = None) -> str:
        """Answer `user_text` and add both turns to the history (the oldest that no longer
        fit are dropped). `on_chunk(tokens_1xN_so_far)` runs every few tokens, as in
        `decode`; it may print them and returns True once the reply has ended."""
        ids, turns = self.prompt(user_text)
        out_1xN = decode(
            self.cfg,
            self.params,
            [ids],
            self.max_new_tokens,
            self.sampling,
            seed=self.seed,
            row_ids=[self.replies],
            chunk_size=STREAM_CHUNK,
            on_chunk=on_chunk,
            mesh=self.mesh,
        )
        text = reply_text(self.tokenizer, out_1xN[0])
        self.turns = [*turns, (ASSISTANT, text)]
        self.replies += 1
        return text
