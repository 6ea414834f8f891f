"""The training loop, top to bottom: one function, `train`, for one process or many.

  set up      accelerate (processes, device, the plan's autocast), the model, the data, AdamW (or the
              planned optimizer), warmup + decay from transformers' schedulers, a checkpoint to resume
  before      retention perplexity and a first evaluation of the untouched model (step 0)
  each step   grad_accum micro-batches: forward, token-summed loss / tokens in the whole step, backward
              (gradients synchronised on the last micro-batch only); clip; optimizer step; LR step
  every N     a metrics line; evaluation (validation loss, exact match) with early stopping; a checkpoint
  after       the best weights reloaded, the final model / adapter, retention again, plot and summary

The loss of a step is the mean cross-entropy over every labelled token of the step on all processes:
each micro-batch contributes its token sum divided by that total, so micro-batch size, accumulation and
process count change nothing but speed and memory. With several processes, DDP/FSDP/DeepSpeed average
the gradients over processes; the loss is scaled by the process count to undo that average.

Precision bf16-master: memplan.master_weights (fp32 masters stepped by the plan's optimizer, rounded back
into the bf16 weights), or with sharding deepspeed DeepSpeed's own bf16 optimizer. Under DeepSpeed
(memplan.train.deepspeed_setup) the engine owns the step: `accelerator.backward` runs engine.backward and,
on the last micro-batch, engine.step (reduction, the JSON's gradient_clipping, the optimizer step);
memplan keeps its data order, loss normalisation, LR schedule, evaluation and checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from memplan.errors import UserError
from memplan.train.settings import Resolved


def _accelerator(plan):
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from memplan.plan import mixed_precision

    if not torch.distributed.is_initialized():
        # accelerate keeps its settings in a process-wide singleton; a second run in the same Python
        # process (a notebook, tests) may use another precision.
        AcceleratorState._reset_state(reset_partial_state=True)
    if plan.sharding == "deepspeed":
        from memplan.train import deepspeed_setup

        return Accelerator(**deepspeed_setup.accelerator_kwargs(plan))
    return Accelerator(mixed_precision=mixed_precision(plan), cpu=plan.device == "cpu")


def _optimizer(plan, model):
    """The plan's optimizer (memplan.profile_optim: the one `memplan profile` measures) over the trainable
    parameters. With weight decay, biases and norm weights (1-D tensors) are not decayed, as in HF Trainer.
    bf16-master: memplan.master_weights steps fp32 masters of the bf16 parameters, except under DeepSpeed,
    whose engine keeps the masters itself."""
    from memplan.runtime.optim import MasterWeightsOptimizer, wants_masters
    from memplan.runtime.optim import optimizer_factory

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    wd = plan.hparams.weight_decay
    groups: list[dict[str, Any]] = [{"params": [p for _, p in params]}]
    if wd > 0:
        groups = [{"params": [p for _, p in params if p.dim() >= 2], "weight_decay": wd},
                  {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
    factory = optimizer_factory(plan)
    if plan.sharding != "deepspeed" and wants_masters(plan.precision, [p for _, p in params]):
        return MasterWeightsOptimizer(groups, factory)
    return factory(groups)


def total_steps(plan, per_epoch: int) -> int:
    """max_steps, else ceil(epochs x micro-batches per epoch / grad_accum)."""
    if plan.hparams.max_steps:
        return plan.hparams.max_steps
    return max(1, math.ceil(plan.hparams.epochs * per_epoch / plan.grad_accum))


def warmup_steps(plan, total: int) -> int:
    h = plan.hparams
    return h.warmup_steps if h.warmup_steps is not None else math.ceil(h.warmup_ratio * total)


def _shard_fsdp(model, plan, world: int) -> None:
    """FSDP2 (`fully_shard`) of every decoder layer, then the root. Used on the CPU, where accelerate
    runs only DDP; on CUDA accelerate applies FSDP from the launch config. ZeRO stage 2 or 3
    (memplan.train.preflight refuses the others)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from memplan.train.evaluate import _hf_model

    mesh = init_device_mesh("cpu", (world,))
    reshard = plan.zero == 3
    for layer in _hf_model(model).get_decoder().layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)


