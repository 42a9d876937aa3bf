"""Build the training loader for this data-parallel rank from the recipe.

The single place the trainer learns about data: it maps the recipe onto the loaders' own
arguments (``view_plan``, ``eda_config``), so the data package never reads the recipe.
``data.loader`` picks the implementation: ``dali`` (DALI decode + every view, GeCo fields and
EDA; needs the ``dali`` extra), ``simple`` (PIL, view 0 + caption only: it refuses recipes
needing more, naming the field) or ``auto`` (DALI when it imports). Both loaders read the same
sample order and share the state format. TP ranks, and every pipeline stage, of one DP rank
build identical loaders (same shards, same seed, randomness a function of the position only),
so they see identical batches.
"""

from __future__ import annotations

from tulip_mega.data.base import BatchLoader
from tulip_mega.data.dali_pipeline import ViewPlan, dali_available
from tulip_mega.data.eda import EdaConfig
from tulip_mega.data.energon_meta import read_metadataset
from tulip_mega.data.mixture import MixturePart
from tulip_mega.data.shards import expand_shards
from tulip_mega.data.simple_loader import LoaderFieldError, SimpleLoader
from tulip_mega.data.tokenizer import PAD_ID, Tokenizer
from tulip_mega.config import Config, ConfigError
from tulip_mega.config.run_layout import RunLayout
from tulip_mega.config.schema import AugmentConfig
from tulip_mega.config.streams import Streams


def use_dali(cfg: Config) -> bool:
    """Resolve ``data.loader`` (auto -> DALI when ``nvidia.dali`` imports)."""
    if cfg.data.loader == "simple":
        return False
    available = dali_available()
    if cfg.data.loader == "dali" and not available:
        raise ConfigError(
            "data.loader=dali but nvidia.dali does not import; install it (pip install -e .[dali], "
            "or scripts/install_cpu.sh) or set data.loader=auto/simple"
        )
    return available


def eda_config(augment: AugmentConfig) -> EdaConfig:
    """The EDA probabilities of ``data.augment`` (eda_synonym, eda_swap, eda_deletion, eda_stopword)."""
    return EdaConfig(augment.eda_synonym, augment.eda_swap, augment.eda_deletion, augment.eda_stopword)


def view_plan(cfg: Config, streams: Streams) -> ViewPlan:
    """Exactly the fields the resolved input streams say the non-zero loss terms need, with the
    recipe's crop scales and augmentation strengths."""
    s, v, a = streams, cfg.data.views, cfg.data.augment
    return ViewPlan(
        image_size=cfg.model.vision.image_size, crops=s.loader_crops,
        global_scale=tuple(v.global_scale), local_crops=s.local_crops, local_size=v.local_size,
        local_scale=tuple(v.local_scale), edits=s.geco_edits, first_view_crop=a.first_view_crop,
        flip_prob=a.flip_prob, color_jitter=tuple(a.color_jitter), color_jitter_prob=a.color_jitter_prob,
        grayscale_prob=a.grayscale_prob, blur_prob=a.blur_prob, paraphrases=s.paraphrases,
        negatives=s.negatives, eda=s.eda_caption, eda_config=eda_config(a), regions=s.locca_regions,
    )


def _tokenizer(cfg: Config) -> Tokenizer:
    tokenizer = Tokenizer(cfg.data.tokenizer, context_length=cfg.model.text.context_length)
    if tokenizer.vocab_size > cfg.model.text.vocab_size:
        raise ConfigError(
            f"data.tokenizer={cfg.data.tokenizer} has {tokenizer.vocab_size} tokens but "
            f"model.text.vocab_size={cfg.model.text.vocab_size}; raise model.text.vocab_size "
            f"(a multiple of parallel.tensor_parallel) or train a smaller tokenizer"
        )
    return tokenizer


def build_train_loader(cfg: Config, layout: RunLayout, dp_rank: int) -> BatchLoader:
    """The loader yielding DP rank `dp_rank`'s micro-batches (size train.micro_batch_size), with
    the fields the run's input streams (`layout.streams`) need."""
    plan = view_plan(cfg, layout.streams)
    common = dict(
        batch_size=cfg.train.micro_batch_size,
        tokenizer=_tokenizer(cfg),
        dp_rank=dp_rank,
        dp_size=layout.data_parallel,
        seed=cfg.run.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
    )
    shards = train_datasets(cfg)
    if use_dali(cfg):
        from tulip_mega.data.dali_loader import DaliLoader

        return DaliLoader(shards, plan=plan, threads=cfg.data.threads, prefetch=cfg.data.prefetch,
                          reader_workers=cfg.data.reader_workers, **common)
    try:
        return SimpleLoader(shards, image_size=cfg.model.vision.image_size, fields=plan.fields(), **common)
    except LoaderFieldError as e:
        raise ConfigError(str(e)) from e


def train_datasets(cfg: Config) -> list[str] | list[MixturePart]:
    """The training shards: ``data.train_shards`` expanded, or with ``data.mixture`` one
    ``MixturePart`` per dataset (its shards expanded, so a typo fails here, naming the dataset)."""
    if _is_metadataset(cfg):
        return _metadataset_parts(cfg.data.train_shards.strip())
    if not cfg.data.mixture:
        return expand_shards(cfg.data.train_shards)
    parts = []
    for i, (name, entry) in enumerate(zip(cfg.data.mixture_names(), cfg.data.mixture)):
        try:
            shards = expand_shards(entry.shards)
        except FileNotFoundError as e:
            raise ConfigError(f"data.mixture[{i}] ({name}): {e}") from None
        parts.append(MixturePart(name, shards, entry.weight))
    return parts


def _is_metadataset(cfg: Config) -> bool:
    spec = cfg.data.train_shards.strip()
    return not cfg.data.mixture and spec.endswith((".yaml", ".yml")) and "," not in spec


def mixture_names(cfg: Config) -> list[str]:
    """The mixture's dataset names (data.mixture or a metadataset YAML; [] for one dataset), the
    same on every rank: the per-dataset counters the trainer sums over ranks."""
    if _is_metadataset(cfg):
        return [part.name for part in read_metadataset(cfg.data.train_shards.strip(), "train")]
    return cfg.data.mixture_names()


def _metadataset_parts(path: str) -> list[MixturePart]:
    """An energon MetadatasetV2 blend (data.train_shards=blend.yaml): one MixturePart per
    dataset folder of its train split, weighted as the YAML says (``energon_meta.read_metadataset``)."""
    try:
        entries = read_metadataset(path, "train")
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.train_shards={path}: {e}") from None
    parts = []
    for entry in entries:
        try:
            parts.append(MixturePart(entry.name, expand_shards(entry.path), entry.weight))
        except FileNotFoundError as e:
            raise ConfigError(f"data.train_shards={path}: dataset {entry.name!r}: {e}") from None
    return parts


def caption_pad_id(cfg: Config) -> int:
    """The caption padding id the text reconstruction loss ignores: the tokenizer's own when
    that loss is on and the tokenizer file is there, else the id our tokenizer trainer assigns."""
    if cfg.loss.weights.text_recon > 0:
        try:
            return Tokenizer(cfg.data.tokenizer).pad_id
        except FileNotFoundError:  # no tokenizer file (synthetic-batch tests and benchmarks)
            pass
    return PAD_ID
