"""Run real training steps of a plan and measure them per phase: the one loop behind `memplan profile`
(backends trace, cpu, cuda), the tracer (memplan.profile.trace) and the GPU check.

Per optimizer step: grad_accum x (forward + loss on a synthetic batch of exactly micro_batch x seq_len
random token ids, labels = the ids, no attention mask; loss / grad_accum; backward), then
`optimizer.step()` and `optimizer.zero_grad(set_to_none=True)`. Step 1 creates the optimizer states
lazily; steps 2..n are the steady state. Under DDP the micro-batches before the last skip the gradient
all-reduce (`no_sync`, as accelerate does); under FSDP2 every micro-batch reduce-scatters its gradients, as
`memplan train` runs it, so that they stay sharded between micro-batches, unless the plan's sync_each_batch is off:
then only the last one does (`set_requires_gradient_sync(False)` before, as transformers' Trainer runs
accumulation), and every unit's whole gradients stay until then.

- precision: amp-* runs forward + loss under `torch.autocast(device type, 16-bit dtype)` (autocast's
  weight cache keeps 16-bit copies alive through forward and backward) and backward outside it, as HF
  Trainer / accelerate do; no GradScaler (its unscale is in place). bf16-master: see memplan.runtime.optim.
- loss: standard = `model(input_ids, labels=...).loss` (HF's ForCausalLMLoss, fp32 upcast of the logits);
  chunked = the decoder + `memplan.runtime.loss.chunked_causal_lm_loss` with the output embedding. Only the loss is
  kept from the model output (the logits are dropped before backward, as in HF Trainer).
- use_cache=False in every forward: training builds no KV cache (TRL, axolotl, LLaMA-Factory turn it off).
- transformers cannot see on fake tensors that an unmasked batch is not packed and would build a b x s x s
  mask that a real run does not: `find_packed_sequence_indices` returns None during the steps, on every
  backend, so that they stay comparable.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from memplan.errors import UserError
from memplan.estimator.activations import as_one_row, packed
from memplan.estimator.phases import PHASES
from memplan.plan import Plan
from memplan.profile.launch import deepspeed_engine
from memplan.profile.meters import CudaMeter
from memplan.runtime import liger
from memplan.runtime.loss import chunked_causal_lm_loss, head_options
from memplan.runtime.meter import LiveBytes, StepMeasure
from memplan.runtime.model import build_model, gradient_sync, materialize, model_spec, quant_state_tensors
from memplan.runtime.optim import make_optimizer, optimizer_factory, state_tensors

BACKENDS = ("cuda", "cpu", "trace")


@dataclass
class Measured:
    """What one process measured over `steps` optimizer steps."""

    backend: str
    steps: list[StepMeasure]
    after_load: int | None  # bytes after the model is built (weights), before the first step
    nvml_used: int | None = None
    nvml_scope: str | None = None  # "process" (this process's NVML figure) or "device"
    oom: dict | None = None  # {"phase", "step", "allocated_bytes", "message"} when a step ran out of memory
    rank: int = 0
    world_size: int = 1
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)  # each optimizer step's wall time (CUDA: synchronized)

    @property
    def first(self) -> StepMeasure | None:
        return self.steps[0] if self.steps else None

    @property
    def steady(self) -> StepMeasure | None:
        """Per phase the largest peak of steps 2..n (step 1 when only one ran), with that step's breakdown."""
        done = [s for s in self.steps if all(p in s.peaks for p in PHASES)]
        pool = done[1:] or done
        if not pool:
            return None
        out = StepMeasure(peaks={})
        for ph in PHASES:
            best = max(pool, key=lambda s: s.peaks[ph])
            out.peaks[ph] = best.peaks[ph]
            if ph in best.breakdown:
                out.breakdown[ph] = dict(best.breakdown[ph])
            if best.reserved.get(ph) is not None:
                out.reserved[ph] = best.reserved[ph]
            if ph in best.tensor_peaks:
                out.tensor_peaks[ph] = best.tensor_peaks[ph]
        return out

    @property
    def peak(self) -> int:
        """Max over every phase of every step (what max_memory_allocated over the whole run reports)."""
        return max((s.peak for s in self.steps), default=0)

    @property
    def reserved_peak(self) -> int | None:
        values = [v for s in self.steps for v in s.reserved.values() if v is not None]
        return max(values) if values else None

    def to_json(self) -> dict:
        return {"backend": self.backend, "steps": [s.to_json() for s in self.steps], "after_load": self.after_load,
                "nvml_used": self.nvml_used, "nvml_scope": self.nvml_scope, "oom": self.oom, "rank": self.rank,
                "world_size": self.world_size, "seconds": self.seconds, "notes": self.notes}

    @classmethod
    def from_json(cls, d: dict) -> Measured:
        return cls(backend=d["backend"], steps=[StepMeasure.from_json(s) for s in d["steps"]],
                   after_load=d["after_load"], nvml_used=d.get("nvml_used"), nvml_scope=d.get("nvml_scope"),
                   oom=d.get("oom"), rank=d.get("rank", 0), world_size=d.get("world_size", 1),
                   seconds=d.get("seconds", 0.0), notes=d.get("notes") or [])


