"""Measure real training steps on a CUDA GPU and compare them with memplan's estimate, plan by plan.

Run by benchmarks/gpu_check.sh on a machine with one GPU. For each plan: `memplan profile`'s own path
(memplan.profile.run.measure, backend cuda): the HF model from the preset's config (random weights;
memory does not depend on their values), the plan applied exactly as the trace applies it, 3 optimizer
steps on random tokens; per phase `torch.cuda.max_memory_allocated` (peaks reset between phases), the
reserved peak (with the plan's allocator: run 4 repeats twelve cases with expandable segments), NVML's used
memory, the live-tensor breakdown, and the process's resident host memory before and after. TIME_CASES are
timed too, without the breakdown meter, against recommend's time model (row["timing"]). A case that
fails for another reason than memory is retried once without the breakdown meter. Each result is appended
to a JSONL file as soon as it is measured, so a cut-off run still leaves data.

One process measures its cases one after another, and its allocator keeps what earlier cases left (cuBLAS's
workspaces, segments `empty_cache` cannot return): what a case reserves then depends on the cases before it.
`--fresh` runs each case in a process of its own, with PYTORCH_CUDA_ALLOC_CONF set for its allocator before
CUDA starts, as `memplan train` runs a plan and as the estimate's reserved figure assumes (no timing pass;
rows marked "fresh").

    python benchmarks/gpu_check.py OUT.jsonl [--fresh] [case-index ...]
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (preset, plan fields): sized so that all fit one 80 GB GPU and the whole list runs in a few minutes.
CASES = [
    ("qwen2.5-0.5b", dict(precision="bf16", micro_batch=4, seq_len=2048, grad_ckpt=False)),
    ("qwen2.5-0.5b", dict(precision="amp-bf16", micro_batch=2, seq_len=1024, grad_ckpt=False)),
    ("qwen2.5-0.5b", dict(precision="bf16", micro_batch=4, seq_len=2048, grad_ckpt=True)),
    ("tinyllama-1.1b", dict(precision="bf16", micro_batch=2, seq_len=2048, grad_ckpt=False, attn="eager")),
    ("tinyllama-1.1b", dict(method="lora", precision="bf16", micro_batch=4, seq_len=2048, grad_ckpt=False)),
    ("tinyllama-1.1b", dict(method="lora", precision="amp-bf16", micro_batch=2, seq_len=1024, grad_ckpt=True)),
    ("llama-3.2-1b", dict(precision="bf16", micro_batch=2, seq_len=2048, grad_ckpt=True, optimizer="adamw-fused")),
    ("llama-3.2-1b", dict(precision="bf16", micro_batch=2, seq_len=2048, grad_ckpt=True, loss="chunked")),
    ("llama-3.2-1b", dict(precision="fp32", micro_batch=1, seq_len=1024, grad_ckpt=False, grad_accum=2)),
    ("llama-2-7b", dict(precision="bf16", micro_batch=1, seq_len=512, grad_ckpt=False)),
    ("llama-2-7b", dict(method="lora", precision="bf16", micro_batch=4, seq_len=2048, grad_ckpt=True)),
    ("llama-3-8b", dict(precision="bf16", micro_batch=1, seq_len=2048, grad_ckpt=True, optimizer="adamw-forloop")),
    # run 2: QLoRA and 8-bit optimizers (bitsandbytes), fp16 autocast, other families, long contexts
    ("llama-2-7b", dict(method="qlora", precision="bf16", micro_batch=4, seq_len=1024, grad_ckpt=True)),
    ("llama-3.2-3b", dict(method="qlora", precision="bf16", micro_batch=2, seq_len=1024, grad_ckpt=False,
                          optimizer="paged-adamw-8bit")),
    ("qwen2.5-1.5b", dict(precision="bf16", micro_batch=4, seq_len=1024, grad_ckpt=True, optimizer="adamw-8bit")),
    ("qwen2.5-1.5b", dict(precision="amp-fp16", micro_batch=2, seq_len=1024, grad_ckpt=False)),
    ("llama-3-8b", dict(method="lora", precision="bf16", micro_batch=1, seq_len=8192, grad_ckpt=True)),
    ("mistral-7b", dict(method="lora", precision="bf16", micro_batch=4, seq_len=2048, grad_ckpt=False)),
    ("qwen2.5-7b", dict(method="lora", precision="bf16", micro_batch=2, seq_len=4096, grad_ckpt=True,
                        loss="chunked")),
    ("gemma-2b", dict(method="lora", precision="bf16", micro_batch=4, seq_len=1024, grad_ckpt=False)),
    ("gemma-2-2b", dict(method="lora", precision="bf16", micro_batch=2, seq_len=1024, grad_ckpt=False,
                        attn="eager")),
    ("phi-3-mini", dict(method="lora", precision="bf16", micro_batch=4, seq_len=1024, grad_ckpt=False)),
    ("gpt2", dict(precision="fp32", micro_batch=8, seq_len=1024, grad_ckpt=False)),
    ("opt-1.3b", dict(method="lora", precision="bf16", micro_batch=4, seq_len=1024, grad_ckpt=False)),
    ("tinyllama-1.1b", dict(precision="bf16", micro_batch=8, seq_len=512, grad_ckpt=False, optimizer="adafactor")),
    # run 3: the 2025-26 families (q/k norms, post-norms, local/global layers, NoPE layers, multipliers)
    ("qwen3-0.6b", dict(precision="bf16", micro_batch=4, seq_len=2048, grad_ckpt=False)),
    ("qwen3-8b", dict(method="lora", precision="bf16", micro_batch=2, seq_len=2048, grad_ckpt=True)),
    ("gemma-3-1b", dict(precision="bf16", micro_batch=2, seq_len=2048, grad_ckpt=False)),
    ("gemma-3-1b", dict(method="lora", precision="amp-bf16", micro_batch=4, seq_len=1024, grad_ckpt=False,
                        attn="eager")),
    ("olmo-2-7b", dict(method="lora", precision="bf16", micro_batch=4, seq_len=1024, grad_ckpt=False)),
    ("smollm3-3b", dict(method="lora", precision="bf16", micro_batch=2, seq_len=2048, grad_ckpt=False)),
    ("granite-3.3-8b", dict(method="lora", precision="bf16", micro_batch=2, seq_len=2048, grad_ckpt=True)),
    # MoE: GPT-OSS (sinks, eager: no SDPA path) and Qwen3-MoE (128 experts, attention-only LoRA)
    ("gpt-oss-20b", dict(method="lora", precision="bf16", micro_batch=1, seq_len=1024, grad_ckpt=True,
                         attn="eager")),
    ("qwen3-30b-a3b", dict(method="lora", precision="bf16", micro_batch=1, seq_len=1024, grad_ckpt=True,
                           lora={"targets": "q_proj,k_proj,v_proj,o_proj"})),
]
# run 4: the first twelve again with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (reserved vs the default)
CASES += [(preset, dict(fields, allocator="expandable")) for preset, fields in CASES[:12]]
# run 5: cases 0, 5 and 10 on two GPUs under DDP, measured as DDP over a one-rank NCCL group on this GPU: its
# broadcast at wrap, gradient buckets and their rebuild are what each of N ranks allocates (memplan.estimator.reducer)
DDP_CASES = (0, 5, 10)
CASES += [(CASES[i][0], dict(CASES[i][1], gpus=2)) for i in DDP_CASES]
# run 6 (49-53): DeepSpeed ZeRO-1/2 on one GPU through its engine, as memplan train runs it: the flat 16-bit buffer,
# the reduce buckets, the gradient partition on its reduction stream, its step (memplan.estimator.zero_optimizer); and
# ZeRO-Offload: the staging buffer, each reduced gradient's float64 copy, lm_head's as the backward starts (TinyLlama:
# untied), with accumulation. Needs deepspeed (benchmarks/gpu_wheels.sh); without it the rows say so.
ZERO = dict(sharding="deepspeed", precision="bf16-master", grad_ckpt=True)
CASES += [
    ("qwen2.5-0.5b", dict(ZERO, zero=2, micro_batch=4, seq_len=1024)),
    ("llama-3.2-1b", dict(ZERO, zero=1, micro_batch=2, seq_len=1024, grad_accum=2)),
    ("tinyllama-1.1b", dict(ZERO, method="lora", zero=2, micro_batch=4, seq_len=1024)),
    ("tinyllama-1.1b", dict(ZERO, zero=2, offload="optimizer", micro_batch=2, seq_len=2048)),
    ("llama-3.2-1b", dict(ZERO, zero=2, offload="optimizer", micro_batch=4, seq_len=1024, grad_ckpt=False,
                          grad_accum=2)),
]
# run 7 (54-55): DeepSpeed ZeRO-3 on one GPU: zero.Init's partitions, the flat buffer, the gradient partition and the
# reduce bucket, its step per sub-group (memplan.estimator.zero3_optimizer); full fine-tuning and LoRA
CASES += [
    ("qwen2.5-0.5b", dict(ZERO, zero=3, micro_batch=4, seq_len=1024)),
    ("tinyllama-1.1b", dict(ZERO, method="lora", zero=3, micro_batch=4, seq_len=1024)),
]


# The timing pass: these cases again, without the breakdown meter (a dispatch mode that slows every op), for
# TIME_STEPS steps; their wall times after TIME_WARMUP against recommend's time model on this GPU. Plan types:
# full bf16 / fp32 / amp-bf16, checkpointing on and off, LoRA, QLoRA, fused / for-loop / 8-bit AdamW.
TIME_CASES = (0, 1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 14)
TIME_STEPS, TIME_WARMUP = 6, 2


def host_rss() -> dict[str, int]:
    """This process's resident memory now and at its peak (/proc/self/status VmRSS, VmHWM), bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def measure(preset: str, fields: dict, steps: int = 3, attribute: bool = True) -> dict:
    """One case through memplan's profile path (memplan.profile.run.measure, backend cuda), in the JSONL
    row format gpu_report.py reads: per step the phase peaks, the reserved peak and NVML's used memory."""
    from memplan.catalog.presets import models_dir
    from memplan.plan import Plan
    from memplan.profile.meters import CudaMeter
    from memplan.profile.run import measure as profile_measure

    plan = Plan(model=preset, **fields)
    rss_before = host_rss()
    meter = CudaMeter("cuda:0", attribute=attribute)
    with _ddp_group(plan) as wrap:
        result = profile_measure(str(models_dir() / preset / "config.json"), plan, backend="cuda", steps=steps,
                                 meter=meter, wrap=wrap)
    out = {"steps": [], "after_load": result.after_load, "attributed": attribute,
           "nvml_scope": result.nvml_scope, "oom": result.oom, "host_rss": {"before": rss_before,
                                                                                "after": host_rss()}}
    for step in result.steps:
        row = dict(step.peaks)
        row["reserved"] = max((v for v in step.reserved.values() if v is not None), default=None)
        row["nvml_used"] = result.nvml_used
        row["tensor_peaks"] = step.tensor_peaks
        row["breakdown"] = step.breakdown
        out["steps"].append(row)
    return out


