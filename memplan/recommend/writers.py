"""The ready-to-run files of a recommendation: plan.yaml, accelerate_config.yaml, ds_config.json, README.md.

Key names follow the tools that read them: accelerate's config file (ClusterConfig), DeepSpeed's JSON
config (deepspeed.ai/docs/config-json) and memplan's flat Plan YAML (`memplan train` / `estimate --config`).
Written atomically: a new directory appears complete (temporary directory + rename); in an existing one
each file is replaced whole (temporary file + os.replace), leaving other files (checkpoints) alone.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from pathlib import Path
from typing import Optional

from memplan.models import ModelSpec
from memplan.plan import Plan, plan_to_yaml

#: torch.distributed's default rendezvous port (MASTER_PORT in torchrun and accelerate).
MAIN_PROCESS_PORT = 29500

# The decoder-layer class FSDP wraps (transformers' module names), by model_type.
DECODER_LAYER_CLASS = {
    "llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer", "mixtral": "MixtralDecoderLayer",
    "qwen2": "Qwen2DecoderLayer", "gemma": "GemmaDecoderLayer", "gemma2": "Gemma2DecoderLayer",
    "phi3": "Phi3DecoderLayer", "gpt2": "GPT2Block", "opt": "OPTDecoderLayer",
}


def mixed_precision(plan: Plan) -> str:
    """accelerate's mixed_precision: autocast regimes and DeepSpeed bf16; pure bf16 / fp32 weights need none."""
    return {"amp-bf16": "bf16", "amp-fp16": "fp16", "bf16-master": "bf16"}.get(plan.precision, "no")


def distributed_type(plan: Plan) -> str:
    if plan.sharding == "deepspeed":
        return "DEEPSPEED"
    if plan.sharding == "fsdp":
        return "FSDP"
    if plan.world_size > 1:
        return "MULTI_CPU" if plan.device == "cpu" else "MULTI_GPU"
    return "NO"


def accelerate_config(plan: Plan, spec: ModelSpec, ds_config_path: Optional[str], main_ip: str) -> dict:
    """accelerate's config file (what `accelerate config` writes), for `accelerate launch --config_file`."""
    cfg: dict = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": distributed_type(plan),
        "num_machines": plan.nodes,
        "num_processes": plan.world_size,  # all processes over all machines
        "machine_rank": 0,
        "use_cpu": plan.device == "cpu",
        "debug": False,
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
    }
    if plan.sharding == "deepspeed":
        # The DeepSpeed JSON holds precision, accumulation, clipping and ZeRO settings; accelerate refuses
        # them twice (DeepSpeedPlugin._deepspeed_config_checks), so no mixed_precision here.
        cfg["deepspeed_config"] = {"deepspeed_config_file": ds_config_path, "zero3_init_flag": plan.zero == 3}
    else:
        cfg["mixed_precision"] = mixed_precision(plan)
    if plan.sharding == "fsdp":
        fsdp = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            # FSDP2: reshard after forward = FULL_SHARD (ZeRO-3); keep gathered = SHARD_GRAD_OP (ZeRO-2)
            "fsdp_reshard_after_forward": plan.zero == 3,
            "fsdp_offload_params": plan.offload == "optimizer+params",
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": True,
            # memplan train checkpoints through transformers (plan.grad_ckpt), not through FSDP's wrapper
            "fsdp_activation_checkpointing": False,
        }
        layer = DECODER_LAYER_CLASS.get(spec.model_type)
        if layer:
            fsdp["fsdp_transformer_layer_cls_to_wrap"] = layer
        cfg["fsdp_config"] = fsdp
    if plan.nodes > 1:
        cfg["main_process_ip"] = main_ip
        cfg["main_process_port"] = MAIN_PROCESS_PORT
    return cfg


def ds_config(plan: Plan, spec: ModelSpec) -> dict:
    """DeepSpeed's JSON config with the plan's numbers (not "auto": accelerate fills "auto" only through
    HF Trainer's integration). Bucket sizes are HF's "auto" rules, the ones the estimator assumes
    (reduce_bucket_size = hidden^2, stage3_prefetch_bucket_size = 0.9 hidden^2,
    stage3_param_persistence_threshold = 10 hidden; transformers integrations/deepspeed.py)."""
    h = spec.hidden_size
    zero: dict = {"stage": plan.zero, "overlap_comm": True, "contiguous_gradients": True,
                  "reduce_bucket_size": h * h}
    if plan.zero == 3:
        zero.update({"stage3_prefetch_bucket_size": int(0.9 * h * h), "stage3_param_persistence_threshold": 10 * h,
                     "stage3_gather_16bit_weights_on_model_save": True})
    if plan.offload in ("optimizer", "optimizer+params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if plan.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": plan.effective_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": plan.hparams.max_grad_norm,
        "bf16": {"enabled": plan.precision == "bf16-master"},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "steps_per_print": plan.hparams.log_every,
        "wall_clock_breakdown": False,
    }


