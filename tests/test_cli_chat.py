"""`jaxlm chat` (jaxlm.inference.chat): the chat template, the history kept within the context
window, and a session driven through a pseudo-terminal as a person would type it."""

import dataclasses
import io
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time

import pytest
from conftest import cli_error

from jaxlm.cli import chat as chat_cli
from jaxlm.data.chat import DefaultTemplate
from jaxlm.inference.chat import Chat, fit_turns, prompt_ids
from jaxlm.inference.generate import Sampling
from jaxlm.runs import open_checkpoint

HELLO = [("user", "hello"), ("assistant", "hi there"), ("user", "how are you")]


class CharTokenizer:
    """One id per character, BOS 1 and EOS 2 (ids of control characters)."""

    bos_id, eos_id = 1, 2

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + [ord(c) for c in text] + [self.eos_id] * eos

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def render(turns):
    """The ids `jaxlm chat` prompts with: the SFT default template, opening the reply."""
    return prompt_ids(DefaultTemplate(), CharTokenizer(), turns)


def test_prompts_use_the_template_fine_tuning_trains_with():
    tok = CharTokenizer()
    ids = render(HELLO)
    messages = [{"role": r, "content": c} for r, c in HELLO]
    assert ids == DefaultTemplate().encode(messages, tok, add_generation_prompt=True)[0]
    assert ids[0] == tok.bos_id and tok.decode(ids[1:]) == (
        "<|user|>\nhello\n<|assistant|>\nhi there\x02<|user|>\nhow are you\n<|assistant|>\n"
    )  # an assistant turn ends with EOS (id 2), as SFT trains it
    assert tok.decode(render([])[1:]) == "<|assistant|>\n"


def test_fit_turns_drops_the_oldest_exchanges_first():
    tok = CharTokenizer()
    turns = [*HELLO, ("assistant", "fine"), ("user", "bye")]
    whole = len(render(turns))
    assert fit_turns(tok, turns, None) == (render(turns), 0)
    assert fit_turns(tok, turns, whole)[1] == 0
    assert fit_turns(tok, turns, whole - 1)[1] == 2  # a whole exchange goes: starts at a user turn
    ids, dropped = fit_turns(tok, turns, 5)  # even the newest turn alone is too long: keep it
    assert dropped == 4 and ids == render([("user", "bye")])


def test_the_prompt_holds_the_history_while_it_fits(pretrained):
    run = open_checkpoint(pretrained)
    tok = run.tokenizer
    # Rotary positions: the same parameters read a longer context than the run trained on.
    cfg = dataclasses.replace(run.cfg.model, max_seq_len=128)
    chat = Chat(cfg, run.params, tok, Sampling(temperature=1.0), 8, seed=3, mesh=run.mesh)
    first = chat.reply("hello")
    ids, turns = chat.prompt("how are you")
    assert turns == [("user", "hello"), ("assistant", first), ("user", "how are you")]
    assert ids == prompt_ids(chat.template, tok, turns)
    chat.reply("how are you")
    assert len(chat.turns) == 4
    chat.reset()
    assert chat.turns == [] and chat.reply("hello") == first  # a reset replays exactly
    # In the run's own 32-token window two exchanges don't fit: the oldest one is dropped.
    small = Chat(run.cfg.model, run.params, tok, Sampling(), 8, mesh=run.mesh)
    small.turns = [("user", "hello"), ("assistant", first)]
    assert small.prompt("how are you")[1] == [("user", "how are you")]


class FakeChat:
    """What `converse` needs of a Chat: replies echo the text in capitals."""

    tokenizer = CharTokenizer()

    def __init__(self):
        self.turns = []

    def prompt(self, text):
        turns = [*self.turns, ("user", text)]
        return render(turns), turns

    def reply(self, text, on_chunk):
        on_chunk([self.tokenizer.encode(" " + text.upper())])
        self.turns += [("user", text), ("assistant", text.upper())]

    def reset(self):
        self.turns = []


