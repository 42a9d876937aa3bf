"""EmbeddingCache alone, on a tiny plain-PyTorch two-tower model in one process: the cache pass,
the dense contrastive terms over the concatenated outputs and the per-micro-batch surrogate
losses give the weights the gradients of the dense loss over the whole batch, and report its
values. The real step wires the same calls into megatron's schedule (integration tests)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from harness import make_cfg
from tulip_mega.config.streams import input_streams
from tulip_mega.losses.outputs import ModelOutputs
from tulip_mega.losses.stack import TulipLossStack
from tulip_mega.training.embedding_cache import EmbeddingCache, refuse_stochastic_layers
from tulip_mega.training.errors import TrainingHalted

MICRO, B = 4, 3  # micro-batches per step, samples per micro-batch
RECIPES = {
    "sigmoid": [],
    "infonce": ["loss.contrastive=infonce"],
}


class TinyTwoTower(torch.nn.Module):
    """Two linear towers, L2-normalised embeddings, one learned logit scale and bias."""

    def __init__(self, image_dim: int = 6, text_dim: int = 5, width: int = 4) -> None:
        super().__init__()
        self.image = torch.nn.Linear(image_dim, width)
        self.text = torch.nn.Linear(text_dim, width)
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = torch.nn.Parameter(torch.tensor(-2.0))

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> ModelOutputs:
        scale = self.log_scale.exp()
        return ModelOutputs(
            image_emb=F.normalize(self.image(images), dim=-1), text_emb=F.normalize(self.text(texts), dim=-1),
            logit_scale=scale, logit_bias=self.bias, ii_logit_scale=scale, ii_logit_bias=self.bias,
            tt_logit_scale=scale, tt_logit_bias=self.bias,
        )


def _setup(recipe: str):
    torch.manual_seed(0)
    cfg = make_cfg(RECIPES[recipe])
    loss = TulipLossStack(cfg, input_streams(cfg), group=None, pad_id=0)
    images = [torch.randn(B, 6) for _ in range(MICRO)]
    texts = [torch.randn(B, 5) for _ in range(MICRO)]
    return TinyTwoTower(), loss, images, texts


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters' gradients (InfoNCE leaves the logit bias without one)."""
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _cached_step(model, loss, images, texts) -> dict[str, torch.Tensor]:
    """What TrainStep does with the cache, the schedule replaced by plain loops."""
    cache = EmbeddingCache(loss, MICRO, B)
    with cache.cache_pass():
        cached = [EmbeddingCache.keep_outputs(model(x, t))[1] for x, t in zip(images, texts)]
        assert not any(v.requires_grad for c in cached for v in c.values())
    report = cache.store(cached, None)
    assert len(cache.grads) == MICRO
    for m, (x, t) in enumerate(zip(images, texts)):
        # megatron's schedule divides each micro-batch's loss by the number of micro-batches.
        (cache.micro_loss(model(x, t), m) / MICRO).backward()
    cache.finish(step=1)
    assert cache.grads == []
    return report


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_surrogate_gradients_equal_the_dense_loss_gradients(recipe):
    model, loss, images, texts = _setup(recipe)
    total, values = loss(model(torch.cat(images), torch.cat(texts)), None, None, terms=loss.contrastive_terms)
    total.backward()
    dense = _grads(model)
    model.zero_grad()
    report = _cached_step(model, loss, images, texts)
    cached = _grads(model)
    assert set(report) == {f"loss/{n}" for n in loss.contrastive_terms} | {f"chance/{n}" for n in loss.contrastive_terms}
    for name, value in values.items():
        torch.testing.assert_close(report[f"loss/{name}"], value.detach(), rtol=1e-6, atol=0)
    assert set(cached) == set(dense)
    for name, grad in dense.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(cached[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_per_micro_batch_gradients_split_the_batch_and_share_the_scale():
    model, loss, images, texts = _setup("sigmoid")
    cache = EmbeddingCache(loss, MICRO, B)
    with cache.cache_pass():
        cached = [EmbeddingCache.keep_outputs(model(x, t))[1] for x, t in zip(images, texts)]
    cache.store(cached, None)
    for grads in cache.grads:
        assert grads["image_emb"].shape == (B, 4) and grads["text_emb"].shape == (B, 4)
        assert grads["logit_scale"].dim() == 0
    torch.testing.assert_close(cache.grads[0]["logit_scale"], cache.grads[-1]["logit_scale"])


def test_a_random_layer_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))
    refuse_stochastic_layers([torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.0))])
    with pytest.raises(TrainingHalted, match="1.p=0.1"):
        refuse_stochastic_layers([model])
