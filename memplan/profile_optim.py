"""The optimizer a plan names, as `memplan profile` builds it (trainable parameters only, one param group,
lr = `hparams.effective_lr(method)`, weight_decay = `hparams.weight_decay`):

    adamw          torch.optim.AdamW(foreach=True)  - the CUDA default (the CPU default is the for-loop)
    adamw-fused    torch.optim.AdamW(fused=True)
    adamw-forloop  torch.optim.AdamW(foreach=False)
    sgd            torch.optim.SGD(momentum=0.9, foreach=True)
    adafactor      transformers.optimization.Adafactor(scale_parameter=False, relative_step=False,
                   warmup_init=False) - HF Trainer's `adafactor`
    adamw-8bit / paged-adamw-8bit: bitsandbytes' AdamW8bit / PagedAdamW8bit.

torch's Adam keeps a 0-dim fp32 `step` tensor per parameter (4 B each). With precision bf16-master the
chosen optimizer steps fp32 master copies of the 16-bit trainable parameters: memplan.master_weights, the
implementation `memplan train` uses too.
"""

from __future__ import annotations

from typing import Callable

import torch

from memplan.errors import UserError
# memplan.profile_run imports state_tensors from here
from memplan.master_weights import MasterWeightsOptimizer, state_tensors, wants_masters  # noqa: F401
from memplan.plan import Plan
from memplan.profile_build import BNB_HINT, BNB_OPTIMIZERS


def optimizer_factory(plan: Plan) -> Callable:
    """A function params -> optimizer. Everything is imported here, before any meter is active: a module
    imported under the fake mode and the meter could create module-level tensors that would be counted."""
    lr = plan.hparams.effective_lr(plan.method)
    wd = plan.hparams.weight_decay
    name = plan.optimizer
    if name == "adamw":
        return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=True)
    if name == "adamw-fused":
        return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=True)
    if name == "adamw-forloop":
        return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=False)
    if name == "sgd":
        return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd, foreach=True)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return lambda params: Adafactor(
            params, lr=lr, weight_decay=wd, scale_parameter=False, relative_step=False, warmup_init=False
        )
    if name in BNB_OPTIMIZERS:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError(f"optimizer {name} needs bitsandbytes, which is not installed. {BNB_HINT}") from None
        cls = bnb.optim.AdamW8bit if name == "adamw-8bit" else bnb.optim.PagedAdamW8bit
        return lambda params: cls(params, lr=lr, weight_decay=wd)
    raise UserError(f"memplan cannot build optimizer '{name}'")


def make_optimizer(plan: Plan, factory: Callable, params: list[torch.Tensor], meter):
    """The plan's optimizer over `params`; bf16-master wraps it around fp32 masters of 16-bit parameters
    (peft's adapters are fp32 already: then there is nothing to master)."""
    if wants_masters(plan.precision, params):
        opt = MasterWeightsOptimizer(params, factory, lambda grads: meter.classify(grads, "gradients"))
        meter.classify(opt.masters, "master_weights")
        return opt
    return factory(params)
