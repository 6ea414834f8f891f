"""Activations of a model without a family module, calibrated by fake-tensor traces of its real decoder layers.

A model read from transformers (memplan.catalog.traced) has no op-by-op replay. Instead the model is built
with layer 0 and one layer of each other kind it has (sliding and full attention, ...) at its true widths,
on fake tensors (nothing is allocated), the way `memplan profile` builds and meters it (memplan.runtime.model,
memplan.profile.run's loss module, memplan.runtime.meter.LiveBytes), and the forward of a training step
runs at a few b x s points. What each part of the forward saves for the backward is counted: autograd's
saved-tensor hooks see every tensor an op saves, the live-bytes meter says when each storage was created,
and each storage is counted once (a layer's input saved by the layer is its).

What is measured, per plan class (below), at b x s points:
- ``layer:<kind>``: what one decoder layer of that kind saves when its input needs a gradient; ``first``:
  what layer 0 saves (its input is the embedding's output: without a gradient under LoRA);
- ``shared``: what the forward saves once, outside the layers (token ids, rotary cos/sin, ...);
- ``inputs``: the tensors the model hands every layer besides the hidden states (masks, cos/sin, position
  ids) that it saves nowhere: alive through the decoder's forward, and kept by checkpointing;
- ``norm``: what the final norm saves.
Each is a polynomial c0 + c1 s + c2 s^2 + b (c3 + c4 s + c5 s^2): per-token tensors (b s), attention
scores and masks (b s^2, s^2), rotary tables (s), autocast's weight copies (constant). A sliding window w
makes a term b s w, linear in b s for a fixed w, but the masks change at s = w
(masking_utils._ignore_causal_mask_sdpa), so s < w and s >= w are separate classes. The values at a 2 x 3
grid of b x s determine the six coefficients (Lagrange interpolation in s, linear in b); a seventh point
outside the grid must be predicted within 0.5 % or the calibration fails.

A plan class is what changes these terms besides b and s: precision regime, full / LoRA (targets, rank,
dropout or not), attention implementation, and the window side. Checkpointing needs no trace of its own
(its recomputation saves what the layer saves; it keeps each layer's input and `inputs`), nor does the loss
(the head is analytic), the optimizer or sharding. What a CPU trace cannot run is added as the analytic
replay's difference: QLoRA (traced as LoRA: bitsandbytes' 4-bit kernels do not run on fake tensors) and
CUDA kernels (the replay's CUDA - CPU difference: dropout masks, norm statistics, SDPA kernel choice). The
head and loss, the backward's transients and autocast's caches are the estimator's analytic terms
(memplan.estimator.activations), from vocabulary, hidden size and the layer's linears.

Results are cached with the model (memplan.catalog.cache): the next estimate is arithmetic, without torch.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import replace
from fractions import Fraction

from memplan.catalog import cache
from memplan.catalog.spec import ModelSpec
from memplan.errors import UserError
from memplan.estimator.activations import Activations, layer_spec, numerics
from memplan.estimator.activations import activations as analytic_activations
from memplan.estimator.autograd import T, Tape
from memplan.estimator.layers import LayerReplay
from memplan.plan import Plan

HOLDOUT_TOLERANCE = 0.005  # a fitted term may miss the held-out trace by at most 0.5 %
GRID_B = (1, 2)
HOLDOUT_B = 3


# ---------------------------------------------------------------- plan classes and their grids


def _window_side(spec: ModelSpec, seq_len: int) -> str:
    window = spec.traits.sliding_window
    return "" if not window else ("ge" if seq_len >= window else "lt")


def grid(spec: ModelSpec, side: str) -> tuple[tuple[int, ...], int]:
    """The sequence lengths of the grid and of the held-out point, all on one side of the window."""
    window = spec.traits.sliding_window
    if side == "ge":
        return (window, window + window // 2, 2 * window), 2 * window + window // 2
    if side == "lt" and window <= 1024:
        step = max(8, window // 4 // 8 * 8)
        return (step, 2 * step, 3 * step), min(4 * step, window - 8)
    return (256, 512, 768), 1024


# Regimes whose activations the CPU trace cannot tell apart: bf16-master keeps bf16 weights and activations
# (its fp32 masters are the optimizer's); fp16 autocast is a GPU regime with bf16 autocast's sizes.
_TRACED_PRECISION = {"bf16-master": "bf16", "amp-fp16": "amp-bf16"}


def trace_plan(spec: ModelSpec, plan: Plan) -> Plan:
    """The plan the trace runs for `plan`'s class: no checkpointing, standard loss, one process; QLoRA as
    LoRA (same precision, targets and rank); flash attention as SDPA (what the CPU runs for it,
    memplan.runtime.model.attention). The trace runs CPU kernels on fake tensors whatever the plan's device."""
    from memplan.estimator.activations import attention_impl

    method = "lora" if plan.quantized_base else plan.method
    attn = attention_impl(spec, plan)
    fields = dict(method=method, precision=_TRACED_PRECISION.get(plan.precision, plan.precision),
                  attn="sdpa" if attn == "flash" else attn, grad_ckpt=False, loss="standard", optimizer="sgd",
                  micro_batch=1, seq_len=256)
    if method == "lora":
        fields["lora"] = plan.lora.model_copy(update={"dropout": 0.05 if plan.lora.dropout > 0 else 0.0,
                                                      "alpha": 32.0})
    return Plan(**fields)


