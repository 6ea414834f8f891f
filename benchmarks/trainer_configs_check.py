"""Do the trainers themselves accept the configs `memplan recommend --emit` writes?

For a set of plans (`memplan recommend -o DIR --emit trl,axolotl,llamafactory,torchtune` on a few models and GPUs,
and plans written directly for FSDP, fp32 and the expandable allocator), each emitted file is handed to its
trainer's own config loader, in a virtual environment of that trainer alone (created under --venvs on first use,
pip from PyPI with torch pinned to the local CPU wheel):

- TRL: `trl sft`'s parser (trl/scripts/sft.py make_parser().parse_args_and_config(["--config", FILE])): ScriptArguments,
  SFTConfig (with transformers' TrainingArguments checks: DeepSpeed's "auto" values filled by
  HfTrainerDeepSpeedConfig, FSDP's options), ModelConfig, DatasetMixtureConfig; then get_dataset loads the local
  JSONL and get_peft_config builds the LoRA config.
- axolotl: axolotl.utils.config.validate_config with the planned GPU's capabilities (its pydantic input config, as
  `axolotl train` validates before loading a model).
- LLaMA-Factory: llamafactory.hparams.get_train_args (HfArgumentParser over its dataclasses and its checks) under
  torchrun with one process, as FORCE_TORCHRUN=1 launches it; then its dataset_info.json entry is parsed
  (data/parser.py get_dataset_list).
- torchtune: OmegaConf.load + torchtune.config.validate (what `tune validate` runs: every _component_ resolved and
  its arguments bound).

This machine has no GPU: transformers' "does this GPU have bf16" check is answered yes, as on the planned GPU,
and nothing else is changed. Results: benchmarks/results/trainer-configs.md. Not part of CI (CI installs none of
these trainers).

    python benchmarks/trainer_configs_check.py [--venvs /tmp] [--only trl,torchtune]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: What pip installs for llamafactory and is removed again: PyPI's torchvision 0.28 / torchaudio 2.11 wheels are
#: CUDA builds that do not load against the CPU torch ("operator torchvision::nms does not exist",
#: "libc10_cuda.so: cannot open shared object file"), and transformers imports torchvision whenever it is
#: installed. LLaMA-Factory needs them only for image, video and audio data.
DROPPED = ["torchvision", "torchaudio"]
#: torchtune 0.6.1 imports torchao.dtypes.nf4tensor, which the newest torchao (0.18) no longer has
#: ("No module named 'torchao.dtypes.nf4tensor"); 0.15.0 has it.
TORCHAO = "0.15.0"
#: Each trainer's packages (torch comes pinned: the local CPU wheel) and the versions reported.
PACKAGES = {"trl": ["trl", "deepspeed", "peft", "bitsandbytes", "liger-kernel"], "axolotl": ["axolotl", "liger-kernel"],
            "llamafactory": ["llamafactory", "deepspeed", "liger-kernel"],
            "torchtune": ["torchtune", f"torchao=={TORCHAO}", "omegaconf", "bitsandbytes"]}  # see TORCHAO
REPORTED = {"trl": ["trl", "transformers", "accelerate", "deepspeed", "datasets", "peft", "bitsandbytes",
                    "liger-kernel"],
            "axolotl": ["axolotl", "transformers", "peft", "trl", "liger-kernel"],
            "llamafactory": ["llamafactory", "transformers", "peft", "deepspeed", "torchvision", "torchaudio",
                             "liger-kernel"],
            "torchtune": ["torchtune", "torchao", "omegaconf", "bitsandbytes"]}

CHAT = {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]}
ALPACA = {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"}

#: `memplan recommend` runs (name, arguments, data shape): the plans it recommends, with --emit.
RECOMMENDED = [
    ("llama-3.1-8b full, 4 x A100 80GB", ["--model", "llama-3.1-8b", "--gpu", "a100-80gb", "--gpus", "4",
                                          "--method", "full"], "chat"),
    ("qwen2.5-7b LoRA, 1 x RTX 4090", ["--model", "qwen2.5-7b", "--gpu", "rtx4090-24gb", "--gpus", "1",
                                        "--method", "lora"], "alpaca"),
    ("llama-3.1-70b QLoRA, 1 x H100", ["--model", "llama-3.1-70b", "--gpu", "h100-80gb", "--gpus", "1",
                                        "--method", "qlora", "--host-memory", "512GiB"], "chat"),
    ("mistral-7b full, 1 x A100 40GB", ["--model", "mistral-7b", "--gpu", "a100-40gb", "--gpus", "1",
                                         "--method", "full"], "alpaca"),
]
#: Plans written directly (the search picks neither FSDP with these settings nor the expandable allocator here).
DIRECT = [
    ("llama-3.1-8b LoRA, FSDP FULL_SHARD, 4 GPUs, expandable segments",
     {"model": "llama-3.1-8b", "method": "lora", "precision": "bf16", "gpus": 4, "sharding": "fsdp", "zero": 3,
      "grad_ckpt": True, "attn": "sdpa", "loss": "chunked", "allocator": "expandable",
      "lora": {"rank": 8, "alpha": 16, "dropout": 0.05, "targets": "q_proj,k_proj,v_proj,o_proj"},
      "hparams": {"warmup_steps": 10}}, "chat"),
    ("llama-3.2-1b full fp32, FSDP SHARD_GRAD_OP + text data, 2 GPUs",
     {"model": "llama-3.2-1b", "method": "full", "precision": "fp32", "gpus": 2, "sharding": "fsdp", "zero": 2,
      "grad_ckpt": False, "hparams": {"warmup_steps": 5}}, "text"),
    ("llama-3.1-8b LoRA on an 8-bit base, reentrant checkpointing, 1 GPU",
     {"model": "llama-3.1-8b", "method": "lora-8bit", "precision": "bf16", "grad_ckpt": True, "ckpt_reentrant": True,
      "lora": {"rank": 16, "targets": "all-linear"}, "hparams": {"warmup_steps": 8}}, "chat"),
    ("qwen2.5-7b full bf16 with Liger's kernels and packed rows, FSDP FULL_SHARD, 8 GPUs",
     {"model": "qwen2.5-7b", "method": "full", "precision": "bf16", "gpus": 8, "sharding": "fsdp", "zero": 3,
      "liger": "all", "attn": "flash", "data": {"packing": True, "padding_free": True},
      "hparams": {"warmup_steps": 10}}, "chat"),
    ("llama-3.1-8b LoRA with activation offloading and Liger's layer kernels, 1 GPU",
     {"model": "llama-3.1-8b", "method": "lora", "precision": "bf16", "offload_activations": True,
      "liger": "rope,rms_norm,swiglu", "micro_batch": 4, "hparams": {"warmup_steps": 6}}, "alpaca"),
]


def _python(venvs: Path, trainer: str) -> Path:
    """The trainer's virtual environment, created and installed on first use."""
    venv = venvs / f"venv-emit-{trainer}"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        constraints = venvs / "emit-torch-constraint.txt"
        constraints.write_text("torch==2.13.0\n")  # never an unpinned torch: the local CPU wheel
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(constraints), "torch==2.13.0",
                        *PACKAGES[trainer]], check=True)
        if trainer == "llamafactory":  # see DROPPED
            subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", *DROPPED], check=True)
    return python


