"""Chat records for supervised fine-tuning (SFT): read, render with a template, mask.

A record is one JSON object a line, either a conversation or a prompt/completion pair:
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  {"prompt": "...", "completion": "..."}        (a user turn, then an assistant turn)

A template turns a conversation into token ids and a per-token target mask: 1 on the tokens
of assistant turns (their content and the end token that closes them), 0 on everything else
(system and user turns, role markers, bos). The loss is taken only where the mask is 1.

The default template (`DefaultTemplate`), rendered piece by piece to ids:
  bos "<|system|>\n" content "\n" "<|user|>\n" content "\n" "<|assistant|>\n" content eos ...
A Hugging Face tokenizer directory whose tokenizer_config.json holds a `chat_template` is
rendered with that Jinja template instead (`JinjaTemplate`, when jinja2 is installed). Its
assistant spans are found by rendering the conversation incrementally and diffing prefixes,
so no template needs marking up; each span is tokenised on its own, and a generation prompt
is built the same way, so training and inference see the same ids.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxlm import paths
from jaxlm.data.tokenizer_base import Tokenizer
from jaxlm.errors import ConfigError

try:  # optional: only Hugging Face chat templates need it
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment
except ImportError:  # pragma: no cover - jinja2 is a dependency, but stay usable without it
    jinja2 = None

ROLES = ("system", "user", "assistant")
Message = dict[str, str]
# A chat document as the pipeline packs it: {"ids": int32[L], "mask": float32[L]}.
ChatDoc = dict[str, np.ndarray]


def is_chat_docs(docs: Any) -> bool:
    """True for a list of chat documents (token ids with a target mask); peeks only at lists."""
    return isinstance(docs, list) and bool(docs) and isinstance(docs[0], Mapping)


# --- records ---------------------------------------------------------------------------------


def parse_record(record: Any, where: str) -> list[Message]:
    """The messages of one decoded JSON record; `where` ("'FILE' line N") names it in errors."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where} is not a JSON object; write one record a line.")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ConfigError(f"{where} has 'messages' that is not a non-empty list of turns.")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise ConfigError(
                    f"{where}: message {i} is not an object with a string 'content'; write "
                    '{"role": ..., "content": "..."}.'
                )
            if m.get("role") not in ROLES:
                raise ConfigError(
                    f"{where}: message {i} has the unknown role {m.get('role')!r}; use one of "
                    f"{', '.join(ROLES)}."
                )
            out.append({"role": m["role"], "content": m["content"]})
    elif "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ConfigError(f"{where} needs both 'prompt' and 'completion' as strings.")
        out = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    else:
        raise ConfigError(
            f"{where} has neither 'messages' nor 'prompt'/'completion'; write "
            '{"messages": [...]} or {"prompt": ..., "completion": ...}.'
        )
    answers = [m for m in out if m["role"] == "assistant"]
    if not answers:
        raise ConfigError(f"{where} has no assistant turn, so there is nothing to learn.")
    if any(not m["content"].strip() for m in answers):
        raise ConfigError(f"{where} has an empty assistant turn; drop it or give its content.")
    return out


def read_records(path: str) -> list[tuple[str, list[Message]]]:
    """(where, messages) of every non-blank line of a JSONL file (local, gs:// or s3://)."""
    paths.check_reachable(path, "The chat data")
    p = paths.as_path(path, "The chat data")
    if not p.is_file():
        raise ConfigError(f"Chat data file '{path}' does not exist; pass a JSONL file.")
    try:
        text = paths.read_text(path)
    except UnicodeDecodeError:
        raise ConfigError(f"Chat data file '{path}' is not UTF-8 text; convert it.") from None
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"'{path}' line {n}"
        try:
            record = json.loads(line)
        except ValueError:
            raise ConfigError(f"{where} is not valid JSON; write one JSON object a line.") from None
        out.append((where, parse_record(record, where)))
    if not out:
        raise ConfigError(f"Chat data file '{path}' holds no records; add conversations.")
    return out


# --- templates -------------------------------------------------------------------------------


class DefaultTemplate:
    """Role markers as plain text; each assistant turn ends with the tokenizer's eos."""

    name = "default"

    def encode(
        self, messages: Sequence[Message], tok: Tokenizer, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """(ids, mask) of a conversation; with `add_generation_prompt`, ids end with the
        assistant marker, ready for the model to answer."""
        ids, mask = [tok.bos_id], [0]
        for m in messages:
            head = tok.encode(f"<|{m['role']}|>\n")
            body = tok.encode(m["content"])
            if m["role"] == "assistant":
                ids += [*head, *body, tok.eos_id]
                mask += [0] * len(head) + [1] * (len(body) + 1)
            else:
                body += tok.encode("\n")
                ids += [*head, *body]
                mask += [0] * (len(head) + len(body))
        if add_generation_prompt:
            head = tok.encode("<|assistant|>\n")
            ids, mask = ids + head, mask + [0] * len(head)
        return ids, mask


def _raise(message: str) -> None:
    raise ConfigError(f"The chat template refused the conversation: {message.rstrip('.')}.")


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=False)


