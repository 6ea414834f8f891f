"""Measure real training steps on a CUDA GPU and compare them with memplan's estimate, plan by plan.

Run by benchmarks/gpu_check.sh on a machine with one GPU. For each plan: build the HF model from the
preset's config (random weights; memory does not depend on their values), apply the plan exactly as the
fake-tensor tracer does (memplan.trace), run 3 optimizer steps on random tokens, and record per phase
`torch.cuda.max_memory_allocated` (peaks reset between phases), the reserved peak and NVML's used memory.
Each result is appended to a JSONL file as soon as it is measured, so a cut-off run still leaves data.

    python benchmarks/gpu_check.py OUT.jsonl [case-index ...]
"""

from __future__ import annotations

import gc
import json
import os
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
]


def _nvml_used() -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or 0))
        return int(pynvml.nvmlDeviceGetMemoryInfo(h).used)
    except Exception:
        return None


def measure(preset: str, fields: dict, steps: int = 3) -> dict:
    import torch

    from memplan import trace as tr
    from memplan.models import models_dir
    from memplan.plan import Plan

    plan = Plan(model=preset, **fields)
    config = tr._resolve_config(json.loads((models_dir() / preset / "config.json").read_text()))
    vocab = config.vocab_size
    if plan.method == "qlora":
        model, hf_model = _qlora_on_gpu(tr, config, plan)
    else:
        with torch.device("meta"):
            hf_model = tr._from_config(config, plan)
            if plan.grad_ckpt:
                tr._enable_checkpointing(hf_model)
            model = tr._apply_lora(hf_model, plan) if plan.method == "lora" else hf_model
        model.to_empty(device="cuda")
        hf_model.tie_weights()
        for module in hf_model.modules():  # to_empty gave new storage: let HF initialize all of it
            if hasattr(module, "_is_hf_initialized"):
                del module._is_hf_initialized
        hf_model.initialize_weights()
        hf_model.tie_weights()
    model.train()
    torch.cuda.synchronize()
    after_load = torch.cuda.memory_allocated()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(plan, params)
    dtype = tr._AUTOCAST_DTYPE.get(plan.precision)
    out = {"steps": []}
    for _ in range(steps):
        peaks = {}
        for _ in range(plan.grad_accum):
            ids = torch.randint(0, vocab, (plan.micro_batch, plan.seq_len), device="cuda")
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
            with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                loss = tr._loss(model, plan, ids, getattr(config, "final_logit_softcapping", None))
            loss = loss / plan.grad_accum
            torch.cuda.synchronize(); peaks["forward"] = max(peaks.get("forward", 0), torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            loss.backward()
            del loss, ids
            torch.cuda.synchronize(); peaks["backward"] = max(peaks.get("backward", 0), torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(); peaks["optimizer"] = torch.cuda.max_memory_allocated()
        peaks["reserved"] = torch.cuda.max_memory_reserved()
        peaks["nvml_used"] = _nvml_used()
        out["steps"].append(peaks)
    out["after_load"] = after_load
    del opt, model, hf_model, params
    return out


def _qlora_on_gpu(tr, config, plan):
    """A random model saved in the 16-bit dtype and loaded back 4-bit (NF4, double quant) onto the GPU."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = tr._WEIGHT_DTYPE[plan.precision]
    with torch.device("cuda"):
        random_model = tr._from_config(config, plan)
    with tempfile.TemporaryDirectory() as tmp:
        random_model.save_pretrained(tmp)
        del random_model
        torch.cuda.empty_cache()
        hf_model = AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype),
            dtype=dtype, attn_implementation="sdpa" if plan.attn == "flash" else plan.attn,
            device_map={"": 0}, local_files_only=True)
    if plan.grad_ckpt:
        tr._enable_checkpointing(hf_model)
    return tr._apply_lora(hf_model, plan), hf_model


def _optimizer(plan, params):
    from memplan import trace as tr

    factory = tr._optimizer_factory(plan)
    if plan.precision == "bf16-master":
        return tr._MasterWeightsOptimizer(params, factory, lambda g: None)
    return factory(params)


def main() -> None:
    import torch
    import transformers

    from memplan.estimator import estimate
    from memplan.models import resolve_model
    from memplan.plan import Plan

    out_path = Path(sys.argv[1])
    picks = {int(a) for a in sys.argv[2:]}
    torch.cuda.init()
    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    header = {
        "torch": torch.__version__, "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(), "total_memory": torch.cuda.get_device_properties(0).total_memory,
        "context_nvml_used": _nvml_used(), "context_reserved": torch.cuda.memory_reserved(),
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
               "estimate_reserved": est.reserved, "estimate_total": est.total}
        try:
            row["measured"] = measure(preset, fields)
        except torch.cuda.OutOfMemoryError as err:
            row["error"] = f"out of memory: {str(err)[:200]}"
        except Exception as err:  # record and go on: one broken case must not lose the others
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
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
