"""memplan inside a Hugging Face `Trainer` (and TRL's trainers, which are Trainers): `MemplanCallback`.

    from memplan.integrations import MemplanCallback
    trainer = Trainer(model, args, train_dataset=..., callbacks=[MemplanCallback(gpu="a100-80gb")])

At the model's first forward - once the batch's shape is known, before any activation is stored - it prints
memplan's estimate for the run as it is: the model's own config, the trainer's arguments read as memplan reads
a `trl sft --config` file (memplan.trainers.trl: batch, accumulation, precision, optimizer, checkpointing,
FSDP / DeepSpeed), the peft LoRA adapter and a 4-bit base, the processes it runs in. Settings that change
memory but are not in the estimate are named on a second line, as `memplan estimate --config` names them.
After the first `steps` optimizer steps it prints the measured peak against the estimate at the largest batch
shape those steps had, and warns when they differ by more than 10 %. On CUDA the measure is
`torch.cuda.max_memory_allocated`; on the CPU, memplan's live tensor meter (memplan.runtime.meter), over those
steps only. A run the estimate cannot stand for (fp16 weights, a partly frozen model without LoRA, another
adapter type, a quantized base without an adapter) makes the callback say so once and stand aside: it never
stops the user's run.
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
from memplan.plan import Plan, build_plan  # noqa: E402
from memplan.report.units import size  # noqa: E402

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


def _weights_dtype(model) -> str:
    """The dtype of the base model's floating-point weights (LoRA adapters and 4-bit storage left out)."""
    for name, p in model.named_parameters():
        if "lora_" not in name and p.dtype.is_floating_point:
            return str(p.dtype).removeprefix("torch.")
    return "float32"


def _adapter(model) -> dict[str, Any]:
    """The model's adapter as TRL's ModelConfig says it (use_peft, lora_*, load_in_4bit)."""
    configs = getattr(model, "peft_config", None)
    base = _unwrap(model)
    if not configs:
        if not all(p.requires_grad for p in model.parameters()):
            raise Unmodelled("a partly frozen model without a LoRA adapter (memplan models full fine-tuning, "
                             "LoRA and QLoRA)")
        return {"use_peft": False}
    config = configs.get(getattr(model, "active_adapter", "default")) or next(iter(configs.values()))
    if str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
        raise Unmodelled(f"the peft adapter type {config.peft_type} (memplan models LoRA)")
    targets = config.target_modules
    return {"use_peft": True, "lora_r": config.r, "lora_alpha": config.lora_alpha,
            "lora_dropout": config.lora_dropout, "use_dora": bool(getattr(config, "use_dora", False)),
            "lora_target_modules": targets if isinstance(targets, str) or targets is None else sorted(targets),
            "load_in_4bit": bool(getattr(base, "is_loaded_in_4bit", False)),
            "load_in_8bit": bool(getattr(base, "is_loaded_in_8bit", False))}


def plan_from_run(args, model, rows: int, tokens: int):
    """The Plan of a Trainer run, and where each field came from: its arguments and model as one TRL config
    (memplan.trainers.trl reads them as it reads `trl sft --config` files, so a run and its file agree), the
    batch shape `rows` x `tokens` the model's forward saw, the processes it runs in. Raises Unmodelled for what
    the estimate cannot stand for."""
    from memplan.trainers import trl

    base = _unwrap(model)
    if _weights_dtype(base) == "float16":
        raise Unmodelled("fp16 weights (memplan models fp32 weights under fp16 autocast, amp-fp16)")
    data = {k: v for k, v in args.to_dict().items() if v is not None}
    if str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "no":
        data.pop("per_device_eval_batch_size", None)  # a run that never evaluates has no evaluation batch
    data.update(_adapter(model), model_name_or_path=str(base.config.name_or_path or base.config.model_type),
                dtype=_weights_dtype(base), per_device_train_batch_size=rows, max_length=tokens,
                attn_implementation=getattr(base.config, "_attn_implementation", None) or "eager")
    if "loss_type" not in data:  # transformers' Trainer: the model's own loss over the full logits
        data["loss_type"] = "nll"
    source = trl.read(data, "the Trainer run")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", args.world_size))
    fields = dict(source.plan, device="cuda" if args.device.type == "cuda" else "cpu", gpus=local,
                  nodes=max(1, args.world_size // local))
    return build_plan(fields, source="the Trainer run"), source


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
    `log` prints a line (default: print). The results stay on the callback: `plan` and `source` (where each
    field came from, and what changes memory but is not modelled), `estimate` (at the first batch's shape),
    `measured` (measured_bytes, estimated_bytes, gap, flag) and `skipped` (why it stood aside)."""

    gpu: str | None = None
    gpu_memory: str | int | None = None
    host_memory: str | int | None = None
    headroom: float | None = None
    steps: int = 2
    log: Any = print
    plan: Plan | None = None
    source: Any = None  # memplan.trainers.source.ConfigSource: what the plan was read from
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

        plan, source = plan_from_run(self._args, model, rows, tokens)
        result = estimate_spec(self._spec, plan, gpu=self.gpu, gpu_memory=self.gpu_memory,
                               host_memory=self.host_memory, headroom=self.headroom)
        return plan, source, result

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
            self.plan, self.source, self.estimate = self._estimate(model, self.shape.rows, self.shape.tokens)
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
        if self.source.not_modelled:
            self._say(args, "not in this estimate (changes memory, not modelled): " + "; ".join(
                f"{n['key']}: {n['value']} ({n['why']})" for n in self.source.not_modelled))

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
            _, _, shaped = self._estimate(model, self.shape.rows, self.shape.tokens)
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

