"""`jaxlm chat`: a conversation with a checkpoint in the terminal.

Each line typed is a user turn; the reply streams back as it is decoded. The history goes
into every prompt (jaxlm.inference.chat's template), its oldest turns dropped when it
outgrows the context window. `/reset` forgets it; `/exit` or Ctrl-D ends the session; Ctrl-C
stops a reply midway.
"""

from __future__ import annotations

import argparse
import sys

from jaxlm.cli.common import add_distributed_args
from jaxlm.cli.generate import add_sampling_args

PROMPT = "you> "
HELP = "/reset forgets the conversation, /exit (or Ctrl-D) ends it."


def register(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="talk with a checkpoint in the terminal (history, streaming, /reset, /exit)",
        description="An interactive conversation: each line is a turn, the reply streams back. "
        + HELP,
    )
    p.add_argument(
        "--checkpoint", "-w", metavar="DIR",
        help="a run dir (newest step), RUN/checkpoints/N, an export or a converted dir",
    )  # fmt: skip
    p.add_argument("--step", type=int, metavar="N", help="use this checkpoint step of a run")
    p.add_argument(
        "--max-new-tokens", type=int, default=100, metavar="N", help="tokens per reply at most"
    )
    add_sampling_args(p)
    p.add_argument(
        "--show-prompt", action="store_true", help="print each prompt's text to stderr first"
    )
    add_distributed_args(p)
    p.set_defaults(run=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    from jaxlm.errors import ConfigError
    from jaxlm.inference.generate import Sampling
    from jaxlm.paths import check_reachable

    if not args.checkpoint:
        raise ConfigError("Name the model to chat with with --checkpoint DIR.")
    if args.num_processes is not None and args.num_processes > 1:
        raise ConfigError(
            f"jaxlm chat is one interactive process; drop --num-processes {args.num_processes}."
        )
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} must be at least 1.")
    check_reachable(args.checkpoint, "--checkpoint")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.no_repeat_ngram_size)
    sampling.check()

    import jax

    from jaxlm.inference.chat import Chat
    from jaxlm.parallel.distributed import initialize
    from jaxlm.runs import checkpoint_dir, open_checkpoint

    where = checkpoint_dir(args.checkpoint, args.step)
    initialize(args.coordinator, args.num_processes, args.process_id)  # before any JAX use
    if jax.process_count() > 1:
        raise ConfigError(
            f"jaxlm chat is one interactive process, not {jax.process_count()}; "
            "start it without a multi-process launcher."
        )
    run = open_checkpoint(*where)  # sharded over this machine's devices
    chat = Chat(
        run.cfg.model,
        run.params,
        run.tokenizer,
        sampling,
        args.max_new_tokens,
        seed=args.seed,
        mesh=run.mesh,
    )
    print(f"Chatting with {where[0]} (step {run.step}). {HELP}", file=sys.stderr, flush=True)
    converse(chat, args.show_prompt)
    return 0


def converse(chat, show_prompt: bool) -> None:
    """Read lines until /exit or end of input; stream a reply to each."""
    from jaxlm.cli.generate import Finisher, Streamer
    from jaxlm.inference.chat import STOPS

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass

    class ReplyFinisher(Finisher):
        def text(self, row) -> tuple[str, bool]:
            text, ended = super().text(row)
            return text.strip(), ended  # from its first visible character to its last

    finisher = ReplyFinisher(chat.tokenizer, list(STOPS))
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        command = line.strip()
        if not command:
            continue
        if command == "/exit":
            return
        if command == "/reset":
            chat.reset()
            print("(history cleared)", flush=True)
            continue
        if command.startswith("/"):
            print(f"Unknown command {command}; {HELP}", file=sys.stderr, flush=True)
            continue
        if show_prompt:
            ids, turns = chat.prompt(line)
            dropped = len(chat.turns) + 1 - len(turns)
            note = f", {dropped} oldest turns dropped" if dropped else ""
            print(f"[prompt, {len(ids)} tokens{note}]", file=sys.stderr)
            print(chat.tokenizer.decode(ids) + "[/prompt]", file=sys.stderr, flush=True)
        streamer = Streamer(finisher, sys.stdout)
        try:
            chat.reply(line, on_chunk=streamer)
        except KeyboardInterrupt:
            streamer.finish()
            print("(reply stopped; it is not kept in the history)", flush=True)
            continue
        streamer.finish()
