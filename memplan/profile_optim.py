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
chosen optimizer steps fp32 master copies of the 16-bit trainable parameters (DeepSpeed's bf16 optimizer
creates its fp32 partitions at initialization): at step(), fp32 grads for all trainable params
(`master.grad = p.grad.float()`), the inner step, the masters copied back, the fp32 grads freed.
"""

from __future__ import annotations

from typing import Callable

import torch

from memplan.errors import UserError
from memplan.plan import Plan
from memplan.profile_build import BNB_HINT, BNB_OPTIMIZERS


class MasterWeightsOptimizer:
    """bf16 params and grads, fp32 master copies stepped by an inner optimizer (DeepSpeed's bf16 optimizer)."""

    def __init__(self, params: list[torch.Tensor], make_inner, on_master_grads) -> None:
        self.params = params
        with torch.no_grad():
            self.masters = [p.detach().to(torch.float32, copy=True) for p in params]
        self.inner = make_inner(self.masters)
        self._on_master_grads = on_master_grads

    @property
    def state(self):
        return self.inner.state

    def state_tensors(self) -> list[torch.Tensor]:
        return self.masters + state_tensors(self.inner)

    @torch.no_grad()
    def step(self) -> None:
        for p, m in zip(self.params, self.masters):
            m.grad = None if p.grad is None else p.grad.float()
        self._on_master_grads([m.grad for m in self.masters])
        self.inner.step()
        for p, m in zip(self.params, self.masters):
            p.copy_(m)
            m.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()


def state_tensors(optimizer) -> list[torch.Tensor]:
    """Every tensor the optimizer keeps between steps (masters included)."""
    if isinstance(optimizer, MasterWeightsOptimizer):
        return optimizer.state_tensors()
    out = []
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                out.append(v)
    return out


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
    if plan.precision == "bf16-master" and any(p.dtype != torch.float32 for p in params):
        opt = MasterWeightsOptimizer(params, factory, lambda grads: meter.classify(grads, "gradients"))
        meter.classify(opt.masters, "master_weights")
        return opt
    return factory(params)
