"""`jaxlm generate`: continue prompts with a run, an export or a converted model.

One prompt and one sequence stream to the terminal: decoding runs in chunks of a few
tokens and the text is printed after each chunk. Several prompts (or sequences) decode as
one left-padded batch and print when done; --output also writes them as JSON lines.
"""

from __future__ import annotations

import argparse
import io
import json
import sys

from jaxlm.cli.common import add_distributed_args, quiet_other_processes

STREAM_CHUNK = 4  # tokens per streamed chunk: small enough to look live, large enough to be cheap
BATCH_CHUNK = 32  # tokens per chunk otherwise: lets decoding stop early at EOS / stop strings


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="continue prompts with a checkpoint (KV cache / carried state, streaming)",
        description="Load a checkpoint and sample text: greedy, temperature, top-k, top-p.",
    )
    p.add_argument(
        "--checkpoint", "-w", metavar="DIR",
        help="a run dir (newest step), RUN/checkpoints/N, an export or a converted dir",
    )  # fmt: skip
    p.add_argument("--workdir", dest="checkpoint", help=argparse.SUPPRESS)  # the old name
    p.add_argument("--step", type=int, metavar="N", help="use this checkpoint step of a run")
    p.add_argument("--prompt", metavar="TEXT", help="text to continue (default: 'ROMEO.\\n')")
    p.add_argument("--prompts-file", metavar="FILE", help="one prompt per line, or JSONL strings")
    p.add_argument(
        "--max-new-tokens", type=int, metavar="N", help="tokens to generate (default: 100)"
    )
    p.add_argument(
        "--max-length", type=int, metavar="N", help="or: total tokens, the prompt's included"
    )
    add_sampling_args(p)
    p.add_argument(
        "--num-return-sequences", type=int, default=1, metavar="N", help="samples per prompt"
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="cut at this text; \\n, \\t escapes (repeatable)",
    )
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="rows decoded at once")
    p.add_argument("--output", "-o", metavar="FILE", help="also write JSON lines here")
    p.add_argument("--no-stream", action="store_true", help="print a single prompt when done")
    add_distributed_args(p)
    p.set_defaults(run=cmd_generate)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """How tokens are picked (shared with `jaxlm chat`): --temperature ... --seed."""
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 means greedy")
    p.add_argument(
        "--top-k", type=int, default=40, metavar="K", help="sample among the k likeliest (0: all)"
    )
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus mass (1: off)")
    p.add_argument(
        "--no-repeat-ngram-size", type=int, default=0, metavar="N", help="never repeat an n-gram"
    )
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed")


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of --prompt / --prompts-file (the default prompt when neither is given)."""
    from jaxlm.config.files import read_utf8
    from jaxlm.errors import ConfigError
    from jaxlm.paths import check_reachable

    if args.prompt is not None and args.prompts_file:
        raise ConfigError("Give --prompt or --prompts-file, not both.")
    if not args.prompts_file:
        return ["ROMEO.\n" if args.prompt is None else args.prompt]
    check_reachable(args.prompts_file, "--prompts-file")
    try:
        lines = read_utf8(args.prompts_file).splitlines()
    except OSError as e:
        raise ConfigError(
            f"Cannot read --prompts-file '{args.prompts_file}' ({e.strerror or e})."
        ) from None
    prompts = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if args.prompts_file.endswith(".jsonl"):
            try:
                line = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{args.prompts_file} line {n} is not JSON ({e.msg}).") from None
            if isinstance(line, dict):
                line = line.get("prompt")
            if not isinstance(line, str):
                raise ConfigError(
                    f'{args.prompts_file} line {n} is neither a string nor {{"prompt": str}}.'
                )
        prompts.append(line)
    if not prompts:
        raise ConfigError(f"--prompts-file '{args.prompts_file}' holds no prompts.")
    return prompts


def unescape(text: str) -> str:
    """Turn the two-character escapes \\n and \\t into a newline and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class Finisher:
    """Turns a row's new tokens into its final text: cut at EOS, then at a stop string."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tok, self.stops = tokenizer, stops

    def text(self, row) -> tuple[str, bool]:
        """(text so far, whether the row has ended)."""
        from jaxlm.inference.generate import cut_at_eos

        ids = cut_at_eos(row, self.tok.eos_id)
        text, stopped = cut_at_stop(self.tok.decode(ids), self.stops)
        return text, stopped or len(ids) < len(row)


class Streamer:
    """Prints a single row's text as chunks arrive, never a character it may take back."""

    def __init__(self, finisher: Finisher, out) -> None:
        self.finisher, self.out, self.printed = finisher, out, 0
        self.hold = max((len(s) for s in finisher.stops), default=1) - 1
        self.final = ""

    def __call__(self, tokens_BxN) -> bool:
        text, ended = self.finisher.text(tokens_BxN[0])
        self.final = text
        # Hold back what could be the start of a stop string or a half-decoded character.
        safe = text if ended else text[: len(text) - self.hold].rstrip("\ufffd")
        if len(safe) > self.printed:
            self.out.write(safe[self.printed :])
            self.out.flush()
            self.printed = len(safe)
        return ended

    def finish(self) -> None:
        """Print whatever was held back."""
        self.out.write(self.final[self.printed :] + "\n")
        self.out.flush()


