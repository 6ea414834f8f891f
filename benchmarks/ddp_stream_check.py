"""DDP in the estimate's allocation stream (memplan.estimator.reducer) against torch's DistributedDataParallel on
two gloo ranks on the CPU.

For each plan a small Llama is trained for three optimizer steps twice: by two processes under DDP
(`torch.distributed.run`, the same wrapper `memplan profile --gpus 2` uses) and by one process without it, each
recording the order of its storage allocations and frees (memplan.runtime.meter.LiveBytes). Reported per plan:

- the storages DDP creates (the module states' broadcast, the gradient buckets, their rebuild in step 2), traced on
  rank 0 and as the stream makes them;
- what DDP adds to the caching allocator's allocated and reserved peaks (`memplan.estimator.allocator.replay`,
  default and expandable segments): the traced DDP run less the traced single process, set against the stream
  with DDP less the stream without. The differences, not the totals, are compared: the traces ran the CPU's kernels,
  the stream follows CUDA's.

    python benchmarks/ddp_stream_check.py [--out benchmarks/results/ddp-stream.txt]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20

CONFIG = {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
          "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 8000, "max_position_embeddings": 512}
ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PLANS = [
    dict(method="full", precision="fp32", micro_batch=2, seq_len=128, grad_accum=2),
    dict(method="full", precision="bf16", micro_batch=2, seq_len=128, grad_ckpt=False),
    dict(method="lora", precision="bf16", micro_batch=2, seq_len=128, lora={"rank": 16, "targets": ALL_LINEARS}),
    dict(method="lora", precision="amp-bf16", micro_batch=4, seq_len=128,
         lora={"rank": 64, "targets": ["q_proj", "v_proj"]}),
]
SMALL = 4096  # the shape check's and the index broadcast's tensors, which the stream leaves out


def worker(plan_json: str, out: str) -> None:
    """One process: three steps of the plan, under DDP when torchrun started several; rank 0 writes its events,
    each allocation with the term the meter gave it (DDP's are comm_buffers)."""
    import torch.distributed as dist

    from memplan.plan import build_plan
    from memplan.profile.launch import make_wrapper
    from memplan.profile.run import measure
    from memplan.runtime.meter import LiveBytes

    class Tagged(LiveBytes):
        def _event_alloc(self, rec):
            if self.events is not None and rec.nbytes:
                self.events.append(("a", rec.uid, rec.nbytes, rec.cat))

    plan = build_plan(json.loads(plan_json))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    wrap = None
    if world > 1:
        dist.init_process_group("gloo")
        wrap = make_wrapper(plan, "cpu", world)
    meter = Tagged(record_events=True)
    measure(CONFIG, plan, backend="cpu", steps=3, meter=meter, wrap=wrap)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps(meter.events))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _run(fields: dict, world: int, tmp: Path) -> list:
    plan = dict(model="llama-tiny", device="cpu", gpus=world, **fields)
    out = tmp / f"events-{world}.json"
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                 f"--nproc-per-node={world}"] if world > 1 else [sys.executable])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([*launcher, __file__, "worker", json.dumps(plan), str(out)], check=True, env=env,
                   capture_output=True, text=True)
    return json.loads(out.read_text())


def _plain(events: list) -> list[tuple]:
    return [tuple(ev[:3]) if ev[0] == "a" else tuple(ev) for ev in events]


def check(fields: dict) -> list[str]:
    from memplan.catalog.spec import spec_from_config
    from memplan.estimator.allocator import ALLOCATORS, replay
    from memplan.estimator.stream import allocation_stream, ddp_events
    from memplan.plan import Plan

    with tempfile.TemporaryDirectory(prefix="memplan-ddp-") as tmp:
        ddp_trace, one_trace = _run(fields, 2, Path(tmp)), _run(fields, 1, Path(tmp))
    plan = Plan(model="llama-tiny", gpus=2, **fields)
    spec = spec_from_config(CONFIG, "llama-tiny")
    traced, step = [], 0
    for ev in ddp_trace:
        step += ev[0] == "s"
        if ev[0] == "a" and ev[3] == "comm_buffers" and ev[2] >= SMALL:
            traced.append((step, ev[2]))
    wrap, rebuild = ddp_events(spec, plan)
    streamed = [(0, ev[2]) for ev in wrap if ev[0] == "a"] + [(2, ev[2]) for ev in rebuild if ev[0] == "a"]
    lines = [f"plan: {json.dumps(fields)}",
             "  DDP's storages (step, bytes), traced on rank 0: " + ", ".join(f"({s}, {n:,})" for s, n in traced),
             "  the same, as the stream makes them:             " + ", ".join(f"({s}, {n:,})" for s, n in streamed)]
    with_ddp, without = allocation_stream(spec, plan), allocation_stream(spec, plan.model_copy(update={"gpus": 1}))
    for allocator in ALLOCATORS:
        t2, t1 = replay(_plain(ddp_trace), allocator), replay(_plain(one_trace), allocator)
        s2, s1 = replay(with_ddp, allocator), replay(without, allocator)
        traced_adds = ((t2.peak_allocated - t1.peak_allocated) / MiB, (t2.peak_reserved - t1.peak_reserved) / MiB)
        stream_adds = ((s2.peak_allocated - s1.peak_allocated) / MiB, (s2.peak_reserved - s1.peak_reserved) / MiB)
        lines.append(f"  {allocator:10s} DDP adds: traced allocated {traced_adds[0]:+8.2f} reserved "
                     f"{traced_adds[1]:+8.2f} MiB | stream allocated {stream_adds[0]:+8.2f} reserved "
                     f"{stream_adds[1]:+8.2f} MiB")
    return lines


def main(argv: list[str]) -> int:
    if argv[:1] == ["worker"]:
        worker(argv[1], argv[2])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ddp-stream.txt")
    args = parser.parse_args(argv)
    import torch

    lines = [f"# {Path(__file__).name}: torch {torch.__version__}, two gloo ranks on the CPU, model "
             f"{json.dumps(CONFIG)}"]
    for fields in PLANS:
        lines += check(fields)
        print("\n".join(lines[-5:]), flush=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main(sys.argv[1:]))