def _versions(python: Path, trainer: str) -> dict[str, str]:
    names = ["torch", *REPORTED[trainer]]
    code = (f"import importlib.metadata as m, json\nout = {{}}\nfor n in {names!r}:\n    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: out[n] = '-'\nprint(json.dumps(out))")
    run = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return json.loads(run.stdout) if run.returncode == 0 else {}


def _write_data(directory: Path, shape: str) -> Path:
    row = {"chat": CHAT, "alpaca": ALPACA, "text": {"text": "2 + 2 = 4."}}[shape]
    path = directory / f"train-{shape}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for _ in range(64)))
    return path


def emit_plans(root: Path) -> list[dict]:
    """Every plan's output directory, written by memplan: recommend's, and the direct plans' (plan.yaml's
    directory written as recommend writes it, through the same writers)."""
    from memplan.catalog.resolve import resolve_model
    from memplan.plan import build_plan
    from memplan.recommend import writers
    from memplan.trainers.emit import Context, emit_all

    cases = []
    for i, (name, args, shape) in enumerate(RECOMMENDED):
        data = _write_data(root, shape)
        out = root / f"plan{i}"
        run = subprocess.run([sys.executable, "-m", "memplan", "recommend", *args, "--data", str(data), "-o", str(out),
                              "--emit", "trl,axolotl,llamafactory,torchtune", "--json"], capture_output=True,
                             text=True, cwd=REPO)
        if run.returncode != 0:
            raise SystemExit(f"memplan recommend {' '.join(args)} failed: {run.stderr}")
        rec = json.loads(run.stdout)
        cases.append({"name": name, "dir": out, "plan": rec["plan"], "configs": rec["trainer_configs"]})
    for j, (name, fields, shape) in enumerate(DIRECT):
        out = root / f"direct{j}"
        out.mkdir()
        data = _write_data(root, shape)
        plan = build_plan({**fields, "data": {**fields.get("data", {}), "train": str(Path("..") / data.name)}},
                          source=name)
        spec = resolve_model(plan.model)
        files = writers.render_files(str(out), plan, spec, [], "127.0.0.1")
        emitted = emit_all(list(PACKAGES), plan, Context(plan, spec, shape, 100), lambda p: (0, True))
        for e in emitted:
            files.update(e.files)
        writers.write_atomically(out, files)
        cases.append({"name": name, "dir": out, "plan": plan.model_dump(mode="json"),
                      "configs": [e.to_json() for e in emitted]})
    return cases