def cmd_generate(args: argparse.Namespace) -> int:
    from jaxlm.config.files import check_output_file
    from jaxlm.errors import ConfigError
    from jaxlm.inference.generate import Sampling
    from jaxlm.paths import check_reachable, is_remote, write_bytes_atomic

    if not args.checkpoint:
        raise ConfigError("Name the model to sample from with --checkpoint DIR.")
    check_reachable(args.checkpoint, "--checkpoint")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.no_repeat_ngram_size)
    sampling.check()
    for name in ("max_new_tokens", "max_length", "num_return_sequences", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} {getattr(args, name)} must be at least 1.")
    args.stop = [unescape(s) for s in args.stop]
    if any(not s for s in args.stop):
        raise ConfigError("--stop '' would cut every text; give a non-empty stop string.")
    prompts = read_prompts(args)
    if args.output:
        check_output_file(args.output, "--output")  # before minutes of decoding

    import jax

    from jaxlm.inference.generate import decode, new_token_limits
    from jaxlm.parallel.distributed import initialize
    from jaxlm.runs import checkpoint_dir, open_checkpoint

    where = checkpoint_dir(args.checkpoint, args.step)
    initialize(args.coordinator, args.num_processes, args.process_id)  # before any JAX use
    quiet_other_processes(jax.process_index())
    # Every process decodes the same rows (sharded over all of them); process 0 prints.
    out = sys.stdout if jax.process_index() == 0 else io.StringIO()
    run = open_checkpoint(*where)
    tok, k = run.tokenizer, args.num_return_sequences
    finisher = Finisher(tok, args.stop)
    encoded = tok.encode_batch(prompts, bos=True)
    max_new = args.max_new_tokens if args.max_length else (args.max_new_tokens or 100)
    limits = new_token_limits(run.cfg.model, [len(e) for e in encoded], max_new, args.max_length)
    rows = [(i, j) for i in range(len(prompts)) for j in range(k)]
    stream = len(rows) == 1 and not args.no_stream
    records = []
    for lo in range(0, len(rows), args.batch_size):
        batch = rows[lo : lo + args.batch_size]
        streamer = Streamer(finisher, out) if stream else None
        if stream:
            out.write(prompts[0])

        caps = [limits[i] for i, _ in batch]

        def all_ended(tokens_BxN, streamer=streamer, caps=caps) -> bool:
            rows = [r[:n] for r, n in zip(tokens_BxN, caps, strict=True)]
            if streamer is not None:
                return streamer(rows)
            return all(len(r) == n or finisher.text(r)[1] for r, n in zip(rows, caps, strict=True))

        out_BxN = decode(
            run.cfg.model,
            run.params,
            [encoded[i] for i, _ in batch],
            max(caps),
            sampling,
            seed=args.seed,
            row_ids=[i * k + j for i, j in batch],
            chunk_size=STREAM_CHUNK if stream else BATCH_CHUNK,
            on_chunk=all_ended,
            mesh=run.mesh,
            row_limits=caps,
        )
        if streamer is not None:
            streamer.finish()
        for (i, j), row, n in zip(batch, out_BxN, caps, strict=True):
            text = finisher.text(row[:n])[0]
            records.append({"prompt_index": i, "sample": j, "prompt": prompts[i], "text": text})
            if len(rows) == 1 and not stream:
                print(prompts[i] + text, file=out, flush=True)
            elif not stream:
                print(f"--- prompt {i}, sample {j} ---\n{prompts[i]}{text}\n", file=out, flush=True)
    if args.output and jax.process_index() == 0:
        lines = "".join(json.dumps(r) + "\n" for r in records)
        if is_remote(args.output):
            write_bytes_atomic(args.output, lines.encode("utf-8"))
        else:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(lines)
    return 0
