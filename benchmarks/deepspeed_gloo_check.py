"""DeepSpeed ZeRO-1, 2 and 3 (`memplan profile --backend cpu --sharding deepspeed`: DeepSpeed's engine on its CPU
accelerator, gloo) against the estimate, per phase.

A small Llama trained for three optimizer steps through DeepSpeed's engine as `memplan train` configures it (the
ds_config.json `memplan recommend` writes, torch's AdamW over the fp32 partition): ZeRO-1 and ZeRO-2, bf16 with fp32
masters (DeepSpeed's bf16) and fp32, with and without accumulation, one and two processes, with checkpointing, full
fine-tuning and LoRA, with ZeRO-Offload (`offload_optimizer`), and ZeRO-3. Each row keeps, per phase, the highest of the
ranks' steady peaks (the estimate is the most loaded rank's: with accumulation the rank owning lm_head holds a
second gradient partition from its backward's start), each plan profiled twice and each phase's lower value kept
(gloo's worker thread can drop a tensor late, see benchmarks/fsdp_gloo_check.py). tests/estimator/test_estimator.py
checks the estimate against every row.

DeepSpeed is not a memplan dependency; run this with a Python that has it (see benchmarks/deepspeed_cpu_check.py):

    python benchmarks/deepspeed_gloo_check.py [--out benchmarks/results/deepspeed-gloo-2rank.jsonl]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from fsdp_gloo_check import LARGE_ROOT, SMALL_ROOT, measure_runs  # noqa: E402

FULL = dict(method="full", sharding="deepspeed", grad_ckpt=False, micro_batch=2, seq_len=128)
# (config, plan)
RUNS = [
    (SMALL_ROOT, dict(FULL, zero=2, precision="bf16-master", grad_accum=2)),
    (SMALL_ROOT, dict(FULL, zero=2, precision="bf16-master")),
    (SMALL_ROOT, dict(FULL, zero=1, precision="bf16-master", grad_accum=2)),
    (SMALL_ROOT, dict(FULL, zero=1, precision="bf16-master")),
    (SMALL_ROOT, dict(FULL, zero=2, precision="fp32", grad_accum=2)),
    (LARGE_ROOT, dict(FULL, zero=2, precision="bf16-master", grad_accum=2, grad_ckpt=True)),  # lm_head's gradient
    (SMALL_ROOT, dict(FULL, zero=2, precision="bf16-master", grad_accum=2, gpus=1)),
    # LoRA: the engine casts peft's fp32 adapters to bf16 with the rest; its flat buffer holds the adapters only
    (SMALL_ROOT, dict(FULL, method="lora", zero=2, precision="bf16-master", grad_accum=2)),
    (SMALL_ROOT, dict(FULL, method="lora", zero=1, precision="bf16-master", grad_accum=2)),
]
# ZeRO-Offload (a CUDA plan, run on the CPU: what DeepSpeed pins and the CPU step count as host memory, see
# memplan.profile.launch._pinned_as_host): lm_head's reduction beside every activation (short rows, a large vocabulary),
# the embedding's at the end (tied), ZeRO-1 keeping whole gradients, fp32, LoRA
OFFLOAD = dict(FULL, offload="optimizer", device="cuda", precision="bf16-master")
SHORT = dict(micro_batch=1, seq_len=16)
RUNS += [
    (SMALL_ROOT, dict(OFFLOAD, zero=2, gpus=1)),
    (SMALL_ROOT, dict(OFFLOAD, zero=2, grad_accum=2)),
    (SMALL_ROOT, dict(OFFLOAD, zero=1, grad_accum=2)),
    (LARGE_ROOT, dict(OFFLOAD, zero=2, grad_accum=2, grad_ckpt=True)),
    (LARGE_ROOT, dict(OFFLOAD, **SHORT, zero=2, gpus=1)),
    (dict(LARGE_ROOT, tie_word_embeddings=True), dict(OFFLOAD, **SHORT, zero=2)),
    (SMALL_ROOT, dict(OFFLOAD, zero=2, precision="fp32")),
    (SMALL_ROOT, dict(OFFLOAD, method="lora", zero=2, grad_accum=2)),
]
# ZeRO-3 (a CUDA plan: memplan train runs it on GPUs only): its persistent gradient partition and reduce bucket, the
# step's fp32 cast and AdamW temporaries. One process gathers nothing; two gather what DeepSpeed's coordinator holds
# (memplan.estimator.zero3_gather, checked event by event by benchmarks/zero3_trace_check.py): full fine-tuning and
# LoRA, with checkpointing, grouped-query attention (coalesced gathers), tied embeddings
ZERO3 = dict(FULL, zero=3, device="cuda", precision="bf16-master", gpus=1)
RUNS += [
    (SMALL_ROOT, dict(ZERO3)),
    (SMALL_ROOT, dict(ZERO3, grad_accum=2)),
    (LARGE_ROOT, dict(ZERO3, grad_accum=2, grad_ckpt=True)),
    (dict(LARGE_ROOT, tie_word_embeddings=True), dict(ZERO3, **SHORT)),
    (SMALL_ROOT, dict(ZERO3, precision="fp32")),
    (SMALL_ROOT, dict(ZERO3, method="lora", grad_accum=2)),
    (SMALL_ROOT, dict(ZERO3, gpus=2, grad_accum=2)),
    (LARGE_ROOT, dict(ZERO3, gpus=2, grad_accum=2, grad_ckpt=True)),
    (SMALL_ROOT, dict(ZERO3, gpus=2, method="lora")),
    (SMALL_ROOT, dict(ZERO3, gpus=2, method="lora", grad_ckpt=True)),
    (dict(SMALL_ROOT, num_key_value_heads=1), dict(ZERO3, gpus=2)),
    (dict(LARGE_ROOT, tie_word_embeddings=True), dict(ZERO3, gpus=2, **SHORT)),
    (SMALL_ROOT, dict(ZERO3, gpus=2, precision="fp32")),
]
# ZeRO-3 offloading (its fp32 masters and gradient partition in host memory, the step on the CPU): the optimizer's
# and the parameters' too, one process and two, LoRA, checkpointing with accumulation, fp32. One process offloading
# parameters is left out: on the CPU its partitions are already where the compute runs, a GPU copies them over
RUNS += [
    (SMALL_ROOT, dict(ZERO3, gpus=2, offload="optimizer")),
    (SMALL_ROOT, dict(ZERO3, offload="optimizer")),
    (SMALL_ROOT, dict(ZERO3, gpus=2, offload="optimizer+params")),
    (SMALL_ROOT, dict(ZERO3, gpus=2, offload="optimizer", method="lora")),
    (LARGE_ROOT, dict(ZERO3, gpus=2, offload="optimizer", grad_accum=2, grad_ckpt=True)),
    (SMALL_ROOT, dict(ZERO3, gpus=2, offload="optimizer", precision="fp32")),
]

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "deepspeed-gloo-2rank.jsonl"))
    import deepspeed

    measure_runs([(config, dict({"gpus": 2}, **fields)) for config, fields in RUNS], Path(parser.parse_args().out),
                 ranks="max", extra={"deepspeed": deepspeed.__version__})


if __name__ == "__main__":
    main()
