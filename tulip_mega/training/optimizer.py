"""AdamW with the papers' parameter groups, the LR schedule, and a step that refuses non-finite updates.

Weight decay follows big_vision's SigLIP configs (`wd_mults=(('.*/kernel$', 1.0),)`: only
kernels are decayed): the weight matrices of linear and convolution layers are decayed;
nothing else is, namely

  * every logit scale and bias (`logit_scale`, `logit_bias`, `ii_/tt_logit_*`,
    `aug_logit_scale`): decay would pull the temperature towards exp(0) = 1 and the bias
    towards 0 at every step (open_clip excludes `logit_scale` for the same reason);
  * norms and biases (all 0-/1-dim tensors; megatron's and open_clip's default rule);
  * position embeddings, token embeddings, the MAP head's probe and the MAE mask token: not
    kernels in big_vision (`pos_embedding`, `Embed/embedding`, `MAPHead/probe`), so not decayed;
  * SigLIP 2's self-distillation heads (`distill_head`, `patch_head`), idle until the EMA
    teacher starts (see IDLE_UNTIL_TEACHER). The teacher itself is not trained at all.

megatron-core's own default (`len(shape) == 1 or name.endswith('.bias')`) misses the 0-dim
scalars, which is why the rule is given to `get_megatron_optimizer` explicitly.
See docs/training.md for the table.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

# Name fragments of tensors that are not kernels although they have >= 2 dimensions.
NOT_KERNELS = ("position_embedding", "word_embeddings", "probe", "mask_token")
# The self-distillation heads get no gradient until the EMA teacher starts; decay alone would
# shrink them towards zero by then. Undecayed (and so untouched by AdamW) they start the terms
# at their initial values, as SigLIP 2 initialises them when it adds the terms.
IDLE_UNTIL_TEACHER = ("distill_head", "patch_head")


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether AdamW's weight decay applies to this parameter (see the module docstring)."""
    return param.dim() >= 2 and not any(fragment in name for fragment in NOT_KERNELS + IDLE_UNTIL_TEACHER)


def make_optimizer(cfg, parts: list[DistributedDataParallel]):
    """megatron's AdamW (decoupled weight decay) with the decay rule above, over all of this
    rank's DDP model parts (one per virtual stage; one optimizer for the rank, as megatron's
    trainer builds it)."""
    model = parts[0]
    o = cfg.optim
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.betas[0],
        adam_beta2=o.betas[1],
        adam_eps=o.eps,
        clip_grad=o.clip_grad,
        bf16=model.config.bf16,
        params_dtype=model.config.params_dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    no_decay = ParamKey(with_name_predicate=ParamWithNamePredicate(
        name="not_a_kernel", fn=lambda param, name: not decays(name, param)))
    return get_megatron_optimizer(opt_config, list(parts), config_overrides={no_decay: {"wd_mult": 0.0}})


def make_scheduler(cfg, optimizer) -> OptimizerParamScheduler:
    """Linear warmup from 0 to optim.lr, then cosine decay to optim.min_lr at train.steps."""
    o, steps = cfg.optim, cfg.train.steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=steps,
        lr_decay_style="cosine",
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def guarded_step(optimizer, loss_is_finite: bool) -> tuple[bool, float]:
    """megatron's optimizer step (prepare grads, clip by the global norm, update) unless the
    loss or the gradient norm is not finite, in which case nothing is updated: no weight, no
    Adam moment, no step count. Returns (applied, grad norm before clipping).

    Every rank reaches the same decision: the loss is already reduced over the whole world
    and the norm over the model-parallel group (DP replicas hold identical reduced grads).
    """
    from megatron.core.optimizer import clip_grads  # attribute lookup: the CPU shim patches it

    found_inf = optimizer.prepare_grads()  # copies grads to main grads; True only with a loss scaler
    grad_norm = optimizer.get_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else 0.0
    if found_inf or not loss_is_finite or not math.isfinite(grad_norm):
        return False, grad_norm
    for sub in _sub_optimizers(optimizer):
        params = sub.get_parameters()
        if params and sub.config.clip_grad > 0:
            clip_grads.clip_grad_by_total_norm_fp32(
                params, sub.config.clip_grad, grad_norm,
                sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    optimizer.step_with_ready_grads()
    return True, grad_norm


def weight_decay_table(model_parts: list[torch.nn.Module], optimizer: Optional[object] = None) -> dict[str, float]:
    """{parameter name: weight decay of the optimizer group holding it} (tests and docs).

    Groups are matched by parameter identity, which holds when the optimizer steps the model's
    own fp32 parameters (the CPU case); under bf16 megatron's optimizer holds fp32 copies, and
    those parameters map to NaN."""
    by_param = {}
    if optimizer is not None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                by_param[id(p)] = group["weight_decay"]
    return {name: by_param.get(id(p), float("nan")) for part in model_parts for name, p in part.named_parameters()}