LOADERS = {
    "trl": '''
import json, sys, os
import transformers.training_args as ta
ta.is_torch_bf16_gpu_available = lambda *a, **k: True  # the planned GPU has bf16; this machine has no GPU
from trl import get_dataset, get_peft_config, get_quantization_config
from trl.scripts.sft import make_parser
script, sft, model, mixture = make_parser().parse_args_and_config(["--config", "trl_sft.yaml"])
data = get_dataset(mixture)
peft = get_peft_config(model)
quant = get_quantization_config(model)
ds = sft.hf_deepspeed_config.config if getattr(sft, "hf_deepspeed_config", None) else None
print(json.dumps({"detail": f"SFTConfig: batch {sft.per_device_train_batch_size} x accum "
      f"{sft.gradient_accumulation_steps}, bf16 {sft.bf16}, optim {sft.optim}, max_length {sft.max_length}, "
      f"loss {sft.loss_type}, "
      f"fsdp {sft.fsdp or '-'} {sft.fsdp_config or ''}, "
      f"deepspeed auto -> micro-batch {ds['train_micro_batch_size_per_gpu'] if ds else '-'}; "
      f"dataset {len(data['train'])} rows; LoRA {'r%d %s' % (peft.r, peft.target_modules) if peft else '-'}; "
      f"quantized {('8-bit' if quant.load_in_8bit else '4-bit ' + quant.bnb_4bit_quant_type) if quant else '-'}; "
      f"checkpointing {sft.gradient_checkpointing} {sft.gradient_checkpointing_kwargs or ''}; "
      f"liger {sft.use_liger_kernel} {sft.liger_kernel_config or ''}, packing {sft.packing} "
      f"({sft.packing_strategy}), padding_free {sft.padding_free}, activation_offloading "
      f"{sft.activation_offloading}; env "
      f"{os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '-')}"}))
''',
    "axolotl": '''
import json, yaml
from axolotl.cli.config import prepare_plugins
from axolotl.utils.config import validate_config
from axolotl.utils.dict import DictDefault
cfg = DictDefault(yaml.safe_load(open("axolotl.yaml")))
prepare_plugins(cfg)  # as `axolotl train` does before validating: the plugins' own keys (liger_*) join the schema
caps = {"bf16": True, "fp8": False, "n_gpu": int(__import__("os").environ["PLAN_GPUS"]), "n_node": 1,
        "compute_capability": "sm_90"}
env = {"torch_version": __import__("torch").__version__.split("+")[0]}
out = validate_config(cfg, capabilities=caps, env_capabilities=env)
print(json.dumps({"detail": f"validated: adapter {out.get('adapter') or 'none'}, micro_batch_size "
      f"{out.micro_batch_size}, gradient_accumulation_steps {out.gradient_accumulation_steps}, bf16 {out.bf16}, "
      f"optimizer {out.optimizer}, "
      f"deepspeed {out.deepspeed or '-'}, fsdp_version {out.fsdp_version or '-'}, sample_packing "
      f"{out.sample_packing}, plugins {out.plugins or '-'} (liger rope {out.liger_rope}, rms_norm "
      f"{out.liger_rms_norm}, glu {out.liger_glu_activation}, fused CE {out.liger_fused_linear_cross_entropy})"}))
''',
    "llamafactory": '''
import json, yaml
import transformers.utils as tu, transformers.training_args as ta
import llamafactory.hparams.parser as lp
lp.is_torch_bf16_gpu_available = ta.is_torch_bf16_gpu_available = lambda *a, **k: True  # the planned GPU
args = yaml.safe_load(open("llamafactory.yaml"))
model, data, training, finetuning, _ = lp.get_train_args(args)
import os, sys, types, llamafactory
# llamafactory.data's __init__ imports its multimodal plugin (torchaudio); its dataset_info.json parser does not
package = types.ModuleType("llamafactory.data")
package.__path__ = [os.path.join(os.path.dirname(llamafactory.__file__), "data")]
sys.modules["llamafactory.data"] = package
from llamafactory.data.parser import get_dataset_list
datasets = get_dataset_list(data.dataset, data.dataset_dir)
print(json.dumps({"detail": f"get_train_args: stage {finetuning.stage}, {finetuning.finetuning_type}, "
      f"quantization_bit {model.quantization_bit}, cutoff_len {data.cutoff_len}, bf16 {training.bf16}, "
      f"pure_bf16 {finetuning.pure_bf16}, deepspeed {training.deepspeed or '-'}, fsdp {training.fsdp or '-'}, "
      f"liger {model.enable_liger_kernel}, packing {data.packing}; "
      f"dataset {datasets[0].dataset_name} ({datasets[0].formatting})"}))
''',
    "torchtune": '''
import json
from omegaconf import OmegaConf
from torchtune import config
cfg = OmegaConf.load("torchtune.yaml")
config.validate(cfg)
print(json.dumps({"detail": f"validated: {cfg.model._component_}, dataset {cfg.dataset._component_}, "
      f"dtype {cfg.dtype}, batch {cfg.batch_size} x accum {cfg.gradient_accumulation_steps}, activation "
      f"offloading {cfg.enable_activation_offloading}, packed {cfg.dataset.get('packed', False)}"}))
''',
}