# ---------------------------------------------------------------- what can run where


def check_runnable(plan: Plan, backend: str, steps: int) -> None:
    """One clear line for every plan a backend cannot run (exit 2), with where it can run."""
    if backend not in BACKENDS:
        raise UserError(f"backend '{backend}' is not one of: {', '.join(BACKENDS)}")
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    uses_bnb = plan.uses_bitsandbytes
    if uses_bnb and backend == "trace":
        what = {"nf4": "4-bit kernels (QLoRA)", "int8": "8-bit matmul kernels (lora-8bit)"}.get(
            plan.quantized_base or "", f"8-bit optimizer kernels ({plan.optimizer})")
        raise UserError(f"the trace backend cannot run bitsandbytes' {what} on fake tensors. Hint: use --backend "
                        "cpu (bitsandbytes >= 0.50 runs them on the CPU; small models) or --backend cuda")
    if backend == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--backend cuda: no CUDA device (torch {torch.__version__}, "
                        f"built for CUDA {torch.version.cuda or 'none'}). Hint: use --backend trace or cpu")
    if plan.sharding == "deepspeed":
        if backend == "trace":
            raise UserError("DeepSpeed's engine runs real tensors, not the trace backend's fake ones. Hint: "
                            "--backend cpu (small models, its CPU accelerator and gloo) or --backend cuda")
        if importlib.util.find_spec("deepspeed") is None:
            raise UserError("memplan profile runs a DeepSpeed plan through DeepSpeed's own engine, which is not "
                            "installed. Hint: pip install deepspeed, or --sharding fsdp")
    ds_offload = plan.sharding == "deepspeed" and plan.zero > 0
    if plan.offload != "none" and not (backend == "cuda" and plan.sharding == "fsdp" or ds_offload):
        raise UserError("CPU offload is profiled with DeepSpeed ZeRO (--sharding deepspeed --zero 2 --offload "
                        "optimizer) and, on CUDA, with FSDP (--sharding fsdp --zero 3 --offload optimizer+params "
                        "--backend cuda)")
    if plan.offload_activations:
        raise UserError("memplan profile does not offload activations (trainers' OffloadActivations copies them on a "
                        "CUDA stream into pinned memory); the estimate models it. Hint: --no-offload-activations")
    if plan.world_size > 1 and backend == "trace":
        raise UserError(f"the plan runs {plan.world_size} processes; the trace backend runs one. Hint: "
                        f"--backend cpu runs {plan.world_size} processes with gloo (small models), --backend cuda "
                        "with NCCL, or --gpus 1 for one process")


# ---------------------------------------------------------------- the step


class CausalLMLoss(torch.nn.Module):
    """The training objective as one module, so that a DDP/FSDP wrapper sees the whole forward."""

    def __init__(self, model, chunked: bool, head: dict) -> None:
        super().__init__()
        self.model = model
        self.chunked = chunked
        self.head = head  # memplan.runtime.loss.head_options of the model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if not self.chunked:
            return self.model(input_ids=input_ids, labels=input_ids, position_ids=position_ids, use_cache=False).loss
        hidden = self.model.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False)[0]
        return chunked_causal_lm_loss(hidden, self.model.get_output_embeddings(), input_ids, **self.head)


