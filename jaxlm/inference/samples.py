"""End-of-training samples: a greedy and a sampled continuation of the configured prompt."""

from __future__ import annotations

import jax

from jaxlm.config import RunConfig
from jaxlm.data.tokenizer_base import Tokenizer
from jaxlm.inference.generate import generate
from jaxlm.paths import Path, as_path


def write_samples(cfg: RunConfig, params, tok: Tokenizer, workdir: Path | str) -> str:
    """A greedy and a sampled continuation of the configured prompt, saved to samples.txt;
    returns the text."""
    t = cfg.train
    prompt_ids = tok.encode(t.sample_prompt, bos=True)
    new_tokens = t.sample_tokens
    if not cfg.model.recurrent:  # a context too short for them all: fewer new tokens, not none
        new_tokens = min(new_tokens, cfg.model.max_seq_len - 1)
    # Decoding takes the parameters where they are (sharded, maybe over several hosts): no
    # process ever holds the whole tree. The prompt goes in as numpy, the same on every process.
    mesh = getattr(jax.tree.leaves(params)[0].sharding, "mesh", None)
    out = {}
    for name, temp, top_k in (("greedy", 0.0, 0), ("sampled", t.temperature, t.top_k)):
        ids = generate(
            cfg.model,
            params,
            prompt_ids,
            new_tokens,
            temperature=temp,
            top_k=top_k,
            seed=t.seed,
            eos_id=tok.eos_id,
            mesh=mesh,
        )[0]
        out[name] = t.sample_prompt + tok.decode(ids)
    text = "".join(
        f"--- {name} (temperature {temp}) ---\n{out[name]}\n\n"
        for name, temp in (("greedy", 0.0), ("sampled", t.temperature))
    )
    if jax.process_index() == 0:
        (as_path(workdir) / "samples.txt").write_text(text, encoding="utf-8")
    return text