def _all_sum(accelerator, value):
    import torch

    if accelerator.num_processes == 1:
        return value
    t = value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float64)
    t = t.to(accelerator.device)
    torch.distributed.all_reduce(t)
    return t


def train(resolved: Resolved, *, resume: bool = False, trust_remote_code: bool = False,
          echo: Callable[[str], None] = print, progress: bool = True, checked=None) -> dict:
    """Run the plan; returns the summary (also written to OUTPUT_DIR/summary.json). `checked` is what
    memplan.train.preflight found; without it the same checks run here first."""
    from memplan.train import preflight

    # ---- set up: everything that can be wrong with the input fails here, before torch is imported
    if checked is None:
        checked = preflight.require(resolved, resume, trust_remote_code)
    from memplan.runtime.hf import offline_and_quiet

    offline_and_quiet()  # never the network; no lines about optional kernels
    import torch
    from tqdm import tqdm
    from transformers import get_scheduler
    from transformers.trainer_utils import set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # memplan's own bar is the one progress display
    # transformers 5 deprecations reached through peft (is_gradient_checkpointing): not the user's to fix
    warnings.filterwarnings("ignore", message=".*will be removed in v6", category=FutureWarning)

    from memplan.train import checkpoint as ckpt
    from memplan.train import data as data_mod
    from memplan.train import deepspeed_setup
    from memplan.train import evaluate as ev
    from memplan.train import inputs as run_inputs
    from memplan.train import metrics as mx
    from memplan.train import outputs
    from memplan.runtime.meter import PeakMemory
    from memplan.runtime.model import load_model, load_tokenizer, parameter_counts

    plan = resolved.plan
    out = resolved.output_dir
    h = plan.hparams
    base_dir = checked.model_dir
    accelerator = _accelerator(plan)
    ds = plan.sharding == "deepspeed"
    if ds:
        deepspeed_setup.configure(accelerator, plan)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    if world != plan.world_size:
        raise UserError(f"the plan has {plan.world_size} process(es) (gpus x nodes) but {world} were started")

    def say(msg: str) -> None:
        """A status line; while the progress bar is drawn, above it rather than glued onto it."""
        if main:
            with tqdm.external_write_mode():
                echo(msg)

    ckpt_root = out / outputs.CHECKPOINTS
    if main:
        outputs.mark_output_dir(out)
        for stale in outputs.remove_stale(out):
            say(f"removed {stale}, left by a run stopped while saving")
    tokenizer = load_tokenizer(base_dir, trust_remote_code)
    run_data = data_mod.load_run_data(plan, tokenizer, checked.records)
    stream = data_mod.Stream(run_data.train, plan.micro_batch, world, rank, h.seed)
    steps = total_steps(plan, stream.per_epoch)

    set_seed(h.seed)
    model = load_model(plan, base_dir, accelerator.device, trust_remote_code)
    trainable, total = parameter_counts(model)
    sharded = plan.sharding == "fsdp" and world > 1
    if sharded and plan.device == "cuda" and accelerator.distributed_type.name != "FSDP":
        raise UserError("the plan says FSDP but the processes were not started with an FSDP accelerate config. "
                        "Hint: memplan recommend -o DIR writes one; memplan train then launches with it")
    own_fsdp = sharded and plan.device == "cpu"
    if own_fsdp:
        _shard_fsdp(model, plan, world)
    optimizer = _optimizer(plan, model)
    # transformers' "constant" has no warmup; "constant_with_warmup" is the plan's constant.
    schedule = {"constant": "constant_with_warmup"}.get(h.lr_scheduler, h.lr_scheduler)
    scheduler = get_scheduler(schedule, optimizer,
                              num_warmup_steps=warmup_steps(plan, steps), num_training_steps=steps)
    if own_fsdp:
        optimizer = accelerator.prepare_optimizer(optimizer)
    else:  # accelerate wraps the model: DDP, FSDP from the launch config on CUDA, or DeepSpeed's engine
        model, optimizer = accelerator.prepare(model, optimizer)
    device, autocast = accelerator.device, accelerator.autocast
    chunked = plan.loss == "chunked"
    pad_id = tokenizer.pad_token_id
    eval_batch = max(1, plan.micro_batch)

    # The trainer's state, saved in every checkpoint: with the window of steps not yet logged, so that a
    # resumed run logs the same mean losses as an uninterrupted one.
    trainer: dict[str, Any] = {"step": 0, "best_loss": None, "best_step": None, "bad_evals": 0,
                               "tokens": 0, "train_seconds": 0.0, "retention_before": None,
                               "window": _empty_window()}
    if resume:
        for line in checked.skipped:
            say(f"{line}; resuming from {checked.resume_from.name} instead")
        trainer.update(ckpt.load_checkpoint(checked.resume_from, model, optimizer, scheduler, accelerator, sharded,
                                            deepspeed=ds))
        say(f"resumed from {checked.resume_from} at step {trainer['step']}")
        if checked.changes:
            _apply_changes(plan, optimizer, scheduler, checked.changes)
            say(run_inputs.change_line(checked.changes, trainer["step"]))
    log = mx.MetricsLog(out / "metrics.jsonl", trainer["step"] if resume else None) if main else None
    if log and log.dropped:
        say(f"note: {out / 'metrics.jsonl'} line(s) {', '.join(map(str, log.dropped))} were cut off (not JSON) "
            "by a crash while writing; dropped")

    say(f"model {base_dir} ({total:,} parameters, {trainable:,} trainable, {plan.method}); "
        f"{run_data.n_task} task + {run_data.n_replay} replay training sequences"
        + (" (packed)" if run_data.packed else "") + f", {len(run_data.validation)} validation; "
        f"{steps} optimizer steps of {plan.effective_batch} sequences on {world} process(es)")
    if run_data.dropped:
        say(f"note: {run_data.dropped} training examples were dropped: their response starts after "
            f"seq_len {plan.seq_len} tokens")
    for line in preflight.small_data_warnings(plan, len(run_data.train), len(run_data.validation)):
        say(f"warning: {line}")
    # The validation loss stops the run early and chooses the final weights only when it is measured on
    # enough examples (memplan.train.data.MIN_EARLY_STOPPING_EXAMPLES); below that it is only logged.
    selects = len(run_data.validation) >= data_mod.MIN_EARLY_STOPPING_EXAMPLES
    patience = h.early_stopping_patience if selects else 0

    def evaluate(step: int) -> Optional[dict]:
        if not run_data.validation:
            return None
        loss = ev.mean_loss(model, run_data.validation, eval_batch, pad_id, device, autocast)
        acc = ev.exact_match(model, run_data.validation_records, tokenizer, device, autocast, h.eval_samples) \
            if h.eval_samples else None
        rec = {"step": step, "eval_loss": loss, "eval_ppl": mx.perplexity(loss), "eval_accuracy": acc}
        if log:
            log.write(rec)
        return rec

    # ---- before: the untouched model's retention perplexity and validation scores (step 0)
    if run_data.retention and trainer["retention_before"] is None:
        trainer["retention_before"] = ev.mean_loss(model, run_data.retention, eval_batch, pad_id, device, autocast)
    first_eval = None
    if not resume:
        first_eval = evaluate(0)
        if first_eval:
            say(_eval_line(first_eval))

    # ---- the loop
    meter = PeakMemory(device)
    trainer_start = trainer["step"]
    meter.start(model, optimizer)
    if meter.mode is not None:
        # What the optimizer steps, when it is not the model's parameters: memplan's fp32 masters, DeepSpeed's
        # fp32 partitions. Alive from the start, so counted from the start.
        # FSDP's are DTensors: their storage is this process's shard.
        meter.mode.register([p.to_local() if hasattr(p, "to_local") else p
                             for g in optimizer.param_groups for p in g["params"]])
    bar = tqdm(total=steps, initial=trainer["step"], disable=not progress or not main, unit="step",
               dynamic_ncols=True)
    stopped_early = False
    model.train()
    while trainer["step"] < steps:
        t0 = time.perf_counter()
        first = trainer["step"] * plan.grad_accum
        micro = [data_mod.collate(stream.micro_batch_at(first + i), pad_id, run_data.packed)
                 for i in range(plan.grad_accum)]
        labelled = _all_sum(accelerator, float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)))
        labelled = float(labelled)
        step_loss = torch.zeros((), dtype=torch.float64)
        tokens = 0
        for i, batch in enumerate(micro):
            batch = {k: v.to(device) for k, v in batch.items()}
            last = i == plan.grad_accum - 1
            if ds:  # the engine reduces, clips, steps and zeroes the grads in the last micro-batch's backward
                accelerator.sync_gradients = last
            sync = last or sharded or ds
            with (contextlib.nullcontext() if sync else accelerator.no_sync(model)):
                with autocast():
                    loss_sum = ev.token_loss_sum(model, batch, chunked)
                accelerator.backward(loss_sum * (world / labelled), **(deepspeed_setup.BACKWARD_KWARGS if ds else {}))
            step_loss += loss_sum.detach().double().cpu()
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        lr = scheduler.get_last_lr()[0]
        grad_norm = None
        if ds:  # stepped above with the DeepSpeed config's gradient_clipping
            grad_norm = deepspeed_setup.global_grad_norm(model) if h.max_grad_norm > 0 else None
        else:
            if h.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), h.max_grad_norm)
                grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        trainer["step"] += 1
        step = trainer["step"]
        meter.step_done(max(b["input_ids"].shape[1] for b in micro))
        if meter.measured_steps == meter.steps and not meter.cuda and step == trainer_start + meter.steps:
            say(_memory_line(memory_report(plan, base_dir, meter)))

        loss = float(_all_sum(accelerator, step_loss)) / labelled
        tokens = int(_all_sum(accelerator, float(tokens)))
        seconds = time.perf_counter() - t0
        trainer["tokens"] += tokens
        trainer["train_seconds"] += seconds
        window = trainer["window"]
        window["loss"] += loss
        window["steps"] += 1
        window["tokens"] += tokens
        window["seconds"] += seconds
        if not math.isfinite(loss):
            raise UserError(f"step {step}: the loss is {loss}. Hint: lower hparams.lr, or use precision fp32 / amp-bf16")

        if step % h.log_every == 0 or step == steps:
            rec = {"step": step, "epoch": round(stream.epoch_of(step * plan.grad_accum), 4),
                   "loss": window["loss"] / window["steps"], "lr": lr, "grad_norm": grad_norm,
                   "tokens": window["tokens"], "tokens_per_s": window["tokens"] / window["seconds"],
                   "peak_memory_bytes": meter.peak_bytes, "elapsed_s": round(trainer["train_seconds"], 3)}
            if log:
                log.write(rec)
            bar.set_postfix_str(f"loss {rec['loss']:.4f} lr {lr:.2e} {rec['tokens_per_s']:.0f} tok/s"
                                + (f" mem {meter.peak_bytes / 2**20:.0f}MiB" if meter.peak_bytes else ""))
            trainer["window"] = _empty_window()
        bar.update(1)

        improved = False
        if step % h.eval_every == 0 or step == steps:
            rec = evaluate(step)
            if rec:
                say(_eval_line(rec))
                if trainer["best_loss"] is None or rec["eval_loss"] < trainer["best_loss"]:
                    trainer.update(best_loss=rec["eval_loss"], best_step=step, bad_evals=0)
                    improved = selects
                else:
                    trainer["bad_evals"] += 1
                stopped_early = bool(patience) and trainer["bad_evals"] >= patience
        save_every = h.save_every or h.eval_every
        if step % save_every == 0 or improved or step == steps or stopped_early:
            if log:
                log.sync()  # the metrics up to the checkpoint reach the disk before the checkpoint does
            ckpt.save_checkpoint(ckpt_root, step, model, optimizer, scheduler, trainer, accelerator, sharded,
                                 h.save_total_limit, trainer["best_step"] if selects else None, deepspeed=ds,
                                 inputs=checked.inputs)
        if stopped_early:
            say(f"early stopping at step {step}: no better validation loss in {patience} evaluations")
            break
    bar.close()
    meter.stop()

    # ---- after: best weights, final model, retention, summary
    final_step = trainer["step"]
    if selects and trainer["best_step"] is not None and trainer["best_step"] != final_step:
        ckpt.load_weights_only(ckpt_root / f"{ckpt.PREFIX}{trainer['best_step']:06d}", model, accelerator,
                               sharded, deepspeed=ds)
        final_step = trainer["best_step"]
    written = ckpt.save_final(out, model, tokenizer, plan, accelerator, sharded, base_dir, deepspeed=ds)
    retention_after = ev.mean_loss(model, run_data.retention, eval_batch, pad_id, device, autocast) \
        if run_data.retention else None
    summary = _summary(plan, resolved, base_dir, trainable, total, trainer, log, meter, written, final_step,
                       stopped_early, retention_after, world)
    if main:
        if log:
            mx.plot(log.records, out / "training.png")
            log.close()
        summary["files"]["plot"] = str(out / "training.png")
        mx.write_json(out / "summary.json", summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


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


def _empty_window() -> dict:
    """The steps since the last metrics line: their summed mean losses, count, tokens and seconds."""
    return {"loss": 0.0, "steps": 0, "tokens": 0, "seconds": 0.0}


def _memory_line(mem: dict) -> str:
    flag = " (gap over 10 %)" if mem["flag"] else ""
    return (f"memory: measured peak {mem['measured_bytes'] / 2**20:.1f} MiB ({mem['what']}), memplan's estimate "
            f"{mem['estimated_bytes'] / 2**20:.1f} MiB at the measured shape: {100 * mem['gap']:+.1f} %{flag}")


def _eval_line(rec: dict) -> str:
    acc = f", exact match {100 * rec['eval_accuracy']:.1f} %" if rec.get("eval_accuracy") is not None else ""
    return f"step {rec['step']}: validation loss {rec['eval_loss']:.4f} (perplexity {rec['eval_ppl']:.2f}){acc}"


def _summary(plan, resolved, base_dir: Path, trainable: int, total: int, trainer: dict, log, meter, written: dict,
             final_step: int, stopped_early: bool, retention_after: Optional[float], world: int) -> dict:
    from memplan.train import metrics as mx

    records = log.records if log else []
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    before = trainer.get("retention_before")
    retention = None
    if before is not None and retention_after is not None:
        p0, p1 = mx.perplexity(before), mx.perplexity(retention_after)
        retention = {"perplexity_before": p0, "perplexity_after": p1, "change": p1 / p0 - 1}
    return {
        "model": str(base_dir),
        "method": plan.method,
        "params_total": total,
        "params_trainable": trainable,
        "processes": world,
        "steps": trainer["step"],
        "stopped_early": stopped_early,
        "final_weights_step": final_step,
        "train_loss_first": train[0]["loss"] if train else None,
        "train_loss_last": train[-1]["loss"] if train else None,
        "eval_first": evals[0] if evals else None,
        "eval_best": min(evals, key=lambda r: r["eval_loss"]) if evals else None,
        "eval_last": evals[-1] if evals else None,
        "retention": retention,
        "tokens": trainer["tokens"],
        "train_seconds": round(trainer["train_seconds"], 3),
        "tokens_per_s_median": mx.median([r["tokens_per_s"] for r in train]),
        "memory": memory_report(plan, base_dir, meter),
        "files": dict(written, metrics=str(resolved.output_dir / "metrics.jsonl"),
                      summary=str(resolved.output_dir / "summary.json"),
                      checkpoints=str(resolved.output_dir / "checkpoints")),
    }


def memory_report(plan, base_dir: Path, meter) -> Optional[dict]:
    """The measured peak next to memplan's estimate, for the plan as written and for the batch shape the
    measured steps really had (the data's longest micro-batch rather than seq_len tokens)."""
    from memplan.estimator import estimate
    from memplan.models import resolve_model
    from memplan.runtime.meter import compare

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
        **compare(meter.peak_bytes, shaped.peak_allocated),
    }
    if meter.reserved_bytes is not None:
        out["reserved_bytes"] = meter.reserved_bytes
    return out
