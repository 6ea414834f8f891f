"""The training loop, for one process or many: `train` calls the steps below in order, each a small
function of the `Trainer` (what set-up made) and its `TrainerState` (memplan.train.state: the counts a
checkpoint saves).

  setup            accelerate (processes, device, the plan's autocast), the data, the model, AdamW (or the
                   planned optimizer), warmup + decay as transformers' schedulers, a checkpoint to resume
  evaluate_before  retention perplexity and a first evaluation of the untouched model (step 0)
  train_steps      each optimizer_step: grad_accum micro-batches forward, token-summed loss / tokens in the
                   whole step, backward (gradients synchronised on the last micro-batch only); clip;
                   optimizer step; LR step. Then what is due: a metrics line (log_metrics), an evaluation
                   with early stopping (evaluate_and_track), a checkpoint (save_checkpoint_if_due)
  save             the best weights reloaded, the final model / adapter, retention again, plot and summary
  cleanup          the processes wait for each other and end

The loss of a step is the mean cross-entropy over every labelled token of the step on all processes:
each micro-batch contributes its token sum divided by that total, so micro-batch size, accumulation and
process count change nothing but speed and memory. With several processes, DDP/FSDP/DeepSpeed average
the gradients over processes; the loss is scaled by the process count to undo that average.

Precision bf16-master: memplan.runtime.optim (fp32 masters stepped by the plan's optimizer, rounded back
into the bf16 weights), or with sharding deepspeed DeepSpeed's own bf16 optimizer. Under DeepSpeed
(memplan.train.deepspeed_setup) the engine owns the step: `accelerator.backward` runs engine.backward and,
on the last micro-batch, engine.step (reduction, the JSON's gradient_clipping, the optimizer step);
memplan keeps its data order, loss normalisation, LR schedule, evaluation and checkpoints.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memplan.catalog.resolve import resolve_model
from memplan.errors import UserError
from memplan.estimator import estimate
from memplan.plan import mixed_precision
from memplan.report import train as report
from memplan.report.units import format_bytes
from memplan.runtime.host_rss import PhasePeaks
from memplan.runtime.meter import PeakMemory, compare_peak
from memplan.runtime.model import (
    attention_note,
    gradient_sync,
    load_model,
    load_tokenizer,
    model_spec,
    parameter_counts,
)
from memplan.runtime.optim import lr_schedule, make_optimizer, optimizer_factory
from memplan.train import checkpoint as ckpt
from memplan.train import data as data_mod
from memplan.train import deepspeed_setup, outputs, preflight
from memplan.train import evaluate as ev
from memplan.train import inputs as run_inputs
from memplan.train import metrics as mx
from memplan.train.checkpoint import Parts
from memplan.train.settings import Resolved
from memplan.train.state import TrainerState, Window


def _accelerator(plan):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if not torch.distributed.is_initialized():
        # accelerate keeps its settings in a process-wide singleton; a second run in the same Python
        # process (a notebook, tests) may use another precision.
        AcceleratorState._reset_state(reset_partial_state=True)
    if plan.sharding == "deepspeed":
        return Accelerator(**deepspeed_setup.accelerator_kwargs(plan))
    return Accelerator(mixed_precision=mixed_precision(plan), cpu=plan.device == "cpu")


def plan_optimizer(plan, model):
    """The plan's optimizer over the trainable parameters, built as `memplan profile` measures it
    (memplan.runtime.optim.make_optimizer); under DeepSpeed the engine keeps the fp32 masters itself."""
    params = [p for p in model.parameters() if p.requires_grad]
    return make_optimizer(plan, optimizer_factory(plan), params, masters=plan.sharding != "deepspeed")


def total_steps(plan, per_epoch: int) -> int:
    """max_steps, else ceil(epochs x micro-batches per epoch / grad_accum)."""
    if plan.hparams.max_steps:
        return plan.hparams.max_steps
    return max(1, math.ceil(plan.hparams.epochs * per_epoch / plan.grad_accum))


def warmup_steps(plan, total: int) -> int:
    h = plan.hparams
    return h.warmup_steps if h.warmup_steps is not None else math.ceil(h.warmup_ratio * total)


def _shard_fsdp(model, plan, world: int) -> None:
    """FSDP2 (`fully_shard`) in accelerate's units (memplan.runtime.fsdp). Used on the CPU, where accelerate
    runs only DDP; on CUDA accelerate applies FSDP from the launch config, the same units, and under autocast its
    mixed-precision policy, which this one follows (Plan.fsdp_mixed_precision). ZeRO stage 2 or 3
    (memplan.train.preflight refuses the others)."""
    from memplan.runtime.fsdp import shard_model

    shard_model(model, model, plan, "cpu", world)


def _all_sum(accelerator, value):
    if accelerator.num_processes == 1:
        return value
    t = value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float64)
    t = t.to(accelerator.device)
    torch.distributed.all_reduce(t)
    return t


# ---------------------------------------------------------------- the run: setup, loop, save and clean up


def train(resolved: Resolved, *, resume: bool = False, trust_remote_code: bool = False,
          echo: Callable[[str], None] = print, progress: bool = True, checked=None) -> dict:
    """Run the plan; returns the summary (also written to OUTPUT_DIR/summary.json). `checked` is what
    memplan.train.preflight found; without it the same checks run here first."""
    if checked is None:  # everything that can be wrong with the input fails here, before torch is imported
        checked = preflight.require(resolved, resume, trust_remote_code)
    host = PhasePeaks("load")  # the process's resident set per phase, from its start (imports included)
    t = setup(resolved, checked, resume, trust_remote_code, echo)
    t.host = host
    host.enter("train")
    evaluate_before(t, resume)
    stopped_early = train_steps(t, progress)
    summary = save(t, stopped_early)
    cleanup(t)
    return summary


@dataclass
class Trainer:
    """What `setup` made for the run, and the state the loop advances."""

    plan: Any
    out: Path  # the output directory
    checked: Any  # preflight.Checked: the model directory, the data records, the checkpoint to resume
    parts: Any  # checkpoint.Parts: model, optimizer, scheduler, accelerator, sharding
    tokenizer: Any
    data: Any  # data.RunData: training, validation and retention sequences
    stream: Any  # data.Stream: this process's micro-batches of each optimizer step
    steps: int  # optimizer steps of the whole run
    params: tuple[int, int]  # trainable, total
    selects: bool  # the validation loss stops the run early and chooses the final weights
    log: Any  # metrics.MetricsLog on the main process, else None
    meter: Any  # memory.PeakMemory
    say: Callable[[str], None]
    state: TrainerState
    start_step: int  # where this process started: 0, or the resumed checkpoint's step
    host: PhasePeaks | None = None  # the peak resident set per phase (load, train, save)

    @property
    def accelerator(self):
        return self.parts.accelerator

    @property
    def model(self):
        return self.parts.model

    @property
    def patience(self) -> int:
        """Evaluations without a better validation loss before the run stops; 0: it never stops early."""
        return self.plan.hparams.early_stopping_patience if self.selects else 0


def setup(resolved: Resolved, checked, resume: bool, trust_remote_code: bool,
          echo: Callable[[str], None]) -> Trainer:
    """accelerate (processes, device, the plan's autocast), the data, the model, the optimizer and its LR
    schedule, the checkpoint to resume and the metrics file; then a line that says what will run."""
    _quiet_libraries()
    plan, out, base_dir = resolved.plan, resolved.output_dir, checked.model_dir
    accelerator = _start_processes(plan)
    say = _status_printer(accelerator.is_main_process, echo)
    if accelerator.is_main_process:
        _prepare_output_dir(out, say)
    tokenizer = load_tokenizer(base_dir, trust_remote_code)
    run_data = data_mod.load_run_data(plan, tokenizer, checked.records)
    stream = data_mod.Stream(run_data.train, plan.micro_batch, accelerator.num_processes,
                             accelerator.process_index, plan.hparams.seed)
    steps = total_steps(plan, stream.per_epoch)
    parts, params = _model_and_optimizer(plan, base_dir, accelerator, steps, trust_remote_code)
    state = _resume(plan, parts, checked, say) if resume else TrainerState()
    log = _metrics_log(out, state.step if resume else None, say) if accelerator.is_main_process else None
    t = Trainer(plan=plan, out=out, checked=checked, parts=parts, tokenizer=tokenizer, data=run_data, stream=stream,
                steps=steps, params=params, log=log, meter=PeakMemory(accelerator.device), say=say, state=state,
                selects=len(run_data.validation) >= data_mod.MIN_EARLY_STOPPING_EXAMPLES, start_step=state.step)
    _describe_run(t)
    return t


def evaluate_before(t: Trainer, resume: bool) -> None:
    """The untouched model's retention loss, and on a fresh run its validation scores (step 0)."""
    if t.data.retention and t.state.retention_before is None:
        t.state.retention_before = _mean_loss(t, t.data.retention)
    if not resume:
        rec = validate(t)
        if rec:
            t.say(report.eval_line(rec))


def train_steps(t: Trainer, progress: bool) -> bool:
    """Optimizer steps until the plan's last, each followed by what is due: a metrics line, an evaluation,
    a checkpoint. Returns whether early stopping ended the run."""
    from tqdm import tqdm

    _start_meter(t)
    bar = tqdm(total=t.steps, initial=t.state.step, disable=not progress or not t.accelerator.is_main_process,
               unit="step", dynamic_ncols=True)
    stopped_early = False
    t.model.train()
    while t.state.step < t.steps:
        lr, grad_norm = optimizer_step(t)
        log_metrics(t, bar, lr, grad_norm)
        bar.update(1)
        improved, stopped_early = evaluate_and_track(t)
        save_checkpoint_if_due(t, improved, stopped_early)
        if stopped_early:
            t.say(f"early stopping at step {t.state.step}: no better validation loss in {t.patience} evaluations")
            break
    bar.close()
    t.meter.stop()
    return stopped_early


def save(t: Trainer, stopped_early: bool) -> dict:
    """The best weights back (when the validation loss chooses them), the final model or adapter,
    retention, the plot and summary.json; returns the summary."""
    _enter(t, "save")
    final_step = _restore_best(t)
    written = ckpt.save_final(t.parts, t.out, t.tokenizer, t.plan, t.checked.model_dir)
    retention_after = _mean_loss(t, t.data.retention) if t.data.retention else None
    summary = _summary(t, written, final_step, stopped_early, retention_after)
    if summary["host_memory"]:
        t.say(report.host_memory_line(summary["host_memory"]))
    if summary["step_time"]:
        t.say(report.step_time_line(summary["step_time"]))
    if t.accelerator.is_main_process:
        if t.log:
            mx.plot(t.log.records, t.out / "training.png")
            t.log.close()
        summary["files"]["plot"] = str(t.out / "training.png")
        mx.write_json(t.out / "summary.json", summary)
    return summary


def cleanup(t: Trainer) -> None:
    t.accelerator.wait_for_everyone()
    t.accelerator.end_training()


# ---------------------------------------------------------------- setup's parts


def _quiet_libraries() -> None:
    """Never the network; no lines about optional kernels; memplan's own bar the one progress display."""
    from memplan.runtime.hf import offline_and_quiet

    offline_and_quiet()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # transformers 5 deprecations reached through peft (is_gradient_checkpointing): not the user's to fix
    warnings.filterwarnings("ignore", message=".*will be removed in v6", category=FutureWarning)


def _start_processes(plan):
    """accelerate for the plan (DeepSpeed configured from its JSON), with the plan's process count."""
    accelerator = _accelerator(plan)
    if plan.sharding == "deepspeed":
        deepspeed_setup.configure(accelerator, plan)
    if accelerator.num_processes != plan.world_size:
        raise UserError(f"the plan has {plan.world_size} process(es) (gpus x nodes) but "
                        f"{accelerator.num_processes} were started")
    return accelerator


def _status_printer(main: bool, echo: Callable[[str], None]) -> Callable[[str], None]:
    from tqdm import tqdm

    def say(msg: str) -> None:
        """A status line (main process); while the progress bar is drawn, above it rather than glued onto it."""
        if main:
            with tqdm.external_write_mode():
                echo(msg)

    return say


def _prepare_output_dir(out: Path, say: Callable[[str], None]) -> None:
    outputs.mark_output_dir(out)
    for stale in outputs.remove_stale(out):
        say(f"removed {stale}, left by a run stopped while saving")


def _model_and_optimizer(plan, base_dir: Path, accelerator, steps: int, trust_remote_code: bool):
    """The plan's model (FSDP-sharded, or wrapped by accelerate), its optimizer and the LR schedule, as
    checkpoint.Parts; and the (trainable, total) parameter counts."""
    from accelerate.utils import set_seed

    h, world = plan.hparams, accelerator.num_processes
    set_seed(h.seed)
    model = load_model(plan, base_dir, accelerator.device, trust_remote_code)
    params = parameter_counts(model)
    sharded = plan.fully_shards
    if sharded and plan.device == "cuda" and accelerator.distributed_type.name != "FSDP":
        raise UserError("the plan says FSDP but the processes were not started with an FSDP accelerate config. "
                        "Hint: memplan recommend -o DIR writes one; memplan train then launches with it")
    own_fsdp = sharded and plan.device == "cpu"
    if own_fsdp:
        _shard_fsdp(model, plan, world)
    optimizer = plan_optimizer(plan, model)
    scheduler = lr_schedule(optimizer, h.lr_scheduler, warmup_steps(plan, steps), steps)
    if own_fsdp:
        optimizer = accelerator.prepare_optimizer(optimizer)
    else:  # accelerate wraps the model: DDP, FSDP from the launch config on CUDA, or DeepSpeed's engine
        model, optimizer = accelerator.prepare(model, optimizer)
    parts = Parts(model=model, optimizer=optimizer, scheduler=scheduler, accelerator=accelerator, sharded=sharded,
                  deepspeed=plan.sharding == "deepspeed")
    return parts, params


def _resume(plan, parts, checked, say: Callable[[str], None]) -> TrainerState:
    """The checkpoint preflight chose restored into the parts; its trainer state, with the --set changes."""
    for line in checked.skipped:
        say(f"{line}; resuming from {checked.resume_from.name} instead")
    state = ckpt.load_checkpoint(checked.resume_from, parts)
    say(f"resumed from {checked.resume_from} at step {state.step}")
    if checked.changes:
        _apply_changes(plan, parts.optimizer, parts.scheduler, checked.changes)
        say(run_inputs.change_line(checked.changes, state.step))
    return state


def _metrics_log(out: Path, resume_step: int | None, say: Callable[[str], None]):
    log = mx.MetricsLog(out / "metrics.jsonl", resume_step)
    if log.dropped:
        say(f"note: {out / 'metrics.jsonl'} line(s) {', '.join(map(str, log.dropped))} were cut off (not JSON) "
            "by a crash while writing; dropped")
    return log


def _describe_run(t: Trainer) -> None:
    plan, run_data = t.plan, t.data
    trainable, total = t.params
    t.say(f"model {t.checked.model_dir} ({total:,} parameters, {trainable:,} trainable, {plan.method}); "
          f"{run_data.n_task} task + {run_data.n_replay} replay training sequences"
          + (" (packed)" if run_data.packed else "") + f", {len(run_data.validation)} validation; "
          f"{t.steps} optimizer steps of {plan.effective_batch} sequences on {t.accelerator.num_processes} process(es)")
    attn = attention_note(plan, model_spec(t.checked.model_dir))
    if attn:
        t.say(f"note: {attn}")
    if run_data.dropped:
        t.say(f"note: {run_data.dropped} training examples were dropped: their response starts after "
              f"seq_len {plan.seq_len} tokens")
    for line in preflight.small_data_warnings(plan, len(run_data.train), len(run_data.validation)):
        t.say(f"warning: {line}")


# ---------------------------------------------------------------- each step


def _start_meter(t: Trainer) -> None:
    optimizer = t.parts.optimizer
    t.meter.start(t.model, optimizer)
    if t.meter.mode is not None:
        # What the optimizer steps, when it is not the model's parameters: memplan's fp32 masters, DeepSpeed's
        # fp32 partitions. Alive from the start, so counted from the start.
        # FSDP's are DTensors: their storage is this process's shard.
        t.meter.mode.register([p.to_local() if hasattr(p, "to_local") else p
                               for g in optimizer.param_groups for p in g["params"]])


def optimizer_step(t: Trainer) -> tuple[float, float | None]:
    """One optimizer step: grad_accum micro-batches forward and backward, clip, step the optimizer and
    the LR; its loss, tokens and time counted into the state. Returns the step's LR and gradient norm."""
    start = time.perf_counter()
    micro = _micro_batches(t)
    labelled = float(_all_sum(t.accelerator, float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro))))
    step_loss, tokens = _forward_backward(t, micro, labelled)
    positions = sum(b["input_ids"].numel() for b in micro)
    lr = t.parts.scheduler.get_last_lr()[0]
    grad_norm = _clip_and_step(t)
    t.parts.scheduler.step()
    t.state.step += 1
    t.meter.step_done(max(b["input_ids"].shape[1] for b in micro))
    if t.meter.measured_steps == t.meter.steps and not t.meter.cuda and t.state.step == t.start_step + t.meter.steps:
        t.say(report.memory_line(memory_report(t.plan, t.checked.model_dir, t.meter)))

    loss = float(_all_sum(t.accelerator, step_loss)) / labelled
    tokens = int(_all_sum(t.accelerator, float(tokens)))
    t.state.count_step(loss, tokens, time.perf_counter() - start, positions)
    if not math.isfinite(loss):
        raise UserError(f"step {t.state.step}: the loss is {loss}. Hint: lower hparams.lr, or use precision fp32 / "
                        "amp-bf16")
    return lr, grad_norm


