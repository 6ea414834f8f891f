"""The optimizer a plan names, built the same way for `memplan profile` and `memplan train`, and the fp32 master
weights of precision bf16-master.

    adamw          torch.optim.AdamW(foreach=True)  - the CUDA default (the CPU default is the for-loop)
    adamw-fused    torch.optim.AdamW(fused=True)
    adamw-forloop  torch.optim.AdamW(foreach=False)
    sgd            torch.optim.SGD(momentum=0.9, foreach=True)
    adafactor      transformers.optimization.Adafactor(scale_parameter=False, relative_step=False,
                   warmup_init=False) - HF Trainer's `adafactor`
    adamw-8bit / paged-adamw-8bit: bitsandbytes' AdamW8bit / PagedAdamW8bit.

lr = `hparams.effective_lr(method)`, weight_decay = `hparams.weight_decay`. torch's Adam keeps a 0-dim fp32
`step` tensor per parameter (4 B each).

Precision bf16-master (`MasterWeightsOptimizer`): bf16 weights and gradients, fp32 master copies stepped by the
optimizer. This is DeepSpeed's bf16 optimizer regime (runtime/bf16_optimizer.py, ZeRO's fp32 partitions) for
runs without DeepSpeed. What it holds, in the terms of memplan's estimator (estimator/states.py
`master_bytes`, `optimizer_step_temporaries`):

  from construction  an fp32 copy of every 16-bit trainable parameter (an fp32 parameter, such as a
                     peft adapter, is its own master and is not copied)
  step()             fp32 copies of all the 16-bit gradients (`master.grad = p.grad.float()`), the inner
                     optimizer's step over the masters (its states are therefore fp32), each master
                     rounded back into its bf16 parameter, the fp32 gradients freed

The model's gradients stay 16-bit and accumulate over micro-batches in the parameter's dtype (torch's
AccumulateGrad), which is also what gradient clipping and DDP's all-reduce see.

The inner optimizer's `param_groups` are this optimizer's, so an LR scheduler (or accelerate's
AcceleratedOptimizer) that sets `group["lr"]` drives the inner step. `state_dict()` holds the inner
optimizer's state and the masters, so a resumed run continues from the exact fp32 weights rather than
from their bf16 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from memplan.errors import UserError
from memplan.plan import BITSANDBYTES_OPTIMIZERS, PRECISIONS, Plan
from memplan.runtime.hf import BNB_HINT


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
    if name in BITSANDBYTES_OPTIMIZERS:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError(f"optimizer {name} needs bitsandbytes, which is not installed. {BNB_HINT}") from None
        cls = bnb.optim.AdamW8bit if name == "adamw-8bit" else bnb.optim.PagedAdamW8bit
        return lambda params: cls(params, lr=lr, weight_decay=wd)
    raise UserError(f"memplan cannot build optimizer '{name}'")


def param_groups(params: list[torch.Tensor], weight_decay: float) -> list[dict[str, Any]]:
    """One group; with weight decay, two: biases and norm weights (1-D tensors) are not decayed, as in HF
    Trainer (transformers/trainer.py, get_decay_parameter_names)."""
    if weight_decay <= 0:
        return [{"params": params}]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(plan: Plan, factory: Callable, params: list[torch.Tensor], meter=None, masters: bool = True):
    """The plan's optimizer over the trainable `params`, the same for `memplan profile` (which passes its
    meter) and `memplan train`. bf16-master wraps it around fp32 masters of 16-bit parameters (peft's
    adapters are fp32 already: then there is nothing to master), unless `masters` is False (DeepSpeed's
    engine keeps the masters itself)."""
    groups = param_groups(params, plan.hparams.weight_decay)
    if masters and wants_masters(plan.precision, params):
        on_grads = (lambda grads: meter.classify(grads, "gradients")) if meter else None
        opt = MasterWeightsOptimizer(groups, factory, on_grads)
        if meter:
            meter.classify(opt.masters, "master_weights")
        return opt
    return factory(groups)


def _groups(params: Iterable) -> list[dict[str, Any]]:
    params = list(params)
    if params and isinstance(params[0], dict):
        return [dict(g, params=list(g["params"])) for g in params]
    return [{"params": params}]


class MasterWeightsOptimizer(torch.optim.Optimizer):
    """`make_inner(master param groups)` builds the optimizer that steps the fp32 masters of `params`
    (tensors or param-group dicts). `on_master_grads(grads)` sees the fp32 gradients before each step
    (memplan profile classifies them)."""

    def __init__(self, params: Iterable, make_inner: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
                 on_master_grads: Callable[[list[torch.Tensor]], None] | None = None) -> None:
        groups = _groups(params)
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (model parameter, its master)
        with torch.no_grad():
            for group in groups:
                masters = [p if p.dtype == torch.float32 else p.detach().to(torch.float32, copy=True)
                           for p in group["params"]]
                self.pairs += zip(group["params"], masters)
                group["params"] = masters
        self.inner = make_inner(groups)
        self._on_master_grads = on_master_grads
        super().__init__(self.inner.param_groups, self.inner.defaults)
        self._share_inner()

    def _share_inner(self) -> None:
        # The same list and dicts as the inner optimizer's: a learning rate set here is the one it uses.
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    @property
    def masters(self) -> list[torch.Tensor]:
        """The fp32 copies (not the fp32 parameters that are their own master)."""
        return [m for p, m in self.pairs if m is not p]

    def state_tensors(self) -> list[torch.Tensor]:
        return self.masters + state_tensors(self.inner)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightsOptimizer.step takes no closure")
        copies = [(p, m) for p, m in self.pairs if m is not p]
        for p, m in copies:
            m.grad = None if p.grad is None else p.grad.to(torch.float32)
        if self._on_master_grads is not None:
            self._on_master_grads([m.grad for _, m in copies])
        self.inner.step()
        for p, m in copies:
            p.copy_(m)
            m.grad = None
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, _ in self.pairs:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "masters": self.masters}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"inner", "masters"}:
            raise ValueError("not a MasterWeightsOptimizer state (keys 'inner' and 'masters' expected)")
        masters = self.masters
        saved = state_dict["masters"]
        if len(saved) != len(masters) or any(s.shape != m.shape for s, m in zip(saved, masters)):
            raise ValueError(f"the state holds {len(saved)} master weights; this optimizer has {len(masters)} "
                             "of other shapes")
        self.inner.load_state_dict(state_dict["inner"])
        self._share_inner()  # torch's load_state_dict builds new param-group dicts
        with torch.no_grad():
            for (p, m), s in zip([(p, m) for p, m in self.pairs if m is not p], saved):
                m.copy_(s)
                p.copy_(m)


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


def wants_masters(precision: str, params: Iterable[torch.Tensor]) -> bool:
    """A regime with fp32 masters (bf16-master) and 16-bit trainable parameters (peft adapters are fp32 already:
    nothing to master)."""
    return PRECISIONS[precision].masters and any(p.dtype != torch.float32 for p in params)


# ---------------------------------------------------------------- sharded (FSDP2) checkpoints
# Under FSDP2 the parameters, their masters and the optimizer states are DTensors; torch's distributed
# state-dict helpers map optimizer states to parameter names and cannot place masters that are not the
# model's parameters. Each process therefore saves and restores its own shards (a run resumes with the
# same process count, which memplan checks).


def _local(value):
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.to_local().detach().clone()
    if isinstance(value, dict):
        return {k: _local(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_local(v) for v in value)
    return value


def local_state_dict(opt: MasterWeightsOptimizer) -> dict[str, Any]:
    """This process's shards of the masters and optimizer states, as plain tensors."""
    return _local(opt.state_dict())


