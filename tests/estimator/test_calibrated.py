"""Models without a family module: activations calibrated by fake-tensor traces of their decoder layers.

Small configs of architectures nobody hand-coded (hidden 256, 3-4 layers, b 2, s 512): Cohere2 (parallel
attention and MLP, LayerNorm without bias, sliding and full layers with a 256 window, so SDPA gets a
mask), GLM-4 (sandwich norms, fused gate_up, partial rotary), Starcoder2 (LayerNorm with bias, biased
linears, a plain GELU MLP), EXAONE-4 (q/k norms, post-norms, sliding and full layers), Seed-OSS
(attention dropout 0.1 by default: PyTorch's CPU SDPA runs its math kernel), OLMo-2 (q/k norms over all
heads), Qwen3-MoE (fused expert stacks, a router module). The estimate (kernels="cpu") against the whole model's trace: every phase within -2 % ... +3 %.
The calibration cache is pointed at a temporary directory (MEMPLAN_CACHE_DIR).
"""

from __future__ import annotations

import json

import pytest

from memplan.catalog.spec import spec_from_config
from memplan.errors import UserError
from memplan.estimator import calibrated, estimate
from memplan.plan import Plan
from memplan.profile.trace import trace_training

from support import run_torch_free

SMALL = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=8192, pad_token_id=0, bos_token_id=1, eos_token_id=2)
COHERE2 = dict(SMALL, model_type="cohere2", num_hidden_layers=4, sliding_window=256,
               layer_types=["sliding_attention", "full_attention"] * 2)
GLM4 = dict(SMALL, model_type="glm4")
STARCODER2 = dict(SMALL, model_type="starcoder2")
EXAONE4 = dict(SMALL, model_type="exaone4", sliding_window=256,
               layer_types=["sliding_attention", "sliding_attention", "full_attention"])
SEED_OSS = dict(SMALL, model_type="seed_oss")
OLMO2 = dict(SMALL, model_type="olmo2")
OLMOE = dict(SMALL, model_type="olmoe", num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
             intermediate_size=128)

FULL_BF16 = dict(precision="bf16", grad_ckpt=False)
LORA_CKPT = dict(method="lora", precision="bf16", grad_ckpt=True)

CASES = [
    ("cohere2-full-bf16-sdpa-window-mask", COHERE2, dict(FULL_BF16, attn="sdpa")),
    ("cohere2-lora-sdpa", COHERE2, dict(method="lora", precision="bf16", grad_ckpt=False, attn="sdpa")),
    ("glm4-full-amp-eager", GLM4, dict(precision="amp-bf16", grad_ckpt=False, attn="eager")),
    ("glm4-lora-ckpt-sdpa", GLM4, dict(LORA_CKPT, attn="sdpa")),
    ("starcoder2-full-bf16-sdpa", STARCODER2, dict(FULL_BF16, attn="sdpa")),
    ("exaone4-lora-ckpt-eager", EXAONE4, dict(LORA_CKPT, attn="eager")),
    ("seed_oss-full-bf16-sdpa-math", SEED_OSS, dict(FULL_BF16, attn="sdpa")),
    ("olmo2-lora-q-v-amp", OLMO2, dict(method="lora", precision="amp-bf16", grad_ckpt=False, attn="sdpa",
                                       lora={"targets": "q_proj,v_proj", "rank": 8})),
    # peft wraps the fused expert stacks and the router (all-linear; its ParamWrapper takes no dropout)
    ("olmoe-lora-all-linear", OLMOE, dict(method="lora", precision="bf16", grad_ckpt=False,
                                          lora={"dropout": 0.0})),
]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMPLAN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _errors(config: dict, plan: Plan) -> dict[str, float]:
    est = estimate(spec_from_config(dict(config), config["model_type"]), plan, kernels="cpu")
    steady = trace_training(dict(config), plan, backend="trace").steady
    return {p: 100 * (est.phase_peaks[p] - getattr(steady, p)) / getattr(steady, p)
            for p in ("forward", "backward", "optimizer")}