def _micro_batches(t: Trainer) -> list[dict]:
    """This process's grad_accum micro-batches of the next step, in the run's data order (data.Stream)."""
    first = t.state.step * t.plan.grad_accum
    return [data_mod.collate(t.stream.micro_batch_at(first + i), t.tokenizer.pad_token_id, t.data.packed,
                             t.plan.data.padding_free) for i in range(t.plan.grad_accum)]


def _forward_backward(t: Trainer, micro: list[dict], labelled: float):
    """Each micro-batch's token-summed loss over `labelled` (the step's labelled tokens on all processes),
    backward; gradients synchronised on the last micro-batch only. Returns this process's summed loss
    (float64) and input tokens."""
    model, accelerator, ds = t.model, t.accelerator, t.parts.deepspeed
    scale = accelerator.num_processes / labelled
    step_loss = torch.zeros((), dtype=torch.float64)
    tokens = 0
    for i, batch in enumerate(micro):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        last = i == len(micro) - 1
        if ds:  # the engine reduces, clips, steps and zeroes the grads in the last micro-batch's backward
            accelerator.sync_gradients = last
        # FSDP reduce-scatters every micro-batch's gradients unless the plan defers it to the last (sync_each_batch)
        sync = last or t.parts.sharded and t.plan.sync_each_batch or ds
        with gradient_sync(model, sync):
            with accelerator.autocast():
                loss_sum = ev.token_loss_sum(model, batch, t.plan.loss == "chunked")
            accelerator.backward(loss_sum * scale, **(deepspeed_setup.BACKWARD_KWARGS if ds else {}))
        step_loss += loss_sum.detach().double().cpu()
        tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    return step_loss, tokens


def _clip_and_step(t: Trainer) -> float | None:
    """Clip to max_grad_norm and step the optimizer; the gradient norm before clipping (None unclipped).
    Under DeepSpeed the engine stepped in the last backward, with its JSON's gradient_clipping."""
    h, model, optimizer = t.plan.hparams, t.model, t.parts.optimizer
    if t.parts.deepspeed:
        return deepspeed_setup.global_grad_norm(model) if h.max_grad_norm > 0 else None
    grad_norm = None
    if h.max_grad_norm > 0:
        norm = t.accelerator.clip_grad_norm_(model.parameters(), h.max_grad_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def log_metrics(t: Trainer, bar, lr: float, grad_norm: float | None) -> None:
    """Every log_every steps and at the last: a metrics line of the steps since the previous one."""
    state, window, step = t.state, t.state.window, t.state.step
    if not (step % t.plan.hparams.log_every == 0 or step == t.steps):
        return
    peak = t.meter.peak_bytes
    rec = {"step": step, "epoch": round(t.stream.epoch_of(step * t.plan.grad_accum), 4),
           "loss": window.loss / window.steps, "lr": lr, "grad_norm": grad_norm,
           "tokens": window.tokens, "tokens_per_s": window.tokens / window.seconds,
           "step_s": window.seconds / window.steps, "positions_per_row": window.positions / (
               window.steps * t.plan.grad_accum * t.plan.micro_batch),
           "peak_memory_bytes": peak, "elapsed_s": round(state.train_seconds, 3)}
    if t.log:
        t.log.write(rec)
    bar.set_postfix_str(f"loss {rec['loss']:.4f} lr {lr:.2e} {rec['tokens_per_s']:.0f} tok/s"
                        + (f" mem {format_bytes(peak, 'MiB', digits=0)}" if peak else ""))
    state.window = Window()


def evaluate_and_track(t: Trainer) -> tuple[bool, bool]:
    """Every eval_every steps and at the last: evaluate, and track the best validation loss. Returns
    (a better loss that chooses the final weights, early stopping's patience ran out)."""
    step = t.state.step
    if not (step % t.plan.hparams.eval_every == 0 or step == t.steps):
        return False, False
    rec = validate(t)
    if not rec:
        return False, False
    t.say(report.eval_line(rec))
    improved = t.state.count_evaluation(rec["eval_loss"]) and t.selects
    return improved, bool(t.patience) and t.state.bad_evals >= t.patience


def save_checkpoint_if_due(t: Trainer, improved: bool, stopping: bool) -> None:
    """Every save_every (else eval_every) steps, at a better validation loss, at the last step and when
    stopping early."""
    h, step = t.plan.hparams, t.state.step
    if not (step % (h.save_every or h.eval_every) == 0 or improved or step == t.steps or stopping):
        return
    if t.log:
        t.log.sync()  # the metrics up to the checkpoint reach the disk before the checkpoint does
    _enter(t, "save")
    ckpt.save_checkpoint(t.parts, t.out / outputs.CHECKPOINTS, t.state, h.save_total_limit,
                         t.state.best_step if t.selects else None, inputs=t.checked.inputs)
    _enter(t, "train")


def _enter(t: Trainer, phase: str) -> None:
    """The host RAM meter's next phase (saving happens inside training, at each checkpoint)."""
    if t.host is not None:
        t.host.enter(phase)


def validate(t: Trainer) -> dict | None:
    """The validation loss and perplexity (and exact match on eval_samples records) at this step, into
    metrics.jsonl; None without validation data."""
    if not t.data.validation:
        return None
    h = t.plan.hparams
    loss = _mean_loss(t, t.data.validation)
    acc = ev.exact_match(t.model, t.data.validation_records, t.tokenizer, t.accelerator.device, t.accelerator.autocast,
                         h.eval_samples) if h.eval_samples else None
    rec = {"step": t.state.step, "eval_loss": loss, "eval_ppl": mx.perplexity(loss), "eval_accuracy": acc}
    if t.log:
        t.log.write(rec)
    return rec


def _mean_loss(t: Trainer, examples: list) -> float | None:
    return ev.mean_loss(t.model, examples, max(1, t.plan.micro_batch), t.tokenizer.pad_token_id,
                        t.accelerator.device, t.accelerator.autocast)


def _restore_best(t: Trainer) -> int:
    """When the validation loss chooses the final weights: the best checkpoint's weights back into the
    model. Returns the step of the final weights."""
    best = t.state.best_step
    if t.selects and best is not None and best != t.state.step:
        ckpt.load_weights_only(t.out / outputs.CHECKPOINTS / f"{ckpt.PREFIX}{best:06d}", t.parts)
        return best
    return t.state.step


def _apply_changes(plan, optimizer, scheduler, changes: dict) -> None:
    """The --set changes of a resumed run that the restored optimizer and scheduler do not pick up by
    themselves: a new peak LR (the scheduler's base). The schedule's length (max_steps, epochs) is already
    the new plan's, as the scheduler was built from it; the LR of the resumed step is recomputed from both."""
    if "hparams.lr" in changes:
        lr = plan.hparams.effective_lr(plan.method)
        scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
        for group in optimizer.param_groups:
            group["initial_lr"] = lr
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def _summary(t: Trainer, written: dict, final_step: int, stopped_early: bool,
             retention_after: float | None) -> dict:
    state, out = t.state, t.out
    records = t.log.records if t.log else []
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    retention = None
    if state.retention_before is not None and retention_after is not None:
        p0, p1 = mx.perplexity(state.retention_before), mx.perplexity(retention_after)
        retention = {"perplexity_before": p0, "perplexity_after": p1, "change": p1 / p0 - 1}
    trainable, total = t.params
    return {
        "model": str(t.checked.model_dir),
        "method": t.plan.method,
        "params_total": total,
        "params_trainable": trainable,
        "processes": t.accelerator.num_processes,
        "steps": state.step,
        "stopped_early": stopped_early,
        "final_weights_step": final_step,
        "train_loss_first": train[0]["loss"] if train else None,
        "train_loss_last": train[-1]["loss"] if train else None,
        "eval_first": evals[0] if evals else None,
        "eval_best": min(evals, key=lambda r: r["eval_loss"]) if evals else None,
        "eval_last": evals[-1] if evals else None,
        "retention": retention,
        "tokens": state.tokens,
        "train_seconds": round(state.train_seconds, 3),
        "tokens_per_s_median": mx.median([r["tokens_per_s"] for r in train]),
        "memory": memory_report(t.plan, t.checked.model_dir, t.meter),
        "host_memory": host_report(t),
        "step_time": time_report(t, train),
        "files": dict(written, metrics=str(out / "metrics.jsonl"), summary=str(out / "summary.json"),
                      checkpoints=str(out / "checkpoints")),
    }


def memory_report(plan, base_dir: Path, meter) -> dict | None:
    """The measured peak next to memplan's estimate, for the plan as written and for the batch shape the
    measured steps really had (the data's longest micro-batch rather than seq_len tokens). On CUDA the caching
    allocator's reserved peak too, against the estimate's (this process is the fresh process it predicts; rows
    of varying length can fragment the cache more than the estimate's one shape)."""
    if meter.peak_bytes is None:
        return None
    spec = resolve_model(str(base_dir))
    planned = estimate(spec, plan)
    shaped = estimate(spec, plan.model_copy(update={"seq_len": meter.max_tokens_per_row}))
    out = {
        "what": "torch.cuda.max_memory_allocated" if meter.cuda else
                f"live tensor bytes over the first {meter.measured_steps} optimizer steps",
        "measured_steps": meter.measured_steps,
        "measured_seq_len": meter.max_tokens_per_row,
        "estimate_plan_bytes": planned.peak_allocated,
        **compare_peak(meter.peak_bytes, shaped.peak_allocated),
    }
    if meter.reserved_bytes is not None:
        out.update(reserved_bytes=meter.reserved_bytes, estimate_reserved_bytes=shaped.reserved,
                   reserved_basis=shaped.reserved_basis, reserved_gap=meter.reserved_bytes / shaped.reserved - 1)
    return out


def time_report(t: Trainer, rows: list[dict]) -> dict | None:
    """The measured step time next to `memplan recommend`'s time model (memplan.recommend.throughput) for this
    plan on this hardware, at the row length the steps ran (padding included). Measured: the median of the
    metrics lines' mean step times, leaving out the lines that hold the steps memplan's memory meter watched and
    the one after (the first steps warm up caches and allocators). None when no line is left or the hardware
    has no time model (a GPU NVML cannot name)."""
    from memplan.recommend import throughput

    warm = t.start_step + t.meter.steps + 1
    windows = [(prev["step"] + 1, r) for prev, r in zip([{"step": t.start_step}, *rows], rows) if prev["step"] >= warm]
    if not windows:
        return None
    later = [r for _, r in windows]
    plan = t.plan
    target = time_target(plan)
    if target is None:
        return None
    seq = mx.median([r["positions_per_row"] for r in later])
    spec = resolve_model(str(t.checked.model_dir))
    step = throughput.step_time(spec, plan, target, t.params[0], seq_tokens=seq)
    measured = mx.median([r["step_s"] for r in later])
    return {"what": f"median of the mean seconds per optimizer step of {len(later)} metrics line(s), steps "
                    f"{windows[0][0]}-{later[-1]['step']}",
            "measured_s": measured, "predicted_s": step.total_s, "predicted_terms_s": step.terms,
            "positions_per_row": seq, "hardware": target.describe(),
            "error": step.total_s / measured - 1}


def time_target(plan):
    """The hardware this run's step time is predicted for: this machine's CPU, or its GPUs when NVML names them
    as a preset with throughput figures; None for a GPU without figures (the time model would borrow another
    GPU's and say so only in recommend's assumptions)."""
    from memplan.recommend.hardware import cpu_target, gpu_target

    headroom = plan.target.headroom if plan.target else 0.1  # no bearing on the time
    if plan.device == "cpu":
        return cpu_target(plan.world_size, headroom, [])
    target = gpu_target(None, None, plan.gpus, plan.nodes, headroom)
    gpu = target.gpu if target else None
    if gpu is None or not (gpu.bf16_tflops or gpu.fp16_tflops or gpu.fp32_tflops):
        return None
    return target


def host_report(t: Trainer) -> dict | None:
    """Each process's measured peak resident set per phase (every process takes part) next to the host estimate
    per process (memplan.estimator.host) for the run as it ran: its sequences at most as long as its longest
    example, its training examples. None when nothing was measured."""
    if t.host is None:
        return None
    peaks = t.host.stop()
    every = [peaks]
    if t.accelerator.num_processes > 1:
        every = [None] * t.accelerator.num_processes
        torch.distributed.all_gather_object(every, peaks)
    plan = t.plan
    longest = max(len(e.input_ids) for e in t.data.train)
    ran = plan.model_copy(update={"seq_len": min(plan.seq_len, longest),
                                  "data": plan.data.model_copy(update={"samples": len(t.data.train)})})
    host = estimate(resolve_model(str(t.checked.model_dir)), ran).host
    estimated = {p: {"rank0_bytes": ph.rank0_bytes, "other_process_bytes": ph.other_bytes, "node_bytes": ph.node}
                 for p, ph in host.phases.items()}
    phase = max(peaks, key=peaks.get)
    return {"what": "peak resident set (VmHWM) of each process, per phase",
            "phases_separate": t.host.resets, "measured": [{"rank": r, **p} for r, p in enumerate(every)],
            "plan_as_run": {"seq_len": ran.seq_len, "samples": ran.data.samples},
            "estimate": estimated, "phase": phase,
            **compare_peak(max(peaks.values()), max(ph.rank0_bytes for ph in host.phases.values()))}