def load_local_state_dict(opt: MasterWeightsOptimizer, state: dict[str, Any]) -> None:
    """Inverse of local_state_dict on the same sharding: states whose shape is their master's shard become
    DTensors laid out like it; 0-dim values (Adam's step) stay plain."""
    from torch.distributed.tensor import DTensor

    copies = [(p, m) for p, m in opt.pairs if m is not p]
    saved = state["masters"]
    if len(saved) != len(copies) or any(s.shape != m.to_local().shape for s, (_, m) in zip(saved, copies)):
        raise ValueError("the saved master shards do not match this process's shards")
    opt.inner.load_state_dict(state["inner"])
    opt._share_inner()
    for _, m in opt.pairs:
        st = opt.inner.state.get(m)
        if not st or not isinstance(m, DTensor):
            continue
        local_shape = m.to_local().shape
        for key, value in st.items():
            if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.dim() > 0:
                if value.shape != local_shape:
                    raise ValueError(f"optimizer state '{key}' is not shaped like its parameter's shard")
                st[key] = DTensor.from_local(value, m.device_mesh, m.placements, run_check=False,
                                             shape=m.shape, stride=m.stride())
    with torch.no_grad():
        for (p, m), s in zip(copies, saved):
            m.to_local().copy_(s)
            p.to_local().copy_(m.to_local())


def unwrap(optimizer):
    """The optimizer inside accelerate's AcceleratedOptimizer (or itself)."""
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


# The three schedules of `hparams.lr_scheduler`, written as transformers' get_scheduler writes them
# (optimization.py `_get_*_schedule_with_warmup_lr_lambda`): the same factor at every step, and partials of
# module functions, so a LambdaLR's state_dict is the same too. transformers.optimization itself imports
# trainer_utils, which imports peft and with it bitsandbytes: seconds of start-up for every process of a run
# that needs neither.
def _warmup(step: int, warmup: int) -> float:
    return float(step) / float(max(1, warmup))


def _constant_factor(step: int, *, num_warmup_steps: int) -> float:
    return _warmup(step, num_warmup_steps) if step < num_warmup_steps else 1.0


def _linear_factor(step: int, *, num_warmup_steps: int, num_training_steps: int) -> float:
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    return max(0.0, float(num_training_steps - step) / float(max(1, num_training_steps - num_warmup_steps)))


def _cosine_factor(step: int, *, num_warmup_steps: int, num_training_steps: int) -> float:
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    progress = float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # half a cycle: down to 0


def lr_schedule(optimizer, kind: str, warmup_steps: int, total_steps: int):
    """The LR schedule `kind` (cosine, linear or constant, each after a linear warmup from 0 over `warmup_steps`)
    over `total_steps`: transformers' get_scheduler("cosine" / "linear" / "constant_with_warmup")."""
    from functools import partial

    factor = {"constant": partial(_constant_factor, num_warmup_steps=warmup_steps),
              "linear": partial(_linear_factor, num_warmup_steps=warmup_steps, num_training_steps=total_steps),
              "cosine": partial(_cosine_factor, num_warmup_steps=warmup_steps, num_training_steps=total_steps)}[kind]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
