"""The estimate against traced training steps for a matrix of plans, written to benchmarks/results/.

    python benchmarks/accuracy.py [--out benchmarks/results/accuracy-trace.md] [--only SUBSTRING]

Measured = `memplan profile`'s measuring path (memplan.profile.run.measure): two optimizer steps of the
transformers model built from the preset's config, live bytes per phase on fake tensors (backend
"trace"), or on real CPU tensors (backend "cpu": bitsandbytes' 4-bit and 8-bit kernels cannot run on fake
tensors; those rows use a small config).
Estimated with kernels="cpu" (the trace runs CPU kernels; they differ from CUDA only where stated).
Rows are sorted by the worst per-phase error. The file is rewritten after every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL = dict(model_type="llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)

# Llama-4-Scout-17B-16E's text_config widths (its multimodal config.json on the hub), first 4 layers (3 with
# rotary and chunked attention, 1 NoPE), all MoE: 16 experts, top-1, a shared expert.
SCOUT_TEXT_4L = dict(model_type="llama4_text", hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
                     num_hidden_layers=4, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
                     num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1, vocab_size=202048,
                     attention_chunk_size=8192, use_qk_norm=True, attn_temperature_tuning=True, floor_scale=8192,
                     attn_scale=0.1, pad_token_id=200018, bos_token_id=200000, eos_token_id=200001,
                     tie_word_embeddings=False)

# Rows that are not a preset as it is: (preset whose config.json is the base, or None, and the keys replaced).
# The MoE models at full width with 4 layers (one dense, three sparse where the family has dense layers): a
# full-size trace of them is too large for CI; each layer kind's activations and states are the full-size ones.
# qwen2_moe / qwen3_moe: their config classes' defaults, written out (Qwen2MoeConfig: Qwen1.5-MoE-A2.7B's
# widths; Qwen3MoeConfig: Qwen3-30B-A3B's, but head_dim = hidden / heads = 64).
CONFIGS = {
    "small-llama": (None, SMALL),
    "deepseek-r1-4l": ("deepseek-r1", dict(num_hidden_layers=4, first_k_dense_replace=1)),
    "qwen2-moe-defaults-4l": (None, dict(model_type="qwen2_moe", vocab_size=151936, hidden_size=2048,
                                         intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16,
                                         num_hidden_layers=4, mlp_only_layers=[0])),
    "qwen3-moe-defaults-4l": (None, dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
                                         intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4,
                                         num_hidden_layers=4, norm_topk_prob=True)),
    "llama4-scout-text@4L": (None, SCOUT_TEXT_4L),
    # Architectures without a family module (memplan.catalog.traced + memplan.estimator.calibrated): the config
    # class's defaults, which transformers documents as a released model's shape (Starcoder2Config: StarCoder2-3B's
    # shape; Glm4Config: GLM-4-9B-0414's), and Cohere2's defaults (Command R's 35B widths, a 4096 window on three
    # layers of four) cut to 8 layers; calibrated by trace on first use (memplan's cache: MEMPLAN_CACHE_DIR).
    "starcoder2-defaults": (None, {"model_type": "starcoder2"}),
    "glm4-defaults": (None, {"model_type": "glm4"}),
    "cohere2-defaults-8-layers": (None, {"model_type": "cohere2", "num_hidden_layers": 8}),
}

MATRIX = [
    ("llama-2-7b", dict(precision="bf16", seq_len=512, grad_ckpt=False)),
    ("llama-2-7b", dict(precision="bf16", seq_len=512, grad_ckpt=False, optimizer="adamw-forloop")),
    ("llama-2-7b", dict(precision="bf16", seq_len=512, grad_ckpt=False, optimizer="adamw-fused")),
    ("llama-2-7b", dict(method="lora", precision="bf16", micro_batch=4, seq_len=2048)),
    ("llama-2-7b", dict(method="lora", precision="bf16", micro_batch=2, seq_len=4096,
                        lora={"rank": 64, "targets": "q_proj,v_proj"})),
    ("llama-2-7b", dict(precision="amp-bf16", seq_len=1024)),
    ("llama-2-7b", dict(precision="bf16-master", seq_len=1024)),
    ("llama-2-7b", dict(precision="fp32", seq_len=256, grad_ckpt=False, attn="eager")),
    ("llama-3-8b", dict(precision="bf16", seq_len=2048)),
    ("llama-3-8b", dict(method="lora", precision="bf16", seq_len=8192, loss="chunked")),
    ("llama-3-8b", dict(method="lora", precision="bf16", micro_batch=2, seq_len=2048, grad_ckpt=False)),
    ("llama-3-8b", dict(method="lora", precision="amp-bf16", seq_len=1024, grad_ckpt=False, attn="eager")),
    ("mistral-7b", dict(precision="bf16", micro_batch=2, seq_len=1024, grad_accum=4)),
    ("mistral-7b", dict(method="lora", precision="bf16", micro_batch=16, seq_len=256, grad_ckpt=False)),
    ("qwen2.5-0.5b", dict(precision="bf16", micro_batch=16, seq_len=512, grad_ckpt=False)),
    ("qwen2.5-0.5b", dict(precision="amp-bf16", micro_batch=4, seq_len=2048, grad_accum=2)),
    ("qwen2.5-0.5b", dict(precision="bf16", micro_batch=4, seq_len=512, grad_ckpt=False, optimizer="sgd")),
    ("qwen2.5-1.5b", dict(method="lora", precision="bf16", micro_batch=8, seq_len=1024, grad_ckpt=False,
                          lora={"rank": 8, "dropout": 0.1})),
    ("qwen2.5-7b", dict(method="lora", precision="bf16", seq_len=4096)),
    ("qwen2.5-14b", dict(method="lora", precision="bf16", seq_len=2048)),
    # Qwen2_5_VLForConditionalGeneration on a text-only batch, its vision tower frozen (b 2: cos/sin per sequence)
    ("qwen2.5-vl-7b", dict(method="lora", precision="bf16", micro_batch=2, seq_len=2048)),
    ("llama-2-13b", dict(method="lora", precision="bf16", micro_batch=2, seq_len=2048)),
    ("llama-2-70b", dict(method="lora", precision="bf16", seq_len=1024)),
    ("llama-3.2-1b", dict(precision="fp32", micro_batch=2, seq_len=1024, grad_ckpt=False)),
    ("llama-3.2-3b", dict(precision="bf16", micro_batch=4, seq_len=1024)),
    ("tinyllama-1.1b", dict(precision="amp-bf16", micro_batch=8, seq_len=512, grad_ckpt=False)),
    ("tinyllama-1.1b", dict(method="lora", precision="bf16", micro_batch=2, seq_len=2048, grad_ckpt=False,
                            attn="eager")),
    ("gemma-2b", dict(method="lora", precision="bf16", micro_batch=2, seq_len=1024)),
    ("gemma-2-2b", dict(method="lora", precision="bf16", seq_len=1024, attn="eager")),
    ("phi-3-mini", dict(precision="bf16", seq_len=1024)),
    ("mixtral-8x7b", dict(method="lora", precision="bf16", seq_len=512, lora={"dropout": 0.0})),
    ("mixtral-8x7b", dict(method="lora", precision="bf16", micro_batch=2, seq_len=1024,
                          lora={"targets": "q_proj,k_proj,v_proj,o_proj"})),
    ("gpt2", dict(precision="fp32", micro_batch=8, seq_len=1024, grad_ckpt=False)),
    ("opt-1.3b", dict(method="lora", precision="bf16", micro_batch=4, seq_len=1024, grad_ckpt=False)),
    ("qwen2.5-0.5b", dict(precision="bf16", micro_batch=4, seq_len=512, grad_ckpt=False, optimizer="adafactor")),
    ("qwen3-0.6b", dict(precision="bf16", micro_batch=4, seq_len=1024, grad_ckpt=False)),
    ("qwen3-1.7b", dict(method="lora", precision="bf16", micro_batch=4, seq_len=2048)),
    ("olmo-2-7b", dict(method="lora", precision="bf16", micro_batch=4, seq_len=512, grad_ckpt=False)),
    ("gemma-3-1b", dict(precision="bf16", micro_batch=2, seq_len=1024, grad_ckpt=False)),
    ("gemma-3-1b", dict(method="lora", precision="amp-bf16", micro_batch=4, seq_len=2048, attn="eager")),
    ("smollm3-3b", dict(method="lora", precision="bf16", micro_batch=2, seq_len=2048, grad_ckpt=False)),
    ("granite-3.3-8b", dict(precision="bf16", seq_len=1024)),
    ("granite-3.3-8b", dict(method="lora", precision="bf16", micro_batch=2, seq_len=2048)),
    ("small-llama", dict(method="qlora", precision="bf16", micro_batch=2, seq_len=256, grad_ckpt=False), "cpu"),
    ("small-llama", dict(method="qlora", precision="bf16", micro_batch=2, seq_len=256), "cpu"),
    ("small-llama", dict(precision="bf16", micro_batch=2, seq_len=256, grad_ckpt=False, optimizer="adamw-8bit"),
     "cpu"),
    ("deepseek-r1-4l", dict(method="lora", precision="bf16", seq_len=2048, lora={"dropout": 0.0})),
    ("deepseek-r1-4l", dict(precision="bf16", seq_len=1024, grad_ckpt=False)),
    ("qwen2-moe-defaults-4l", dict(precision="bf16", micro_batch=4, seq_len=2048, grad_ckpt=False)),
    ("qwen2-moe-defaults-4l", dict(method="lora", precision="bf16", micro_batch=4, seq_len=2048,
                                   lora={"dropout": 0.0})),
    ("qwen3-moe-defaults-4l", dict(precision="bf16", micro_batch=4, seq_len=2048, grad_ckpt=False)),
    ("qwen3-moe-defaults-4l", dict(method="lora", precision="bf16", micro_batch=4, seq_len=2048,
                                   lora={"dropout": 0.0})),
    # GPT-OSS at its true widths, cut to its first 4 layers (2 sliding, 2 full); eager: it has no SDPA path
    ("gpt-oss-20b@4L", dict(precision="bf16", seq_len=1024, grad_ckpt=False, attn="eager")),
    ("gpt-oss-20b@4L", dict(method="lora", precision="bf16", seq_len=2048, grad_ckpt=False, attn="eager")),
    ("llama4-scout-text@4L", dict(precision="bf16", seq_len=2048, grad_ckpt=False)),
    ("llama4-scout-text@4L", dict(method="lora", precision="bf16", seq_len=8192)),
    ("starcoder2-defaults", dict(method="lora", precision="amp-bf16", micro_batch=4, seq_len=2048, grad_ckpt=False)),
    ("glm4-defaults", dict(method="lora", precision="bf16", micro_batch=2, seq_len=2048)),
    ("cohere2-defaults-8-layers", dict(method="lora", precision="bf16", seq_len=8192, grad_ckpt=False)),
]


def run_case(preset: str, fields: dict, backend: str) -> dict:
    from memplan.catalog.presets import models_dir
    from memplan.catalog.resolve import resolve_model
    from memplan.catalog.spec import spec_from_config
    from memplan.estimator import estimate
    from memplan.plan import Plan
    from memplan.profile.run import measure

    if preset in CONFIGS:
        base, over = CONFIGS[preset]
        config = json.loads((models_dir() / base / "config.json").read_text()) if base else {}
        config.update(over)
        spec = spec_from_config(dict(config), preset)
    elif "@" in preset:  # "<preset>@<N>L": the preset's first N layers (its widths, fewer layers)
        base, _, layers = preset.partition("@")
        config = truncated(json.loads((models_dir() / base / "config.json").read_text()), int(layers.rstrip("L")))
        spec = spec_from_config(dict(config), preset)
    else:
        config = json.loads((models_dir() / preset / "config.json").read_text())
        spec = resolve_model(preset)
    plan = Plan(model=preset, **fields)
    est = estimate(spec, plan, kernels="cpu")
    t0 = time.perf_counter()
    trace = measure(config, plan, backend=backend, steps=2)
    seconds = time.perf_counter() - t0
    steady = trace.steady
    phases = {p: (est.phase_peaks[p], getattr(steady, p)) for p in ("forward", "backward", "optimizer")}
    errs = {p: 100 * (e - m) / m for p, (e, m) in phases.items()}
    peak_phase = max(phases, key=lambda p: phases[p][1])
    at_peak = steady.breakdown[peak_phase]
    act_frac = (at_peak["activations"] + at_peak["logits_loss"]) / phases[peak_phase][1]
    return dict(preset=preset, plan=fields, backend=backend, phases=phases, errs=errs, seconds=seconds,
                peak_error=100 * (est.peak_allocated - trace.peak) / trace.peak, act_frac=act_frac,
                estimate_peak=est.peak_allocated, trace_peak=trace.peak)


def truncated(config: dict, layers: int) -> dict:
    """`config` with only its first `layers` decoder layers (and their layer_types)."""
    out = dict(config, num_hidden_layers=layers)
    if isinstance(config.get("layer_types"), list):
        out["layer_types"] = config["layer_types"][:layers]
    return out


def write(rows: list[dict], out: Path, failures: list[str]) -> None:
    rows = sorted(rows, key=lambda r: -max(abs(e) for e in r["errs"].values()))
    lines = [
        "# memplan estimate vs traced training steps",
        "",
        "Written by `benchmarks/accuracy.py`. Measured: `memplan profile`'s measuring path, two optimizer "
        "steps (forward, loss, backward, optimizer, zero_grad), steady-state live bytes per phase; `trace` = "
        "fake tensors at full size (`-4l` rows: the model at full width, 4 layers), `cpu` = real CPU tensors "
        "(bitsandbytes kernels; a 4-layer h512 Llama). "
        "error % = 100 x (estimate - measured) / measured. act = share of activations (incl. logits) at "
        "the measured peak.",
        "",
        "| model | plan | backend | measured peak GiB | estimate GiB | peak error % | forward % | backward % "
        "| optimizer % | act | trace s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        plan = ", ".join(f"{k}={v}" for k, v in r["plan"].items())
        e = r["errs"]
        lines.append(f"| {r['preset']} | {plan} | {r['backend']} | {r['trace_peak'] / 2**30:.3f} | "
                     f"{r['estimate_peak'] / 2**30:.3f} | {r['peak_error']:+.2f} | {e['forward']:+.2f} | "
                     f"{e['backward']:+.2f} | {e['optimizer']:+.2f} | {r['act_frac']:.2f} | {r['seconds']:.0f} |")
    worst = max((abs(e) for r in rows for e in r["errs"].values()), default=0.0)
    under = min((e for r in rows for e in r["errs"].values()), default=0.0)
    lines += ["", f"{len(rows)} plans; worst per-phase |error| {worst:.2f} %; most negative {under:+.2f} %; "
              f"{sum(r['act_frac'] >= 0.4 for r in rows)} with activations >= 40 % of the peak."]
    if failures:
        lines += ["", "Not measured:"] + [f"- {f}" for f in failures]
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "accuracy-trace.md"))
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    rows, failures = [], []
    for case in MATRIX:
        preset, fields = case[0], case[1]
        backend = case[2] if len(case) > 2 else "trace"
        if args.only and args.only not in preset:
            continue
        try:
            r = run_case(preset, fields, backend)
        except Exception as err:  # keep the matrix going; the failure is listed in the file
            failures.append(f"{preset} {fields}: {type(err).__name__}: {str(err)[:200]}")
            print("FAILED", preset, fields, err, flush=True)
            continue
        rows.append(r)
        print(f"{preset:14} {fields} " + " ".join(f"{p[:3]} {e:+.2f}%" for p, e in r["errs"].items())
              + f" ({r['seconds']:.0f}s)", flush=True)
        write(rows, Path(args.out), failures)


if __name__ == "__main__":
    main()
