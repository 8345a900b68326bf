"""`jaxlm generate`: sample text from a run or an exported model."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="continue a prompt with a trained run's latest checkpoint",
        description="Load the newest checkpoint of a run and sample text.",
    )
    p.add_argument("--workdir", "-w", required=True, metavar="DIR", help="a run directory")
    p.add_argument("--prompt", default="ROMEO.\n", metavar="TEXT", help="text to continue")
    p.add_argument(
        "--max-new-tokens", type=int, default=100, metavar="N", help="tokens to generate"
    )
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 means greedy")
    p.add_argument(
        "--top-k", type=int, default=40, metavar="K", help="sample among the k likeliest (0: all)"
    )
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed")
    p.set_defaults(run=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from jaxlm.evaluate import load_run

    run = load_run(args.workdir)
    from jaxlm.generate import generate

    ids = run.tokenizer.encode(args.prompt, bos=True)
    out = generate(
        run.cfg.model,
        run.params,
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        eos_id=run.tokenizer.eos_id,
    )[0]
    print(args.prompt + run.tokenizer.decode(out))
    return 0
