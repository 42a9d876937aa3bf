"""Which blocks run their GEMMs in FP8: Transformer Engine's shape rule, applied to the recipe.

The single FP8 eligibility decision (the other half of the FP8 gate, whether Transformer
Engine imports at all, is models/specs.check_layer_support). Pure Python (no torch, no TE
import), so config validation and `tulip-mega plan` decide exactly what a GPU run will do;
models/megatron_config.py gives each block's TransformerConfig its FP8 setting from it.

TE's rule, read from its source (transformer_engine/pytorch):
- every TE linear checks its input, flattened to [tokens, in] as it arrives (the LOCAL
  sequence-parallel shard, before TE's own all-gather), and its weight [out, in] per TP rank:
  `assert_dim_for_fp8_exec` wants the leading dimension divisible by 8 and the last by 16
  (module/linear.py, layernorm_linear.py; v1.5 through main, all FP8 recipes);
- TE 1.x also asserts the same on both operands of every FP8 GEMM (cpp_extensions/gemm.py
  `fp8_gemm`): the dgrad GEMM has the weight transposed [in, out] and the gradient
  [tokens, out], the wgrad GEMM the input transposed [in, tokens] and the gradient transposed
  [out, tokens]. Together: tokens, in and out are all multiples of 16. TE 2.x dropped that
  Python check, but cuBLASLt's FP8 GEMMs still need 16-byte (16-element) leading dimensions.
So an FP8 GEMM per rank needs in % 16 == 0, out % 16 == 0, tokens % 16 == 0 (all tokens it
multiplies: after the all-gather under sequence parallel), and local input tokens % 8 == 0.

Each TE transformer layer (models/specs.te_layer_spec) runs four such linears; attention
itself stays bf16 (megatron's fp8_dot_product_attention is off), and the MAP head, text head,
patch embedding and decoder projections are plain torch / megatron modules, never FP8.
Per rank (h width, f MLP width, t TP, s sequence, B rows of a tower call):
    linear_qkv   column-parallel  [s*B, h]   -> 3h/t   (TE gathers s under SP: local s/t)
    linear_proj  row-parallel     [s*B, h/t] -> h
    linear_fc1   column-parallel  [s*B, h]   -> f/t    (local s/t under SP)
    linear_fc2   row-parallel     [s*B, f/t] -> h

Policy: FP8 is a per-block choice (megatron enters the FP8 context per TransformerBlock
from its own config, transformer_block.py; a config with fp8=None enters none), so
- a block (tower or decoder) with a width TE cannot run in FP8 runs bf16, or the recipe is
  refused when `precision.fp8_ineligible=error`;
- a token count TE cannot run is refused at config time naming the key to change (the micro-
  or eval batch): no layer choice fixes it, and TE would raise at the first step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from tulip_mega.config.streams import Streams, decoder_length, input_streams, model_heads

ALIGN = 16  # every FP8 GEMM dimension per rank
LOCAL_ALIGN = 8  # TE's check of the local (pre all-gather) input rows

BLOCK_LABELS = {"vision": "vision tower", "text": "text tower", "mae_decoder": "MAE decoder",
                "text_decoder": "caption decoder", "locca_decoder": "LocCa decoder"}


@dataclass(frozen=True)
class Gemm:
    """One TE linear of a block's layers, per TP rank."""

    layer: str  # linear_qkv | linear_proj | linear_fc1 | linear_fc2
    in_width: int
    out_width: int
    in_source: str  # how the widths derive from the recipe, for messages
    out_source: str


@dataclass(frozen=True)
class TokenCount:
    """The rows one tower call feeds every GEMM of a block (per rank)."""

    stream: str  # global | local | mae | text | eval | decoder
    tokens: int  # rows of the GEMM: sequence x batch (the whole sequence, also under SP)
    local: int  # rows TE's input check sees: tokens / TP under sequence parallel, else tokens
    per_sample: int  # tokens per row of the batch key (sequence x views)
    why: str  # e.g. "729 patches x 4 views x train.micro_batch_size=16"
    key: str  # the recipe key the batch comes from


