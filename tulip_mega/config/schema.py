"""The configuration schema: one dataclass per component, defaults and help text beside each field.

Every field carries `metadata={"help": ...}` so `help_text()` can print the whole key space.
Each section validates itself (`validate()`); checks that span sections live in
`Config.validate`, and the ones that need the world size in `validate_layout`. All of them run
before any process group exists, so a bad recipe fails in milliseconds on rank 0's terminal
instead of as a shape mismatch deep inside megatron-core.

Nothing here imports torch or megatron: the config must load instantly (for `--help`, tests,
and launch scripts). The Transformer Engine probe for FP8 is imported lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union


class ConfigError(ValueError):
    """A recipe, override or layout the trainer cannot run; the message says which key and why."""


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def _section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _at_least(obj: Any, prefix: str, names: tuple[str, ...], minimum: int) -> None:
    """Each named field (when set) must be >= minimum; None means 'not decided yet' and passes."""
    for name in names:
        value = getattr(obj, name)
        if value is not None:
            _require(value >= minimum, f"{prefix}.{name}={value!r} must be >= {minimum}")


@dataclass
class RunConfig:
    name: str = _f("tulip", "run name; run folder = output_dir/name")
    output_dir: str = _f("runs", "parent folder of run folders")
    seed: int = _f(1234, "random seed: weight init, data order and augmentation (keyed by seed and DP rank), "
                              "MAE masks (keyed by seed, step and sample)")
    log_interval: int = _f(1, "steps between metric lines")
    max_wall_time_minutes: Optional[float] = _f(None, "stop cleanly (and checkpoint) after this long")

    def validate(self) -> None:
        _require(bool(self.name.strip()), "run.name must not be empty")
        _require(bool(self.output_dir.strip()), "run.output_dir must not be empty")
        _require(self.seed >= 0, f"run.seed={self.seed} must be >= 0 (numpy seeds are unsigned)")
        _at_least(self, "run", ("log_interval",), 1)
        m = self.max_wall_time_minutes
        _require(m is None or m > 0, f"run.max_wall_time_minutes={m} must be > 0 or null")


def _validate_tower(tower: Any, prefix: str) -> None:
    """Checks shared by both towers; fields still None (not yet resolved) are skipped."""
    _at_least(tower, prefix, ("num_layers", "hidden_size", "num_heads", "ffn_hidden_size"), 1)
    h, n = tower.hidden_size, tower.num_heads
    if h is not None and n is not None:
        _require(h % n == 0, f"{prefix}.hidden_size={h} is not divisible by {prefix}.num_heads={n}: "
                             "each head needs a whole number of channels")


@dataclass
class VisionConfig:
    image_size: Optional[int] = _f(None, "input resolution in pixels (square); null = from model.size")
    patch_size: Optional[int] = _f(None, "patch side in pixels; null = from model.size")
    num_layers: Optional[int] = _f(None, "transformer layers; null = from model.size")
    hidden_size: Optional[int] = _f(None, "model width; null = from model.size")
    num_heads: Optional[int] = _f(None, "attention heads; null = from model.size")
    ffn_hidden_size: Optional[int] = _f(None, "MLP inner width; null = from model.size")

    def validate(self) -> None:
        _at_least(self, "model.vision", ("image_size", "patch_size"), 1)
        _validate_tower(self, "model.vision")
        i, p = self.image_size, self.patch_size
        if i is not None and p is not None:
            _require(i % p == 0, f"model.vision.image_size={i} is not divisible by "
                                 f"model.vision.patch_size={p}: the image must tile into whole patches")

    @property
    def seq_length(self) -> int:
        """Tokens per image, one per patch (the sequence length the vision tower runs at)."""
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    vocab_size: Optional[int] = _f(None, "tokenizer vocabulary size; null = from model.size")
    context_length: Optional[int] = _f(None, "tokens per caption (pad/truncate); null = from model.size")
    num_layers: Optional[int] = _f(None, "transformer layers; null = from model.size")
    hidden_size: Optional[int] = _f(None, "model width; null = from model.size")
    num_heads: Optional[int] = _f(None, "attention heads; null = from model.size")
    ffn_hidden_size: Optional[int] = _f(None, "MLP inner width; null = from model.size")

    def validate(self) -> None:
        _at_least(self, "model.text", ("vocab_size", "context_length"), 1)
        _validate_tower(self, "model.text")


@dataclass
class DecoderConfig:
    """A small transformer decoder used only for a reconstruction loss (training only: not exported)."""

    num_layers: int = _f(2, "decoder transformer layers")
    hidden_size: Optional[int] = _f(None, "decoder width; null = the width of the tower it decodes")
    num_heads: Optional[int] = _f(None, "decoder attention heads; null = the tower's")
    ffn_hidden_size: Optional[int] = _f(None, "decoder MLP inner width; null = the tower's")

    def validate(self, prefix: str) -> None:
        _validate_tower(self, prefix)


@dataclass
class ModelConfig:
    size: str = _f("debug", "a name in the size table (tulip_mega/config/sizes.py)")
    vision: VisionConfig = _section(VisionConfig, "image tower; unset fields come from the size table")
    text: TextConfig = _section(TextConfig, "text tower; unset fields come from the size table")
    temperature_init: float = _f(10.0, "exp(t) at init (SigLIP: t = log 10)")
    bias_init: float = _f(-10.0, "sigmoid-loss bias b at init")
    layernorm_eps: float = _f(1e-6, "epsilon of every LayerNorm")
    init_std: float = _f(0.02, "std of the normal weight init")
    init_from_hf: Optional[str] = _f(None, "start from a Hugging Face SiglipModel directory (its weights, any "
                                           "TP/PP); null = random init")
    init_from_open_clip: Optional[str] = _f(None, "start from an open_clip folder (tulip-mega convert --to open_clip, "
                                                  "or a TULIP release: open_clip_config.json + weights), any TP/PP")
    mae_decoder: DecoderConfig = _section(DecoderConfig, "MAE pixel decoder (built only when loss.weights.mae > 0)")
    text_decoder: DecoderConfig = _section(DecoderConfig, "causal caption decoder (built only when "
                                                          "loss.weights.text_recon > 0)")
    locca_decoder: DecoderConfig = _section(DecoderConfig, "LocCa decoder with cross-attention to the image's patch "
                                                           "tokens (built only when loss.weights.locca > 0); null "
                                                           "sizes = the text tower's")
    aug_projector_hidden: int = _f(4096, "hidden width of the clip-rocket MLP projector (aug <-> aug InfoNCE)")
    aug_temperature_init: float = _f(10.0, "inverse temperature of the aug <-> aug InfoNCE at init (1/0.1)")
    separate_logit_params: bool = _f(True, "image-image and text-text sigmoid terms learn their own scale/bias "
                                           "(init like the image-text ones); false = share the image-text ones")
    transformer_impl: Literal["auto", "te", "local"] = _f("auto", "layer implementation: auto = Transformer Engine "
                                                                  "when it imports, else megatron-core's local layers")

    def validate(self) -> None:
        self.vision.validate()
        self.text.validate()
        _require(not (self.init_from_hf and self.init_from_open_clip),
                 "model.init_from_hf and model.init_from_open_clip are both set: start from one of them")
        self.mae_decoder.validate("model.mae_decoder")
        self.text_decoder.validate("model.text_decoder")
        self.locca_decoder.validate("model.locca_decoder")
        _at_least(self, "model", ("aug_projector_hidden",), 1)
        _require(self.aug_temperature_init > 0, f"model.aug_temperature_init={self.aug_temperature_init} must be > 0")
        for name in ("temperature_init", "layernorm_eps", "init_std"):
            value = getattr(self, name)
            _require(value > 0, f"model.{name}={value} must be > 0")


@dataclass
class ParallelConfig:
    tensor_parallel: int = _f(1, "tensor-parallel size (splits heads/MLP across ranks)")
    pipeline_parallel: int = _f(1, "pipeline-parallel size (splits layers into stages)")
    virtual_pipeline: int = _f(1, "interleaved virtual stages (model chunks) per pipeline rank: smaller bubble, more "
                                  "p2p traffic; needs PP > 1 and micro-batches per step a multiple of PP")
    pipeline_split: Union[Literal["balanced", "even"], list[tuple[int, int]]] = _f(
        "balanced", "per-stage layers of both towers: balanced (by FLOPs), even (layers / PP), or "
                    "[[vision, text], ...] one pair per stage; with virtual_pipeline=v > 1 one pair per "
                    "chunk, PP x v pairs in megatron's order (chunk 0 of every rank, then chunk 1, ...) "
                    "(tulip_mega/models/pipeline_split.py)")
    sequence_parallel: bool = _f(False, "shard LayerNorm/dropout activations along the sequence (needs TP > 1)")
    distributed_optimizer: bool = _f(False, "ZeRO-1 via megatron DistributedOptimizer")
    overlap_grad_reduce: bool = _f(False, "overlap the data-parallel gradient all-reduce with backward")

    def validate(self) -> None:
        _at_least(self, "parallel", ("tensor_parallel", "pipeline_parallel", "virtual_pipeline"), 1)
        # megatron runs its interleaved schedule only when there is a pipeline to interleave.
        _require(self.virtual_pipeline == 1 or self.pipeline_parallel > 1,
                 f"parallel.virtual_pipeline={self.virtual_pipeline} needs parallel.pipeline_parallel > 1 "
                 f"(got {self.pipeline_parallel}): virtual stages are chunks of a pipeline rank's layers")
        _require(not self.sequence_parallel or self.tensor_parallel > 1,
                 "parallel.sequence_parallel=true needs parallel.tensor_parallel > 1 "
                 f"(got {self.tensor_parallel}): it shards activations across the TP group")


@dataclass
class PrecisionConfig:
    dtype: Literal["auto", "fp32", "bf16"] = _f("auto", "auto = bf16 on GPU, fp32 on CPU")
    fp8: Optional[Literal["e4m3", "hybrid"]] = _f(None, "FP8 GEMMs via Transformer Engine; null = off")
    fp8_recipe: Literal["delayed", "tensorwise"] = _f("delayed", "FP8 scaling recipe")
    fp8_amax_history_len: int = _f(1024, "amax history window of delayed scaling")
    fp8_amax_compute_algo: Literal["max", "most_recent"] = _f("max", "how the scale is picked from the history")
    fp8_ineligible: Literal["bf16", "error"] = _f(
        "bf16", "a tower or decoder with a GEMM width Transformer Engine cannot run in FP8 (per rank, not a "
                "multiple of 16): bf16 = that block runs bf16, error = refuse the recipe "
                "(tulip_mega/config/fp8_shapes.py)")
    bias_fusions: bool = _f(
        False, "GPU only: megatron's torch.compile'd bias+GELU and bias+dropout+add kernels; off by default, "
               "measured slower on an H200 (benchmarks/RESULTS.md, GPU acceptance)")

    def validate(self) -> None:
        # Whether this machine has Transformer Engine for FP8 is checked at launch, with the
        # other machine checks (tulip_mega.models.specs.check_layer_support): a recipe for
        # H100s must still load, print and plan anywhere.
        _at_least(self, "precision", ("fp8_amax_history_len",), 1)


@dataclass
class RecomputeConfig:
    granularity: Optional[Literal["selective", "full"]] = _f(None, "activation recompute; null = off")
    method: Literal["uniform", "block"] = _f("uniform", "full recompute: uniform chunks or the first N layers")
    num_layers: int = _f(1, "full recompute: layers per chunk (uniform) or per stage (block)")

    def validate(self) -> None:
        _at_least(self, "recompute", ("num_layers",), 1)


@dataclass
class OptimConfig:
    lr: float = _f(1e-3, "peak learning rate (after warmup)")
    min_lr: float = _f(0.0, "LR floor reached at the end of the decay")
    weight_decay: float = _f(1e-4, "AdamW decoupled weight decay")
    betas: tuple[float, float] = _f((0.9, 0.95), "AdamW (beta1, beta2)")
    eps: float = _f(1e-8, "AdamW epsilon")
    clip_grad: float = _f(1.0, "global grad-norm clip; 0 disables")
    warmup_steps: int = _f(0, "linear warmup steps (must be < train.steps: the cosine decay needs a step)")

    def validate(self) -> None:
        _require(self.lr > 0, f"optim.lr={self.lr} must be > 0")
        _require(0 <= self.min_lr <= self.lr, f"optim.min_lr={self.min_lr} must be in [0, optim.lr={self.lr}]")
        _require(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                 f"optim.betas={list(self.betas)} must be two numbers in [0, 1)")
        _require(self.eps > 0, f"optim.eps={self.eps} must be > 0")
        _require(self.clip_grad >= 0, f"optim.clip_grad={self.clip_grad} must be >= 0 (0 disables)")
        _at_least(self, "optim", ("warmup_steps",), 0)


@dataclass
class TrainConfig:
    steps: int = _f(100, "optimizer steps to run")
    global_batch_size: int = _f(32, "image-text pairs per step, all ranks together")
    micro_batch_size: int = _f(8, "pairs per forward/backward on one data-parallel rank")
    max_skipped_steps: int = _f(10, "stop the run (exit code 4, not requeued) after this many consecutive steps "
                                    "whose loss or gradient norm was not finite (each is skipped: no weight or "
                                    "optimizer state changes)")
    check_cache: bool = _f(False, "debug: with the global contrastive batch's embedding cache, compare the gradient "
                                  "pass's contrastive embeddings with the cached ones every step and stop (exit "
                                  "code 6) past train.check_cache_tolerance (docs/losses.md)")
    check_cache_tolerance: Optional[float] = _f(None, "largest relative difference train.check_cache accepts; "
                                                      "null = by precision: fp32 1e-5, bf16 1e-2, FP8 2e-2")

    def validate(self) -> None:
        _at_least(self, "train", ("steps", "global_batch_size", "micro_batch_size", "max_skipped_steps"), 1)
        t = self.check_cache_tolerance
        _require(t is None or t > 0, f"train.check_cache_tolerance={t} must be > 0 or null")
        g, m = self.global_batch_size, self.micro_batch_size
        _require(m <= g, f"train.micro_batch_size={m} must be <= train.global_batch_size={g}")
        _require(g % m == 0, f"train.global_batch_size={g} is not divisible by train.micro_batch_size={m}")


@dataclass
class ViewsConfig:
    """What the loader emits per sample. Counts decide tensor shapes (and the pipeline p2p shape)."""

    global_crops: int = _f(1, "full-resolution views per image; view 0 is the one paired with the caption")
    global_scale: tuple[float, float] = _f((0.4, 1.0), "area range (fraction of the image) of global crops")
    local_crops: int = _f(0, "low-resolution crops per image for the image-image loss (TULIP: up to 8)")
    local_size: int = _f(96, "side of a local crop in pixels (a multiple of model.vision.patch_size)")
    local_scale: tuple[float, float] = _f((0.05, 0.4), "area range of local crops")
    geco_images: bool = _f(False, "add the GeCo image edits (key.pos.jpg / key.neg.jpg) as two more views")
    paraphrases: int = _f(0, "GeCo paraphrases per caption (padded; missing ones are ignored pairs)")
    negatives: int = _f(0, "GeCo meaning-changing rewrites per caption (padded; missing ones ignored)")
    eda: bool = _f(False, "also emit an EDA-augmented copy of the caption (clip-rocket text augmentation)")

    def validate(self) -> None:
        _at_least(self, "data.views", ("global_crops",), 1)
        _at_least(self, "data.views", ("local_crops", "paraphrases", "negatives"), 0)
        _at_least(self, "data.views", ("local_size",), 1)
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            _require(0 < lo <= hi <= 1, f"data.views.{name}={[lo, hi]} must satisfy 0 < min <= max <= 1")


@dataclass
class AugmentConfig:
    """Photometric augmentation of the crops (global crops after view 0, and local crops)."""

    first_view_crop: bool = _f(False, "view 0 gets a random-resized crop too; false = plain resize (SigLIP)")
    flip_prob: float = _f(0.5, "horizontal flip probability")
    color_jitter: tuple[float, float, float, float] = _f((0.4, 0.4, 0.4, 0.1),
                                                         "brightness, contrast, saturation, hue strength")
    color_jitter_prob: float = _f(0.8, "probability of applying colour jitter; 0 = off")
    grayscale_prob: float = _f(0.2, "probability of converting a crop to grayscale")
    blur_prob: float = _f(0.5, "probability of a Gaussian blur")
    eda_synonym: float = _f(0.4, "EDA: probability of synonym replacement per caption")
    eda_swap: float = _f(0.4, "EDA: probability of a random word swap")
    eda_deletion: float = _f(0.2, "EDA: probability of random word deletion")
    eda_stopword: float = _f(0.8, "EDA: probability of stop-word removal")

    def validate(self) -> None:
        for name in ("flip_prob", "color_jitter_prob", "grayscale_prob", "blur_prob",
                     "eda_synonym", "eda_swap", "eda_deletion", "eda_stopword"):
            value = getattr(self, name)
            _require(0 <= value <= 1, f"data.augment.{name}={value} must be a probability in [0, 1]")
        _require(len(self.color_jitter) == 4 and all(v >= 0 for v in self.color_jitter),
                 f"data.augment.color_jitter={list(self.color_jitter)} must be four numbers >= 0")


@dataclass
class MixtureEntry:
    """One dataset of a weighted training mixture (data.mixture; docs/data.md "Mixtures")."""

    shards: str = _f("", "this dataset's shards, in any form data.train_shards takes")
    weight: float = _f(1.0, "relative sampling weight (> 0); the weights are normalised over the mixture")
    name: str = _f("", "name in logs, metrics and checkpoints; default: dataset<i> (0-based)")


@dataclass
class DataConfig:
    train_shards: str = _f("data/shapes/train-{000000..000007}.tar",
                           "webdataset shards: brace range, glob, directory or file, comma-separated; "
                           "each may be an object-store URL read through multi-storage-client "
                           "(s3://bucket/prefix/train-{000000..000099}.tar, s3://bucket/prefix/train-*.tar, "
                           "s3://bucket/prefix/, msc://profile/...; credentials: MSC_CONFIG or AWS_* env, "
                           "see README 'Shards in an object store')")
    mixture: list[MixtureEntry] = field(default_factory=list, metadata={"help": (
        "weighted mixture of datasets: a list of {shards, weight, name}; each sample is drawn from dataset i with "
        "probability weight_i / sum(weights); non-empty replaces data.train_shards")})
    tokenizer: str = _f("data/shapes/tokenizer.model", "SentencePiece model file")
    shuffle_buffer: int = _f(256, "samples held in the shuffle buffer; 0 = no shuffle")
    loader: Literal["auto", "dali", "simple"] = _f(
        "auto", "auto = DALI when nvidia.dali imports (all views, GeCo, EDA), else the PIL loader "
        "(view 0 + caption only); dali / simple force one")
    threads: int = _f(2, "DALI worker threads per rank for decode and augmentation")
    prefetch: int = _f(2, "batches the DALI loader prepares ahead in a background thread; 0 = synchronous")
    reader_workers: int = _f(0, "processes per rank for the DALI loader's host work (JSON, view params, EDA, "
                                "tokenising); 0 = in the loader thread; see benchmarks/RESULTS.md")
    views: ViewsConfig = _section(ViewsConfig, "views and GeCo fields emitted per sample")
    augment: AugmentConfig = _section(AugmentConfig, "image and text augmentation")

    def validate(self) -> None:
        _require(bool(self.train_shards.strip()), "data.train_shards must not be empty")
        for i, entry in enumerate(self.mixture):
            _require(bool(entry.shards.strip()), f"data.mixture[{i}].shards must not be empty")
            _require(entry.weight > 0, f"data.mixture[{i}].weight={entry.weight} must be > 0 "
                                       f"(leave a dataset out of the list to drop it)")
        names = self.mixture_names()
        _require(len(set(names)) == len(names), f"data.mixture names must be unique, got {names}")
        _require(bool(self.tokenizer.strip()), "data.tokenizer must not be empty")
        _at_least(self, "data", ("shuffle_buffer", "prefetch", "reader_workers"), 0)
        _at_least(self, "data", ("threads",), 1)
        self.views.validate()
        self.augment.validate()

    def mixture_names(self) -> list[str]:
        """Each mixture dataset's name (its `name`, or dataset<i>)."""
        return [entry.name or f"dataset{i}" for i, entry in enumerate(self.mixture)]


