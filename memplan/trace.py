"""Trace the live allocated bytes of real training steps of a Hugging Face causal LM, per phase.

This is memplan's ground truth: the analytic estimator is tested against it, and the `profile` command's
cpu/trace backends run it. It runs the real transformers/peft/torch code of a training step and records
every tensor storage that the step allocates, on fake tensors (`backend="fake"`: any model size, nothing
allocated, ~1-2 s for a 7B step) or on real CPU tensors (`backend="real"`: small models only; the same
tracker, used to check the fake trace).

How each Plan field becomes the traced step
--------------------------------------------
- model config: `AutoModelForCausalLM.from_config`, built on the `meta` device in the weight dtype
  (`torch.set_default_dtype` + `dtype=`; fake parameters cannot be `.to(dtype)`-ed), then materialized
  with `to_empty(device="cpu")` inside `FakeTensorMode(allow_non_fake_inputs=True)` (fake) or for real
  (real: HF's own `initialize_weights`, normal(0, initializer_range), rotary buffers recomputed), and the
  embeddings re-tied with `tie_weights()` (`to_empty` unties them). The caller's config is not modified,
  and `dtype=` is always passed (`from_config` would otherwise build in the config's own `dtype`).
- attn: `attn_implementation` = eager | sdpa; "flash" is traced as "sdpa": PyTorch's CPU SDPA runs a
  flash-attention kernel that keeps no s x s tensors (only the log-sum-exp), like CUDA flash-attention 2.
- precision:
    fp32        fp32 weights, grads, optimizer states; no autocast.
    amp-bf16    fp32 weights; forward + loss under `torch.autocast("cpu", dtype=torch.bfloat16)`
                (autocast's weight cache keeps bf16 copies alive through forward and backward);
                backward outside autocast, as HF Trainer / accelerate do.
    amp-fp16    the same with float16. No GradScaler: its unscale is in place and adds a few scalars.
    bf16        bf16 weights, grads and optimizer states (torchtune, LLaMA-Factory pure_bf16).
    bf16-master bf16 weights and grads; the optimizer holds fp32 master copies of the trainable
                parameters, created with the optimizer (DeepSpeed's bf16 optimizer creates its fp32
                partitions at initialization). At step(): fp32 grads for all trainable params
                (`master.grad = p.grad.float()`), the chosen optimizer steps the masters, the masters are
                copied back into the bf16 params, the fp32 grads are freed.
- method: full trains every parameter. lora: peft `LoraConfig(r, lora_alpha, lora_dropout,
  target_modules, task_type="CAUSAL_LM")` + `get_peft_model` on the meta model, peft defaults kept
  (adapters upcast to fp32, `autocast_adapter_dtype=True`; with bf16-master the masters are then fp32
  copies of fp32 adapters). qlora: refused on fake tensors (bitsandbytes' 4-bit kernels cannot run
  there); on real tensors (bitsandbytes needed) a random model in the weight dtype is saved and reloaded
  through `BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute dtype = the plan's 16-bit dtype)`
  on the CPU, then LoRA as above (no `prepare_model_for_kbit_training`: it would upcast norms and
  embeddings to fp32). The NF4 absmax/code tensors (`quant_state`) count as parameters.
- optimizer (trainable parameters only, one param group, lr = `hparams.effective_lr(method)`,
  weight_decay = `hparams.weight_decay`):
    adamw          torch.optim.AdamW(foreach=True)  - the CUDA default (the CPU default is the for-loop)
    adamw-fused    torch.optim.AdamW(fused=True)
    adamw-forloop  torch.optim.AdamW(foreach=False)
    sgd            torch.optim.SGD(momentum=0.9, foreach=True)
    adafactor      transformers.optimization.Adafactor(scale_parameter=False, relative_step=False,
                   warmup_init=False) - HF Trainer's `adafactor`
    adamw-8bit / paged-adamw-8bit: bitsandbytes (refused on fake tensors; real needs bitsandbytes).
  torch's Adam keeps a 0-dim fp32 `step` tensor per parameter (4 B each); it is counted.
- grad_ckpt: `activation_checkpointing_enable({"use_reentrant": False})` (transformers 5's name for
  `gradient_checkpointing_enable`, which is a deprecated alias of it). `model.train()` always.
- use_cache=False in every forward: training builds no KV cache (with use_cache=True and no checkpointing
  transformers would also concatenate a copy of every layer's K and V into a DynamicCache during the
  forward; TRL, axolotl and LLaMA-Factory turn it off for training).
- micro_batch, seq_len: random token ids (micro_batch, seq_len), labels = the ids (the model shifts them),
  no attention mask (an unpadded batch). transformers cannot see on fake tensors that such a batch is not
  packed and would build a b x s x s mask that a real run does not: `find_packed_sequence_indices` is made
  to return None during the trace (for both backends, so they stay comparable).
- loss: standard = `model(input_ids, labels=...).loss` (HF's ForCausalLMLoss, fp32 upcast of the logits);
  chunked = the decoder (`get_decoder()`) + `memplan.loss.chunked_causal_lm_loss` with the output
  embedding (`get_output_embeddings()`) and the config's `final_logit_softcapping` if any.
  Only the loss is kept from the model output (the logits are dropped before backward, as in HF Trainer).
- grad_accum: per optimizer step, grad_accum x (forward, loss / grad_accum, backward); then
  `optimizer.step()` and `optimizer.zero_grad(set_to_none=True)`. `steps` optimizer steps are run;
  step 1 creates the optimizer states lazily, the last step is the steady state.
- Not traced (a GPU-only or multi-process matter, modelled elsewhere): sharding/zero/offload, gpus/nodes,
  the CUDA caching allocator, context and workspaces, CUDA attention/optimizer kernel choices.

How bytes are counted
---------------------
A TorchDispatchMode sees the outputs of every op (aten and custom ops such as bitsandbytes'); each
distinct untyped storage is counted once (views share it) at its nbytes, from the op that creates it
until the storage is freed (a weakref callback on the Python storage object). torch keeps one Python
storage object per storage for as long as the storage lives only if that object was made while no
dispatch mode was active - as inside `__torch_dispatch__`; lookups from the driver disable the modes. The
model's parameters and buffers are registered before the first step. A storage grown by an out= op is
re-read when it is an op's output again; storages `resize_`d by hand (FSDP) are out of scope.
Per phase (forward incl. loss / backward / optimizer step + zero_grad) the maximum live bytes is kept,
with the breakdown at that moment: parameters (model params and buffers), gradients (storages of `p.grad`,
and the fp32 master grads), optimizer_states (tensors in the optimizer state, fp32 masters) and
activations (everything else: saved activations, temporaries, logits, masks, autocast copies). A storage
is classified when it becomes known as a gradient / state (end of each backward / optimizer step); the
phase peaks it was alive at are corrected then, so a gradient produced at the backward peak counts as a
gradient there. Workspace that a kernel allocates and frees inside one op is not seen (on fake tensors it
does not exist; a GPU run's max_memory_allocated would see it).
The trace imports everything it needs before entering the modes: a module imported under them could
create module-level tensors that would be counted (transformers.optimization did: 16 B).
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from memplan.errors import UserError
from memplan.loss import chunked_causal_lm_loss
from memplan.plan import ALL_LINEAR, Plan

PHASES = ("forward", "backward", "optimizer")
CATEGORIES = ("parameters", "gradients", "optimizer_states", "activations")

_AUTOCAST_DTYPE = {"amp-bf16": torch.bfloat16, "amp-fp16": torch.float16}
_WEIGHT_DTYPE = {
    "fp32": torch.float32,
    "amp-bf16": torch.float32,
    "amp-fp16": torch.float32,
    "bf16": torch.bfloat16,
    "bf16-master": torch.bfloat16,
}
_BNB_OPTIMIZERS = ("adamw-8bit", "paged-adamw-8bit")
_BNB_HINT = "Hint: pip install bitsandbytes (CPU wheels exist for Linux x86-64/aarch64), or use --backend cuda."


# ---------------------------------------------------------------- results


@dataclass
class PhasePeaks:
    """One optimizer step's peak live bytes per phase, and what was live at each peak."""

    forward: int  # max live bytes while running forward passes (incl. loss) of this optimizer step
    backward: int  # max live bytes during backward passes
    optimizer: int  # max during optimizer.step() and zero_grad
    # phase -> {"parameters", "gradients", "optimizer_states", "activations"} bytes live at that phase's peak
    breakdown: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return max(self.forward, self.backward, self.optimizer)


