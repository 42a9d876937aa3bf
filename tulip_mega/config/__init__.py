"""Typed run configuration: dataclass defaults -> recipe YAML -> `key.path=value` overrides.

Import-light on purpose (no torch, no megatron) so `--help` and config errors are instant.
"""

from .load import all_keys, apply_override, config_to_dict, help_text, load_config, resolve, save_config
from .schema import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    RecomputeConfig,
    RunConfig,
    TextConfig,
    TrainConfig,
    VisionConfig,
    data_parallel_size,
    validate_layout,
)
from .sizes import SIZES

__all__ = [
    "SIZES",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LoggingConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "RecomputeConfig",
    "RunConfig",
    "TextConfig",
    "TrainConfig",
    "VisionConfig",
    "all_keys",
    "apply_override",
    "config_to_dict",
    "data_parallel_size",
    "help_text",
    "load_config",
    "resolve",
    "save_config",
    "validate_layout",
]