class JinjaTemplate:
    """A Hugging Face `chat_template` (Jinja), rendered as transformers renders it."""

    name = "jinja"

    def __init__(self, source: str, specials: Mapping[str, str]) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ConfigError(f"The tokenizer's chat_template is not valid Jinja ({e}).") from None
        self._specials = dict(specials)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        """The template's text for `messages`."""
        try:
            return self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                **self._specials,
            )  # fmt: skip
        except jinja2.TemplateError as e:
            raise ConfigError(f"The chat template failed on the conversation ({e}).") from None

    def segments(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> list[tuple[str, bool]]:
        """(text, is_target) pieces whose concatenation is the rendered conversation."""
        segs: list[tuple[str, bool]] = []
        done = ""
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:k], True)
            full = self.render(messages[: k + 1], False)
            if not (before.startswith(done) and full.startswith(before)):
                raise ConfigError(
                    "The chat template does not render a conversation as an extension of its "
                    "earlier turns, so the assistant tokens can't be found; use the default "
                    "template (delete chat_template from tokenizer_config.json)."
                )
            answer = full[len(before) :]
            kept = answer.rstrip()  # whitespace after the end token belongs to the next turn
            segs += [(before[len(done) :], False), (kept, True)]
            done = before + kept
        end = self.render(messages, add_generation_prompt)
        if not end.startswith(done):
            _raise("its full rendering does not extend the rendering of its turns")
        segs.append((end[len(done) :], False))
        return [(t, target) for t, target in segs if t]

    def encode(
        self, messages: Sequence[Message], tok: Tokenizer, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """(ids, mask) of a conversation: each segment tokenised on its own."""
        ids: list[int] = []
        mask: list[int] = []
        for text, target in self.segments(messages, add_generation_prompt):
            piece = tok.encode(text)
            ids += piece
            mask += [int(target)] * len(piece)
        return ids, mask


ChatTemplate = DefaultTemplate | JinjaTemplate


def load_template(tokenizer_path: str) -> ChatTemplate:
    """The chat template of a tokenizer: the Jinja `chat_template` in the tokenizer_config.json
    beside it (Hugging Face), else the default."""
    config = paths.as_path(tokenizer_path).parent / "tokenizer_config.json"
    if jinja2 is None or not str(tokenizer_path).endswith(".json") or not config.is_file():
        return DefaultTemplate()
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except ValueError:
        return DefaultTemplate()
    source = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(source, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if not isinstance(source, str) or not source.strip():
        return DefaultTemplate()
    specials = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = data.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        specials[key] = value if isinstance(value, str) else ""
    return JinjaTemplate(source, specials)


# --- documents -------------------------------------------------------------------------------


def encode_conversation(
    messages: Sequence[Message], tok: Tokenizer, template: ChatTemplate, where: str = ""
) -> ChatDoc:
    """One chat document: int32 ids and the float32 mask that is 1 on assistant tokens."""
    try:
        ids, mask = template.encode(messages, tok)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None
    if len(ids) < 2 or not any(mask[1:]):
        raise ConfigError(f"{where} renders to no assistant tokens; check the chat template.")
    return {"ids": np.asarray(ids, np.int32), "mask": np.asarray(mask, np.float32)}


def chat_documents(
    files: str, tok: Tokenizer, template: ChatTemplate
) -> tuple[list[ChatDoc], list[str]]:
    """The chat documents of comma-separated JSONL files, and the files' names."""
    names = [f.strip() for f in files.split(",") if f.strip()]
    docs = [
        encode_conversation(messages, tok, template, where)
        for name in names
        for where, messages in read_records(name)
    ]
    return docs, names


def split_documents(
    docs: list[ChatDoc], fraction: float, seed: int
) -> tuple[list[ChatDoc], list[ChatDoc]]:
    """A seeded random `fraction` of the conversations (at least one) held out for validation."""
    if len(docs) < 2:
        raise ConfigError(
            "The chat data holds a single conversation, too few to hold out validation ones; "
            "add conversations or pass --validation."
        )
    n_val = min(max(1, round(len(docs) * fraction)), len(docs) - 1)
    order = np.random.default_rng(seed).permutation(len(docs))
    held = set(order[:n_val].tolist())
    train = [d for i, d in enumerate(docs) if i not in held]
    return train, [docs[i] for i in sorted(held)]