@contextlib.contextmanager
def _ddp_group(plan):
    """A DDP plan's wrapper over a one-rank NCCL group (what one of its ranks allocates); None for one GPU."""
    if plan.world_size == 1:
        yield None
        return
    import torch.distributed as dist

    from memplan.profile.launch import make_wrapper

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield make_wrapper(plan, "cuda:0", 1)
    finally:
        dist.destroy_process_group()


def time_case(preset: str, fields: dict) -> dict:
    """The case's step time, measured (median of the steps after TIME_WARMUP) and predicted by
    memplan.recommend.throughput.step_time for this GPU (NVML's name, matched to a preset)."""
    import statistics

    from memplan.catalog.presets import models_dir
    from memplan.catalog.resolve import resolve_model
    from memplan.estimator import estimate
    from memplan.plan import Plan
    from memplan.profile.meters import CudaMeter
    from memplan.profile.run import measure as profile_measure
    from memplan.recommend import throughput
    from memplan.recommend.hardware import gpu_target

    plan = Plan(model=preset, **fields)
    result = profile_measure(str(models_dir() / preset / "config.json"), plan, backend="cuda", steps=TIME_STEPS,
                             meter=CudaMeter("cuda:0", attribute=False))
    out = {"step_seconds": result.step_seconds, "oom": result.oom}
    if result.oom or len(result.step_seconds) <= TIME_WARMUP:
        return out
    measured = statistics.median(result.step_seconds[TIME_WARMUP:])
    spec = resolve_model(preset)
    target = gpu_target(None, None, 1, 1, 0.1)
    step = throughput.step_time(spec, plan, target, estimate(spec, plan).params_trainable)
    tokens = plan.micro_batch * plan.seq_len * plan.grad_accum
    out.update(measured_s=measured, tokens_per_s=tokens / measured, predicted=step.to_json(),
               gpu=target.gpu.id if target and target.gpu else None,
               achieved_mfu=step.flops / measured / step.peak_flops, error=step.total_s / measured - 1)
    return out