class _LogitsLossTerm:
    """Counts the loss's work as the term logits_loss, as the estimate defines it
    (memplan.estimator.activations: loss_forward_peak, loss_backward_peak): in the forward, the logits (the
    output embedding's output) and what the loss computes from them (their fp32 copy, the log-softmax); in
    the backward, what is created until the gradient reaches the logits (the loss's gradients). What the
    output embedding creates or saves itself (autocast's copies of its input and weight, its input's
    gradient) and the labels count as activations, as the estimate's head does. A chunked loss recomputes
    each chunk in the backward: the module hooks see the recomputation too.

    Liger's fused linear cross-entropy (`fused`) never calls the output embedding: everything after the decoder
    (its grad_input and grad_weight, its chunks' logits) is the term, until the gradient reaches the decoder's
    output."""

    def __init__(self, hf_model, meter, fused: bool = False) -> None:
        self.meter = meter
        if fused:
            self.handles = [hf_model.get_decoder().register_forward_hook(self._head_done)]
            return
        head = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
        self.handles = [] if head is None else [head.register_forward_pre_hook(self._head_starts),
                                                head.register_forward_hook(self._head_done)]

    def _active(self) -> bool:
        return self.meter.current_phase in ("forward", "backward")

    def _head_starts(self, module, args) -> None:
        if self._active():
            self.meter.default = "activations"

    def _head_done(self, module, args, output) -> None:
        if not isinstance(output, torch.Tensor):  # the decoder's output (fused): its last hidden state
            output = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", None)
            if not self._active() or not isinstance(output, torch.Tensor):
                return
            self.meter.default = "logits_loss"
            if self.meter.current_phase == "forward" and output.requires_grad:
                output.register_hook(self._gradient_reached_logits)
            return
        if not self._active():
            return
        self.meter.classify([output], "logits_loss")
        self.meter.default = "logits_loss"
        if self.meter.current_phase == "forward" and output.requires_grad:
            output.register_hook(self._gradient_reached_logits)

    def _gradient_reached_logits(self, grad) -> None:
        self.meter.default = "activations"

    def backward_starts(self) -> None:
        if self.handles:
            self.meter.default = "logits_loss"

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextlib.contextmanager
def packed_batches(rows_packed: bool) -> Iterator[None]:
    """transformers 5 finds packed sequences from the position ids (masking_utils.find_packed_sequence_indices), which
    ends by reading a value (`.all()`): fake tensors cannot. The batches `train_steps` makes are known: packed rows
    get their sequence ids as that function computes them, without the read; the others are not packed (None)."""
    try:
        from transformers import masking_utils
    except ImportError:  # transformers < 4.53 had no packed-sequence detection
        yield
        return
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return

    def sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
        first = position_ids[:, :1] - 1
        return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)

    masking_utils.find_packed_sequence_indices = sequence_ids if rows_packed else (lambda position_ids: None)
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


def _gradient_sync(model, plan: Plan, last_micro_batch: bool):
    """Skip DDP's all-reduce on all but the last micro-batch of an optimizer step; FSDP2 reduce-scatters each one
    unless the plan defers it (memplan.train.loop._forward_backward)."""
    fsdp = hasattr(model, "set_requires_gradient_sync")
    sync = last_micro_batch or fsdp and not plan.defers_gradient_reduction
    return gradient_sync(model, sync)


