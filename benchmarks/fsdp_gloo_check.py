"""FSDP2 on two gloo ranks (`memplan profile --backend cpu --gpus 2`) against the estimate, per phase.

Small Llamas whose proportions put the peak where FSDP2 gathers the most, in accelerate's units
(memplan.runtime.fsdp): the embeddings and the tail (final norm, lm_head) smaller than a decoder layer, or each 2.7
times as large (a 128K vocabulary beside a 4096-wide model: 2.4 times a layer), tied into one tail unit, layers that
outweigh the activations; full FT and LoRA, FULL_SHARD (zero 3) and
SHARD_GRAD_OP (zero 2); bf16, and amp-bf16 under the mixed-precision policy accelerate gives FSDP; with accumulation,
each micro-batch reduce-scattering its gradients or only the last (sync_each_batch off). Each row is what
`memplan profile --json` measured on rank 0 (the steady steps' phase peaks and their breakdown), each plan profiled
twice (or more) and each phase's lower peak kept: gloo's worker thread can drop a collective's tensor after the next
phase has begun (seen: +0.98 and +2.0 MiB in an optimizer phase, +0.9 MiB in a backward, one run in three or four),
which NCCL does not do. tests/estimator/test_estimator.py checks the estimate against every row.

gloo copies a reduce-scatter input (distributed_c10d.reduce_scatter_single; NCCL makes none) while the whole gradients
it was copied from are still referenced: the estimate counts that copy on the CPU (memplan.estimator.phases).

    python benchmarks/fsdp_gloo_check.py [--out benchmarks/results/fsdp-gloo-2rank.jsonl]
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

SMALL_ROOT = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=2048, max_position_embeddings=512)
LARGE_ROOT = dict(SMALL_ROOT, vocab_size=8192)
TIED = dict(LARGE_ROOT, tie_word_embeddings=True)
WIDE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=8, vocab_size=2048, max_position_embeddings=512)
FULL = dict(method="full", grad_ckpt=False)
LORA = dict(method="lora", grad_ckpt=False)
LORA_CKPT = dict(method="lora", grad_ckpt=True)
QLORA = dict(method="qlora", grad_ckpt=False)
LONG = dict(micro_batch=2, seq_len=256)
SHORT = dict(micro_batch=1, seq_len=32)
# (config, plan): what decides each row's peak is in its comment
RUNS = [
    (SMALL_ROOT, dict(FULL, zero=2, **LONG)),
    (SMALL_ROOT, dict(LORA, zero=2, **LONG)),
    (SMALL_ROOT, dict(FULL, zero=3, **LONG)),
    (SMALL_ROOT, dict(LORA, zero=3, **LONG)),
    (LARGE_ROOT, dict(FULL, zero=3, **LONG)),  # the tail gathered at the loss, beside its all-gather output
    (LARGE_ROOT, dict(LORA_CKPT, zero=3, **LONG)),
    (LARGE_ROOT, dict(FULL, zero=3, **SHORT)),  # the tail's gather; the embeddings' whole gradients
    (LARGE_ROOT, dict(FULL, zero=3, grad_accum=2, **LONG)),  # each micro-batch reduce-scatters, as memplan train
    (LARGE_ROOT, dict(LORA_CKPT, zero=3, grad_accum=2, **LONG)),
    (WIDE, dict(LORA_CKPT, zero=3, micro_batch=1, seq_len=64)),  # the last layer's gather
    (WIDE, dict(FULL, zero=3, micro_batch=1, seq_len=64)),  # a layer's whole gradients, the reduce-scatter input
    (WIDE, dict(LORA_CKPT, zero=2, micro_batch=1, seq_len=64)),
    # autocast: the mixed-precision policy gathers bf16 copies of fp32 shards; the layers run on them
    (SMALL_ROOT, dict(FULL, zero=3, precision="amp-bf16", **LONG)),
    (LARGE_ROOT, dict(LORA_CKPT, zero=3, precision="amp-bf16", **LONG)),
    (WIDE, dict(FULL, zero=3, precision="amp-bf16", micro_batch=1, seq_len=64)),  # sharded fp32 gradients
    (SMALL_ROOT, dict(LORA, zero=2, precision="amp-bf16", **LONG)),
    # the reduce-scatter deferred to the last micro-batch (sync_each_batch off, transformers' Trainer default): every
    # unit's whole gradients held between micro-batches
    (LARGE_ROOT, dict(FULL, zero=3, grad_accum=2, sync_each_batch=False, **LONG)),
    (LARGE_ROOT, dict(LORA_CKPT, zero=3, grad_accum=2, sync_each_batch=False, **LONG)),
    (SMALL_ROOT, dict(FULL, zero=2, grad_accum=2, sync_each_batch=False, **LONG)),
    (SMALL_ROOT, dict(FULL, zero=3, grad_accum=2, sync_each_batch=False, precision="amp-bf16", **LONG)),
    # QLoRA: the 4-bit weights stored in bf16 and sharded as such, their quantization states whole on each rank; the
    # first layer's post-backward in the backward's final callback without checkpointing (its input has no gradient)
    (SMALL_ROOT, dict(QLORA, zero=3, **LONG)),
    (LARGE_ROOT, dict(QLORA, zero=3, grad_ckpt=True, **LONG)),
    (SMALL_ROOT, dict(QLORA, zero=2, grad_ckpt=True, **LONG)),
    (LARGE_ROOT, dict(QLORA, zero=3, grad_ckpt=True, precision="amp-bf16", **LONG)),  # the policy over fp32 adapters
    (SMALL_ROOT, dict(QLORA, zero=3, grad_ckpt=True, grad_accum=2, sync_each_batch=False, **LONG)),
    # tied embeddings: one tail unit of the final norm and the embeddings, gathered from the forward's start to the
    # backward's final callback (under LoRA without the norm, which peft hides from accelerate)
    (TIED, dict(FULL, zero=3, **SHORT)),
    (TIED, dict(LORA, zero=3, **LONG)),
    # the wide model deferring: every layer's whole gradients beside the last layer's reduce-scatter
    (WIDE, dict(FULL, zero=3, micro_batch=1, seq_len=64, grad_accum=2, sync_each_batch=False)),
]


def profile(config: dict, fields: dict, tmp: Path, ranks: str = "rank 0") -> dict:
    """What `memplan profile --json` measured: rank 0's phase peaks and breakdown, or (ranks="max") each phase's
    highest peak over the ranks."""
    path = tmp / "config.json"
    path.write_text(json.dumps(dict(model_type="llama", **config)))
    plan = {"precision": "bf16", "sharding": "fsdp", "gpus": 2, "device": "cpu", **fields}
    args = ["--backend", "cpu", "--gpus", str(plan["gpus"]), "--sharding", plan["sharding"],
            "--zero", str(plan["zero"]),
            "--method", plan["method"], "--precision", plan["precision"], "--batch-size", str(plan["micro_batch"]),
            "--seq-len", str(plan["seq_len"]), "--grad-accum", str(plan.get("grad_accum", 1)),
            "--grad-ckpt" if plan["grad_ckpt"] else "--no-grad-ckpt",
            "--sync-each-batch" if plan.get("sync_each_batch", True) else "--no-sync-each-batch",
            *[arg for key in ("device", "offload") if key in fields for arg in (f"--{key}", fields[key])],
            "--steps", "3", "--json"]
    done = subprocess.run([sys.executable, "-m", "memplan", "profile", "--model", str(path), *args],
                          capture_output=True, text=True, cwd=tmp, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if done.returncode not in (0, 1):  # 1: outside the goal, still a measurement
        raise SystemExit(done.stderr[-3000:])
    measured = json.loads(done.stdout)["results"][0]["measured"]
    if ranks == "max":
        per_rank = measured.get("ranks") or [measured]
        return {"llama_config": config, "plan": plan, "ranks": "max",
                "command": f"memplan profile --model config.json {' '.join(args)}",
                "phase_peaks": {ph: max(r["phase_peaks"][ph] for r in per_rank) for ph in measured["phase_peaks"]}}
    return {"llama_config": config, "plan": plan,
            "command": f"memplan profile --model config.json {' '.join(args)}",
            "phase_peaks": measured["phase_peaks"], "phase_breakdown": measured["phase_breakdown"]}


def _lower(first: dict, second: dict) -> dict:
    """Per phase, the run with the lower peak (its breakdown with it, where rows have one)."""
    row = dict(first, phase_peaks=dict(first["phase_peaks"]))
    if "phase_breakdown" in first:
        row["phase_breakdown"] = dict(first["phase_breakdown"])
    for phase, peak in second["phase_peaks"].items():
        if peak < row["phase_peaks"][phase]:
            row["phase_peaks"][phase] = peak
            if "phase_breakdown" in row:
                row["phase_breakdown"][phase] = second["phase_breakdown"][phase]
    return row


def measure_runs(runs: list, out: Path, ranks: str = "rank 0", extra: dict | None = None,
                 only: list[int] | None = None) -> None:
    """Profile each (config, plan) of `runs` twice, keep each phase's lower peak, print it beside the estimate, and
    write the rows to `out` (one JSON object per line, atomically). A plan's "checked" (not a plan field) names the
    phases the tests compare, where the estimate is known to leave the others out; it goes into the row. `only`:
    the indices of `runs` to measure, the other rows kept from `out` as they are."""
    from memplan.catalog.resolve import resolve_model
    from memplan.estimator import estimate
    from memplan.plan import build_plan

    stored = [json.loads(line) for line in out.read_text().splitlines()] if only else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (config, fields) in enumerate(runs):
            if only and i not in only:
                rows.append(stored[i])
                continue
            fields = dict(fields)
            checked = fields.pop("checked", None)
            row = _lower(profile(config, fields, Path(tmp), ranks), profile(config, fields, Path(tmp), ranks))
            row.update(extra or {}, **({"checked": checked} if checked else {}))
            rows.append(row)
            (Path(tmp) / "config.json").write_text(json.dumps(dict(model_type="llama", **config)))
            e = estimate(resolve_model(str(Path(tmp) / "config.json")), build_plan(row["plan"]), kernels="cpu")
            errors = {ph: 100 * (e.phase_peaks[ph] - m) / m for ph, m in row["phase_peaks"].items()}
            phases = ", ".join(f"{ph} {row['phase_peaks'][ph] / MiB:.2f} MiB {err:+.2f} %"
                               for ph, err in errors.items())
            print(f"vocab {config['vocab_size']:5d} hidden {config['hidden_size']} {fields}: {phases}", flush=True)
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp_out.replace(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fsdp-gloo-2rank.jsonl"))
    parser.add_argument("--only", type=int, nargs="+", metavar="I",
                        help="measure these rows of RUNS (0-based) again and keep the others from --out")
    args = parser.parse_args()
    measure_runs(RUNS, Path(args.out), only=args.only)


if __name__ == "__main__":
    main()