def class_key(spec: ModelSpec, plan: Plan) -> str:
    """The cache key of `plan`'s class (see the module docstring)."""
    from memplan.estimator.activations import lora_targets

    tp = trace_plan(spec, plan)
    lora = f"|r{tp.lora.rank}|d{int(tp.lora.dropout > 0)}|{','.join(sorted(lora_targets(spec, tp)))}" \
        if tp.method == "lora" else ""
    return f"{tp.method}|{tp.precision}|{tp.attn}|{_window_side(spec, plan.seq_len)}{lora}"


# ---------------------------------------------------------------- the estimate (arithmetic)


def _interpolate(points: list[int], values: list[int], x: int) -> Fraction:
    """Lagrange's polynomial through (points, values) at x (degree len(points) - 1), exactly."""
    total = Fraction(0)
    for i, (xi, yi) in enumerate(zip(points, values, strict=True)):
        term = Fraction(yi)
        for j, xj in enumerate(points):
            if j != i:
                term *= Fraction(x - xj, xi - xj)
        total += term
    return total


def evaluate(fit: dict, name: str, b: int, s: int) -> int:
    """A fitted term at micro-batch b and sequence s: quadratic in s through the grid, linear in b."""
    rows = [_interpolate(fit["s"], row, s) for row in fit["values"][name]]
    b0, b1 = fit["b"]
    return round(rows[0] + (rows[1] - rows[0]) * Fraction(b - b0, b1 - b0))


def _terms(spec: ModelSpec, plan: Plan, fit: dict, kinds: list[int]) -> dict[str, int]:
    """The calibrated per-layer and shared terms at the plan's b and s."""
    b, s = plan.micro_batch, plan.seq_len
    q = {name: evaluate(fit, name, b, s) for name in fit["values"]}
    layer = {k: q.get(f"layer:{k}", q["first"]) for k in set(kinds)}
    rest = kinds[1:] or kinds
    first = q["first"]
    if plan.grad_ckpt and plan.method != "full" and f"layer:{kinds[0]}" in q:
        first = q[f"layer:{kinds[0]}"]  # checkpointing makes layer 0's input require grad
    return dict(first=first, layer=sum(layer[k] for k in rest) // len(rest), shared=q["shared"],
                inputs=q["inputs"], norm=q["norm"])


def _norm_saved(spec: ModelSpec, plan: Plan, kernels: str) -> int:
    """What the analytic replay's final norm saves (replaced by the traced one)."""
    num = numerics(plan, spec)
    tape = Tape(kernels=kernels)
    LayerReplay(tape, layer_spec(spec, plan), num).norm(T(plan.micro_batch * plan.seq_len * spec.hidden_size,
                                                         num.residual, True))
    return tape.saved_bytes


def activations(spec: ModelSpec, plan: Plan, kernels: str) -> Activations:
    """The Activations of a calibrated model: traced layers, shared tensors and final norm; analytic head,
    loss, transients and caches; what the CPU trace cannot run as the replay's difference."""
    entry = cache.load(spec.traits.calibrated)
    if entry is None:
        raise UserError(f"{spec.name}: its cached description is gone (memplan.catalog.cache); run again")
    key = class_key(spec, plan)
    fit = entry["classes"].get(key) or calibrate(spec, plan, key)
    t = _terms(spec, plan, fit, entry["layer_kinds"])
    analytic = analytic_activations(spec, plan, kernels, traced=False)
    traced_as = analytic_activations(spec, replace_plan(plan, trace_plan(spec, plan)), "cpu", traced=False)
    first = t["first"] + analytic.first_layer - traced_as.first_layer
    layer = t["layer"] + analytic.layer - traced_as.layer
    if plan.grad_ckpt:
        shared = t["shared"] + t["inputs"]  # checkpointing keeps every tensor input of each layer
        masks = 0
    else:
        shared, masks = t["shared"], t["inputs"]
    head = analytic.head - _norm_saved(spec, plan, kernels) + t["norm"]
    return replace(analytic, layer=layer, first_layer=first, shared=shared, forward_masks=masks, head=head)