def batch(plan: Plan, vocab: int, device: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random token ids of the plan's shape, and position ids where rows are packed: two sequences per row
    (positions restarting halfway), or padding-free, the micro-batch's sequences in one row (restarting every
    seq_len tokens)."""
    row = as_one_row(plan)
    input_ids = torch.randint(0, vocab, (row.micro_batch, row.seq_len), device=device)
    if not packed(row):
        return input_ids, None
    if plan.data.padding_free and plan.micro_batch > 1:
        positions = torch.arange(plan.seq_len, device=device).repeat(plan.micro_batch)
    else:
        positions = torch.arange(row.seq_len, device=device) % max(1, (row.seq_len + 1) // 2)
    return input_ids, positions.expand(row.micro_batch, -1)


def train_steps(model, optimizer, plan: Plan, meter, *, steps: int, vocab: int, device: str,
                trainable: list[torch.Tensor], logits_term: _LogitsLossTerm | None = None,
                clock: list[float] | None = None) -> None:
    """`steps` optimizer steps of `plan`, each phase announced to the meter (a nanoGPT-like loop); each step's
    wall seconds appended to `clock` (on CUDA after the device finished its work)."""
    dtype = getattr(torch, plan.regime.compute) if plan.regime.autocast else None
    device_type = torch.device(device).type
    engine = plan.sharding == "deepspeed"  # DeepSpeed's engine reduces, steps and zeroes in its own calls
    for _ in range(steps):
        start = time.perf_counter()
        meter.new_step()
        for micro in range(plan.grad_accum):
            last = micro == plan.grad_accum - 1
            with _gradient_sync(model, plan, last) if not engine else contextlib.nullcontext():
                meter.phase("forward")
                input_ids, position_ids = batch(plan, vocab, device)
                with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
                    loss = model(input_ids, position_ids)
                loss = loss / plan.grad_accum  # the mean over the optimizer step's micro-batches
                meter.phase("backward")
                if logits_term is not None:
                    logits_term.backward_starts()
                if engine:  # memplan train's engine.backward (the loss is the step's mean already)
                    model.backward(loss, scale_wrt_gas=False)
                else:
                    loss.backward()
                del loss, input_ids, position_ids
            if engine and not last:
                model.step()  # a micro-batch's end: DeepSpeed counts it, its boundary steps
            meter.classify([p.grad for p in trainable], "gradients")
        meter.phase("optimizer")
        if engine:
            model.step()
            meter.classify(state_tensors(model.optimizer.optimizer), "optimizer_states")
        else:
            optimizer.step()
            meter.classify(state_tensors(optimizer), "optimizer_states")
            optimizer.zero_grad(set_to_none=True)
        meter.phase(None)
        if clock is not None:
            if device_type == "cuda":
                torch.cuda.synchronize(device)
            clock.append(time.perf_counter() - start)


# ---------------------------------------------------------------- measuring


def make_meter(backend: str, device: str):
    """Live tensor bytes on trace (fake tensors) and cpu; the allocator's statistics on cuda."""
    if backend == "cuda":
        return CudaMeter(device)
    return LiveBytes()


def measure(config, plan: Plan, *, backend: str, steps: int = 3, weights: str | None = None, seed: int = 0,
            device: str | None = None, meter=None, wrap: Callable | None = None,
            memory_limit: int | None = None) -> Measured:
    """Build the plan's model from `config` (a transformers config, a dict with model_type, a config.json or a
    model directory) and measure `steps` optimizer steps on `backend`. `wrap(module, meter)` returns the
    DDP/FSDP-wrapped module (several processes). `memory_limit` (cuda) caps the caching allocator at that
    many bytes, as a smaller GPU would. Out of memory is caught and returned in `.oom`."""
    check_runnable(plan, backend, steps)
    device = device or ("cuda:0" if backend == "cuda" else "cpu")
    if backend == "cuda":
        use_cuda_allocator(plan.allocator)
    if backend == "cuda" and memory_limit is not None:
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_limit / total), torch.device(device))
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        # transformers 5 deprecations reached through peft (is_gradient_checkpointing): not ours to fix
        warnings.filterwarnings("ignore", message=".*will be removed in v6", category=FutureWarning)
        # Liger's kernels: launches skipped without a GPU (the memory is exact, the loss is not computed)
        with liger.scope(plan, runs_kernels=backend == "cuda"):
            return _measure(config, plan, backend, steps, weights, device, meter or make_meter(backend, device), wrap)


