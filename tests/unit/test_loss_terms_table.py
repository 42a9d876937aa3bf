"""The loss stack's table of terms: it agrees with the recipe's term lists, and a term whose
ModelOutputs field is missing fails with an error that names the field."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tulip_mega.config import load_config
from tulip_mega.config.streams import CONTRASTIVE_TERMS, DISTILL_TERMS, RECONSTRUCTION_TERMS, input_streams
from tulip_mega.losses.outputs import ModelOutputs
from tulip_mega.losses.stack import LOSS_TERMS, TERMS, TulipLossStack

DEBUG = ["model.size=debug", "model.vision.image_size=32", "model.vision.patch_size=8"]


def _outputs(b: int = 4, e: int = 8, **fields) -> ModelOutputs:
    g = torch.Generator().manual_seed(0)
    emb = [torch.nn.functional.normalize(torch.randn(b, e, generator=g), dim=-1) for _ in range(2)]
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    return ModelOutputs(image_emb=emb[0], text_emb=emb[1], logit_scale=scale, logit_bias=bias,
                        ii_logit_scale=scale, ii_logit_bias=bias, tt_logit_scale=scale, tt_logit_bias=bias, **fields)


def test_table_order_and_kinds_match_the_recipe_terms():
    assert TERMS == ("image_text", "image_image", "text_text", "mae", "text_recon", "locca", "aug_contrastive",
                     "self_distill", "masked_prediction")
    assert {t.name for t in LOSS_TERMS if t.chance is not None} == set(CONTRASTIVE_TERMS + DISTILL_TERMS + ("locca",))
    assert {t.name for t in LOSS_TERMS if t.chance is None} == set(RECONSTRUCTION_TERMS) - {"locca"}
    fields = {f.name for f in dataclasses.fields(ModelOutputs)}
    for term in LOSS_TERMS:
        assert set(term.reads) <= fields, term.name


def test_plain_siglip_stack_runs_one_term_from_the_table():
    cfg = load_config(None, DEBUG)
    stack = TulipLossStack(cfg, input_streams(cfg), group=None, pad_id=0)
    assert stack.terms == ("image_text",) and stack.contrastive_terms == ("image_text",)
    total, values = stack(_outputs())
    assert list(values) == ["image_text"] and torch.equal(total, values["image_text"])
    chance = stack.chance(_outputs())
    # one positive and B - 1 = 3 negatives per row: log B + (B - 1) log(B / (B - 1))
    assert chance["image_text"].item() == pytest.approx(math.log(4) + 3 * math.log(4 / 3), rel=1e-6)


def test_missing_model_output_names_the_field():
    cfg = load_config(None, DEBUG + ["loss.weights.image_image=1", "data.views.global_crops=2"])
    stack = TulipLossStack(cfg, input_streams(cfg), group=None, pad_id=0)
    assert "image_image" in stack.terms
    with pytest.raises(ValueError, match=r"loss term image_image reads ModelOutputs\.view_emb"):
        stack(_outputs(), terms=("image_image",))