def replace_plan(plan: Plan, traced: Plan) -> Plan:
    """`plan` with the trace plan's method, precision, attention and LoRA (the trace's counterpart)."""
    return plan.model_copy(update=dict(method=traced.method, precision=traced.precision, attn=traced.attn,
                                       lora=traced.lora))


def label(spec: ModelSpec) -> str | None:
    """How reports name a calibrated model's estimate: 'calibrated by trace (first run N s)'."""
    if not spec.traits.calibrated:
        return None
    entry = cache.load(spec.traits.calibrated) or {}
    seconds = entry.get("build_seconds", 0) + sum(c.get("seconds", 0) for c in entry.get("classes", {}).values())
    return f"calibrated by trace (first run {seconds:.1f} s)"


# ---------------------------------------------------------------- the calibration (torch, transformers)


def calibrate(spec: ModelSpec, plan: Plan, key: str) -> dict:
    """Trace `plan`'s class at the grid and the held-out point, check the fit, and cache it."""
    from memplan.catalog.traced import representatives
    from memplan.extras import require

    require("torch", f"{spec.name}: the activations of a model without a family module are calibrated (once per "
                     "plan class, then cached) by tracing it, which")
    t0 = time.perf_counter()
    entry = cache.load(spec.traits.calibrated)
    keep = representatives(spec.config, entry["layer_kinds"])
    s_grid, s_held = grid(spec, _window_side(spec, plan.seq_len))
    points = [(b, s) for b in GRID_B for s in s_grid] + [(HOLDOUT_B, s_held)]
    measured = _trace(spec, trace_plan(spec, plan), keep, entry, points)
    names = sorted(measured[points[0]])
    fit = {"b": list(GRID_B), "s": list(s_grid),
           "values": {n: [[measured[b, s][n] for s in s_grid] for b in GRID_B] for n in names}}
    for n in names:
        want = measured[HOLDOUT_B, s_held][n]
        got = evaluate(fit, n, HOLDOUT_B, s_held)
        if abs(got - want) > HOLDOUT_TOLERANCE * max(abs(want), 1):
            raise UserError(f"{spec.name}: the calibration of '{n}' ({key}) misses the held-out trace "
                            f"(b {HOLDOUT_B}, s {s_held}): {got:,} vs {want:,} bytes (grid b {GRID_B} x s {s_grid}: "
                            f"{fit['values'][n]}); its activations do not follow the fitted form")
    fit["holdout"] = {"b": HOLDOUT_B, "s": s_held}
    fit["seconds"] = round(time.perf_counter() - t0, 3)
    entry["classes"][key] = fit
    cache.save(spec.traits.calibrated, entry)
    return fit


