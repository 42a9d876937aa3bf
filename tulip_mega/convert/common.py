"""What every format's conversion shares: the error it raises, the run settings read from the
`config.yaml` beside a checkpoint, and the check that imported weights fit the recipe.

A checkpoint lives at `<run>/checkpoints/step_N`, so the run's resolved recipe is two folders up;
an export reads a few settings there (layer-norm epsilon, tokenizer, logit-bias init) that the
checkpoint itself may not store.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    from tulip_mega.config.schema import ModelConfig
    from tulip_mega.convert.plain_model import PlainConfig


class ConversionError(RuntimeError):
    """A checkpoint or model that cannot be converted; the message says why."""


def run_config_path(checkpoint: Union[str, Path]) -> Path:
    """The run's `config.yaml` for a checkpoint folder `<run>/checkpoints/step_N` (may not exist)."""
    return Path(checkpoint).resolve().parent.parent / "config.yaml"


def run_config_value(checkpoint: Union[str, Path], section: str, key: str) -> Any:
    """`section.key` of the run's config.yaml beside the checkpoint; None when the file or key is absent."""
    run_cfg = run_config_path(checkpoint)
    if not run_cfg.is_file():
        return None
    import yaml

    return ((yaml.safe_load(run_cfg.read_text()) or {}).get(section) or {}).get(key)


def run_tokenizer(checkpoint: Union[str, Path]) -> Optional[Path]:
    """The run's `data.tokenizer` (SentencePiece model) when the run config names an existing file."""
    tok = run_config_value(checkpoint, "data", "tokenizer")
    return Path(tok) if tok and Path(tok).is_file() else None


def check_matches_recipe(cfg: PlainConfig, model_cfg: ModelConfig, source: Any, key: str, what: str) -> None:
    """Raise naming every recipe key whose value differs from the source model's architecture
    (shape checks alone would miss e.g. the LayerNorm epsilon)."""
    diffs = [f"model.{tower}.{k}: {source} has {v!r}, the recipe {getattr(getattr(model_cfg, tower), k)!r}"
             for tower in ("vision", "text") for k, v in getattr(cfg, tower).items()
             if getattr(getattr(model_cfg, tower), k) != v]
    if cfg.layernorm_eps != model_cfg.layernorm_eps:
        diffs.append(f"model.layernorm_eps: {source} has {cfg.layernorm_eps!r}, the recipe {model_cfg.layernorm_eps!r}")
    if diffs:
        raise ConversionError(f"{key}: the {what} does not match the recipe:\n  " + "\n  ".join(diffs))