@dataclass(frozen=True)
class BlockFp8:
    """FP8 eligibility of one block: its GEMMs, the token counts it runs, and what fails."""

    name: str  # vision | text | mae_decoder | text_decoder | locca_decoder
    gemms: tuple[Gemm, ...]
    tokens: tuple[TokenCount, ...]
    width_problems: tuple[str, ...]
    token_problems: tuple[TokenCount, ...]
    built: bool = True  # False: a decoder this recipe's loss weights do not build

    @property
    def label(self) -> str:
        return BLOCK_LABELS[self.name]


@dataclass(frozen=True)
class Fp8Plan:
    """Which blocks run FP8 under the recipe's `precision.fp8` (None = FP8 off everywhere)."""

    fp8: Optional[str]
    recipe: str  # precision.fp8_recipe
    blocks: tuple[BlockFp8, ...]

    def runs_fp8(self, name: str) -> bool:
        """Whether block `name` (vision, text, mae_decoder, text_decoder) runs its GEMMs in FP8."""
        if self.fp8 is None:
            return False
        return not self.block(name).width_problems

    def block(self, name: str) -> BlockFp8:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(f"no block {name!r} in this recipe; blocks: {', '.join(b.name for b in self.blocks)}")

    def startup_line(self) -> str:
        """One line: which blocks run FP8 and why any does not (start-up log, plan)."""
        if self.fp8 is None:
            return "fp8: off (precision.fp8=null)"
        built = [b for b in self.blocks if b.built]
        on = [b.label for b in built if self.runs_fp8(b.name)]
        off = [f"{b.label} ({'; '.join(b.width_problems)})" for b in built if not self.runs_fp8(b.name)]
        line = f"fp8 {self.fp8} ({self.recipe} scaling): FP8 GEMMs in {', '.join(on) or 'no block'}"
        if off:
            line += f"; bf16 in {', '.join(off)}: not multiples of {ALIGN}, Transformer Engine's FP8 shape rule"
        return line

    def table(self) -> list[str]:
        """`tulip-mega plan`'s FP8 section: one line per block with its GEMMs per rank."""
        if self.fp8 is None:
            return []
        lines = [f"FP8 GEMMs (precision.fp8={self.fp8}; Transformer Engine needs every GEMM dimension per rank "
                 f"a multiple of {ALIGN}), per rank in -> out:"]
        for b in (b for b in self.blocks if b.built):
            gemms = "  ".join(f"{g.layer.removeprefix('linear_')} {g.in_width}->{g.out_width}" for g in b.gemms)
            tokens = ", ".join(f"{t.stream} {t.tokens}" for t in b.tokens)
            state = "FP8 " if self.runs_fp8(b.name) else "bf16"
            lines.append(f"  {b.label:<16} {state}  {gemms}  tokens {tokens}")
            if not self.runs_fp8(b.name):
                lines.append(f"  {'':<16}       ^ {'; '.join(b.width_problems)}: not multiples of {ALIGN}")
        return lines


