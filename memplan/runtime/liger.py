"""Liger's kernels on the model a plan trains (Plan.liger), as transformers' `use_liger_kernel` applies them.

On a GPU they run. The trace and cpu backends of `memplan profile` cannot run Triton kernels (no GPU), so there
`launches_skipped` turns each launch into a no-op: what Liger allocates is torch code around the launches
(torch.empty / zeros_like for outputs, gradients and buffers; a kernel writes into those and allocates nothing),
so the traced memory is exact, while the values (the loss) are not computed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from memplan.plan import LIGER_KERNELS, Plan


def apply(hf_model, plan: Plan) -> None:
    """liger_kernel.transformers._apply_liger_kernel_to_instance with the plan's kernels on, the others off
    (transformers/integrations/liger.py `apply_liger_kernel` calls it with the model type's defaults)."""
    if not plan.liger:
        return
    from memplan.extras import require

    require("liger", "--liger")
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    if _scopes:  # the model's modeling module is loaded by now: keep its names for scope() to put back
        _scopes[-1].extend(_module_names())
    _apply_liger_kernel_to_instance(model=hf_model, cross_entropy=False,
                                    **{k: k in plan.liger for k in LIGER_KERNELS})


@contextlib.contextmanager
def scope(plan: Plan, runs_kernels: bool) -> Iterator[None]:
    """Where a plan's model is built and trained with Liger's kernels: apply_liger_kernel_to_<type> also replaces
    module-level names of transformers' modeling module (apply_rotary_pos_emb, the RMSNorm and MLP classes), which
    would reach every model built later in this process; they are put back on exit. Without `runs_kernels` (no
    GPU: the trace and cpu backends) the Triton launches are skipped (`launches_skipped`)."""
    if not plan.liger:
        yield
        return
    saved: list = []
    _scopes.append(saved)
    try:
        with contextlib.nullcontext() if runs_kernels else launches_skipped():
            yield
    finally:
        _scopes.pop()
        for module, names in saved:
            for name, value in names.items():
                if vars(module).get(name) is not value:
                    setattr(module, name, value)


_scopes: list[list] = []  # the open scope()s, innermost last: the module names apply() is about to change


def _module_names() -> list:
    import sys

    return [(m, dict(vars(m))) for name, m in list(sys.modules.items())
            if name.startswith("transformers.models.") and m is not None]


@contextlib.contextmanager
def launches_skipped() -> Iterator[None]:
    """Triton's JITFunction.run and Autotuner.run (what `kernel[grid](...)` calls) do nothing inside."""
    import torch
    from torch._subclasses.fake_tensor import DataDependentOutputException
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    saved = JITFunction.run, Autotuner.run, torch.equal
    original_equal = torch.equal

    def equal(a, b) -> bool:
        # The fused cross-entropy's backward asks torch.equal(grad_output, 1.0) to skip a scaling kernel that works
        # in place: either answer allocates the same. A fake tensor has no value to compare: answer "not equal".
        try:
            return original_equal(a, b)
        except DataDependentOutputException:
            return False

    JITFunction.run = Autotuner.run = lambda self, *args, **kwargs: None
    torch.equal = equal
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run, torch.equal = saved
