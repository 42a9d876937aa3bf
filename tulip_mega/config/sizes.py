"""Named model sizes: `model.size` picks a row, and any `model.vision.*` / `model.text.*` field
left null in the recipe is filled from it by `resolve()`.

Keys match `VisionConfig` / `TextConfig` field names exactly (a test enforces it), so a recipe
can start from a named size and override single fields.
"""

from __future__ import annotations

_SO400M_TEXT = dict(vocab_size=32000, context_length=64, num_layers=27, hidden_size=1152, num_heads=16,
                    ffn_hidden_size=4304)

# name -> (vision fields, text fields)
SIZES: dict[str, tuple[dict[str, int], dict[str, int]]] = {
    # Seconds-per-step on a laptop CPU; used by tests and recipes/tiny_cpu.yaml.
    "debug": (
        dict(image_size=32, patch_size=8, num_layers=2, hidden_size=64, num_heads=4, ffn_hidden_size=256),
        dict(vocab_size=1024, context_length=64, num_layers=2, hidden_size=64, num_heads=4, ffn_hidden_size=256),
    ),
    # ViT-B/16 towers (SigLIP B/16 at 224).
    "b16": (
        dict(image_size=224, patch_size=16, num_layers=12, hidden_size=768, num_heads=12, ffn_hidden_size=3072),
        dict(vocab_size=32000, context_length=64, num_layers=12, hidden_size=768, num_heads=12,
             ffn_hidden_size=3072),
    ),
    # SigLIP shape-optimized 400M. Published as "so400m-patch14-384", but its stride-14 patch
    # conv drops the last 6 pixel rows/columns of a 384 image and actually sees 378 = 27 x 14
    # (27 x 27 = 729 patches). We state that effective size so image_size % patch_size == 0
    # holds; parameters and compute are identical, only the data resize target differs.
    "so400m": (
        dict(image_size=378, patch_size=14, num_layers=27, hidden_size=1152, num_heads=16, ffn_hidden_size=4304),
        dict(_SO400M_TEXT),
    ),
    # SigLIP giant (g/16 at 384) vision tower with the so400m text tower.
    "g16": (
        dict(image_size=384, patch_size=16, num_layers=40, hidden_size=1536, num_heads=16, ffn_hidden_size=6144),
        dict(_SO400M_TEXT),
    ),
    # ~6B vision tower for pipeline-parallel pretraining (recipes/tulip_6b.yaml): InternViT-6B's
    # shape (Chen et al. 2024, InternVL: width 3200, 48 layers, MLP 12800, patch 14) with 32 heads
    # of 100 instead of 25 of 128, so TP=8 holds whole heads (same parameters and FLOPs: attention
    # weights do not depend on the head count); at 224 px (256 patches). Text: a ~1B tower
    # (width 2048, 20 layers, 16 heads, MLP 4h, the 32k vocabulary and 64 tokens of so400m's).
    "6b": (
        dict(image_size=224, patch_size=14, num_layers=48, hidden_size=3200, num_heads=32, ffn_hidden_size=12800),
        dict(vocab_size=32000, context_length=64, num_layers=20, hidden_size=2048, num_heads=16,
             ffn_hidden_size=8192),
    ),
}