def _gemms(prefix: str, h: int, f: int, tp: int) -> tuple[Gemm, ...]:
    """The four TE linears of one layer of width h and MLP width f, per rank under TP tp."""
    by_tp = f" / TP {tp}" if tp > 1 else ""
    hs, fs = f"{prefix}.hidden_size {h}", f"{prefix}.ffn_hidden_size {f}"
    return (
        Gemm("linear_qkv", h, 3 * h // tp, hs, f"3 x {hs}{by_tp}"),
        Gemm("linear_proj", h // tp, h, f"{hs}{by_tp}", hs),
        Gemm("linear_fc1", h, f // tp, hs, f"{fs}{by_tp}"),
        Gemm("linear_fc2", f // tp, h, f"{fs}{by_tp}", hs),
    )


def _width_problems(gemms: tuple[Gemm, ...]) -> tuple[str, ...]:
    """Widths that are not multiples of ALIGN, one entry per width, naming every GEMM side it sets."""
    sides: dict[tuple[int, str], list[str]] = {}
    for g in gemms:
        for side, width, source in (("output", g.out_width, g.out_source), ("input", g.in_width, g.in_source)):
            if width % ALIGN:
                sides.setdefault((width, source), []).append(f"{g.layer} {side}")
    return tuple(f"{' / '.join(names)} width {width} = {source}" for (width, source), names in sides.items())


def _tokens(stream: str, seq: int, views: int, batch: int, seq_why: str, key: str, cfg) -> TokenCount:
    tp = cfg.parallel.tensor_parallel
    tokens = seq * views * batch
    local = tokens // tp if cfg.parallel.sequence_parallel else tokens
    views_why = f" x {views} views" if views > 1 else ""
    return TokenCount(stream, tokens, local, seq * views, f"{seq_why}{views_why} x {key}={batch}", key)


def _eval_on(cfg) -> bool:
    e = cfg.eval
    return bool(e.zeroshot_shards or e.retrieval_shards or e.linear_probe_shards)


def _block_tokens(cfg, streams: Streams) -> dict[str, list[TokenCount]]:
    """Every tower call's rows per block: the training streams (config/streams.py), the
    evaluation pass (view 0 and caption at eval.batch_size) when an eval set is configured,
    and the decoders (all patches / the caption, one per sample)."""
    v, t = cfg.model.vision, cfg.model.text
    mb, micro = cfg.train.micro_batch_size, "train.micro_batch_size"
    seq_why = {"global": f"{streams.patches} patches", "local": f"{streams.local_patches} local-crop patches",
               "mae": f"{streams.mae_visible} MAE visible patches",
               "teacher": f"{streams.patches} patches (EMA teacher)",
               "masked": f"{streams.patches} patches (masked-prediction student)"}
    out: dict[str, list[TokenCount]] = {"vision": [], "text": []}
    for s in streams.vision:
        out["vision"].append(_tokens(s.name, s.seq, s.views, mb, seq_why[s.name], micro, cfg))
    out["text"].append(_tokens("text", t.context_length, streams.texts, mb,
                               f"{t.context_length} tokens (model.text.context_length)", micro, cfg))
    if _eval_on(cfg):
        eb = cfg.eval.batch_size or mb
        key = "eval.batch_size" if cfg.eval.batch_size else "eval.batch_size (null = train.micro_batch_size)"
        out["vision"].append(_tokens("eval", v.seq_length, 1, eb, f"{v.seq_length} patches", key, cfg))
        out["text"].append(_tokens("eval", t.context_length, 1, eb, f"{t.context_length} tokens", key, cfg))
    heads = model_heads(cfg)
    out["mae_decoder"] = [_tokens("decoder", streams.patches, 1, mb, f"{streams.patches} patches", micro, cfg)
                          ] if heads.mae_decoder else []
    out["text_decoder"] = [_tokens("decoder", t.context_length, 1, mb, f"{t.context_length} tokens", micro, cfg)
                           ] if heads.text_decoder else []
    if heads.locca_decoder:  # listed only where built: recipes without it keep their table
        locca = decoder_length(t.context_length, cfg.parallel.tensor_parallel if cfg.parallel.sequence_parallel else 1)
        out["locca_decoder"] = [_tokens("decoder", locca, 3, mb, f"{locca} LocCa positions x 3 tasks", micro, cfg)]
    return out


def _token_ok(t: TokenCount) -> bool:
    return t.tokens % ALIGN == 0 and t.local % LOCAL_ALIGN == 0


def fp8_plan(cfg, streams: Optional[Streams] = None) -> Fp8Plan:
    """The FP8 decision for a resolved, validated recipe: every block's GEMMs per rank, the
    token counts they run over, and which blocks cannot run FP8 (see the module docstring).
    Computed the same way whether or not precision.fp8 is set (the plan then marks all bf16).
    Decoders the loss weights switch off are listed with `built=False` and no token counts.
    `streams`: the run's input streams (`RunLayout.streams`); the recipe's own when None
    (config validation, before a layout exists)."""
    m, tp = cfg.model, cfg.parallel.tensor_parallel
    sizes = {"vision": ("model.vision", m.vision), "text": ("model.text", m.text),
             "mae_decoder": ("model.mae_decoder", m.mae_decoder), "text_decoder": ("model.text_decoder", m.text_decoder),
             "locca_decoder": ("model.locca_decoder", m.locca_decoder)}
    blocks = []
    for name, tokens in _block_tokens(cfg, streams or input_streams(cfg)).items():
        prefix, size = sizes[name]
        gemms = _gemms(prefix, size.hidden_size, size.ffn_hidden_size, tp)
        blocks.append(BlockFp8(name, gemms, tuple(tokens), _width_problems(gemms),
                               tuple(t for t in tokens if not _token_ok(t)), built=name in ("vision", "text")
                               or bool(tokens)))
    return Fp8Plan(cfg.precision.fp8, cfg.precision.fp8_recipe, tuple(blocks))


def _multiple_needed(counts: list[TokenCount], tp: int, sp: bool) -> int:
    """The smallest batch multiple that makes every count in `counts` pass the rule."""
    need = 1
    for t in counts:
        m = ALIGN // math.gcd(t.per_sample, ALIGN)
        if sp:  # local rows = per_sample / tp x batch must be a multiple of 8
            m = math.lcm(m, LOCAL_ALIGN // math.gcd(t.per_sample // tp, LOCAL_ALIGN))
        need = math.lcm(need, m)
    return need


def check_fp8_shapes(cfg, streams: Optional[Streams] = None) -> Fp8Plan:
    """Refuse, with a ConfigError naming the key, a recipe whose FP8 GEMMs Transformer Engine
    would reject: a token count of a block that runs FP8 (any block, whatever the layer
    choice), or a width when `precision.fp8_ineligible=error`. Returns the plan. `streams`:
    the recipe's input streams when the caller has them (config validation does)."""
    from tulip_mega.config import ConfigError

    plan = fp8_plan(cfg, streams)
    if plan.fp8 is None:
        return plan
    for b in plan.blocks:
        if b.built and b.width_problems and cfg.precision.fp8_ineligible == "error":
            raise ConfigError(
                f"precision.fp8={plan.fp8}: the {b.label} cannot run FP8: {'; '.join(b.width_problems)} "
                f"(not a multiple of {ALIGN}, Transformer Engine's FP8 shape rule per rank); change the width or "
                "parallel.tensor_parallel, or set precision.fp8_ineligible=bf16 to run that block in bf16")
    failing = [(b, t) for b in plan.blocks if plan.runs_fp8(b.name) for t in b.token_problems]
    if failing:
        b, t = failing[0]
        same_key = [c for blk in plan.blocks if plan.runs_fp8(blk.name) for c in blk.tokens if c.key == t.key]
        need = _multiple_needed(same_key, cfg.parallel.tensor_parallel, cfg.parallel.sequence_parallel)
        local = (f", {t.local} on each rank before the sequence-parallel all-gather (needs a multiple of "
                 f"{LOCAL_ALIGN})" if cfg.parallel.sequence_parallel else "")
        key = t.key.split(" ")[0]
        raise ConfigError(
            f"precision.fp8={plan.fp8}: the {b.label}'s FP8 GEMMs (linear_qkv, linear_proj, linear_fc1, linear_fc2) "
            f"would run over {t.tokens} tokens in the {t.stream} pass ({t.why}{local}); Transformer Engine needs a "
            f"multiple of {ALIGN}: set {key} to a multiple of {need}, or precision.fp8=null")
    return plan