@dataclass
class TraceResult:
    steps: list[PhasePeaks]  # one per optimizer step
    after_load: int  # live bytes after model build (+LoRA) before the first step

    @property
    def steady(self) -> PhasePeaks:
        """The last optimizer step (optimizer states exist from step 1 on)."""
        return self.steps[-1]

    @property
    def peak(self) -> int:
        """Max over all phases of all steps (what torch.cuda.max_memory_allocated would report)."""
        return max(s.peak for s in self.steps)


# ---------------------------------------------------------------- the live-bytes tracker


class _Storage:
    __slots__ = ("nbytes", "cat", "born", "ref")

    def __init__(self, nbytes: int, cat: str, born: int) -> None:
        self.nbytes = nbytes
        self.cat = cat
        self.born = born
        self.ref: Optional[weakref.ref] = None


class _Peak:
    __slots__ = ("total", "clock", "breakdown")

    def __init__(self) -> None:
        self.total = -1
        self.clock = -1
        self.breakdown = dict.fromkeys(CATEGORIES, 0)


class _LiveBytes(TorchDispatchMode):
    """Running total of live storage bytes, per category, with per-phase maxima per optimizer step."""

    def __init__(self) -> None:
        super().__init__()
        self._storages: dict[int, _Storage] = {}  # id(untyped storage object) -> record
        self.totals = dict.fromkeys(CATEGORIES, 0)
        self.live = 0
        self.clock = 0  # counts ops; a storage born at clock c was alive at every peak with clock >= c
        self.steps: list[dict[str, _Peak]] = []
        self._peak: Optional[_Peak] = None  # the current phase's peak of the current step

    # -- bookkeeping

    def _add(self, st: torch.UntypedStorage, cat: str) -> None:
        key = id(st)
        rec = self._storages.get(key)
        if rec is not None:
            nbytes = st.nbytes()
            if nbytes != rec.nbytes:  # grown by an out= op
                self.live += nbytes - rec.nbytes
                self.totals[rec.cat] += nbytes - rec.nbytes
                rec.nbytes = nbytes
            return
        rec = _Storage(st.nbytes(), cat, self.clock)
        rec.ref = weakref.ref(st, self._freer(key, rec))
        self._storages[key] = rec
        self.live += rec.nbytes
        self.totals[cat] += rec.nbytes

    def _freer(self, key: int, rec: _Storage):
        def free(_ref: weakref.ref) -> None:
            if self._storages.get(key) is rec:
                del self._storages[key]
            self.live -= rec.nbytes
            self.totals[rec.cat] -= rec.nbytes

        return free

    def _record(self) -> None:
        peak = self._peak
        if peak is not None and self.live > peak.total:
            peak.total = self.live
            peak.clock = self.clock
            peak.breakdown.update(self.totals)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.clock += 1
        if isinstance(out, torch.Tensor):
            self._add(out.untyped_storage(), "activations")
        elif isinstance(out, (tuple, list)):
            for t in out:
                if isinstance(t, torch.Tensor):
                    self._add(t.untyped_storage(), "activations")
                elif isinstance(t, (tuple, list)):
                    for u in t:
                        if isinstance(u, torch.Tensor):
                            self._add(u.untyped_storage(), "activations")
        self._record()
        return out

    # -- driver interface (called with the dispatch modes active; storage lookups run with them disabled)

    def register(self, tensors: Iterable[torch.Tensor], cat: str) -> None:
        """Count tensors that exist before the trace (parameters and buffers)."""
        with _disable_current_modes():
            for t in tensors:
                self._add(t.untyped_storage(), cat)

    def classify(self, tensors: Iterable[Optional[torch.Tensor]], cat: str) -> None:
        """Mark live storages as `cat` (from "activations"), also at every recorded peak they were alive at."""
        with _disable_current_modes():
            for t in tensors:
                if t is None:
                    continue
                rec = self._storages.get(id(t.untyped_storage()))
                if rec is None or rec.cat != "activations":
                    continue
                rec.cat = cat
                self.totals["activations"] -= rec.nbytes
                self.totals[cat] += rec.nbytes
                for step in self.steps:
                    for peak in step.values():
                        if peak.clock >= rec.born:
                            peak.breakdown["activations"] -= rec.nbytes
                            peak.breakdown[cat] += rec.nbytes

    def new_step(self) -> None:
        self.steps.append({})
        self._peak = None

    def phase(self, name: Optional[str]) -> None:
        if name is None:
            self._peak = None
            return
        self._peak = self.steps[-1].setdefault(name, _Peak())
        self._record()

    def result(self) -> list[PhasePeaks]:
        out = []
        for step in self.steps:
            tot = {ph: max(step[ph].total, 0) if ph in step else 0 for ph in PHASES}
            out.append(
                PhasePeaks(
                    forward=tot["forward"],
                    backward=tot["backward"],
                    optimizer=tot["optimizer"],
                    breakdown={ph: dict(step[ph].breakdown) for ph in PHASES if ph in step},
                )
            )
        return out


