"""Typed, frozen run configuration: YAML files plus `section.key=value` overrides, validated.

Every field has a default and a one-line description (the `doc` metadata); `jaxlm config
--reference` and the README reference are generated from them. Model fields are marked
architecture or runtime (`runtime_fields`): resuming and fine-tuning from a checkpoint may
change only runtime ones. Validation runs before
anything touches JAX, and each problem is reported as one sentence naming the key.
`schema` holds the dataclasses, `load` reads and writes them, `validate` checks them.
"""

from jaxlm.config.load import (
    describe,
    from_dict,
    load_config,
    parse_overrides,
    resolve,
    to_dict,
    to_yaml,
)
from jaxlm.config.schema import (
    ATTENTION_IMPLS,
    DTYPES,
    FAMILY_DEFAULTS,
    MATMUL_PRECISIONS,
    NAN_POLICIES,
    RECURRENT_DEFAULTS,
    REMAT_POLICIES,
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    TrainConfig,
    architecture_fields,
    layout_fields,
    model_changes,
    runtime_fields,
)
from jaxlm.config.validate import validate
from jaxlm.errors import ConfigError

__all__ = [
    "ATTENTION_IMPLS",
    "DTYPES",
    "FAMILY_DEFAULTS",
    "MATMUL_PRECISIONS",
    "NAN_POLICIES",
    "RECURRENT_DEFAULTS",
    "REMAT_POLICIES",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimizerConfig",
    "RunConfig",
    "TrainConfig",
    "architecture_fields",
    "describe",
    "from_dict",
    "layout_fields",
    "load_config",
    "model_changes",
    "parse_overrides",
    "resolve",
    "runtime_fields",
    "to_dict",
    "to_yaml",
    "validate",
]