def readme(out_dir: str, plan: Plan, summary: list[str], has_ds: bool) -> str:
    d = shlex.quote(out_dir.rstrip("/") or ".")
    lines = [f"# Fine-tuning plan: {plan.model} ({plan.method})", "", *summary, "",
             "## Files", "",
             "- `plan.yaml`: the plan (model, method, memory settings, data, hyperparameters, output). "
             "Relative paths in it are relative to this directory.",
             "- `accelerate_config.yaml`: accelerate's launch configuration "
             f"(`distributed_type: {distributed_type(plan)}`, {plan.world_size} process(es) on {plan.nodes} machine(s))."]
    if has_ds:
        lines.append("- `ds_config.json`: DeepSpeed's configuration (ZeRO stage, offload, batch, precision); "
                     "`accelerate_config.yaml` points to it by absolute path.")
    lines += ["", "## Check the memory estimate", "", "```bash", f"memplan estimate --config {d}/plan.yaml", "```",
              "", "## Run", ""]
    if plan.nodes == 1:
        how = ("`memplan train` starts the processes itself through "
               f"`accelerate launch --config_file {d}/accelerate_config.yaml`.") if plan.world_size > 1 else \
            "One process: `memplan train` runs it directly."
        lines += [how, "", "```bash", f"memplan train {d}/plan.yaml", "```"]
    else:
        lines += [f"{plan.nodes} machines x {plan.gpus} GPUs. Put this directory at the same path on every machine. "
                  "`main_process_ip` in `accelerate_config.yaml` must be the address of machine 0 (edit it if "
                  "it is not). Then on machine 0:", "", "```bash", f"memplan train {d}/plan.yaml", "```", "",
                  "and on machine K (1 to " + str(plan.nodes - 1) + "), set its rank first:", "", "```bash",
                  f"sed -i 's/^machine_rank: .*/machine_rank: K/' {d}/accelerate_config.yaml",
                  f"memplan train {d}/plan.yaml", "```", "",
                  "`memplan train` launches through "
                  f"`accelerate launch --config_file {d}/accelerate_config.yaml` on each machine."]
    lines += ["", "Dry run (the resolved plan and its estimate, nothing trained):", "", "```bash",
              f"memplan train {d}/plan.yaml --dry-run", "```", ""]
    return "\n".join(lines)


def _yaml(data: dict, header: str) -> str:
    import yaml

    return header + yaml.safe_dump(data, sort_keys=False)


def render_files(out_dir: Path, shown_dir: str, plan: Plan, spec: ModelSpec, summary: list[str],
                 main_ip: str) -> dict[str, str]:
    """File name -> contents for the output directory."""
    d = shown_dir.rstrip("/") or "."
    files = {"plan.yaml": plan_to_yaml(plan, header=f"# memplan train {d}/plan.yaml\n"
                                                      f"# memplan estimate --config {d}/plan.yaml\n")}
    ds_path = None
    if plan.sharding == "deepspeed":
        ds_path = str((out_dir / "ds_config.json").resolve())
        files["ds_config.json"] = json.dumps(ds_config(plan, spec), indent=2) + "\n"
    files["accelerate_config.yaml"] = _yaml(
        accelerate_config(plan, spec, ds_path, main_ip),
        f"# accelerate launch --config_file {d}/accelerate_config.yaml  (memplan train {d}/plan.yaml does this)\n")
    files["README.md"] = readme(shown_dir, plan, summary, ds_path is not None)
    return files


def _write_file(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_atomically(out_dir: Path, files: dict[str, str]) -> list[str]:
    """Write `files` into out_dir; returns the written paths."""
    from memplan.errors import UserError

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"-o {out_dir} exists and is not a directory")
    try:
        _write_all(out_dir, files)
    except OSError as err:
        raise UserError(f"-o {out_dir}: cannot write there: {err.strerror} ({err.filename})") from None
    return [str(out_dir / name) for name in files]


def _write_all(out_dir: Path, files: dict[str, str]) -> None:
    if out_dir.is_dir():
        for name, text in files.items():
            _write_file(out_dir / name, text)
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
        try:
            for name, text in files.items():
                (tmp / name).write_text(text, encoding="utf-8")
            os.replace(tmp, out_dir)
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise
