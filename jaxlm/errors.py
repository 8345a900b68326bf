"""The errors a user can cause. Each message is one sentence naming the bad value and the
fix; the CLI prints it without a traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """A problem with what the user handed in (config, files, data, tokenizer), phrased as one
    sentence that names the bad value and the fix. The CLI prints it without a traceback."""


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient norm or state; the message is one sentence."""


class UnwritablePathError(ConfigError):
    """A path the command must write can't be written (permissions, a read-only disk): the
    machine, not the input, is at fault, so the CLI exits with 1 rather than 2."""