@pytest.mark.parametrize("config, fields", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_phase_peaks_match_the_trace(config, fields):
    errors = _errors(config, Plan(micro_batch=2, seq_len=512, **fields))
    for phase, err in errors.items():
        assert -2.0 <= err <= 3.0, f"{phase}: {err:+.2f} %"


def test_other_sizes_reuse_the_calibration_without_torch(cache_dir):
    """The next estimate of the same class (another b, s) reads the cache: no torch, no transformers, and
    the same figures as in the process that calibrated."""
    plan = Plan(method="lora", precision="bf16", micro_batch=3, seq_len=1536)
    spec = spec_from_config(dict(GLM4), "glm4")
    estimate(spec, Plan(method="lora", precision="bf16", micro_batch=1, seq_len=600))  # calibrates the class
    here = estimate(spec, plan).phase_peaks
    out = run_torch_free("import json\n"
                         "from memplan.catalog.spec import spec_from_config\n"
                         "from memplan.estimator import estimate\n"
                         "from memplan.plan import Plan\n"
                         f"spec = spec_from_config({GLM4!r}, 'glm4')\n"
                         f"e = estimate(spec, Plan.model_validate_json({plan.model_dump_json()!r}))\n"
                         "print(json.dumps(e.phase_peaks))", cache_dir)
    assert json.loads(out) == here


def test_sizes_far_from_the_grid_match_the_trace():
    """The fitted forms extrapolate: b 4, s 2048 against the trace (the grid is b 1-2, s 256-768)."""
    errors = _errors(STARCODER2, Plan(method="lora", precision="bf16", micro_batch=4, seq_len=2048,
                                      grad_ckpt=False))
    for phase, err in errors.items():
        assert -2.0 <= err <= 3.0, f"{phase}: {err:+.2f} %"


def test_a_term_off_its_form_fails_loudly(monkeypatch):
    """A term that is not c0 + c1 s + c2 s^2 + b (c3 + c4 s + c5 s^2) misses the held-out point."""
    def cubic(spec, plan, keep, entry, points):
        return {(b, s): {"first": b * s ** 3, "shared": s, "norm": b * s, "inputs": 0, "layer:0": b * s}
                for b, s in points}

    monkeypatch.setattr(calibrated, "_trace", cubic)
    spec = spec_from_config(dict(GLM4), "glm4")
    with pytest.raises(UserError, match="calibration of 'first'.*misses the held-out trace"):
        estimate(spec, Plan(method="lora"))


def test_evaluate_is_exact_on_the_forms():
    fit = {"b": [1, 2], "s": [256, 512, 768], "values": {}}
    form = lambda b, s: 7 + 3 * s + s * s + b * (5 + 11 * s + 2 * s * s)  # noqa: E731
    fit["values"]["t"] = [[form(b, s) for s in fit["s"]] for b in fit["b"]]
    for b, s in [(1, 100), (8, 8192), (3, 4096)]:
        assert calibrated.evaluate(fit, "t", b, s) == form(b, s)


def test_plans_the_cpu_trace_cannot_tell_apart_share_one_class():
    """QLoRA is traced as LoRA, flash attention as SDPA, bf16-master as bf16, fp16 autocast as bf16's;
    checkpointing and the loss need no trace of their own. GPU-only plans (flash, amp-fp16) estimate."""
    spec = spec_from_config(dict(GLM4), "glm4")
    plans = [Plan(method=m, precision=p, attn=a, grad_ckpt=c, loss=loss)
             for m in ("lora", "qlora") for p in ("bf16", "bf16-master") for a in ("sdpa", "flash")
             for c in (True, False) for loss in ("standard", "chunked")]
    assert len({calibrated.class_key(spec, p) for p in plans}) == 1
    assert calibrated.class_key(spec, Plan(method="full", precision="bf16")) != calibrated.class_key(spec, plans[0])
    amp = {calibrated.class_key(spec, Plan(method="lora", precision=p)) for p in ("amp-bf16", "amp-fp16")}
    assert len(amp) == 1
    for p in (Plan(method="lora", precision="amp-fp16", attn="flash"), Plan(method="qlora", attn="flash")):
        assert estimate(spec, p).peak_allocated > 0


def test_profile_measures_a_calibrated_model(run_cli, tmp_path):
    """memplan profile builds the real model of a type without a family module and meets its estimate."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(EXAONE4, hidden_size=64, intermediate_size=128, vocab_size=512)))
    code, out, err = run_cli("profile", "--model", str(path), "--method", "lora", "--batch-size", "2",
                             "--seq-len", "64", "--backend", "cpu", "--steps", "2", "--json")
    assert code == 0, err
    (result,) = json.loads(out)["results"]
    assert all(-2.0 <= e <= 3.0 for e in result["phase_error_pct"].values()), result["phase_error_pct"]