# ---------------------------------------------------------------- model


def _resolve_config(config: Any):
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return copy.deepcopy(config)
    if isinstance(config, dict):
        data = dict(config)
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise UserError("a model config dict needs a 'model_type' key (e.g. 'llama')")
        return AutoConfig.for_model(model_type, **data)
    if isinstance(config, (str, Path)):
        path = Path(config)
        if path.is_file():
            return _resolve_config(json.loads(path.read_text()))
        if path.is_dir():
            return AutoConfig.from_pretrained(str(path), local_files_only=True)
        raise UserError(f"model config {config}: no such file or directory (the tracer never downloads)")
    raise UserError(f"cannot read a model config from {type(config).__name__}")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _enable_checkpointing(hf_model) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(hf_model, "activation_checkpointing_enable"):
        hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _apply_lora(hf_model, plan: Plan):
    from peft import LoraConfig, get_peft_model

    targets = plan.lora.targets
    lora = LoraConfig(
        r=plan.lora.rank,
        lora_alpha=plan.lora.alpha,
        lora_dropout=plan.lora.dropout,
        target_modules=ALL_LINEAR if targets == ALL_LINEAR else list(targets),
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(hf_model, lora)
    except ValueError as err:  # target modules not found
        raise UserError(f"cannot apply LoRA for tracing: {err}") from None


def _from_config(config, plan: Plan):
    from transformers import AutoModelForCausalLM

    attn = "sdpa" if plan.attn == "flash" else plan.attn
    dtype = _WEIGHT_DTYPE[plan.precision]
    try:
        with _default_dtype(dtype):
            return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    except ValueError as err:  # unknown model type, attention implementation not supported, ...
        raise UserError(f"cannot build the model for tracing: {err}") from None


def _build_model(config, plan: Plan, backend: str, fake_mode):
    """The model to train (peft-wrapped for LoRA/QLoRA) with storage, and the HF model inside it.

    Built on the meta device (exact and fast at any size; LoRA applied there too), then given storage:
    fake tensors, or real CPU tensors initialized by HF's own `initialize_weights` (normal(0,
    initializer_range) linear/embedding weights, ones for norms, recomputed rotary buffers; LoRA's A and B
    are nn.Linear and get normal weights too, so the adapters carry gradient from the first step).
    `to_empty` unties tied embeddings; `tie_weights()` ties them again.
    """
    if plan.method == "qlora":
        return _build_qlora(config, plan)
    with torch.device("meta"):
        hf_model = _from_config(config, plan)
        if plan.grad_ckpt:
            _enable_checkpointing(hf_model)
        model = _apply_lora(hf_model, plan) if plan.method == "lora" else hf_model
    if backend == "fake":
        with fake_mode:
            model.to_empty(device="cpu")
            hf_model.tie_weights()
    else:
        model.to_empty(device="cpu")
        hf_model.tie_weights()
        for module in hf_model.modules():  # to_empty gave new tensors: initialize all of them
            if hasattr(module, "_is_hf_initialized"):
                del module._is_hf_initialized
        hf_model.initialize_weights()
        hf_model.tie_weights()
        with torch.no_grad():
            for name, t in list(model.named_parameters()) + list(model.named_buffers()):
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise RuntimeError(f"tracer: {name} was not initialized")
    model.train()
    return model, hf_model


def _build_qlora(config, plan: Plan):
    """Real tensors only: a random model in the weight dtype, saved and reloaded through transformers'
    BitsAndBytesConfig (NF4, double quantization, compute dtype = the 16-bit dtype of the plan), + LoRA.
    peft's `prepare_model_for_kbit_training` is not applied (it would upcast norms/embeddings to fp32)."""
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    weight_dtype = _WEIGHT_DTYPE[plan.precision]
    compute_dtype = _AUTOCAST_DTYPE.get(plan.precision, weight_dtype)
    attn = "sdpa" if plan.attn == "flash" else plan.attn
    random_model = _from_config(config, plan)
    with tempfile.TemporaryDirectory(prefix="memplan-qlora-") as tmp:
        random_model.save_pretrained(tmp)
        del random_model
        hf_model = AutoModelForCausalLM.from_pretrained(
            tmp,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute_dtype,
            ),
            dtype=weight_dtype,
            attn_implementation=attn,
            device_map="cpu",
            local_files_only=True,
        )
    if plan.grad_ckpt:
        _enable_checkpointing(hf_model)
    model = _apply_lora(hf_model, plan)
    model.train()
    return model, hf_model