def _trace(spec: ModelSpec, plan: Plan, keep: list[int], entry: dict,
           points: list[tuple[int, int]]) -> dict[tuple[int, int], dict[str, int]]:
    """The forward of a training step at each (b, s) of `points`, on the model built once with only the
    decoder layers `keep`, on fake tensors: the saved bytes by part (see _Probe). The model, the loss module,
    the meter, the autocast and the (unpacked) batches are memplan profile's (memplan.profile.run)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memplan.catalog.traced import hf_config
    from memplan.profile.run import CausalLMLoss, packed_batches
    from memplan.runtime.loss import head_options
    from memplan.runtime.model import build_model

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will be removed in v6", category=FutureWarning)
        built = build_model(plan, config=hf_config(spec.config, spec.name, keep=keep), fake_mode=fake_mode)
    module = CausalLMLoss(built.model, False, head_options(built.hf_model.config))
    probe = _Probe(module)
    if probe.signatures != [entry["kinds"][entry["layer_kinds"][i]] for i in keep]:
        raise UserError(f"{spec.name}: its layers {keep} built alone differ from the whole model's; the "
                        "calibration cannot trace them")
    kinds = [entry["layer_kinds"][i] for i in keep]
    dtype = getattr(torch, plan.regime.compute) if plan.regime.autocast else None
    out = {}
    with packed_batches(False), fake_mode, probe.meter:
        probe.meter.register(list(module.parameters()) + list(module.buffers()), "weights")
        for b, s in points:
            probe.reset()
            ids = torch.randint(0, built.vocab_size, (b, s))
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = module(ids)
            out[b, s] = probe.result(kinds)
            del loss, ids  # the forward's graph and what it saved go
    return out


class _Probe:
    """Counts, during the first forward of a traced step, what each part of the model saves for the backward
    (autograd's saved-tensor hooks), each storage once, by where the live-bytes meter saw it created."""

    def __init__(self, module) -> None:
        """Hooks on `module`'s (a CausalLMLoss) decoder layers, output layer and itself."""
        import functools

        from memplan.catalog.traced import layer_signature, layer_types
        from memplan.runtime.meter import LiveBytes
        from memplan.runtime.model import decoder_layers

        self.meter = LiveBytes()
        layers = decoder_layers(module)
        types = layer_types(module.model.config, len(layers))
        self.signatures = [layer_signature(m, t) for m, t in zip(layers, types, strict=True)]
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(functools.partial(self._enter, i), with_kwargs=True)
            layer.register_forward_hook(self._leave)
        module.model.get_output_embeddings().register_forward_pre_hook(self._head)
        module.register_forward_pre_hook(self._begin)
        module.register_forward_hook(self._end)
        self.hooks = None
        self.reset()

    def reset(self) -> None:
        """Forget the last forward: count the next one."""
        self.saved: dict[int, tuple[int, object]] = {}  # storage id -> (bytes, part: layer index, "shared", ...)
        self.inputs: dict[int, int] = {}  # storage id -> bytes of the model's tensors handed to every layer
        self.part: object = "shared"
        self.start = -1  # the meter's clock when layer 0 starts: storages born before are the model's
        self.hidden0 = -1
        self.recording = False
        self.keep: list = []

    def _storage(self, t):
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():  # the storage object the meter keys on (made with no mode active)
            storage = t.untyped_storage()
        self.keep.append(storage)  # its id stays its own until the forward ends
        return id(storage), self.meter._storages.get(id(storage))

    def _begin(self, module, args) -> None:
        import torch

        self.recording = True
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda packed: packed)
        self.hooks.__enter__()

    def _end(self, module, args, output) -> None:
        if self.recording:
            self.hooks.__exit__(None, None, None)
            self.recording = False
            self.keep.clear()

    def _enter(self, index: int, module, args, kwargs) -> None:
        if not self.recording:
            return
        import torch

        if index == 0:
            self.start = self.meter.clock
        self.part = index
        hidden = args[0] if args else kwargs.get("hidden_states")
        others = list(args[1:]) + list(kwargs.values())
        while others:
            t = others.pop()
            if isinstance(t, (tuple, list)):
                others.extend(t)
            elif isinstance(t, torch.Tensor) and t is not hidden:
                key, rec = self._storage(t)
                if rec is not None and rec.cat != "weights" and rec.born < self.start:
                    self.inputs[key] = rec.nbytes
        if index == 0 and hidden is not None:
            self.hidden0 = self._storage(hidden)[0]

    def _leave(self, module, args, output) -> None:
        self.part = "norm"

    def _head(self, module, args) -> None:
        self.part = "head"

    def _pack(self, t):
        key, rec = self._storage(t)
        if rec is None or rec.cat == "weights" or key in self.saved:
            return t
        part = self.part
        if isinstance(part, int) and rec.born < self.start and key != self.hidden0:
            part = "shared"  # made by the model before the layers (rotary cos/sin), saved inside one
        self.saved[key] = (rec.nbytes, part)
        return t

    def result(self, kinds: list[int]) -> dict[str, int]:
        """Saved bytes: layer 0 ("first"), one layer per kind ("layer:<kind>", layers 1..), "shared",
        "norm" (the final norm); "inputs": the tensors handed to the layers that nothing saved."""
        by_part: dict[object, int] = {}
        for nbytes, part in self.saved.values():
            by_part[part] = by_part.get(part, 0) + nbytes
        out = {"first": by_part.get(0, 0), "shared": by_part.get("shared", 0), "norm": by_part.get("norm", 0),
               "inputs": sum(n for key, n in self.inputs.items() if key not in self.saved)}
        for kind in set(kinds[1:]):
            parts = [by_part.get(i, 0) for i in range(1, len(kinds)) if kinds[i] == kind]
            out[f"layer:{kind}"] = sum(parts) // len(parts)
        return out