def _measure(config, plan: Plan, backend: str, steps: int, weights, device: str, meter, wrap) -> Measured:
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = None
    if backend == "trace":
        # Liger's fused cross-entropy reads a count with .item() and compares grad_output with torch.equal: a shape
        # environment lets fake tensors answer with a symbol instead of refusing (the skipped kernels take it)
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        fake_mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv() if plan.liger else None)
    t0 = time.perf_counter()
    where = {"phase": "load", "step": 0}
    oom = None
    after_load = None
    notes: list[str] = []
    clock: list[float] = []
    try:
        shards = getattr(wrap, "shards_parameters", False)
        built = build_model(plan, config=config, weights=weights, device=device, fake_mode=fake_mode, on_meta=shards)
        notes = built.notes
        factory = optimizer_factory(plan)  # imports happen here, before the meter is active
        module = CausalLMLoss(built.model, plan.loss == "chunked", head_options(built.hf_model.config))
        if shards:  # FSDP: shard on the meta device, then give each rank only its shards
            on_meta = any(p.is_meta for p in built.model.parameters())  # a quantized base is loaded whole
            module = wrap(module, meter)
            if on_meta:
                materialize(built.model, built.hf_model, device)
        with packed_batches(packed(as_one_row(plan))), (fake_mode or contextlib.nullcontext()), meter:
            meter.register(list(module.parameters()) + list(module.buffers())
                           + quant_state_tensors(built.model), "weights")
            after_load = _allocated(meter)
            if wrap is not None and not shards:
                module = wrap(module, meter)
            trainable = [p for p in module.parameters() if p.requires_grad]
            deepspeed = plan.sharding == "deepspeed"  # its engine keeps the fp32 masters itself
            optimizer = make_optimizer(plan, factory, trainable, meter, masters=not deepspeed)
            if deepspeed:
                module = deepspeed_engine(module, optimizer, plan, model_spec(built.hf_model.config), device, meter)
            logits_term = _LogitsLossTerm(built.hf_model, meter, fused=plan.liger_loss)
            try:
                where["phase"] = None
                train_steps(module, optimizer, plan, meter, steps=steps, vocab=built.vocab_size, device=device,
                            trainable=trainable, logits_term=logits_term, clock=clock)
            finally:
                logits_term.remove()
    except RuntimeError as err:  # torch.OutOfMemoryError is one; cuBLAS and NCCL report theirs as RuntimeError
        if not _out_of_memory(err):
            raise
        phase = where["phase"] or getattr(meter, "current_phase", None) or "optimizer"
        oom = {"phase": phase, "step": len(getattr(meter, "steps", [])) or 0,
               "allocated_bytes": _allocated(meter), "message": str(err).splitlines()[0][:300]}
    result = Measured(backend=backend, steps=meter.result(), after_load=after_load,
                      seconds=round(time.perf_counter() - t0, 2), oom=oom, notes=list(notes), step_seconds=clock)
    for key, value in meter.extras().items():
        setattr(result, key.removesuffix("_bytes"), value)
    if backend == "cuda":
        torch.cuda.empty_cache()
    return result


def use_cuda_allocator(allocator: str) -> None:
    """Switch this process's CUDA caching allocator to the plan's (expandable segments or not) for the blocks it
    allocates from now on: its cache is emptied first, so the measured steps start without cached segments.
    `torch.cuda.memory._set_allocator_settings` takes PYTORCH_CUDA_ALLOC_CONF's syntax at run time."""
    torch.cuda.empty_cache()
    setter = getattr(torch.cuda.memory, "_set_allocator_settings", None)
    if setter is not None:
        setter(f"expandable_segments:{allocator == 'expandable'}")


def _out_of_memory(err: RuntimeError) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError  # torch < 2.5: cuda's
    text = str(err)
    return isinstance(err, oom_type) or "out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text


def _allocated(meter) -> int:
    if isinstance(meter, CudaMeter):
        return int(meter.stats.memory_allocated(meter.device)) if meter.current_phase is None \
            else meter.allocated_now()
    return meter.allocated_now()
