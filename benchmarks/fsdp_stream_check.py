"""FSDP2 in the estimate's allocation stream (memplan.estimator.fully_shard) against torch's `fully_shard` on two
gloo ranks on the CPU.

For each plan a small Llama is trained for three optimizer steps by two processes under FSDP2
(`torch.distributed.run`, the wrapper `memplan profile --gpus 2` uses), rank 0 recording the order of its storage
allocations and frees (memplan.runtime.meter.LiveBytes), each allocation with the FSDP function that made it. The
storages FSDP makes itself (the all-gather outputs, the unsharded parameters, the reduce-scatter inputs and outputs)
are listed in the order they are made and freed in the second step, traced and as the stream makes them; the two
lists must be equal (up to when gloo frees an all-gather output: `canonical`). Each plan's traced list is stored
(one JSON row per plan), and tests/estimator/test_fully_shard.py checks the stream against every row. gloo's own
copy of a reduce-scatter input (distributed_c10d.reduce_scatter_single) does not exist on NCCL and is left out. The
step's other storages (activations, autograd's gradients) are the single-GPU stream's, checked by
benchmarks/allocator_check.py. The trace follows when the collectives complete: once in a dozen runs a root's
all-gather output was freed just after the next unit's all-gather output was made, not just before (`canonical`).

Also reported: the all-gather and reduce-scatter streams' share of the replayed reserved peak, which the one-pool
replay of the same stream would not hold apart.

    python benchmarks/fsdp_stream_check.py [--out benchmarks/results/fsdp-stream.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20

SMALL_ROOT = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 2048, "max_position_embeddings": 512}
LARGE_ROOT = dict(SMALL_ROOT, vocab_size=8192)
TIED = dict(SMALL_ROOT, tie_word_embeddings=True)
CHUNKED = dict(SMALL_ROOT, max_position_embeddings=2048)
GPT2 = {"model_type": "gpt2", "n_embd": 256, "n_layer": 3, "n_head": 4, "vocab_size": 2048, "n_positions": 512}
PLANS = [
    (SMALL_ROOT, dict(method="full", zero=3, micro_batch=2, seq_len=64, grad_ckpt=False)),
    (LARGE_ROOT, dict(method="full", zero=3, micro_batch=1, seq_len=32, grad_ckpt=False, grad_accum=2)),
    (SMALL_ROOT, dict(method="full", zero=2, micro_batch=2, seq_len=64, grad_ckpt=False)),
    (LARGE_ROOT, dict(method="lora", zero=3, micro_batch=2, seq_len=64, grad_ckpt=True)),
    (SMALL_ROOT, dict(method="lora", zero=2, micro_batch=2, seq_len=64, grad_ckpt=True, grad_accum=2)),
    # autocast: fp32 shards gathered as bf16 copies, gradients reduced in bf16 and cast back (mixed-precision policy)
    (LARGE_ROOT, dict(method="full", zero=3, micro_batch=1, seq_len=32, grad_ckpt=False, precision="amp-bf16",
                      grad_accum=2)),
    (SMALL_ROOT, dict(method="lora", zero=3, micro_batch=2, seq_len=64, grad_ckpt=True, precision="amp-bf16")),
    # the reduce-scatter deferred to the last micro-batch (sync_each_batch off): the first only reshards
    (LARGE_ROOT, dict(method="full", zero=3, micro_batch=1, seq_len=32, grad_ckpt=False, grad_accum=2,
                      sync_each_batch=False)),
    (SMALL_ROOT, dict(method="lora", zero=2, micro_batch=2, seq_len=64, grad_ckpt=True, grad_accum=2,
                      sync_each_batch=False)),
    # without checkpointing the first layer's input has no gradient: the backward's final callback runs its
    # post-backward, and frees the embeddings' all-gather it prefetched
    (LARGE_ROOT, dict(method="lora", zero=3, micro_batch=2, seq_len=64, grad_ckpt=False)),
    # QLoRA: the 4-bit weights' packed bf16 storage gathered as stored, beside the adapters (cast under the policy)
    (SMALL_ROOT, dict(method="qlora", zero=3, micro_batch=2, seq_len=64, grad_ckpt=False)),
    (LARGE_ROOT, dict(method="qlora", zero=3, micro_batch=1, seq_len=32, grad_ckpt=True, grad_accum=2)),
    (SMALL_ROOT, dict(method="qlora", zero=2, micro_batch=2, seq_len=64, grad_ckpt=True)),
    (SMALL_ROOT, dict(method="qlora", zero=3, micro_batch=2, seq_len=64, grad_ckpt=True, precision="amp-bf16")),
    (SMALL_ROOT, dict(method="qlora", zero=3, micro_batch=1, seq_len=32, grad_ckpt=False, grad_accum=2,
                      sync_each_batch=False)),
    # tied embeddings: one tail unit of the final norm and the embeddings, gathered as the forward starts
    (TIED, dict(method="full", zero=3, micro_batch=2, seq_len=64, grad_ckpt=False)),
    # ... under LoRA without the norm (peft hides a Llama's from accelerate): reduced in the final callback
    (TIED, dict(method="lora", zero=3, micro_batch=2, seq_len=64, grad_ckpt=False)),
    # a root unit of its own: GPT-2's position embeddings
    (GPT2, dict(method="full", zero=3, micro_batch=2, seq_len=64, grad_ckpt=True, grad_accum=2)),
    # ... under LoRA, its final norm still in the tied tail (peft hides only a base model named `model`)
    (GPT2, dict(method="lora", zero=3, micro_batch=2, seq_len=64, grad_ckpt=False)),
    # a loss calling lm_head once per chunk: the tail's group runs in part, resharded as the backward starts and
    # gathered again for the first chunk's recomputation, the last layer prefetched once the first chunk's done
    (CHUNKED, dict(method="full", zero=3, micro_batch=2, seq_len=1024, grad_ckpt=False, loss="chunked")),
    (CHUNKED, dict(method="lora", zero=3, micro_batch=2, seq_len=1024, grad_ckpt=True, loss="chunked")),
    # ... in one chunk, checkpointed all the same: lm_head called once in the forward, again in the recomputation
    (SMALL_ROOT, dict(method="full", zero=3, micro_batch=2, seq_len=64, grad_ckpt=False, loss="chunked")),
    (SMALL_ROOT, dict(method="lora", zero=3, micro_batch=2, seq_len=64, grad_ckpt=True, loss="chunked")),
]
# FSDP's storages by the torch function that allocates them (torch/distributed/fsdp/_fully_shard)
KINDS = {"foreach_all_gather": "all-gather", "alloc_storage": "unsharded"}


def _maker() -> str:
    """The kind of the storage being allocated, from the FSDP function on the stack ("" for the others)."""
    stack = traceback.extract_stack()
    if any(f.name == "reduce_scatter_single" for f in stack):
        return "gloo-copy"
    for f in reversed(stack):
        if f.name in KINDS:
            return KINDS[f.name]
        if f.name == "foreach_reduce":  # its input, then its output (the output made inside the stream's context)
            return f"reduce-scatter@{f.lineno}"
    return ""


def worker(config_json: str, plan_json: str, out: str, kind=_maker) -> None:
    """One rank of the run: the plan profiled on the CPU for three steps, rank 0 writing its storage events to
    `out`, each allocation with `kind()` of the stack that made it."""
    import torch.distributed as dist

    from memplan.plan import build_plan
    from memplan.profile.launch import make_wrapper
    from memplan.profile.run import measure
    from memplan.runtime.meter import LiveBytes

    class Tagged(LiveBytes):
        def _event_alloc(self, rec):
            if self.events is not None and rec.nbytes:
                self.events.append(("a", rec.uid, rec.nbytes, kind()))

    plan = build_plan(json.loads(plan_json))
    dist.init_process_group("gloo")
    meter = Tagged(record_events=True)
    measure(json.loads(config_json), plan, backend="cpu", steps=3, meter=meter,
            wrap=make_wrapper(plan, "cpu", int(os.environ["WORLD_SIZE"])))
    if int(os.environ["RANK"]) == 0:
        Path(out).write_text(json.dumps(meter.events))
    dist.barrier()
    dist.destroy_process_group()


def _traced(config: dict, plan: dict, tmp: Path) -> list:
    out = tmp / "events.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2",
           __file__, "worker", json.dumps(config), json.dumps(plan), str(out)]
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    return json.loads(out.read_text())


def _fsdp_sequence(events: list, kind_of, step: int) -> list[str]:
    """The FSDP storages made ("+kind bytes") and freed ("-kind bytes") in optimizer step `step` (1-based)."""
    made, seq, at = {}, [], 0
    for ev in events:
        if ev[0] == "s":
            at += 1
        elif ev[0] == "a":
            kind = kind_of(ev)
            if kind:
                made[ev[1]] = (kind, ev[2])
                if at == step:
                    seq.append(f"+{kind} {ev[2]}")
        elif ev[0] == "f" and ev[1] in made:
            kind, nbytes = made.pop(ev[1])
            if at == step:
                seq.append(f"-{kind} {nbytes}")
    return seq


REDUCE_SCATTER = ("reduce-scatter-input", "reduce-scatter-output", "reduce-scatter-cast")


def canonical(sequence: list[str]) -> list[str]:
    """The sequence with each run of consecutive all-gather events written frees first, then allocations, each in
    their order, and each run of one unit's unsharded parameters made (or freed) one after another sorted by size.
    A gloo worker thread can hold an all-gather's output until its own bookkeeping ends, so a free can land after
    the next unit's all-gather is made (seen at the root's re-gather as the backward starts, under a mixed-precision
    policy each time, without one once in a dozen runs); NCCL frees it when Python drops it, the order the stream
    follows. A unit copies out its parameters in its module's order, which memplan's parameter listing
    (memplan.estimator.states.model_parts: a layer's linears, then its norms) follows for Llama's layers but not
    GPT-2's (ln_1 before attn): the same tensors, back to back."""
    out: list[str] = []
    run: list[str] = []
    for ev in [*sequence, ""]:
        if run and ev[1:].startswith("unsharded ") and run[-1][:11] == ev[:11]:
            run.append(ev)
            continue
        if run and run[0][1:].startswith("all-gather ") and ev[1:].startswith("all-gather "):
            run.append(ev)
            continue
        if run and run[0][1:].startswith("all-gather "):
            run = [e for e in run if e[0] == "-"] + [e for e in run if e[0] == "+"]
        else:
            run = sorted(run, key=lambda e: int(e.split()[1]))
        out += run
        run = [ev] if ev[1:].startswith(("all-gather ", "unsharded ")) else []
        if ev and not run:
            out.append(ev)
    return out


def _trace_kinds(events: list):
    """A traced allocation's kind: by the line of foreach_reduce that made it, its reduce-scatter input, output, and
    (under a mixed-precision policy) the output cast to the shards' dtype."""
    lines = sorted({int(ev[3].split("@")[1]) for ev in events if ev[0] == "a" and ev[3].startswith("reduce-")})
    names = dict(zip(lines, REDUCE_SCATTER))

    def kind(ev) -> str:
        k = ev[3]
        if k.startswith("reduce-scatter@"):
            return names[int(k.split("@")[1])]
        return "" if k == "gloo-copy" else k
    return kind


def _stream(config: dict, fields: dict) -> tuple[list, list]:
    """The stream of the plan on a GPU, and its FSDP storages' kinds by id."""
    from memplan.catalog.spec import spec_from_config
    from memplan.estimator import fully_shard, stream
    from memplan.plan import Plan

    spec = spec_from_config(config, "llama-small")
    plan = Plan(**{"model": "llama-small", "gpus": 2, "sharding": "fsdp", "precision": "bf16", "device": "cuda",
                   **fields})
    kinds: dict[int, str] = {}

    def labelled(method, names):
        """`method`, its allocations given `names` in order (the last name repeating)."""
        def run(self, st, *args):
            before = len(st.events)
            result = method(self, st, *args)
            made = [ev[1] for ev in st.events[before:] if ev[0] == "a"]
            kinds.update(zip(made, [*names, *[names[-1]] * len(made)]))
            return result
        return run

    class Labelled(fully_shard.FullyShard):
        _all_gather_output = labelled(fully_shard.FullyShard._all_gather_output, ("all-gather",))
        _copy_out = labelled(fully_shard.FullyShard._copy_out, ("unsharded",))
        post_backward = labelled(fully_shard.FullyShard.post_backward, REDUCE_SCATTER)

    original = fully_shard.FullyShard
    fully_shard.FullyShard = Labelled
    try:
        events = stream.allocation_stream(spec, stream.stream_plan(plan), steps=3)
    finally:
        fully_shard.FullyShard = original
    return events, kinds


def check(config: dict, fields: dict) -> tuple[list[str], dict]:
    import torch

    from memplan.estimator.allocator import replay

    plan = {"model": "llama-small", "device": "cpu", "gpus": 2, "sharding": "fsdp", "precision": "bf16", **fields}
    with tempfile.TemporaryDirectory(prefix="memplan-fsdp-") as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(config))
        plan["model"] = str(path)
        trace = _traced(config, plan, Path(tmp))
    traced = _fsdp_sequence(trace, _trace_kinds(trace), step=2)
    events, kinds = _stream(config, fields)
    streamed = _fsdp_sequence(events, lambda ev: kinds.get(ev[1], ""), step=2)
    same = canonical(traced) == canonical(streamed)
    lines = [f"config {json.dumps({k: v for k, v in config.items() if k != 'model_type'})}",
             f"plan {json.dumps(fields)}: {len(traced)} FSDP storage events in step 2, traced and streamed "
             + ("equal" if same else "DIFFERENT")]
    if not same:
        traced, streamed = canonical(traced), canonical(streamed)
        first = next((i for i, (a, b) in enumerate(zip(traced, streamed)) if a != b), min(len(traced), len(streamed)))
        lines.append(f"  first difference at event {first}: traced {traced[first:first + 6]} | "
                     f"stream {streamed[first:first + 6]}")
    one_pool = [ev[:3] if ev[0] == "a" else ev for ev in events]
    by_stream, pooled = replay(events), replay(one_pool)
    lines.append(f"  stream replayed on a GPU: allocated {by_stream.peak_allocated / MiB:.2f} MiB, reserved "
                 f"{by_stream.peak_reserved / MiB:.2f} MiB with a pool per stream, "
                 f"{pooled.peak_reserved / MiB:.2f} MiB were the streams' blocks shared")
    row = {"torch": torch.__version__, "llama_config": config, "plan": fields, "step2_fsdp_storages": traced}
    return lines, row


def main(argv: list[str]) -> int:
    if argv[:1] == ["worker"]:
        worker(*argv[1:4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fsdp-stream.jsonl")
    args = parser.parse_args(argv)
    rows, every = [], True
    for config, fields in PLANS:
        lines, row = check(config, fields)
        every &= "equal" in lines[1]
        rows.append(json.dumps(row))
        print("\n".join(lines), flush=True)
    print("every plan: " + ("equal" if every else "DIFFERENT"))
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("\n".join(rows) + "\n")
    tmp.replace(args.out)
    return 0 if every else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main(sys.argv[1:]))
