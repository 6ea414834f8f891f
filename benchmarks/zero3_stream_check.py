"""DeepSpeed ZeRO-3 in the estimate's allocation stream (memplan.estimator.zero3_optimizer) against DeepSpeed's engine
on two gloo ranks on the CPU.

For each plan a small Llama is trained for three optimizer steps by two processes through DeepSpeed's engine (the
wrapper `memplan profile --backend cpu --gpus 2 --sharding deepspeed --zero 3` uses), rank 0 recording the order of its
storage allocations and frees (memplan.runtime.meter.LiveBytes), each allocation with the DeepSpeed function that made
it. The storages DeepSpeed makes itself in the second step are listed by kind, in the order they are made and freed
(and those of the first step's optimizer step, which makes the optimizer states):

- "gather": the parameters its coordinator gathers (an all-gather buffer per parameter, or a flat buffer and a copy
  of each parameter out of it) and releases;
- "reduce": the flat tensor a reduce-scatter of several gradients interleaves them into;
- "step": what the optimizer step makes, of 512 bytes or more (the norms' float64 copies, the flat fp32 gradient,
  the optimizer's temporaries, the persistent parameters freed and gathered again).

Each plan's traced lists are stored (one JSON row per plan), and tests/estimator/test_zero3_optimizer.py checks the
stream against every row. gloo's own copies (its reduce-scatter emulation) and DeepSpeed's scalars (the loss scale,
the norms' values, the trace checks' small lists) are left out. The step's other storages (activations, autograd's
gradients) are the single-GPU stream's, checked by benchmarks/allocator_check.py; the stream's allocated peak per
phase is the estimate's (tests/estimator/test_zero3_optimizer.py), which benchmarks/deepspeed_gloo_check.py checks.

DeepSpeed is not a memplan dependency; run this with a Python that has it (see benchmarks/deepspeed_cpu_check.py):

    python benchmarks/zero3_stream_check.py [--out benchmarks/results/zero3-stream.jsonl]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SMALL = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 2048, "max_position_embeddings": 512}
PLAN = dict(sharding="deepspeed", zero=3, gpus=2, device="cuda", precision="bf16-master", micro_batch=2, seq_len=64,
            method="full", grad_ckpt=False)
PLANS = [
    (SMALL, dict(PLAN)),
    (SMALL, dict(PLAN, grad_accum=2, grad_ckpt=True)),
    (dict(SMALL, num_key_value_heads=1), dict(PLAN)),  # coalesced gathers
    (dict(SMALL, vocab_size=8192, tie_word_embeddings=True), dict(PLAN, micro_batch=1, seq_len=16)),
    (SMALL, dict(PLAN, method="lora")),  # several adapter gradients per reduce-scatter
    (SMALL, dict(PLAN, method="lora", grad_ckpt=True)),
    (SMALL, dict(PLAN, precision="fp32")),
    (SMALL, dict(PLAN, hparams={"weight_decay": 0.01})),  # two optimizer groups, so two sub-groups
]
MIN_STEP_BYTES = 512  # the step's scalars (norms, their sum, the loss scale) are left out
# (step, kind) compared: the first step's gathers are not the others' (the coordinator records its trace, and
# prefetches nothing, in the first), the first optimizer step makes the states
COMPARED = [(1, "reduce"), (1, "step"), (2, "gather"), (2, "reduce"), (2, "step")]


def _kind() -> str:
    """The kind of the storage being allocated, from the DeepSpeed function on the stack ("" for the others)."""
    names = [f.name for f in traceback.extract_stack()]
    if "reduce_scatter_tensor" in names:
        return ""  # gloo's emulation of the reduce-scatter copies its input (NCCL does not)
    for name in reversed(names):
        if name in ("_all_gather_sequential", "_all_gather_dtype", "wait") and "fetch_sub_module" in names:
            return "gather"
        if name == "reduce_scatter_coalesced":
            return "reduce"
        if name == "step" and "_take_model_step" in names:
            return "step"
    return ""


def worker(config_json: str, plan_json: str, out: str) -> None:
    from fsdp_stream_check import worker as record

    record(config_json, plan_json, out, kind=_kind)


def sequences(events: list, kind_of, step: int) -> dict[str, list[str]]:
    """Per kind, the storages made ("+bytes") and freed ("-bytes") in optimizer step `step` (1-based)."""
    made, out, at = {}, {"gather": [], "reduce": [], "step": []}, 0
    for ev in events:
        if ev[0] == "s":
            at += 1
        elif ev[0] == "a":
            kind = kind_of(ev)
            if kind and (kind != "step" or ev[2] >= MIN_STEP_BYTES):
                made[ev[1]] = (kind, ev[2])
                if at == step:
                    out[kind].append(f"+{ev[2]}")
        elif ev[0] == "f" and ev[1] in made:
            kind, nbytes = made.pop(ev[1])
            if at == step:
                out[kind].append(f"-{nbytes}")
    return out


def canonical(sequence: list[str]) -> list[str]:
    """The sequence with each run of consecutive allocations, and each of consecutive frees, in order of size.
    DeepSpeed gathers and releases the parameters of a module in the order of a Python set of them (by address:
    `__all_gather_params`, `__params_to_release`), which no model of it can follow. Frees in a row leave the allocator
    as it is whatever their order; of allocations in a row, those of different sizes are often in different pools (1
    MiB and below: the small one), and within one their order places blocks, not how many segments there are."""
    out: list[str] = []
    run: list[str] = []
    for ev in [*sequence, ""]:
        if run and ev[:1] == run[0][:1]:
            run.append(ev)
            continue
        out += sorted(run, key=lambda e: int(e[1:]))
        run = [ev] if ev else []
    return out


def stream_sequences(config: dict, fields: dict) -> dict[int, dict[str, list[str]]]:
    """The same lists from the plan's stream on a GPU, by step: the all-gather stream's storages, the reduce stream's,
    and what the optimizer phase makes on the default stream."""
    from memplan.catalog.spec import spec_from_config
    from memplan.estimator import stream, zero3_gather
    from memplan.estimator.fully_shard import ALL_GATHER_STREAM
    from memplan.estimator.zero_optimizer import REDUCTION_STREAM
    from memplan.plan import Plan

    spec = spec_from_config(config, "llama-small")
    plan = Plan(**{"model": "llama-small", **fields})
    # memplan profile runs the model inside its loss module: one module more, which prefetches too
    original = zero3_gather.step_trace
    zero3_gather.step_trace = functools.partial(original, wrappers=1)
    zero3_gather._REPLAYS.clear()
    try:
        events = stream.allocation_stream(spec, stream.stream_plan(plan), steps=3)
    finally:
        zero3_gather.step_trace = original
        zero3_gather._REPLAYS.clear()
    phase = None
    kinds: dict[int, str] = {}
    for ev in events:
        if ev[0] == "p":
            phase = ev[1]
        elif ev[0] == "a":
            on = ev[3] if len(ev) > 3 else 0
            kinds[ev[1]] = ("gather" if on == ALL_GATHER_STREAM else "reduce" if on == REDUCTION_STREAM
                            else "step" if phase == "optimizer" else "")
    return {step: sequences(events, lambda ev: kinds[ev[1]], step) for step in (1, 2)}


def traced(config: dict, fields: dict, tmp: Path) -> dict[int, dict[str, list[str]]]:
    out = tmp / "events.json"
    plan = {"model": "llama-small", **fields}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2",
           __file__, "worker", json.dumps(config), json.dumps(plan), str(out)]
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
                   capture_output=True, text=True)
    events = json.loads(out.read_text())
    return {step: sequences(events, lambda ev: ev[3], step) for step in (1, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zero3-stream.jsonl"))
    out = Path(parser.parse_args().out)
    import deepspeed

    rows = []
    with tempfile.TemporaryDirectory(prefix="memplan-zero3-") as tmp:
        for config, fields in PLANS:
            seqs = traced(config, fields, Path(tmp))
            ours = stream_sequences(config, fields)
            print(f"{fields['method']} ckpt={fields['grad_ckpt']} accum={fields.get('grad_accum', 1)} "
                  f"{fields['precision']} {config}: " + ", ".join(
                      f"{kind}{step} {len(seqs[step][kind])} storages "
                      f"{'equal' if canonical(ours[step][kind]) == canonical(seqs[step][kind]) else 'DIFFER'}"
                      for step, kind in COMPARED), flush=True)
            rows.append({"deepspeed": deepspeed.__version__, "config": config, "plan": fields,
                         "step1": {kind: seqs[1][kind] for step, kind in COMPARED if step == 1}, "step2": seqs[2]})
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp_out.replace(out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(*sys.argv[2:])
    else:
        main()
