"""Pure Flax language models; `build_model` picks the one a ModelConfig describes."""

from __future__ import annotations

import flax.linen as nn

from jaxlm.config import ModelConfig
from jaxlm.models.hawk import HawkLM
from jaxlm.models.rnn import RecurrentLM
from jaxlm.models.transformer import TransformerLM


def build_model(cfg: ModelConfig, decode: bool = False) -> nn.Module:
    """The language model a ModelConfig describes (Transformer or recurrent family)."""
    if cfg.family == "hawk":
        return HawkLM(cfg, decode=decode)
    if cfg.recurrent:
        return RecurrentLM(cfg, decode=decode)
    return TransformerLM(cfg, decode=decode)
