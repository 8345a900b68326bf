"""Pure Flax language models; `build_model` picks the one a ModelConfig describes."""

from __future__ import annotations

from jaxlm.config import ModelConfig
from jaxlm.models.hawk import HawkLM
from jaxlm.models.lm import LanguageModel
from jaxlm.models.rnn import RecurrentEncoder, RecurrentLM
from jaxlm.models.transformer import TransformerLM

__all__ = [
    "HawkLM",
    "LanguageModel",
    "RecurrentEncoder",
    "RecurrentLM",
    "TransformerLM",
    "build_model",
    "lm_class",
]


def lm_class(cfg: ModelConfig) -> type[LanguageModel]:
    """The LanguageModel subclass of cfg.family (Transformer, LSTM/GRU or Hawk)."""
    if cfg.family == "hawk":
        return HawkLM
    return RecurrentLM if cfg.recurrent else TransformerLM


def build_model(cfg: ModelConfig, decode: bool = False) -> LanguageModel:
    """The language model a ModelConfig describes."""
    return lm_class(cfg)(cfg, decode=decode)