def _quant_state_tensors(model) -> list[torch.Tensor]:
    """bitsandbytes keeps a 4-bit weight's absmax/code (and the nested ones) outside params and buffers."""
    out = []
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        while state is not None:
            out.extend(v for v in vars(state).values() if isinstance(v, torch.Tensor))
            state = getattr(state, "state2", None)
    return out


# ---------------------------------------------------------------- optimizer


class _MasterWeightsOptimizer:
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
        return self.masters + _state_tensors(self.inner)

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


def _state_tensors(optimizer) -> list[torch.Tensor]:
    if isinstance(optimizer, _MasterWeightsOptimizer):
        return optimizer.state_tensors()
    out = []
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                out.append(v)
    return out


def _optimizer_factory(plan: Plan):
    """A function params -> optimizer. Everything is imported here, before the trace: a module imported
    under the fake mode and the tracker could create module-level tensors that would be counted."""
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
    if name in _BNB_OPTIMIZERS:
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if name == "adamw-8bit" else bnb.optim.PagedAdamW8bit
        return lambda params: cls(params, lr=lr, weight_decay=wd)
    raise UserError(f"the tracer does not know optimizer '{name}'")


def _make_optimizer(plan: Plan, factory, model, tracker: _LiveBytes):
    params = [p for p in model.parameters() if p.requires_grad]
    # fp32 masters only for 16-bit trainable weights: peft's adapters are fp32 already.
    if plan.precision == "bf16-master" and any(p.dtype != torch.float32 for p in params):
        opt = _MasterWeightsOptimizer(params, factory, lambda grads: tracker.classify(grads, "gradients"))
        tracker.classify(opt.masters, "optimizer_states")
        return opt
    return factory(params)