CASE_TIMEOUT_S = 300  # one case in its own process (--fresh): start-up, load, 3 steps


def run_fresh(out_path: Path, picks: set[int]) -> None:
    """Each picked case in a new process (`--one`), its allocator set in the environment before CUDA starts."""
    from memplan.runtime.cuda_allocator import allocator_conf

    for i in sorted(picks) or range(len(CASES)):
        env = dict(os.environ)
        conf = allocator_conf(CASES[i][1].get("allocator", "default"), env.get("PYTORCH_CUDA_ALLOC_CONF"))
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        if conf:
            env["PYTORCH_CUDA_ALLOC_CONF"] = conf
        try:
            subprocess.run([sys.executable, __file__, str(out_path), "--one", str(i)], env=env, check=False,
                           timeout=CASE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(i, CASES[i][0], f"timed out after {CASE_TIMEOUT_S} s", flush=True)


def main() -> None:
    args = sys.argv[1:]
    out_path = Path(args.pop(0))
    if "--fresh" in args:
        args.remove("--fresh")
        run_fresh(out_path, {int(a) for a in args})
        return
    fresh = "--one" in args
    if fresh:
        args.remove("--one")
    measure_cases(out_path, {int(a) for a in args}, fresh)


def measure_cases(out_path: Path, picks: set[int], fresh: bool) -> None:
    import torch
    import transformers

    from memplan.catalog.resolve import resolve_model
    from memplan.estimator import estimate
    from memplan.plan import Plan
    from memplan.profile.meters import nvml_used

    torch.cuda.init()
    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    header = {
        "torch": torch.__version__, "transformers": transformers.__version__, "fresh": fresh,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "device": torch.cuda.get_device_name(), "total_memory": torch.cuda.get_device_properties(0).total_memory,
        "context_nvml_used": nvml_used(torch.device("cuda:0"))[0], "context_reserved": torch.cuda.memory_reserved(),
    }
    with out_path.open("a") as f:
        f.write(json.dumps({"header": header}) + "\n")
    print(header, flush=True)
    for i, (preset, fields) in enumerate(CASES):
        if picks and i not in picks:
            continue
        t0 = time.time()
        est = estimate(resolve_model(preset), Plan(model=preset, **fields), kernels="cuda")
        row = {"case": i, "preset": preset, "plan": fields, "estimate": est.phase_peaks,
               "estimate_reserved": est.reserved, "estimate_total": est.total, "fresh": fresh}
        for attribute in (True, False):
            try:
                row["measured"] = measure(preset, fields, attribute=attribute)
                row.pop("error", None)
                break
            except Exception as err:  # record and go on: one broken case must not lose the others
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                gc.collect()
                torch.cuda.empty_cache()
        if i in TIME_CASES and not fresh and "measured" in row and not row["measured"].get("oom"):
            try:
                row["timing"] = time_case(preset, fields)
            except Exception as err:  # the memory row stands; say why the timing is missing
                row["timing"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            gc.collect()
            torch.cuda.empty_cache()
        if row.get("measured", {}).get("oom"):
            row["error"] = f"out of memory in {row['measured']['oom']['phase']}: {row['measured']['oom']['message']}"
        row["seconds"] = round(time.time() - t0, 1)
        gc.collect()
        torch.cuda.empty_cache()
        with out_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        steady = row.get("measured", {}).get("steps", [{}])[-1]
        print(i, preset, fields, "measured", {k: steady.get(k) for k in ("forward", "backward", "optimizer")},
              "estimate", est.phase_peaks, row.get("error", ""), f"{row['seconds']}s", flush=True)


if __name__ == "__main__":
    main()
