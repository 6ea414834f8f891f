"""FSDP2's units as memplan wraps a model and as accelerate 1.14 and later wrap it, on two gloo ranks.

memplan (its estimate, `memplan profile`, `memplan train` on the CPU) wraps every decoder layer and then the model:
the root unit holds the embeddings, the final norm and lm_head. accelerate 1.14 and later
(utils/fsdp_utils.py `fsdp2_prepare_model`: "Carve embed + tail=[final_norm, lm_head] into their own units") wrap
the decoder layers, then the input embeddings as a unit of their own, the final norm with lm_head as another with
reshard_after_forward=False, then the model (reshard_after_forward=None: False for the root). For each plan a small
Llama is profiled for three optimizer steps both ways (the wrapper of `memplan profile --backend cpu --gpus 2`, and
the same with accelerate's units, untied embeddings, full fine-tuning: accelerate finds the final norm among the
base model's children, which a peft model hides), and rank 0's steady peaks per phase are printed beside the
estimate's. The estimate follows memplan's layout; this measures how far accelerate's newer one moves the peaks.

    python benchmarks/fsdp_wrap_layouts.py [--out benchmarks/results/fsdp-wrap-layouts.txt]
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
LARGE_ROOT = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 8192, "max_position_embeddings": 512}
PLANS = [
    dict(method="full", zero=3, micro_batch=1, seq_len=32, grad_ckpt=False),  # the root's gathers decide the peaks
    dict(method="full", zero=3, micro_batch=2, seq_len=256, grad_ckpt=True),  # the logits weigh as much
    dict(method="full", zero=2, micro_batch=2, seq_len=256, grad_ckpt=True),  # SHARD_GRAD_OP: every unit kept
]
PHASES = ("forward", "backward", "optimizer")


def accelerate_units(plan, world: int):
    """The FSDP wrapper of `memplan profile` with accelerate's (>= 1.14) units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from memplan.profile import launch
    from memplan.runtime.model import decoder_layers

    def fsdp(module, meter):
        kwargs = dict(mesh=init_device_mesh("cpu", (world,)), reshard_after_forward=plan.zero == 3)
        layers = decoder_layers(module)
        for layer in layers:
            fully_shard(layer, **kwargs)
        hf_model = module.model
        embed, head = hf_model.get_input_embeddings(), hf_model.get_output_embeddings()
        norm = [m for _, m in getattr(hf_model, hf_model.base_model_prefix).named_children()
                if "Norm" in type(m).__name__][-1]
        fully_shard(embed, **kwargs)
        fully_shard([norm, head], **dict(kwargs, reshard_after_forward=False))
        fully_shard(module, mesh=kwargs["mesh"])
        for unit in (*layers, embed, norm, module):
            launch._count_gathers_as_gathered_params(unit, meter)
        return module

    fsdp.shards_parameters = True
    return fsdp


def worker(config_json: str, plan_json: str, out: str, layout: str) -> None:
    """One rank: the plan profiled on the CPU for three steps; rank 0 writes its steady phase peaks to `out`."""
    import torch.distributed as dist

    from memplan.plan import build_plan
    from memplan.profile.launch import make_wrapper
    from memplan.profile.run import measure

    plan = build_plan(json.loads(plan_json))
    dist.init_process_group("gloo")
    world = int(os.environ["WORLD_SIZE"])
    wrap = accelerate_units(plan, world) if layout == "accelerate" else make_wrapper(plan, "cpu", world)
    measured = measure(json.loads(config_json), plan, backend="cpu", steps=3, wrap=wrap)
    if int(os.environ["RANK"]) == 0:
        Path(out).write_text(json.dumps(measured.steady.peaks))
    dist.barrier()
    dist.destroy_process_group()


def _peaks(config: dict, plan: dict, layout: str, tmp: Path) -> dict:
    out = tmp / f"{layout}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2",
           __file__, "worker", json.dumps(config), json.dumps(plan), str(out), layout]
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    return json.loads(out.read_text())


def main(argv: list[str]) -> int:
    if argv[:1] == ["worker"]:
        worker(*argv[1:5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fsdp-wrap-layouts.txt")
    args = parser.parse_args(argv)
    from memplan.catalog.resolve import resolve_model
    from memplan.estimator import estimate
    from memplan.plan import build_plan

    lines = [f"config {json.dumps({k: v for k, v in LARGE_ROOT.items() if k != 'model_type'})}, two gloo ranks, "
             "rank 0's steady peaks (MiB); change: accelerate's units against memplan's"]
    with tempfile.TemporaryDirectory(prefix="memplan-layouts-") as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(LARGE_ROOT))
        for fields in PLANS:
            plan = {"model": str(path), "device": "cpu", "gpus": 2, "sharding": "fsdp", "precision": "bf16", **fields}
            ours, theirs = (_peaks(LARGE_ROOT, plan, layout, Path(tmp)) for layout in ("memplan", "accelerate"))
            e = estimate(resolve_model(str(path)), build_plan(plan), kernels="cpu")
            lines.append(f"plan {json.dumps(fields)}")
            for ph in PHASES:
                ours_mib, theirs_mib, est_mib = ours[ph] / MiB, theirs[ph] / MiB, e.phase_peaks[ph] / MiB
                lines.append(f"  {ph:9s} memplan {ours_mib:7.2f}  accelerate>=1.14 {theirs_mib:7.2f} "
                             f"({100 * (theirs_mib / ours_mib - 1):+.1f} %)  estimate {est_mib:7.2f} "
                             f"({100 * (est_mib / theirs_mib - 1):+.1f} % over accelerate's)")
            print("\n".join(lines[-4:]), flush=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text("\n".join(lines) + "\n")
    tmp_out.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main(sys.argv[1:]))