# ---------------------------------------------------------------- the step


def _check_backend(plan: Plan, backend: str, steps: int) -> None:
    if backend not in ("fake", "real"):
        raise UserError(f"trace backend '{backend}' is not one of: fake, real")
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    uses_bnb = plan.method == "qlora" or plan.optimizer in _BNB_OPTIMIZERS
    if uses_bnb and backend == "fake":
        what = "4-bit kernels" if plan.method == "qlora" else "8-bit optimizer kernels"
        raise UserError(
            f"the trace backend cannot run bitsandbytes' {what} on fake tensors; use the cpu or cuda backend"
        )
    if uses_bnb:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError(f"plan needs bitsandbytes, which is not installed. {_BNB_HINT}") from None


@contextlib.contextmanager
def _unpacked_batches() -> Iterator[None]:
    """transformers 5: tell the mask code the batch is not packed (it cannot read fake position_ids)."""
    try:
        from transformers import masking_utils
    except ImportError:  # transformers < 4.53 had no packed-sequence detection
        yield
        return
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


def _loss(model, plan: Plan, input_ids: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    if plan.loss == "standard":
        return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False)[0]
    return chunked_causal_lm_loss(hidden, model.get_output_embeddings(), input_ids, softcap=softcap)


def trace_training(config, plan: Plan, *, backend: str = "fake", steps: int = 2, seed: int = 0) -> TraceResult:
    """Run `steps` optimizer steps of `plan` on the model of `config` and return the per-phase peaks.

    `config`: a transformers PretrainedConfig, a config dict with `model_type`, a config.json path or a
    local model directory. `backend`: "fake" (FakeTensorMode, any size) or "real" (CPU tensors).
    """
    _check_backend(plan, backend, steps)
    config = _resolve_config(config)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        # transformers 5 deprecations reached through peft (is_gradient_checkpointing): not ours to fix
        warnings.filterwarnings("ignore", message=".*will be removed in v6", category=FutureWarning)
        return _trace(config, plan, backend, steps, text_config.vocab_size, softcap)


def _trace(config, plan: Plan, backend: str, steps: int, vocab: int, softcap: Optional[float]) -> TraceResult:
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if backend == "fake" else contextlib.nullcontext()
    model, _ = _build_model(config, plan, backend, fake_mode)

    tracker = _LiveBytes()
    tracker.register(list(model.parameters()) + list(model.buffers()) + _quant_state_tensors(model), "parameters")
    after_load = tracker.live

    autocast_dtype = _AUTOCAST_DTYPE.get(plan.precision)

    def amp():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=autocast_dtype)

    trainable = [p for p in model.parameters() if p.requires_grad]
    make_optimizer = _optimizer_factory(plan)
    with _unpacked_batches(), fake_mode, tracker:
        optimizer = _make_optimizer(plan, make_optimizer, model, tracker)
        for _ in range(steps):
            tracker.new_step()
            for _ in range(plan.grad_accum):
                tracker.phase("forward")
                input_ids = torch.randint(0, vocab, (plan.micro_batch, plan.seq_len))
                with amp():
                    loss = _loss(model, plan, input_ids, softcap)
                loss = loss / plan.grad_accum  # the mean over the optimizer step's micro-batches
                tracker.phase("backward")
                loss.backward()
                del loss, input_ids
                tracker.classify([p.grad for p in trainable], "gradients")
            tracker.phase("optimizer")
            optimizer.step()
            tracker.classify(_state_tensors(optimizer), "optimizer_states")
            optimizer.zero_grad(set_to_none=True)
            tracker.phase(None)
    return TraceResult(steps=tracker.result(), after_load=after_load)