def test_converse_ends_at_end_of_input(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n\n/nope\n/reset\nyo\n"))
    fake = FakeChat()
    chat_cli.converse(fake, show_prompt=True)
    out, err = capsys.readouterr()
    assert out.count(chat_cli.PROMPT) == 6  # five lines, then the end of input
    assert "HI\n" in out and "(history cleared)" in out and "YO\n" in out
    assert "Unknown command /nope" in err and "<|user|>\nyo\n<|assistant|>\n" in err
    assert fake.turns == [("user", "yo"), ("assistant", "YO")]


def test_chat_errors_are_one_line(pretrained, capsys):
    assert "--checkpoint DIR" in cli_error(["chat"], capsys)
    err = cli_error(["chat", "-w", str(pretrained), "--num-processes", "2"], capsys)
    assert "one interactive process" in err and "--num-processes 2" in err
    assert "--top-p" in cli_error(["chat", "-w", str(pretrained), "--top-p", "2"], capsys)


# --- a session in a pseudo-terminal ----------------------------------------------------------

ESCAPES = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]|\x1b[=>]")


class Terminal:
    """A child process on a pseudo-terminal: `send` a line, `expect` text on its screen."""

    def __init__(self, argv: list[str]) -> None:
        self.fd, child = pty.openpty()
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "TERM": "dumb"}
        self.proc = subprocess.Popen(argv, stdin=child, stdout=child, stderr=child, env=env)
        os.close(child)
        self.seen = ""

    def expect(self, text: str, timeout: float = 120) -> str:
        """Everything shown up to and including `text` (then forgotten)."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"waited for {text!r}; the screen shows {self.seen!r}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    chunk = b""
                assert chunk, f"the chat ended before {text!r}; it showed {self.seen!r}"
                self.seen += ESCAPES.sub("", chunk.decode("utf-8", "replace")).replace("\r", "")
        end = self.seen.index(text) + len(text)
        shown, self.seen = self.seen[:end], self.seen[end:]
        return shown

    def send(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self.fd)


def reply_of(shown: str) -> str:
    """The reply on the screen after a turn: the text between the prompt and the next prompt."""
    return shown.split("[/prompt]\n", 1)[1].removesuffix(chat_cli.PROMPT).strip()


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_a_chat_session_in_a_terminal(pretrained, tmp_path):
    # The run's 32-token window holds one exchange; rotary positions let the same parameters
    # read 128, so a copy of the run with that window keeps the first turn in the second prompt.
    run = tmp_path / "run"
    shutil.copytree(pretrained, run, ignore=shutil.ignore_patterns("train.lock"))
    config = (run / "config.yaml").read_text()
    assert "  max_seq_len: 32\n" in config
    (run / "config.yaml").write_text(config.replace("  max_seq_len: 32\n", "  max_seq_len: 128\n"))
    argv = [sys.executable, "-m", "jaxlm.cli", "chat", "--checkpoint", str(run)]
    argv += ["--max-new-tokens", "8", "--temperature", "1", "--seed", "1", "--show-prompt"]
    term = Terminal(argv)
    try:
        assert "Chatting with" in term.expect(chat_cli.PROMPT)
        term.send("hello")
        shown = term.expect(chat_cli.PROMPT)
        assert "<|user|>\nhello\n<|assistant|>\n[/prompt]" in shown
        first = reply_of(shown)
        assert first  # streamed back onto the terminal
        term.send("how are you")
        shown = term.expect(chat_cli.PROMPT)
        # The second prompt holds the whole first exchange: the second answer sees it.
        prompt = shown.split("[prompt", 1)[1].split("[/prompt]", 1)[0]
        assert "dropped" not in prompt
        assert f"<|user|>\nhello\n<|assistant|>\n{first}" in prompt
        assert prompt.rstrip().endswith("<|user|>\nhow are you\n<|assistant|>")
        assert reply_of(shown)
        term.send("/reset")
        assert "(history cleared)" in term.expect(chat_cli.PROMPT)
        term.send("hello")
        assert reply_of(term.expect(chat_cli.PROMPT)) == first  # the same seed replays it
        term.send("/exit")
    finally:
        code = term.close()
    assert code == 0