def check(python: Path, trainer: str, directory: Path, gpus: int) -> tuple[bool, str, float]:
    """Run the trainer's loader on its file in `directory`: (accepted, the loader's message, seconds)."""
    import os

    script = directory / f".check_{trainer}.py"
    script.write_text(LOADERS[trainer])
    command = [str(python), str(script)]
    env = {**os.environ, "PLAN_GPUS": str(gpus), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if trainer == "llamafactory":  # as FORCE_TORCHRUN=1 launches it: one torchrun process on gloo
        command = [str(python), "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29517",
                   str(script)]
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, cwd=directory, env=env, timeout=600)
    seconds = time.perf_counter() - start
    for line in reversed(run.stdout.splitlines()):
        if line.startswith('{"detail"'):
            return run.returncode == 0, json.loads(line)["detail"], seconds
    import re

    errors = [re.sub(r"^\[rank\d+\]: ", "", ln) for ln in run.stderr.splitlines()]
    errors = [ln for ln in errors if re.match(r"[\w.]+(Error|Exception)\b", ln) and "ChildFailedError" not in ln]
    return False, (errors[-1] if errors else f"exit {run.returncode}")[:400], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venvs", default="/tmp", help="where the trainers' virtual environments are (default /tmp)")
    parser.add_argument("--only", default=",".join(PACKAGES), help="comma list of trainers to check")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "trainer-configs.md"))
    args = parser.parse_args()
    trainers = [t for t in args.only.split(",") if t]
    root = Path(tempfile.mkdtemp(prefix="memplan-emit-check-"))
    cases = emit_plans(root)
    installs, pythons = {}, {}
    for trainer in trainers:
        try:
            pythons[trainer] = _python(Path(args.venvs), trainer)
            installs[trainer] = _versions(pythons[trainer], trainer)
        except subprocess.CalledProcessError as err:
            installs[trainer] = {"error": f"install failed: {err}"}
    rows = []
    for case in cases:
        for config in case["configs"]:
            trainer = config["trainer"]
            if trainer not in pythons:
                continue
            if not config["config"]:
                rows.append((case["name"], trainer, "-", "not written", config["differences"][0], 0.0))
                continue
            ok, message, seconds = check(pythons[trainer], trainer, case["dir"], case["plan"]["gpus"])
            diffs = "; ".join(d.split(":")[0] for d in config["differences"])
            exact = "exact" if config["exact"] else f"nearest: {diffs}"
            rows.append((case["name"], trainer, config["config"], "accepted" if ok else "REFUSED",
                         f"{exact}. {message}", seconds))
            print(f"{case['name']} / {trainer}: {'accepted' if ok else 'REFUSED'}: {message}", flush=True)
    _write(Path(args.out), cases, installs, rows)


