"""memplan inside a Hugging Face `Trainer` (and TRL's trainers, which are Trainers): `MemplanCallback`.

    from memplan.integrations import MemplanCallback
    trainer = Trainer(model, args, train_dataset=..., callbacks=[MemplanCallback(gpu="a100-80gb")])

At the model's first forward - once the batch's shape is known, before any activation is stored - it prints
memplan's estimate for the run as it is: the model's own config, the trainer's arguments (batch, accumulation,
precision, optimizer, checkpointing, FSDP / DeepSpeed, devices), the peft adapter and a 4-bit base. After the
first `steps` optimizer steps it prints the measured peak against the estimate at the largest batch shape
those steps had, and warns when they differ by more than 10 %. On CUDA the measure is
`torch.cuda.max_memory_allocated`; on the CPU, memplan's live tensor meter (memplan.runtime.meter), over those
steps only. A setting memplan does not model (an 8-bit base, an optimizer it has no formula for) makes the
callback say so once and stand aside: it never stops the user's run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from memplan.extras import require

require("torch", "memplan.integrations")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from memplan.errors import UserError  # noqa: E402
from memplan.plan import ALL_LINEAR, Plan, build_plan  # noqa: E402
from memplan.report.units import size  # noqa: E402

#: transformers' OptimizerNames (training_args.optim) -> the Plan's optimizer. Trainer builds torch's AdamW
#: for adamw_torch (foreach where torch defaults to it), fused=True for adamw_torch_fused, bitsandbytes' AdamW8bit
#: for the 8-bit names (trainer.py get_optimizer_cls_and_kwargs).
OPTIMIZERS = {
    "adamw_torch": "adamw", "adamw_torch_fused": "adamw-fused", "adamw_8bit": "adamw-8bit",
    "adamw_bnb_8bit": "adamw-8bit", "paged_adamw_8bit": "paged-adamw-8bit", "adafactor": "adafactor",
    "sgd": "sgd",
}
#: config._attn_implementation -> the Plan's attention.
ATTENTION = {"eager": "eager", "sdpa": "sdpa", "flash_attention_2": "flash"}
#: FSDP's sharding strategies (TrainingArguments.fsdp) -> the Plan's ZeRO stage for `sharding: fsdp`.
FSDP_STAGES = {"full_shard": 3, "hybrid_shard": 3, "shard_grad_op": 2, "hybrid_shard_zero2": 2, "no_shard": 0}
GAP_FLAG = 0.10


class Unmodelled(Exception):
    """The run has a setting memplan's estimate does not model; the message says which."""


@dataclass
class RunShape:
    """The largest batch the model's forward saw: rows x tokens."""

    rows: int = 0
    tokens: int = 0

    def see(self, input_ids: torch.Tensor | None) -> None:
        if input_ids is not None and input_ids.dim() == 2:
            self.rows = max(self.rows, int(input_ids.shape[0]))
            self.tokens = max(self.tokens, int(input_ids.shape[1]))


def _unwrap(model):
    """The transformers model under a peft wrapper (PeftModel.base_model.model) or as given."""
    base = getattr(model, "base_model", None)
    inner = getattr(base, "model", None)
    return inner if inner is not None and hasattr(model, "peft_config") else model


def _weights_dtype(model) -> torch.dtype:
    """The dtype of the base model's floating-point weights (LoRA adapters and 4-bit storage left out)."""
    for name, p in model.named_parameters():
        if "lora_" not in name and p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


def _precision(args, weights: torch.dtype, deepspeed: bool) -> str:
    """The Plan's regime: HF Trainer's bf16=True on fp32 weights is autocast (amp-bf16); on bf16 weights the
    step runs in bf16 throughout (bf16); DeepSpeed's bf16 keeps fp32 masters (bf16-master)."""
    if deepspeed and (args.bf16 or weights == torch.bfloat16):
        return "bf16-master"
    if weights == torch.bfloat16:
        return "bf16"
    if weights == torch.float16:
        raise Unmodelled("fp16 weights (memplan models fp32 weights under fp16 autocast, amp-fp16)")
    if args.bf16:
        return "amp-bf16"
    return "amp-fp16" if args.fp16 else "fp32"


def _lora(model) -> tuple[str, dict] | None:
    """('lora' | 'qlora', the Plan's lora settings) of a peft LoRA model, None for a model without adapters."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return None
    config = configs.get(getattr(model, "active_adapter", "default")) or next(iter(configs.values()))
    if getattr(config, "peft_type", None) is None or str(config.peft_type.value) != "LORA":
        raise Unmodelled(f"the peft adapter type {config.peft_type} (memplan models LoRA)")
    targets = config.target_modules
    targets = ALL_LINEAR if targets in (ALL_LINEAR, None) else sorted(targets if not isinstance(targets, str)
                                                                      else [targets])
    base = _unwrap(model)
    if getattr(base, "is_loaded_in_8bit", False):
        raise Unmodelled("an 8-bit base model (load_in_8bit)")
    method = "qlora" if getattr(base, "is_loaded_in_4bit", False) else "lora"
    return method, {"rank": config.r, "alpha": float(config.lora_alpha), "dropout": float(config.lora_dropout),
                    "targets": targets}


def _sharding(args) -> dict:
    """sharding / zero / offload from TrainingArguments' fsdp options or DeepSpeed config."""
    if args.deepspeed:
        ds = args.hf_deepspeed_config.config if getattr(args, "hf_deepspeed_config", None) else {}
        zero = ds.get("zero_optimization", {})
        stage = int(zero.get("stage", 0))
        offload = "none"
        if (zero.get("offload_param") or {}).get("device") in ("cpu", "nvme"):
            offload = "optimizer+params"
        elif (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme"):
            offload = "optimizer"
        return {"sharding": "deepspeed", "zero": stage, "offload": offload}
    options = [str(getattr(o, "value", o)) for o in (args.fsdp or [])]
    if not options:
        return {"sharding": "ddp"}
    stage = next((FSDP_STAGES[o] for o in options if o in FSDP_STAGES), 3)
    return {"sharding": "fsdp", "zero": stage, "offload": "optimizer+params" if "offload" in options else "none"}


def plan_from_run(args, model, rows: int, tokens: int) -> Plan:
    """The Plan of a Trainer run: its arguments, its model (peft adapter, quantized base, attention, dtype) and
    the batch shape `rows` x `tokens`. Raises Unmodelled for what the estimate does not model."""
    base = _unwrap(model)
    optim = str(getattr(args.optim, "value", args.optim))
    if optim not in OPTIMIZERS:
        raise Unmodelled(f"the optimizer '{optim}' (memplan models {', '.join(OPTIMIZERS)})")
    attn = getattr(base.config, "_attn_implementation", None) or "eager"
    if attn not in ATTENTION:
        raise Unmodelled(f"the attention implementation '{attn}' (memplan models {', '.join(ATTENTION)})")
    sharding = _sharding(args)
    lora = _lora(model)
    if lora is None and not all(p.requires_grad for p in model.parameters()):
        raise Unmodelled("a partly frozen model without a LoRA adapter (memplan models full fine-tuning, LoRA "
                         "and QLoRA)")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", args.world_size))
    fields: dict[str, Any] = {
        "model": str(base.config.name_or_path or base.config.model_type),
        "method": lora[0] if lora else "full",
        "precision": _precision(args, _weights_dtype(base), sharding["sharding"] == "deepspeed"),
        "optimizer": OPTIMIZERS[optim],
        "device": "cuda" if args.device.type == "cuda" else "cpu",
        "gpus": local, "nodes": max(1, args.world_size // local),
        "micro_batch": rows, "grad_accum": args.gradient_accumulation_steps, "seq_len": tokens,
        "grad_ckpt": bool(args.gradient_checkpointing), "attn": ATTENTION[attn], **sharding,
    }
    if lora:
        fields["lora"] = lora[1]
    return build_plan(fields, source="the Trainer run")


def model_spec(model):
    """memplan's ModelSpec of the live model's own config (no file, no network)."""
    from memplan.catalog.spec import spec_from_config

    config = _unwrap(model).config
    return spec_from_config(config.to_dict(), str(config.name_or_path or config.model_type))


@dataclass
class MemplanCallback(TrainerCallback):
    """Prints memplan's estimate at the first forward and the measured peak against it after `steps` optimizer
    steps (see the module docstring). gpu / gpu_memory / host_memory / headroom: what the estimate is judged
    against, as `memplan estimate` takes them (default: the local GPUs, or this machine for a CPU run).
    `log` prints a line (default: print). The results stay on the callback: `plan`, `estimate` (at the first
    batch's shape), `measured` (measured_bytes, estimated_bytes, gap, flag) and `skipped` (why it stood aside)."""

    gpu: str | None = None
    gpu_memory: str | int | None = None
    host_memory: str | int | None = None
    headroom: float | None = None
    steps: int = 2
    log: Any = print
    plan: Plan | None = None
    estimate: Any = None
    measured: dict | None = None
    skipped: str | None = None
    shape: RunShape = field(default_factory=RunShape)
    _hook: Any = field(default=None, repr=False)
    _meter: Any = field(default=None, repr=False)
    _args: Any = field(default=None, repr=False)
    _spec: Any = field(default=None, repr=False)

    def _say(self, args, text: str) -> None:
        if args.process_index == 0:
            self.log(f"memplan: {text}")

    def _stand_aside(self, args, why: str) -> None:
        self.skipped = why
        self._say(args, f"no estimate for this run: memplan does not model {why}")
        self._stop()

    def _stop(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._meter is not None:
            self._meter.stop()

    def _estimate(self, model, rows: int, tokens: int):
        from memplan.api import estimate_spec

        plan = plan_from_run(self._args, model, rows, tokens)
        result = estimate_spec(self._spec, plan, gpu=self.gpu, gpu_memory=self.gpu_memory,
                               host_memory=self.host_memory, headroom=self.headroom)
        return plan, result

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._args = args
        try:
            self._spec = model_spec(model)
        except UserError as err:
            self._stand_aside(args, f"this model ({err})")
            return

        def first_forward(module, f_args, f_kwargs):
            self.shape.see(f_kwargs.get("input_ids", f_args[0] if f_args else None))
            if self.estimate is None and self.skipped is None and self.shape.rows:
                self._first_estimate(model)

        self._hook = model.register_forward_pre_hook(first_forward, with_kwargs=True)

    def _first_estimate(self, model) -> None:
        args = self._args
        try:
            self.plan, self.estimate = self._estimate(model, self.shape.rows, self.shape.tokens)
        except (Unmodelled, UserError) as err:
            self._stand_aside(args, str(err))
            return
        e, p = self.estimate, self.plan
        unit = "process" if p.device == "cpu" else "GPU"
        self._say(args, f"{e.model}, {p.method} {p.precision}, {p.optimizer}, {p.sharding}"
                        f"{f' ZeRO-{p.zero}' if p.sharding != 'ddp' else ''}, micro-batch {p.micro_batch} x "
                        f"{p.seq_len} tokens, grad-accum {p.grad_accum}, checkpointing "
                        f"{'on' if p.grad_ckpt else 'off'}: estimated peak {size(e.peak_allocated_bytes)} allocated "
                        f"per {unit} ({e.peak_phase}), {size(e.total_bytes)} in all; {e.verdict}")

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._meter is None and self.skipped is None and state.global_step == 0:
            from memplan.runtime.meter import PeakMemory

            self._meter = PeakMemory(args.device, steps=self.steps)
            self._meter.start(model, optimizer)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        meter = self._meter
        if meter is None or self.skipped is not None or self.measured is not None:
            return
        meter.step_done(self.shape.tokens)
        if meter.measured_steps < self.steps:
            return
        self._stop()
        try:
            _, shaped = self._estimate(model, self.shape.rows, self.shape.tokens)
        except (Unmodelled, UserError) as err:
            self._stand_aside(args, str(err))
            return
        from memplan.runtime.meter import compare_peak

        self.measured = compare_peak(meter.peak_bytes, shaped.peak_allocated_bytes)
        what = "torch.cuda.max_memory_allocated" if meter.cuda else "live tensor bytes"
        line = (f"measured peak {size(meter.peak_bytes)} over the first {meter.measured_steps} optimizer steps "
                f"({what}) vs estimated {size(shaped.peak_allocated_bytes)} at micro-batch {self.shape.rows} x "
                f"{self.shape.tokens} tokens: {100 * self.measured['gap']:+.1f} %")
        self._say(args, line)
        if self.measured["flag"]:
            self._say(args, f"warning: the measured peak is more than {100 * GAP_FLAG:g} % away from the estimate; "
                            "`memplan profile` with this plan shows the difference term by term")

    def on_train_end(self, args, state, control, **kwargs):
        self._stop()

