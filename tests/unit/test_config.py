"""Config loading: layers, type checks, helpful errors, resolution, layout checks, round trip."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from tulip_mega.config import (
    SIZES,
    Config,
    ConfigError,
    TextConfig,
    VisionConfig,
    all_keys,
    config_to_dict,
    data_parallel_size,
    help_text,
    load_config,
    resolve,
    save_config,
    validate_layout,
)

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny_cpu.yaml"
RECIPES = sorted(ROOT.glob("recipes/*.yaml"))


def _write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _model_fields_concrete(cfg: Config) -> None:
    for tower in (cfg.model.vision, cfg.model.text):
        for f in dataclasses.fields(tower):
            value = getattr(tower, f.name)
            assert isinstance(value, int) and not isinstance(value, bool) and value > 0, (f.name, value)


# ---------------------------------------------------------------- loading and layering

def test_defaults_load_and_resolve_from_size_table():
    cfg = load_config(None)
    assert cfg.model.size == "debug"
    assert cfg.model.vision.image_size == 32 and cfg.model.vision.patch_size == 8
    assert cfg.model.text.vocab_size == 1024 and cfg.model.text.context_length == 64  # the HF pipeline pads SigLIP text to 64
    assert cfg.optim.betas == (0.9, 0.95) and cfg.train.steps == 100
    _model_fields_concrete(cfg)
    assert validate_layout(cfg, 1) == 1


def test_tiny_cpu_recipe():
    cfg = load_config(TINY)
    assert cfg.run.name == "tiny_cpu"
    assert (cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel) == (2, 2)
    assert (cfg.train.steps, cfg.train.global_batch_size, cfg.train.micro_batch_size) == (600, 64, 32)
    assert cfg.optim.lr == pytest.approx(2e-3) and cfg.optim.warmup_steps == 20
    assert cfg.checkpoint.interval == 300 and cfg.eval.interval == 300
    # Set for this scale (issue #14): init and logit scale/bias for a width-64, 64-pair model, and
    # a text context that fits the shapes captions (15 tokens + EOS) without ~50 padding tokens.
    assert (cfg.model.init_std, cfg.model.temperature_init, cfg.model.bias_init) == (0.1, 30.0, -8.0)
    assert cfg.model.text.context_length == 16
    assert cfg.data.train_shards == Config().data.train_shards
    _model_fields_concrete(cfg)
    assert validate_layout(cfg, 4) == 1
    assert "torchrun --nproc_per_node 4 -m tulip_mega.train recipes/tiny_cpu.yaml" in TINY.read_text()


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_loads(recipe):
    cfg = load_config(recipe)
    _model_fields_concrete(cfg)
    tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    assert validate_layout(cfg, tp * pp) == 1  # the smallest world the recipe can run on


def test_overrides_win_and_parse_types():
    cfg = load_config(TINY, [
        "train.steps=50", "optim.lr=1e-3", "optim.betas=[0.9, 0.98]", "parallel.sequence_parallel=true",
        "eval.retrieval_shards=data/val.tar", "run.max_wall_time_minutes=30", "model.vision.image_size=64",
        "run.name=2024", "checkpoint.dir=null", "precision.dtype=bf16", "optim.clip_grad=0",
    ])
    assert cfg.train.steps == 50
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.98) and isinstance(cfg.optim.betas, tuple)
    assert cfg.parallel.sequence_parallel is True
    assert cfg.eval.retrieval_shards == "data/val.tar"
    assert cfg.run.max_wall_time_minutes == 30.0 and isinstance(cfg.run.max_wall_time_minutes, float)
    assert cfg.model.vision.image_size == 64 and cfg.model.vision.patch_size == 8  # rest from table
    assert cfg.run.name == "2024"  # a number given to a string field stays the text typed
    assert cfg.checkpoint.dir is None and cfg.precision.dtype == "bf16"
    assert cfg.optim.clip_grad == 0.0 and isinstance(cfg.optim.clip_grad, float)
    assert cfg.optim.warmup_steps == 20  # untouched recipe value survives


def test_later_override_wins_and_section_mapping_override():
    cfg = load_config(None, ["train.steps=5", "train.steps=7", "optim={lr: 0.01, warmup_steps: 2}"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 0.01 and cfg.optim.warmup_steps == 2


def test_size_table_fills_only_unset_fields():
    cfg = load_config(None, ["model.size=b16", "model.text.context_length=32"])
    assert cfg.model.vision.image_size == 224 and cfg.model.vision.hidden_size == 768
    assert cfg.model.text.context_length == 32 and cfg.model.text.vocab_size == 32000


@pytest.mark.parametrize("size", list(SIZES))
def test_size_table_entries_are_complete_and_valid(size):
    vision, text = SIZES[size]
    assert set(vision) == {f.name for f in dataclasses.fields(VisionConfig)}
    assert set(text) == {f.name for f in dataclasses.fields(TextConfig)}
    _model_fields_concrete(load_config(None, [f"model.size={size}"]))


def test_unknown_size_lists_valid_names():
    with pytest.raises(ConfigError, match="model.size='huge'.*debug, b16, so400m, g16"):
        load_config(None, ["model.size=huge"])


def test_resolve_returns_a_copy():
    cfg = Config()
    out = resolve(cfg)
    assert cfg.model.vision.image_size is None and out.model.vision.image_size == 32


# ---------------------------------------------------------------- rejected input

def test_unknown_key_in_yaml_names_file_key_and_suggestion(tmp_path):
    path = _write(tmp_path, "parallel:\n  tensor_paralel: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "'parallel.tensor_paralel'" in msg
    assert "did you mean 'parallel.tensor_parallel'?" in msg


def test_misplaced_key_suggests_full_path(tmp_path):
    path = _write(tmp_path, "tensor_parallel: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key 'tensor_parallel'; did you mean 'parallel.tensor_parallel'"):
        load_config(path)


def test_unknown_key_on_command_line():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.learning_rat=0.1"])
    assert str(err.value).startswith("command line: unknown key 'optim.learning_rat'")
    with pytest.raises(ConfigError, match="unknown key 'optim.lr.x'"):
        load_config(None, ["optim.lr.x=1"])
    with pytest.raises(ConfigError, match="did you mean 'train.micro_batch_size'"):
        load_config(None, ["train.micro_batchsize=4"])


def test_override_without_equals():
    with pytest.raises(ConfigError, match=r"expected key.path=value, got 'train.steps'"):
        load_config(None, ["train.steps"])


@pytest.mark.parametrize("override, expected", [
    ("parallel.tensor_parallel=two", "parallel.tensor_parallel expects int, got 'two' (str)"),
    ("train.steps=true", "train.steps expects int, got True (bool)"),
    ("train.steps=2.5", "train.steps expects int, got 2.5 (float)"),
    ("optim.lr=fast", "optim.lr expects float, got 'fast'"),
    ("optim.betas=[0.9]", "optim.betas expects [float, float], got [0.9]"),
    ("parallel.sequence_parallel=maybe", "parallel.sequence_parallel expects bool"),
    ("run.name=null", "run.name expects str, got None"),
])
def test_bad_type(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith("command line: ") and expected in str(err.value)


def test_bad_literal(tmp_path):
    with pytest.raises(ConfigError, match=r"precision.dtype expects 'auto' \| 'fp32' \| 'bf16', got 'fp16'"):
        load_config(None, ["precision.dtype=fp16"])
    path = _write(tmp_path, "loss:\n  sigmoid_impl: allreduce\n")
    with pytest.raises(ConfigError, match=rf"{path}: loss.sigmoid_impl expects 'auto' \| 'ring' \| 'gather'"):
        load_config(path)


def test_yaml_shape_errors(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))
    path = _write(tmp_path, "optim: 0.1\n", "scalar.yaml")
    with pytest.raises(ConfigError, match=rf"{path}: 'optim' is a section"):
        load_config(path)
    with pytest.raises(ConfigError, match="duplicate key 'steps'"):
        load_config(_write(tmp_path, "train:\n  steps: 1\n  steps: 2\n", "dup.yaml"))
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(tmp_path / "missing.yaml")
    assert load_config(_write(tmp_path, "", "empty.yaml")) == load_config(None)


def test_yaml_float_without_dot_is_accepted(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-3` as a string; a float field still takes it.
    cfg = load_config(_write(tmp_path, "optim:\n  lr: 1e-3\n  min_lr: 0\n"))
    assert cfg.optim.lr == 1e-3 and cfg.optim.min_lr == 0.0


# ---------------------------------------------------------------- validation

def test_tp_must_divide_heads():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.size=b16", "parallel.tensor_parallel=8"])
    assert str(err.value).startswith("model.vision.num_heads=12 is not divisible by parallel.tensor_parallel=8: ")


def test_tp_must_divide_vocab_and_ffn():
    with pytest.raises(ConfigError, match="model.text.vocab_size=1001 is not divisible by parallel.tensor_parallel=2"):
        load_config(None, ["parallel.tensor_parallel=2", "model.text.vocab_size=1001"])
    with pytest.raises(ConfigError, match="model.vision.ffn_hidden_size=255 is not divisible"):
        load_config(None, ["parallel.tensor_parallel=2", "model.vision.ffn_hidden_size=255"])


def test_layers_need_not_divide_by_pp():
    # parallel.pipeline_split (tests/integration/test_pipeline_split.py) places any layer counts; only a
    # stage without a layer of either tower is refused.
    load_config(None, ["parallel.pipeline_parallel=4"])
    load_config(None, ["parallel.pipeline_parallel=2", "model.text.num_layers=3", "parallel.pipeline_split=even"])
    with pytest.raises(ConfigError, match="parallel.pipeline_split: .* cannot fill parallel.pipeline_parallel=5"):
        load_config(None, ["parallel.pipeline_parallel=5"])


def test_sequence_parallel_checks():
    with pytest.raises(ConfigError, match="sequence_parallel=true needs parallel.tensor_parallel > 1"):
        load_config(None, ["parallel.sequence_parallel=true"])
    with pytest.raises(ConfigError, match="model.text.context_length=15 is not divisible by parallel.tensor_parallel=2"):
        load_config(None, ["parallel.sequence_parallel=true", "parallel.tensor_parallel=2",
                           "model.text.context_length=15"])


def test_per_section_checks():
    cases = {
        "optim.lr=0": "optim.lr=0.0 must be > 0",
        "optim.betas=[0.9, 1.0]": "optim.betas=[0.9, 1.0] must be two numbers in [0, 1)",
        "model.vision.patch_size=5": "model.vision.image_size=32 is not divisible by model.vision.patch_size=5",
        "model.text.num_heads=3": "model.text.hidden_size=64 is not divisible by model.text.num_heads=3",
        "train.micro_batch_size=64": "train.micro_batch_size=64 must be <= train.global_batch_size=32",
        "optim.warmup_steps=100": "optim.warmup_steps=100 must be < train.steps=100",
        "train.steps=0": "train.steps=0 must be >= 1",
    }
    for override, expected in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(None, [override])
        assert expected in str(err.value), (override, str(err.value))


def test_full_recompute_layers_per_stage():
    """An even or explicit split is checked with the recipe; a balanced one (it needs the FLOP
    model) by validate_split, which the trainer, eval and plan run before any process starts."""
    from tulip_mega.config.streams import input_streams
    from tulip_mega.models.pipeline_split import validate_split as _validate_split

    def validate_split(cfg):
        return _validate_split(cfg, input_streams(cfg))

    ok = ["parallel.pipeline_parallel=2", "recompute.granularity=full", "recompute.num_layers=1"]
    validate_split(load_config(None, ok))
    too_many = "recompute.num_layers=2 exceeds the 1 layers of the fullest pipeline stage"
    with pytest.raises(ConfigError, match=too_many):
        load_config(None, ok + ["recompute.num_layers=2", "parallel.pipeline_split=even"])
    with pytest.raises(ConfigError, match=too_many):
        validate_split(load_config(None, ok + ["recompute.num_layers=2"]))
    load_config(None, ["recompute.granularity=selective", "recompute.num_layers=9"])  # only checked for full


def test_fp8_recipe_loads_anywhere():
    """TE availability is a machine property checked at launch (test_units), not at load."""
    assert load_config(None, ["precision.fp8=hybrid"]).precision.fp8 == "hybrid"
    with pytest.raises(ConfigError, match="precision.fp8"):
        load_config(None, ["precision.fp8=e5m2"])


def test_validate_layout():
    cfg = load_config(TINY, ["train.global_batch_size=32", "train.micro_batch_size=8"])  # TP 2 x PP 2
    assert validate_layout(cfg, 8) == data_parallel_size(cfg, 8) == 2
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by parallel.tensor_parallel=2 x "
                                          r"parallel.pipeline_parallel=2 \(= 4\)"):
        validate_layout(cfg, 6)
    with pytest.raises(ConfigError, match=r"train.global_batch_size=32 is not divisible by "
                                          r"train.micro_batch_size=8 x data-parallel size 8 \(= 64"):
        validate_layout(cfg, 32)
    cfg12 = load_config(TINY, ["train.global_batch_size=24", "train.micro_batch_size=8"])
    with pytest.raises(ConfigError, match="global_batch_size=24 is not divisible"):
        validate_layout(cfg12, 8)


# ---------------------------------------------------------------- saving, help, import cost

def test_save_load_round_trip(tmp_path):
    cfg = load_config(TINY, ["run.name=2024", "optim.betas=[0.8, 0.99]", "eval.retrieval_shards=v/{0..3}.tar",
                             "run.max_wall_time_minutes=5"])
    path = tmp_path / "sub" / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert config_to_dict(cfg)["optim"]["betas"] == [0.8, 0.99]
    assert list(tmp_path.glob("sub/*")) == [path]  # no temp file left behind


def test_help_text_lists_every_key_with_type_default_and_help():
    text = help_text()
    assert "parallel.tensor_parallel: int = 1  # tensor-parallel size" in text
    assert "precision.dtype: 'auto' | 'fp32' | 'bf16' = auto  # auto = bf16 on GPU, fp32 on CPU" in text
    assert "optim.betas: [float, float] = [0.9, 0.95]" in text
    leaves = [k for k in all_keys() if f"[{k}]" not in text]
    for key in leaves:
        assert f"\n{key}: " in "\n" + text, key


def test_every_field_has_help():
    def walk(cls):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
            if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
                walk(f.default_factory)
    walk(Config)


def test_config_import_is_light():
    code = "import sys, tulip_mega.config; assert not {'torch', 'megatron'} & set(sys.modules), 'heavy import'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