def _write(path: Path, cases: list[dict], installs: dict, rows: list[tuple]) -> None:
    lines = ["# The trainers' own loaders on the configs `memplan recommend --emit` writes", "",
             "`python benchmarks/trainer_configs_check.py` (this machine: no GPU; transformers' bf16-GPU check "
             "answered yes, as on the planned GPU). Each trainer in a virtual environment of its own, torch "
             "2.13.0 (CPU wheel).", "", "## Installed", "", "| trainer | packages |", "|---|---|"]
    for trainer, versions in installs.items():
        lines.append(f"| {trainer} | {', '.join(f'{k} {v}' for k, v in versions.items())} |")
    lines += ["", "All four install from PyPI next to the CPU torch, with two adjustments: llamafactory's torchvision "
              "and "
              "torchaudio are removed after the install (PyPI's wheels are CUDA builds that do not load against the "
              "CPU torch: `operator torchvision::nms does not exist`, `libc10_cuda.so: cannot open shared object "
              "file`; LLaMA-Factory needs them only for image, video and audio data), and torchtune 0.6.1 gets "
              f"torchao {TORCHAO} (it imports torchao.dtypes.nf4tensor, which torchao 0.18 no longer has). TRL's "
              "venv adds deepspeed, peft and bitsandbytes, LLaMA-Factory's deepspeed and torchtune's bitsandbytes, "
              "which the configs name; TRL's, axolotl's and LLaMA-Factory's add liger-kernel, which their loaders "
              "require for a config with Liger's kernels.", "", "## Plans", ""]
    for case in cases:
        p = case["plan"]
        lines.append(f"- {case['name']}: {p['method']}, {p['precision']}, {p['sharding']} ZeRO {p['zero']} offload "
                     f"{p['offload']}, {p['gpus']} GPU(s), micro-batch {p['micro_batch']} x {p['grad_accum']}, "
                     f"checkpointing {'on' if p['grad_ckpt'] else 'off'}, {p['optimizer']}, attn {p['attn']}, "
                     f"loss {p['loss']}, allocator {p['allocator']}, liger {','.join(p['liger']) or 'none'}, "
                     f"activation offloading {'on' if p['offload_activations'] else 'off'}, packing "
                     f"{'padding-free' if p['data']['padding_free'] else 'on' if p['data']['packing'] else 'off'}")
    lines += ["", "## Results", "", "| plan | trainer | file | loader | seconds | what the loader said |",
              "|---|---|---|---|---|---|"]
    for name, trainer, config, verdict, message, seconds in rows:
        lines.append(f"| {name} | {trainer} | {config} | {verdict} | {seconds:.1f} | {message.replace('|', '/')} |")
    accepted = sum(r[3] == "accepted" for r in rows)
    refused = sum(r[3] == "REFUSED" for r in rows)
    lines += ["", f"{accepted} accepted, {refused} refused, {sum(r[3] == 'not written' for r in rows)} not written "
                  "(no torchtune builder for the model).", ""]
    path.write_text("\n".join(lines))
    print(f"wrote {path}: {accepted} accepted, {refused} refused")


if __name__ == "__main__":
    main()