@dataclass
class LossWeights:
    """Weight of each term in the total loss; a term with weight 0 is not computed at all."""

    image_text: float = _f(1.0, "image <-> caption contrastive term (sigmoid or InfoNCE, see loss.contrastive)")
    image_image: float = _f(0.0, "sigmoid loss between views of the images (crops, GeCo edits)")
    text_text: float = _f(0.0, "sigmoid loss between a caption and its GeCo paraphrases / negatives")
    mae: float = _f(0.0, "MAE: normalised-pixel MSE on the masked patches of view 0")
    text_recon: float = _f(0.0, "causal decoder cross entropy reconstructing the caption from its embedding")
    aug_contrastive: float = _f(0.0, "clip-rocket: InfoNCE between the augmented image view and the EDA caption")
    self_distill: float = _f(0.0, "SigLIP 2 / SILC: local crops (student) against an EMA teacher's global crop, "
                                  "from loss.distill.start_fraction of training (SigLIP 2: 1 x the size factor)")
    locca: float = _f(0.0, "SigLIP 2 / LocCa: decoder cross entropy of captioning, referring expressions (region "
                           "caption -> box) and grounded captioning (box -> region caption), see loss.locca")
    masked_prediction: float = _f(0.0, "SigLIP 2 / TIPS: masked student patches against the EMA teacher's patch "
                                       "features, from loss.distill.start_fraction (SigLIP 2: 0.25 x the size factor)")

    def validate(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            _require(value >= 0, f"loss.weights.{name}={value} must be >= 0 (0 switches the term off)")


@dataclass
class DistillConfig:
    """Self-distillation with an EMA teacher (SigLIP 2 section 2.3, after SILC and TIPS): the
    loss.weights.self_distill and masked_prediction terms. Defaults cite docs/losses.md."""

    start_fraction: float = _f(0.8, "fraction of train.steps after which the teacher is copied from the student "
                                    "and both terms switch on (SigLIP 2: the last 20% of training)")
    teacher_momentum: float = _f(0.996, "EMA momentum of the teacher at the start; it follows a cosine to "
                                        "teacher_momentum_end at train.steps (DINO's schedule)")
    teacher_momentum_end: float = _f(1.0, "EMA momentum at the last step")
    prototypes: int = _f(65536, "output width K of each projection head (DINO / iBOT)")
    head_hidden: int = _f(2048, "hidden width of the three-layer projection MLPs (DINO)")
    head_bottleneck: int = _f(256, "bottleneck width before the L2-normalised prototype layer (DINO)")
    student_temperature: float = _f(0.1, "softmax temperature of the student (DINO)")
    teacher_temperature: float = _f(0.04, "softmax temperature of the teacher after centering (DINO)")
    center_momentum: float = _f(0.9, "EMA momentum of the teacher-output centre (DINO)")
    mask_ratio: float = _f(0.5, "fraction of patches the masked-prediction student sees as mask tokens "
                                "(SigLIP 2: 50%)")

    def validate(self) -> None:
        p = "loss.distill"
        _require(0 <= self.start_fraction < 1, f"{p}.start_fraction={self.start_fraction} must be in [0, 1)")
        for name in ("teacher_momentum", "teacher_momentum_end", "center_momentum"):
            value = getattr(self, name)
            _require(0 <= value <= 1, f"{p}.{name}={value} must be in [0, 1]")
        _require(0 < self.mask_ratio < 1, f"{p}.mask_ratio={self.mask_ratio} must be in (0, 1)")
        _at_least(self, p, ("prototypes", "head_hidden", "head_bottleneck"), 1)
        for name in ("student_temperature", "teacher_temperature"):
            value = getattr(self, name)
            _require(value > 0, f"{p}.{name}={value} must be > 0")


@dataclass
class LoccaConfig:
    """SigLIP 2's LocCa decoder loss (Wan et al. 2024, section 2.2 of SigLIP 2): the targets it
    decodes. docs/losses.md gives the sequences and where each default comes from."""

    regions: int = _f(4, "region captions + boxes read per sample from key.json 'regions' (the decoder trains on "
                         "one of them per step, drawn per sample)")
    box_bins: int = _f(500, "location tokens: each box coordinate in [0, 1] is quantised into this many bins")
    parallel_fraction: float = _f(0.5, "share of captioning targets decoded by parallel prediction (every input "
                                       "a mask token; LocCa after CapPa) instead of teacher forcing")

    def validate(self) -> None:
        _at_least(self, "loss.locca", ("regions",), 1)
        _at_least(self, "loss.locca", ("box_bins",), 2)
        _require(0 <= self.parallel_fraction <= 1,
                 f"loss.locca.parallel_fraction={self.parallel_fraction} must be in [0, 1]")


@dataclass
class LossConfig:
    contrastive_batch: Literal["global", "micro"] = _f(
        "global", "pairs each contrastive term compares: global = the whole global batch (micro x DP x "
                  "accumulation, as SigLIP/TULIP define the loss; costs one extra forward of the contrastive "
                  "views per step, see docs/losses.md); micro = one micro-step (micro x DP), for memory-bound runs")
    sigmoid_impl: Literal["auto", "ring", "gather"] = _f(
        "auto", "plain image-text sigmoid loss across DP: ring send/recv or all-gather; auto = ring. The "
                "weighted terms (hard negatives, image-image, text-text) always gather, so ring is refused with them")
    contrastive: Literal["sigmoid", "infonce"] = _f("sigmoid", "image-text term: SigLIP sigmoid or CLIP InfoNCE")
    infonce_max_logit_scale: float = _f(100.0, "InfoNCE logit scales (image-text and aug) are clamped to at most "
                                               "this (open_clip clamps at 100)")
    weights: LossWeights = _section(LossWeights, "weight of each loss term")
    hard_negatives: bool = _f(True, "GeCo caption negatives also enter the image-text sigmoid term (label -1)")
    mae_mask_ratio: float = _f(0.75, "fraction of view-0 patches masked for MAE")
    mae_norm_pix: bool = _f(True, "MAE target = pixels normalised per patch (mean/var), as in MAE")
    label_smoothing: float = _f(0.0, "label smoothing of the image-text InfoNCE")
    aug_label_smoothing: float = _f(0.1, "label smoothing of the aug <-> aug InfoNCE (clip-rocket)")
    distill: DistillConfig = _section(DistillConfig, "EMA teacher of self_distill / masked_prediction (SigLIP 2)")
    locca: LoccaConfig = _section(LoccaConfig, "targets of the LocCa decoder term (SigLIP 2)")

    def validate(self) -> None:
        self.weights.validate()
        self.distill.validate()
        self.locca.validate()
        _require(0 < self.mae_mask_ratio < 1, f"loss.mae_mask_ratio={self.mae_mask_ratio} must be in (0, 1)")
        for name in ("label_smoothing", "aug_label_smoothing"):
            value = getattr(self, name)
            _require(0 <= value < 1, f"loss.{name}={value} must be in [0, 1)")
        _require(self.infonce_max_logit_scale > 0,
                 f"loss.infonce_max_logit_scale={self.infonce_max_logit_scale} must be > 0")
        _require(any(getattr(self.weights, n) > 0 for n in self.weights.__dataclass_fields__),
                 "every loss.weights.* is 0: at least one term must be switched on")


@dataclass
class CheckpointConfig:
    dir: Optional[str] = _f(None, "checkpoint folder; null = <run folder>/checkpoints")
    interval: int = _f(0, "steps between saves; 0 = only at the end")
    keep_last: int = _f(2, "complete checkpoints kept; older ones are deleted")
    resume: bool = _f(False, "continue from the newest complete checkpoint in dir")
    load: Optional[str] = _f(None, "start from this checkpoint (weights+state) instead")
    async_save: bool = _f(False, "write checkpoints in the background while training continues; "
                                 "published (latest) only after the write (training/async_checkpoint.py)")

    def validate(self) -> None:
        _at_least(self, "checkpoint", ("interval",), 0)
        _at_least(self, "checkpoint", ("keep_last",), 1)


@dataclass
class WandbConfig:
    """Weights & Biases: the TensorBoard scalars, eval results and the resolved recipe (rank 0)."""

    mode: Literal["online", "offline", "disabled"] = _f("disabled", "online | offline (files under the run "
                                                                    "folder, `wandb sync` later) | disabled")
    project: str = _f("tulip-mega", "wandb project")
    entity: Optional[str] = _f(None, "wandb entity (team or user); null = your default")
    name: Optional[str] = _f(None, "wandb run name; null = run.name")

    def validate(self) -> None:
        if self.mode != "disabled":
            import importlib.util

            _require(importlib.util.find_spec("wandb") is not None,
                     f"logging.wandb.mode={self.mode} but wandb is not installed: pip install 'tulip-mega[wandb]' "
                     "(or set logging.wandb.mode=disabled)")


@dataclass
class LoggingConfig:
    tensorboard: bool = _f(True, "write TensorBoard event files into the run folder")
    straggler_factor: float = _f(3.0, "warn when a step takes this many times the running median step time")
    loader_wait_warn: float = _f(0.02, "warn when the step waits for data longer than this fraction of step time "
                                       "(after logging.loader_wait_warmup_steps)")
    loader_wait_warmup_steps: int = _f(5, "first steps left out of the loader-wait fraction (loader start, queues "
                                          "filling)")
    plateau_steps: int = _f(50, "warn when a contrastive term stays within 1% of chance/<term> (the loss of a "
                                "model that has learned nothing) this many consecutive steps after "
                                "optim.warmup_steps; 0 = off")
    wandb: WandbConfig = _section(WandbConfig, "Weights & Biases logging (optional extra: tulip-mega[wandb])")

    def validate(self) -> None:
        _require(self.straggler_factor > 1, f"logging.straggler_factor={self.straggler_factor} must be > 1")
        _require(0 < self.loader_wait_warn < 1, f"logging.loader_wait_warn={self.loader_wait_warn} must be in (0, 1)")
        _at_least(self, "logging", ("loader_wait_warmup_steps", "plateau_steps"), 0)
        self.wandb.validate()


@dataclass
class EvalConfig:
    """Zero-shot classification and image-text retrieval, in training and by `tulip-mega eval`."""

    interval: int = _f(0, "steps between evaluations during training (and at the last step); 0 = off")
    zeroshot_shards: Optional[str] = _f(None, "shards of the zero-shot set (brace range, glob, folder); "
                                              "null = no zero-shot eval")
    classes: Optional[str] = _f(None, "classes.json (class names + prompts, val_labels: key -> class); "
                                      "null = classes.json beside the zero-shot shards")
    retrieval_shards: Optional[str] = _f(None, "shards of the image-text retrieval set; null = no retrieval eval")
    linear_probe_shards: Optional[str] = _f(None, "train shards of the linear probe (frozen image features -> "
                                                  "logistic regression); null = no linear probe")
    linear_probe_val_shards: Optional[str] = _f(None, "val shards the linear probe reports top-1 on")
    linear_probe_classes: Optional[str] = _f(None, "classes.json of the probe (classes + labels / train_labels / "
                                                   "val_labels: key -> class); null = beside the probe train shards")
    zeroshot_format: str = _f("classes_json", "format of the zero-shot set: classes_json (shards + classes.json), "
                                              "clip_benchmark (its webdataset layout; eval.zeroshot_shards = the "
                                              "root), imagefolder or imagenet (eval.zeroshot_shards = the folder of "
                                              "class folders); see docs/evaluation.md")
    zeroshot_templates: Optional[str] = _f(None, "openai, siglip or a file of '{c}' templates; null = the set's own "
                                                 "(clip_benchmark's file, openai for imagefolder / imagenet)")
    retrieval_format: str = _f("pairs", "format of the retrieval set: pairs (shards, one caption per sample) or "
                                        "clip_benchmark (its webdataset layout, one caption per .txt line; "
                                        "eval.retrieval_shards = the root)")
    split: str = _f("test", "split folder of clip_benchmark-format sets (<root>/<split>/nshards.txt)")
    linear_probe_format: str = _f("classes_json", "format of the probe's sets: classes_json (shards + classes.json), "
                                                  "clip_benchmark (train split 'train' of linear_probe_shards, val split "
                                                  "eval.split of linear_probe_val_shards) or imagefolder (train and val "
                                                  "folders of class folders)")
    mmvp_path: Optional[str] = _f(None, "the MMVP-VLM folder as released (Questions.csv + MMVP_VLM_Images/); "
                                        "null = no MMVP-VLM eval")
    batch_size: Optional[int] = _f(None, "eval micro-batch per data-parallel rank; null = train.micro_batch_size")
    max_samples: Optional[int] = _f(None, "evaluate at most this many samples per task (split over DP ranks); "
                                          "null = all")

    def validate(self) -> None:
        _at_least(self, "eval", ("interval",), 0)
        _at_least(self, "eval", ("batch_size", "max_samples"), 1)
        _require(not self.interval or bool(self.zeroshot_shards or self.retrieval_shards or self.linear_probe_shards
                                           or self.mmvp_path),
                 f"eval.interval={self.interval} but no eval set: set eval.zeroshot_shards, eval.retrieval_shards, "
                 "eval.linear_probe_shards and/or eval.mmvp_path (or eval.interval=0)")
        zeroshot_formats = ("classes_json", "clip_benchmark", "imagefolder", "imagenet")
        _require(self.zeroshot_format in zeroshot_formats,
                 f"eval.zeroshot_format={self.zeroshot_format!r}: expected one of {', '.join(zeroshot_formats)}")
        _require(self.retrieval_format in ("pairs", "clip_benchmark"),
                 f"eval.retrieval_format={self.retrieval_format!r}: expected pairs or clip_benchmark")
        _require(self.linear_probe_format in ("classes_json", "clip_benchmark", "imagefolder"),
                 f"eval.linear_probe_format={self.linear_probe_format!r}: expected classes_json, clip_benchmark or "
                 "imagefolder")
        _require(self.zeroshot_templates is None or self.zeroshot_format != "classes_json",
                 "eval.zeroshot_templates applies to clip_benchmark / imagefolder / imagenet sets; a classes.json "
                 "carries its own prompts")
        _require(bool(self.linear_probe_shards) == bool(self.linear_probe_val_shards),
                 "eval.linear_probe_shards and eval.linear_probe_val_shards go together (train and val shards)")


@dataclass
class Config:
    run: RunConfig = _section(RunConfig, "run identity, seed, logging cadence, wall-time limit")
    model: ModelConfig = _section(ModelConfig, "model size and tower shapes")
    parallel: ParallelConfig = _section(ParallelConfig, "tensor/pipeline parallel layout")
    precision: PrecisionConfig = _section(PrecisionConfig, "compute dtype and FP8")
    recompute: RecomputeConfig = _section(RecomputeConfig, "activation recomputation")
    optim: OptimConfig = _section(OptimConfig, "AdamW and the LR schedule")
    train: TrainConfig = _section(TrainConfig, "steps and batch sizes")
    data: DataConfig = _section(DataConfig, "shards and tokenizer")
    loss: LossConfig = _section(LossConfig, "contrastive loss implementation")
    checkpoint: CheckpointConfig = _section(CheckpointConfig, "saving, resuming, loading")
    logging: LoggingConfig = _section(LoggingConfig, "metric sinks")
    eval: EvalConfig = _section(EvalConfig, "zero-shot / retrieval evaluation")

    def validate(self) -> None:
        """Every check that does not need the world size; the model must be resolved first."""
        for name in self.__dataclass_fields__:
            getattr(self, name).validate()
        v, t, par = self.model.vision, self.model.text, self.parallel
        for prefix, tower in (("model.vision", v), ("model.text", t)):
            for key, value in vars(tower).items():
                _require(value is not None, f"{prefix}.{key} is unset; call resolve(cfg) before validate()")
        # megatron's OptimizerParamScheduler asserts lr_warmup_steps < lr_decay_steps (= train.steps).
        _require(self.optim.warmup_steps < self.train.steps,
                 f"optim.warmup_steps={self.optim.warmup_steps} must be < train.steps={self.train.steps}: the LR "
                 "schedule warms up, then decays to optim.min_lr by train.steps, so the run needs more steps than "
                 "the warm-up")

        self._validate_loss_inputs()
        from tulip_mega.config.streams import input_streams

        streams = input_streams(self)
        tp = par.tensor_parallel
        split = [("model.vision.num_heads", v.num_heads, "each TP rank must hold whole attention heads"),
                 ("model.text.num_heads", t.num_heads, "each TP rank must hold whole attention heads"),
                 ("model.vision.ffn_hidden_size", v.ffn_hidden_size, "the MLP is split column-wise across TP"),
                 ("model.text.ffn_hidden_size", t.ffn_hidden_size, "the MLP is split column-wise across TP"),
                 ("model.text.vocab_size", t.vocab_size, "the embedding is split by vocabulary rows across TP")]
        for name, dec, used in (("mae_decoder", self.model.mae_decoder, self.loss.weights.mae > 0),
                                ("text_decoder", self.model.text_decoder, self.loss.weights.text_recon > 0),
                                ("locca_decoder", self.model.locca_decoder, self.loss.weights.locca > 0)):
            if used:
                split += [(f"model.{name}.num_heads", dec.num_heads, "each TP rank must hold whole attention heads"),
                          (f"model.{name}.ffn_hidden_size", dec.ffn_hidden_size,
                           "the MLP is split column-wise across TP")]
        if par.sequence_parallel:
            why = "sequence parallelism splits the tokens evenly across TP"
            split += [("the vision sequence (model.vision.image_size/patch_size)^2", v.seq_length, why),
                      ("model.text.context_length", t.context_length, why)]
            if streams.local_crops:
                split.append(("the local-crop sequence (data.views.local_size/model.vision.patch_size)^2",
                              streams.local_patches, why))
            if streams.mae_visible:
                split.append(("the MAE visible patches (patches x (1 - loss.mae_mask_ratio))",
                              streams.mae_visible, why))
        for key, value, why in split:
            _require(value % tp == 0, f"{key}={value} is not divisible by parallel.tensor_parallel={tp}: {why}")
        from tulip_mega.config.pipeline_split import check_recompute_fits, check_split_choice, structural_split

        # The split's structure here; a `balanced` split needs the FLOP model and is checked
        # when the model is built (tulip_mega.models.pipeline_split.validate_split).
        try:
            check_split_choice(self)
            split = structural_split(self)
            if split is not None:
                check_recompute_fits(self, split)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        from tulip_mega.config.fp8_shapes import check_fp8_shapes

        check_fp8_shapes(self, streams)  # Transformer Engine's FP8 shape rule, per block and token count


    def _validate_loss_inputs(self) -> None:
        """Every switched-on loss term must get the inputs it needs from data.views."""
        w, views, patch = self.loss.weights, self.data.views, self.model.vision.patch_size
        if w.image_image > 0:
            n = views.global_crops + views.local_crops + (2 if views.geco_images else 0)
            _require(n >= 2, f"loss.weights.image_image={w.image_image} needs at least two views per image, but "
                             f"data.views gives {n} (global_crops={views.global_crops}, local_crops="
                             f"{views.local_crops}, geco_images={views.geco_images})")
            if views.local_crops:
                _require(views.local_size % patch == 0,
                         f"data.views.local_size={views.local_size} is not divisible by "
                         f"model.vision.patch_size={patch}: local crops must tile into whole patches")
        if w.mae > 0:
            patches = self.model.vision.seq_length
            _require(patches >= 2, f"loss.weights.mae={w.mae} masks patches of view 0, but model.vision.image_size="
                                   f"{self.model.vision.image_size} / model.vision.patch_size={patch} gives {patches} "
                                   "patch: MAE needs at least one visible and one masked patch")
        if w.text_text > 0:
            _require(views.paraphrases + views.negatives >= 1,
                     f"loss.weights.text_text={w.text_text} needs GeCo texts: set data.views.paraphrases and/or "
                     "data.views.negatives >= 1")
        if w.aug_contrastive > 0:
            _require(views.global_crops >= 2 and views.eda,
                     f"loss.weights.aug_contrastive={w.aug_contrastive} pairs the second global crop with the EDA "
                     f"caption: needs data.views.global_crops >= 2 (got {views.global_crops}) and "
                     f"data.views.eda=true (got {views.eda})")
        if w.self_distill > 0:
            _require(views.global_crops >= 2 and views.local_crops >= 1,
                     f"loss.weights.self_distill={w.self_distill} sets local crops (student) against the teacher's "
                     f"second global crop: needs data.views.global_crops >= 2 (got {views.global_crops}) and "
                     f"data.views.local_crops >= 1 (got {views.local_crops}; SigLIP 2 uses 8)")
            _require(views.local_size % patch == 0,
                     f"data.views.local_size={views.local_size} is not divisible by "
                     f"model.vision.patch_size={patch}: local crops must tile into whole patches")
        if w.locca > 0:
            _require(not self.data.augment.first_view_crop,
                     f"loss.weights.locca={w.locca} reads region boxes in view 0's coordinates: needs "
                     "data.augment.first_view_crop=false (view 0 a plain resize, not cropped or flipped)")
        if w.masked_prediction > 0:
            _require(views.global_crops >= 2,
                     f"loss.weights.masked_prediction={w.masked_prediction} masks the second global crop: needs "
                     f"data.views.global_crops >= 2 (got {views.global_crops})")
            patches = self.model.vision.seq_length
            _require(int(patches * self.loss.distill.mask_ratio) >= 1,
                     f"loss.distill.mask_ratio={self.loss.distill.mask_ratio} masks no patch of the "
                     f"{patches}-patch view")
        self._validate_sigmoid_impl()
        for name, dec in (("mae_decoder", self.model.mae_decoder), ("text_decoder", self.model.text_decoder),
                          ("locca_decoder", self.model.locca_decoder)):
            for key, value in vars(dec).items():
                _require(value is not None, f"model.{name}.{key} is unset; call resolve(cfg) before validate()")


    def _validate_sigmoid_impl(self) -> None:
        """loss.sigmoid_impl chooses how the PLAIN image-text sigmoid term crosses DP; a value that
        nothing would honour is refused instead of silently ignored."""
        loss, w, views = self.loss, self.loss.weights, self.data.views
        if loss.sigmoid_impl == "auto":
            return
        plain_it = w.image_text > 0 and loss.contrastive == "sigmoid"
        hard_negatives = plain_it and loss.hard_negatives and views.negatives > 0
        weighted = [name for name, on in (("loss.hard_negatives (with data.views.negatives > 0)", hard_negatives),
                                          ("loss.weights.image_image", w.image_image > 0),
                                          ("loss.weights.text_text", w.text_text > 0)) if on]
        _require(plain_it or weighted,
                 f"loss.sigmoid_impl={loss.sigmoid_impl} has no effect: no sigmoid term is switched on "
                 f"(loss.contrastive={loss.contrastive}); remove the key or set it to auto")
        if loss.sigmoid_impl == "ring":
            _require(not weighted,
                     f"loss.sigmoid_impl=ring cannot be honoured: {', '.join(weighted)} use the weighted pair "
                     "loss, which only has the all-gather implementation; set loss.sigmoid_impl=gather or auto")


def data_parallel_size(cfg: Config, world_size: int) -> int:
    """world / (TP x PP): how many model replicas share each step's global batch."""
    tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    _require(isinstance(world_size, int) and world_size >= 1, f"world size must be an int >= 1, got {world_size!r}")
    _require(world_size % (tp * pp) == 0,
             f"world size {world_size} is not divisible by parallel.tensor_parallel={tp} x "
             f"parallel.pipeline_parallel={pp} (= {tp * pp}): every rank must belong to one TP x PP model replica")
    return world_size // (tp * pp)


def validate_layout(cfg: Config, world_size: int) -> int:
    """Checks that need the number of processes; returns the data-parallel size.

    Called by the trainer with WORLD_SIZE from the environment before any process group is
    created, so a mismatched launch fails with numbers instead of a collective hang.
    """
    dp = data_parallel_size(cfg, world_size)
    g, m = cfg.train.global_batch_size, cfg.train.micro_batch_size
    _require(g % (m * dp) == 0,
             f"train.global_batch_size={g} is not divisible by train.micro_batch_size={m} x "
             f"data-parallel size {dp} (= {m * dp}; world {world_size} / (TP {cfg.parallel.tensor_parallel} x "
             f"PP {cfg.parallel.pipeline_parallel})): each rank must run a whole number of micro-batches per step")
    check_interleaved_microbatches(cfg, g // (m * dp))
    return dp


def check_interleaved_microbatches(cfg: Config, microbatches: int) -> None:
    """megatron-core's interleaved schedule (0.16.1, `forward_backward_pipelining_with_interleaving`)
    runs micro-batches in groups of PP per virtual stage and raises mid-step unless the number
    of micro-batches per step is at least PP and a multiple of it; refuse that recipe up front."""
    pp, v = cfg.parallel.pipeline_parallel, cfg.parallel.virtual_pipeline
    if v == 1:
        return
    g, m = cfg.train.global_batch_size, cfg.train.micro_batch_size
    _require(microbatches >= pp and microbatches % pp == 0,
             f"parallel.virtual_pipeline={v} needs the micro-batches per step (train.global_batch_size={g} / "
             f"(train.micro_batch_size={m} x data-parallel size) = {microbatches}) to be a multiple of "
             f"parallel.pipeline_parallel={pp}: megatron's interleaved schedule runs them in groups of PP")
