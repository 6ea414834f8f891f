"""memplan recommend: the decision tree (one test per leaf), the search, the time model, hyperparameters,
data counting, no-fit and bad-input exit codes, --json shape, --plot."""

import json
import math

import pytest

from memplan.catalog.resolve import resolve_model
from memplan.estimator import estimate
from memplan.plan import build_plan
from memplan.recommend import hardware, throughput
from memplan.recommend import hparams as hp
from memplan.recommend.tree import load_tree


def recommend_json(run_cli, *args):
    code, out, err = run_cli("recommend", *args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def no_local_gpu(monkeypatch):
    """Plan for this machine's CPU even where CI has a GPU."""
    import memplan.catalog.gpus

    monkeypatch.setattr(memplan.catalog.gpus, "local_gpus", lambda: [])


@pytest.fixture
def tiny_model(tmp_path):
    """A 2-layer Llama config with a word-level tokenizer (tokenizers), and a JSONL set of known lengths."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(200)]
    vocab = {w: i for i, w in enumerate(["[UNK]"] + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True)))
    # text examples of 10, 20, ..., 200 words: 20 examples
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(words[:n])}) + "\n" for n in range(10, 201, 10)))
    return model_dir, data


# ------------------------------------------------------------------------------------ the tree, one test per leaf

GPU4 = ("--model", "llama-2-7b", "--gpu", "a100-80gb", "--gpus", "4")
GPU1_24 = ("--model", "llama-2-7b", "--gpu", "rtx4090-24gb", "--gpus", "1")


def test_leaf_low_domain_shift_gives_lora(run_cli):
    out = recommend_json(run_cli, *GPU4, "--dataset-size", "50000")
    assert [d["answer"] for d in out["decision"]] == ["no", "lora"]
    assert out["decision"][0]["reason"] == "domain shift low"
    assert out["plan"]["method"] == "lora"
    assert any("domain shift low" in a for a in out["assumptions"])  # the default is said out loud


def test_leaf_low_domain_shift_falls_back_to_qlora_when_lora_does_not_fit(run_cli):
    out = recommend_json(run_cli, "--model", "llama-2-13b", "--gpu", "rtx4090-24gb", "--dataset-size", "50000")
    assert out["plan"]["method"] == "qlora"
    assert "QLoRA fits" in out["decision"][-1]["reason"] and "LoRA " in out["decision"][-1]["reason"]


def test_leaf_high_shift_with_compute_gives_full_ft(run_cli):
    out = recommend_json(run_cli, *GPU4, "--dataset-size", "50000", "--domain-shift", "high", "--max-hours", "100")
    assert [d["answer"] for d in out["decision"]] == ["yes", "yes", "full"]
    assert "fits" in out["decision"][1]["reason"] and "GiB" in out["decision"][1]["reason"]
    assert out["plan"]["method"] == "full"
    assert out["plan"]["hparams"]["lr"] == hp.LR_HIGH_SHIFT["full"]  # forgetting guard: lower LR
    assert out["plan"]["hparams"]["early_stopping_patience"] == hp.PATIENCE_HIGH_SHIFT


def test_high_shift_without_replay_warns_and_names_only_the_guards_still_on(run_cli):
    default = recommend_json(run_cli, *GPU4, "--dataset-size", "50000", "--domain-shift", "high", "--max-hours", "100")
    given = recommend_json(run_cli, *GPU4, "--dataset-size", "50000", "--domain-shift", "high", "--max-hours", "100",
                           "--lr", "1e-4")
    (warn_default,) = [w for w in default["warnings"] if "without --replay" in w]
    (warn_given,) = [w for w in given["warnings"] if "without --replay" in w]
    assert "lower learning rate" in warn_default and "early stopping" in warn_default
    assert "lower learning rate" not in warn_given and "early stopping" in warn_given  # --lr replaced it


def test_leaf_high_shift_without_compute_and_many_samples_gives_qlora(run_cli):
    out = recommend_json(run_cli, *GPU1_24, "--dataset-size", "50000", "--domain-shift", "high")
    assert [d["answer"] for d in out["decision"]] == ["yes", "no", "yes", "qlora"]
    assert "does not fit" in out["decision"][1]["reason"]
    assert out["plan"]["method"] == "qlora"


def test_leaf_high_shift_without_compute_and_few_samples_gives_lora(run_cli):
    out = recommend_json(run_cli, *GPU1_24, "--dataset-size", "3000", "--domain-shift", "high")
    assert [d["answer"] for d in out["decision"]] == ["yes", "no", "no", "lora"]
    assert out["decision"][2]["reason"] == "3,000 training samples <= 10,000"
    assert out["plan"]["method"] == "lora"


def test_time_budget_decides_enough_compute(run_cli):
    out = recommend_json(run_cli, *GPU4, "--dataset-size", "50000", "--domain-shift", "high", "--max-hours", "1")
    assert out["decision"][1]["answer"] == "no"
    assert "> --max-hours 1" in out["decision"][1]["reason"]
    assert out["plan"]["method"] == "qlora"


def test_forced_method_skips_the_tree_and_checklist_warns(run_cli):
    out = recommend_json(run_cli, *GPU4, "--dataset-size", "3000", "--method", "full")
    assert out["decision"] == [{"question": "Which method?", "answer": "full",
                                "reason": "--method full given: the decision tree is skipped"}]
    warnings = "\n".join(out["warnings"])
    assert "10K samples or fewer" in warnings and "close to pre-training" in warnings


def test_tree_file_is_checked_when_loaded(tmp_path):
    tree = load_tree()
    assert set(tree.leaves) == {"adapters_default", "full", "qlora", "lora"}
    bad = tmp_path / "tree.yaml"
    bad.write_text("root: a\nnodes:\n  a: {question: q, test: nope, 'yes': x, 'no': x}\nleaves:\n  x: {label: X, why: w, methods: [lora]}\n")
    with pytest.raises(ValueError, match="unknown test 'nope'"):
        load_tree(bad)


def test_explain_marks_the_path(run_cli):
    code, out, _ = run_cli("recommend", *GPU1_24, "--dataset-size", "50000", "--domain-shift", "high", "--explain")
    assert code == 0
    marked = [line for line in out.splitlines() if line.lstrip().startswith(">>")]
    assert len(marked) == 4  # three questions and the leaf
    assert "QLoRA (cost-effective)   <== recommended" in marked[-1]


# ------------------------------------------------------------------------------------ the plan

def test_json_shape_and_plan_consistency(run_cli):
    out = recommend_json(run_cli, *GPU4, "--dataset-size", "50000", "--effective-batch", "64")
    assert {"plan", "decision", "estimate", "alternatives", "files"} <= set(out)
    assert all(set(d) == {"question", "answer", "reason"} for d in out["decision"])
    plan = build_plan(out["plan"])
    assert plan.effective_batch == 64 and plan.world_size == 4
    assert out["estimate"]["total_bytes"] <= 0.9 * out["estimate"]["gpu_memory_bytes"]  # the 10 % headroom
    assert out["alternatives"] and all({"plan", "why_not"} <= set(a) for a in out["alternatives"])
    assert any(not a["fits"] and "GiB usable" in a["why_not"] for a in out["alternatives"]) or \
        all(a["fits"] for a in out["alternatives"])
    # as memplan train counts: whole micro-batches per epoch, then accumulation
    steps = math.ceil(3 * (50000 // (plan.micro_batch * 4)) / plan.grad_accum)
    assert out["time"]["optimizer_steps"] == steps
    assert out["time"]["hours"] == pytest.approx(steps * out["time"]["step_s"] / 3600)
    assert out["plan"]["hparams"]["warmup_steps"] == hp.warmup_steps(steps)


def test_headroom_flag_changes_what_fits(run_cli):
    tight = recommend_json(run_cli, *GPU4, "--dataset-size", "50000", "--method", "full", "--headroom", "0.3")
    assert tight["estimate"]["total_bytes"] <= 0.7 * tight["estimate"]["gpu_memory_bytes"]
    loose = recommend_json(run_cli, *GPU4, "--dataset-size", "50000", "--method", "full", "--headroom", "0")
    assert loose["estimate"]["total_bytes"] > tight["estimate"]["total_bytes"]


def test_priority_memory_picks_the_smallest_plan(run_cli):
    out = recommend_json(run_cli, *GPU4, "--dataset-size", "50000", "--method", "full", "--priority", "memory")
    others = [a["total_bytes"] for a in out["alternatives"] if a["fits"]]
    assert all(out["estimate"]["total_bytes"] <= t for t in others)


def test_equal_times_prefer_a_plan_that_keeps_its_cache_and_the_recommended_accumulation(run_cli):
    """Qwen3-8B LoRA on a 24 GB card: one sequence per micro-batch with the standard loss fits only once the
    allocator releases its cache, and needs 32 accumulation steps; two per micro-batch with the chunked loss fit
    with the cache kept, in 16 steps, in the same time. The second is recommended."""
    out = recommend_json(run_cli, "--model", "Qwen/Qwen3-8B", "--gpu", "rtx4090-24gb", "--dataset-size", "20000",
                         "--seq-len", "2048")
    plan = build_plan(out["plan"])
    lo, hi = hp.ACCUM_RANGE
    assert (plan.method, plan.micro_batch, plan.loss) == ("lora", 2, "chunked")
    assert lo <= plan.grad_accum <= hi
    target = hardware.gpu_target("rtx4090-24gb", None, 1, 1, 0.10)
    spec = resolve_model("qwen3-8b")
    assert estimate(spec, plan).total <= target.usable_bytes
    simpler = estimate(spec, plan.model_copy(update={"micro_batch": 1, "grad_accum": 32, "loss": "standard",
                                                      "allocator": "default"}))
    assert simpler.cache_releases(target.usable_bytes) != (0, 0)


def test_no_plan_fits_exits_1_and_says_what_would(run_cli):
    code, out, _ = run_cli("recommend", "--model", "llama-2-70b", "--method", "full", "--gpu-memory", "24GiB",
                           "--dataset-size", "1000")
    assert code == 1
    assert "no plan fits" in out and "what would fit instead" in out
    # every plan is over the host's 128 GiB, not the GPU's 24: more host RAM helps, a bigger GPU does not; more
    # GPUs are offered with the RAM their nodes would have
    assert "--host-memory 720GiB" in out and "a GPU with at least" not in out
    assert "8 GPUs: DeepSpeed ZeRO-3 without offload needs" in out and "of host RAM per node of 1024 GiB" in out


@pytest.mark.parametrize("args, message", [
    (("--model", "llama-2-7b", "--gpu", "h100"), "give --data FILE.jsonl or --dataset-size"),
    (("--model", "llama-2-7b", "--gpu", "h100", "--dataset-size", "0"), "--dataset-size 0"),
    (("--model", "llama-2-7b", "--gpu", "h100", "--dataset-size", "9", "--nodes", "0"), "--nodes 0"),
    (("--model", "llama-2-7b", "--gpu", "h100", "--gpu-memory", "24GiB", "--dataset-size", "9"), "either --gpu"),
    (("--model", "llama-2-7b", "--gpu", "h100", "--dataset-size", "9", "--headroom", "1.5"), "--headroom"),
    (("--model", "llama7b", "--gpu", "h100", "--dataset-size", "9"), "unknown model"),
])
def test_bad_input_exits_2(run_cli, args, message):
    code, _, err = run_cli("recommend", *args)
    assert code == 2 and message in err


def test_malformed_data_line_names_file_and_line(run_cli, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "ok"}\n{"text": \n')
    code, _, err = run_cli("recommend", "--model", "llama-2-7b", "--gpu", "h100", "--data", str(data))
    assert code == 2 and f"{data}:2: malformed JSON" in err


# ------------------------------------------------------------------------------------ data, CPU, plot

def test_data_token_counting_with_the_models_tokenizer(run_cli, tiny_model, no_local_gpu):
    model_dir, data = tiny_model
    out = recommend_json(run_cli, "--model", str(model_dir), "--data", str(data))
    d = out["data"]
    assert d["examples"] == 20 and d["format"] == "text" and "tokenizer" in d["tokenizer"]
    # 10..200 words, one token each; nearest-rank p95 of 20 values = the 19th = 190; p50 = the 10th = 100
    assert (d["tokens_p50"], d["tokens_p95"], d["tokens_max"]) == (100, 190, 200)
    assert out["plan"]["seq_len"] == 192  # p95 rounded up to 64
    assert out["samples"] == 20 - 4  # the validation split is held out: 20 % of a set this small
    assert any("longer than 192 tokens" in w for w in out["warnings"])


def test_data_token_counting_renders_conversations_as_train_does(run_cli, tiny_model, no_local_gpu, tmp_path):
    model_dir, _ = tiny_model
    data = tmp_path / "alpaca.jsonl"
    data.write_text(json.dumps({"instruction": "w1 w2", "input": "w3", "output": "w4"}) + "\n"
                    + json.dumps({"instruction": "w1", "output": "w2 w3"}) + "\n")
    out = recommend_json(run_cli, "--model", str(model_dir), "--data", str(data))
    # memplan's default chat template: "### User:\n{prompt}\n\n### Assistant:\n{answer}" (no bos/eos here);
    # whitespace words: "###", "User:", w1, w2, w3, "###", "Assistant:", w4 = 8; the second record: 7
    assert (out["data"]["tokens_p50"], out["data"]["tokens_max"]) == (7, 8)
    assert out["data"]["format"] == "alpaca"


def test_data_token_counting_approximation_without_tokenizer(run_cli, tiny_model):
    _, data = tiny_model
    out = recommend_json(run_cli, "--model", "llama-2-7b", "--gpu", "h100", "--data", str(data))
    longest = len(" ".join(f"w{i}" for i in range(200)))
    assert out["data"]["tokens_max"] == math.ceil(longest / 4)
    assert "approximation" in out["data"]["tokenizer"]


def test_cpu_plan_without_gpu(run_cli, tiny_model, no_local_gpu):
    model_dir, data = tiny_model
    code, text, _ = run_cli("recommend", "--model", str(model_dir), "--gpus", "1", "--data", str(data))
    assert code == 0 and "this machine's CPU" in text and "(--gpus 1 counts CPU processes here)" in text
    out = recommend_json(run_cli, "--model", str(model_dir), "--gpus", "1", "--data", str(data))
    assert out["plan"]["device"] == "cpu" and out["target"]["device"] == "cpu"
    assert out["plan"]["precision"] in ("fp32", "amp-bf16", "bf16")
    assert out["plan"]["sharding"] == "ddp" and out["plan"]["offload"] == "none"
    assert all(a["plan"]["precision"] in ("fp32", "amp-bf16", "bf16") for a in out["alternatives"])


def test_plot_writes_a_png(run_cli, tmp_path):
    png = tmp_path / "plans.png"
    code, _, err = run_cli("recommend", *GPU4, "--dataset-size", "50000", "--plot", str(png))
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


# ------------------------------------------------------------------------------------ the time model, hand-worked

def test_attention_flops_of_latent_attention():
    """DeepSeek's q/k head dim (128 + 64) differs from its v head dim (128): scores and weighted sum apart."""
    spec = resolve_model("deepseek-r1")
    decoder, _ = throughput.matmul_params(spec)
    fwd_dec, _ = throughput.forward_flops_per_token(spec, 2048)
    assert fwd_dec == 2 * decoder + 2 * 61 * 2048 * 128 * (192 + 128)


def test_flops_per_token_hand_worked():
    spec = resolve_model("llama-2-7b")
    decoder, head = throughput.matmul_params(spec)
    assert head == 32000 * 4096  # untied lm_head
    assert decoder == spec.params_layers
    fwd_dec, fwd_head = throughput.forward_flops_per_token(spec, 2048)
    assert fwd_dec == 2 * decoder + 4 * 32 * 2048 * 32 * 128
    full = build_plan(dict(method="full", grad_ckpt=False, attn="eager"))  # eager: every score computed
    assert throughput.train_flops_per_token(spec, full) == 3 * (fwd_dec + fwd_head)
    # checkpointing: one more forward of the decoder
    ckpt = full.model_copy(update={"grad_ckpt": True})
    assert throughput.train_flops_per_token(spec, ckpt) == 4 * fwd_dec + 3 * fwd_head
    lora = build_plan(dict(method="lora", precision="bf16", grad_ckpt=False, attn="eager"))
    assert throughput.train_flops_per_token(spec, lora) == 2 * (fwd_dec + fwd_head)


def test_causal_attention_kernels_skip_the_masked_half():
    """flash-attention, and SDPA given no mask, skip the blocks above the diagonal: a token attends to (s + 1) / 2
    positions on average. Eager attention and SDPA with a packed-rows mask compute all s x s; a padding-free row
    under SDPA is one row of b x s tokens with its mask over all of them."""
    spec = resolve_model("llama-2-7b")
    decoder, head = throughput.matmul_params(spec)
    all_scores = 4 * 32 * 4096 * 32 * 128  # 2 x 2 x layers x seq x heads x head_dim

    def forward(**fields):
        return throughput.train_flops_by_pass(spec, build_plan(dict(method="full", seq_len=4096, **fields)))["forward"]

    assert forward(attn="eager") == 2 * decoder + all_scores + 2 * head
    half = 2 * decoder + all_scores * (4096 + 1) / 2 / 4096 + 2 * head
    assert forward(attn="flash") == forward(attn="sdpa") == pytest.approx(half)
    assert forward(attn="flash", data={"packing": True}) == pytest.approx(half)  # varlen: per sequence
    assert forward(attn="sdpa", data={"packing": True}) == forward(attn="eager")
    assert forward(attn="sdpa", micro_batch=4, data={"padding_free": True}) == 2 * decoder + 4 * all_scores + 2 * head


def _gpu_step(gpu: str, **fields):
    from memplan.estimator import estimate
    from memplan.recommend.hardware import gpu_target

    spec = resolve_model(fields.pop("model", "llama-2-7b"))
    plan = build_plan(dict(device="cuda", **fields))
    target = gpu_target(gpu, None, plan.gpus, plan.nodes, 0.1)
    trainable = estimate(spec, plan).params_trainable
    return throughput.step_time(spec, plan, target, trainable), target, trainable, spec


def test_gpu_optimizer_step_is_the_bytes_it_moves_over_the_memory_bandwidth():
    fused, target, n, _ = _gpu_step("h100-80gb", method="full", precision="bf16", optimizer="adamw-fused")
    assert target.memory_bytes_s == 3350e9
    assert fused.terms["optimizer"] == pytest.approx(n * 7 * 2 / 3350e9)  # read p, g, m, v; write p, m, v
    foreach, *_ = _gpu_step("h100-80gb", method="full", precision="bf16", optimizer="adamw")
    assert foreach.terms["optimizer"] == pytest.approx(n * 18 * 2 / 3350e9)  # 8 kernels a tensor (no decay)
    decayed, *_ = _gpu_step("h100-80gb", method="full", precision="bf16", optimizer="adamw",
                            hparams={"weight_decay": 0.1})
    assert decayed.terms["optimizer"] == pytest.approx(n * 20 * 2 / 3350e9)  # and p.mul_(1 - lr wd)
    master, *_ = _gpu_step("h100-80gb", method="full", precision="bf16-master", optimizer="adamw-fused",
                           sharding="deepspeed", zero=1, gpus=4)
    assert master.terms["optimizer"] == pytest.approx(n / 4 * (7 * 4 + 12) / 3350e9)  # fp32 masters, its shard
    offloaded, *_ = _gpu_step("h100-80gb", method="full", precision="bf16-master", sharding="deepspeed", zero=3,
                              gpus=4, offload="optimizer")
    assert offloaded.terms["optimizer"] == 0 and offloaded.terms["offload"] > 0


@pytest.mark.parametrize("gpu", ["rtx4090-24gb", "a100-80gb", "h100-80gb", "t4-16gb"])
def test_qlora_and_offload_never_beat_the_plan_they_trade_speed_for(gpu):
    """QLoRA dequantizes every NF4 weight in each forward, backward and recompute (bitsandbytes' MatMul4Bit); the
    same plan in LoRA skips that. Offloading adds host-link traffic to the same plan kept on the GPU. Under FSDP,
    QLoRA gathers 4-bit weights instead of 16-bit ones: less communication, which can make its step the shorter
    one (Answer.AI's two RTX 4090s: QLoRA 0.91 s per example, LoRA 0.94; benchmarks/published_gpu_times.yaml
    R1b, R2); its compute still costs more."""
    precision = "amp-fp16" if gpu == "t4-16gb" else "bf16"
    common = dict(model="llama-3-8b", precision=precision, micro_batch=2, seq_len=2048, grad_ckpt=True)
    for sharding in (dict(gpus=1), dict(gpus=2, sharding="ddp"), dict(gpus=2, sharding="fsdp", zero=3)):
        lora, *_ = _gpu_step(gpu, method="lora", **common, **sharding)
        qlora, _, _, spec = _gpu_step(gpu, method="qlora", **common, **sharding)
        assert qlora.total_s - qlora.comm_s > lora.total_s - lora.comm_s
        if sharding.get("sharding") != "fsdp":
            assert qlora.total_s > lora.total_s
        decoder, _ = throughput.matmul_params(spec)
        assert qlora.dequant_bytes == pytest.approx(decoder * (throughput.NF4_BYTES + 2) * 3)
    for method in ("lora", "qlora", "full"):
        kept, *_ = _gpu_step(gpu, method=method, **common, gpus=2, sharding="fsdp", zero=3)
        moved, *_ = _gpu_step(gpu, method=method, **common, gpus=2, sharding="fsdp", zero=3, offload="optimizer+params")
        assert moved.total_s > kept.total_s, method
    if precision == "bf16":  # DeepSpeed's bf16 regime (bf16-master), optimizer-only offload too
        for offload in ("optimizer", "optimizer+params"):
            ds = dict(common, precision="bf16-master", gpus=2, sharding="deepspeed", zero=3)
            kept, *_ = _gpu_step(gpu, method="full", **ds)
            moved, *_ = _gpu_step(gpu, method="full", **ds, offload=offload)
            assert moved.total_s > kept.total_s, offload


def test_gpu_mfu_is_fitted_per_architecture():
    from memplan.recommend.hardware import gpu_target

    fitted = throughput.GPU_MFU_FITTED
    assert throughput.gpu_mfu(gpu_target("l40s-48gb", None, 1, 1, 0.1)) == fitted["rtx4090-24gb"]  # Ada
    assert throughput.gpu_mfu(gpu_target("h200-141gb", None, 1, 1, 0.1)) == fitted["h100-80gb"]  # Hopper
    assert throughput.gpu_mfu(gpu_target("a10g-24gb", None, 1, 1, 0.1)) == fitted["a100-40gb"]  # Ampere
    assert throughput.gpu_mfu(gpu_target("v100-32gb", None, 1, 1, 0.1)) == throughput.GPU_MFU == sorted(
        fitted.values())[1]  # no fitted architecture: the median


def _published():
    import importlib.util
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("time_accuracy", root / "benchmarks/time_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, yaml.safe_load((root / "benchmarks/published_gpu_times.yaml").read_text())


def test_gpu_mfu_and_its_error_are_what_the_published_step_times_say():
    """GPU_MFU_FITTED is the fit of the published `fit` rows; HELD_OUT_ERROR["cuda"] is the error range on the
    held-out rows memplan can reproduce (those with torch.compile are reported, not counted)."""
    module, rows = _published()
    assert module.fit_mfu(rows) == throughput.GPU_MFU_FITTED
    errors: dict[str, list[float]] = {}
    for r in rows:
        if r["role"] == "held-out" and "torch.compile" not in r.get("differs", ""):
            arch = throughput.MFU_ARCHITECTURE[r["gpu"]]
            errors.setdefault(arch, []).append(module.predicted_gpu(r).total_s / r["step_s"] - 1)
    assert set(errors) == set(throughput.HELD_OUT_ERROR) - {"cpu"}
    for arch, errs in errors.items():
        assert throughput.HELD_OUT_ROWS[arch].startswith(f"{len(errs)} ")
        assert round(max(abs(e) for e in errs), 3) == throughput.HELD_OUT_ERROR[arch]


def test_cpu_time_error_is_what_the_stored_cpu_steps_say():
    """HELD_OUT_ERROR["cpu"] is the largest error on the 12 measured CPU plans (time-accuracy-cpu.jsonl), none of
    them in the CPU calibration."""
    import json as _json
    from pathlib import Path

    module, _ = _published()
    root = Path(__file__).resolve().parents[2]
    rows = [_json.loads(x) for x in (root / "benchmarks/results/time-accuracy-cpu.jsonl").read_text().splitlines()]
    from memplan.recommend.hardware import CpuInfo

    measured_on = CpuInfo(name="AMD EPYC", cores=2, bf16="native", flag="avx512_bf16")  # where they were measured
    _, errors = module.cpu_table(rows, measured_on)
    assert len(errors) == 12 and throughput.HELD_OUT_ROWS["cpu"].startswith("12 ")
    assert round(max(abs(e) for e in errors), 3) == throughput.HELD_OUT_ERROR["cpu"]


def test_recommend_prints_the_step_by_term_and_its_likely_range(run_cli):
    out = recommend_json(run_cli, *GPU1_24, "--dataset-size", "20000")
    t = out["time"]
    assert sum(t["terms_s"].values()) == pytest.approx(t["step_s"])
    low, high = t["likely_hours"]
    assert low < t["hours"] < high and not t["extrapolating"]
    code, text, err = run_cli("recommend", *GPU1_24, "--dataset-size", "20000")
    assert code == 0, err
    assert "per step: forward" in text and "likely" in text and "published step times on this architecture" in text
    for gpu, why in (("t4-16gb", "no published step time"), ("a100-80gb", "fitted on one published run")):
        t = recommend_json(run_cli, "--model", "llama-3.2-1b", "--gpu", gpu, "--gpus", "1",
                           "--dataset-size", "20000")["time"]
        assert t["extrapolating"] and why in t["likely_basis"]
        assert t["likely_hours"][0] < t["hours"] < t["likely_hours"][1]


def test_moe_counts_active_experts_only():
    spec = resolve_model("mixtral-8x7b")
    decoder, _ = throughput.matmul_params(spec)
    assert 11e9 < decoder < 14e9  # ~12.9B active of 46.7B


def test_communication_volumes():
    spec = resolve_model("llama-2-7b")
    n_params = spec.params_total
    ddp = build_plan(dict(method="full", precision="bf16", gpus=4, grad_accum=4))
    z3 = build_plan(dict(method="full", precision="bf16-master", sharding="deepspeed", zero=3, gpus=4, grad_accum=4))
    r = 3 / 4
    assert throughput.comm_bytes(spec, ddp, n_params) == 2 * r * 2 * n_params  # one all-reduce per step
    # ZeRO-3: per micro-step, gather twice + reduce-scatter: 1.5x DDP's volume, every micro-step
    assert throughput.comm_bytes(spec, z3, n_params) == pytest.approx(4 * 3 * r * 2 * n_params)
    assert throughput.comm_bytes(spec, ddp.model_copy(update={"gpus": 1}), n_params) == 0


def test_hparams_from_the_seed():
    assert hp.warmup_steps(100) == 10  # 2000 clamped to 10 %
    assert hp.warmup_steps(100_000) == 3000  # clamped up to 3 %
    assert hp.warmup_steps(40_000) == 2000
    assert hp.default_effective_batch(950) == 32 and hp.default_effective_batch(500) == 16
    assert hp.default_effective_batch(200) == 8 and hp.default_effective_batch(100) == 4
    full = hp.choose("full", "low", 1000, 3)
    assert full.lr == 2e-5 and 1e-5 <= full.lr <= 5e-5
    assert hp.choose("lora", "high", 1000, 3).lr < hp.choose("lora", "low", 1000, 3).lr


def test_learning_rate_goes_as_one_over_width():
    # The recommended and QLoRA's rates are for a 7B (d_model 4096); Adam's LR goes as 1/width (muP).
    assert hp.choose("full", "low", 1000, 3, hidden_size=4096).lr == hp.LR["full"]
    assert hp.choose("full", "low", 1000, 3, hidden_size=8192).lr == pytest.approx(hp.LR["full"] / 2)
    assert hp.choose("lora", "low", 1000, 3, hidden_size=8192).lr == pytest.approx(1e-4)  # QLoRA's 33B/65B rate
    small = hp.choose("lora", "low", 1000, 3, hidden_size=896)  # Qwen2.5-0.5B
    assert small.lr == pytest.approx(2e-4 * 4096 / 896, rel=1e-3)
    assert "4096/896" in small.reasons[0]
    assert hp.choose("lora", "low", 1000, 3, lr=5e-5, hidden_size=896).lr == 5e-5  # given: not scaled


def test_recommended_learning_rate_follows_the_model_width(run_cli):
    narrow = recommend_json(run_cli, "--model", "qwen2.5-0.5b", "--gpus", "1", "--gpu", "h100-80gb",
                            "--dataset-size", "50000")
    assert narrow["plan"]["method"] == "lora"
    assert narrow["plan"]["hparams"]["lr"] == pytest.approx(2e-4 * 4096 / 896, rel=1e-3)
    # a 70B's width (8192): half a 7B's rate, QLoRA's 65B rate
    assert hp.choose("lora", "low", 1000, 1.0, hidden_size=8192).lr == pytest.approx(1e-4)


def test_searched_plans_are_ones_memplan_train_runs(run_cli):
    out = recommend_json(run_cli, *GPU4, "--dataset-size", "50000", "--method", "full")
    for plan in [out["plan"]] + [a["plan"] for a in out["alternatives"]]:
        assert plan["precision"] != "bf16-master" or plan["sharding"] == "deepspeed"
        assert plan["sharding"] != "fsdp" or plan["zero"] in (2, 3)  # FSDP2 has no NO_SHARD


def test_time_counts_padded_tokens_from_the_data():
    from memplan.recommend.data_stats import DataStats

    d = DataStats("x", 4, "text", 4, 20, 40, 40, "t", lengths=[10, 20, 30, 40])
    assert d.expected_padded_length(1, 100) == 25  # one example per batch: the mean
    assert d.expected_padded_length(2, 100) == pytest.approx((10 * 1 + 20 * 3 + 30 * 5 + 40 * 7) / 16)
    assert d.expected_padded_length(2, 25) == pytest.approx((10 * 1 + 20 * 3 + 25 * 5 + 25 * 7) / 16)  # cut at 25
    spec = resolve_model("llama-2-7b")
    plan = build_plan(dict(method="full", seq_len=64))
    assert throughput.train_flops_per_token(spec, plan, 32) < throughput.train_flops_per_token(spec, plan)


def test_small_sets_get_a_batch_of_four_and_no_early_stopping_on_a_few_examples(run_cli, tmp_path):
    # 20 examples once got an effective batch of 1 and a 1-example validation split that early stopping acted on
    assert [hp.default_effective_batch(n) for n in (10, 20, 3, 1)] == [4, 4, 2, 1]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(20)))
    out = recommend_json(run_cli, "--model", "llama-3.2-1b", "--gpu", "h100", "--data", str(data))
    plan = out["plan"]
    assert out["samples"] == 16  # 4 held out for validation
    assert plan["micro_batch"] * plan["grad_accum"] * plan["gpus"] == 4
    assert plan["hparams"]["early_stopping_patience"] == 0
    warnings = " ".join(out["warnings"])
    assert "only 16 training examples: an effective batch of 4 gives 4 optimizer step(s) per epoch" in warnings
    assert "4 validation example(s), fewer than 20" in warnings and "early stopping is off" in warnings
    assert "single examples steer it" not in warnings
    # with a validation file of 20 or more, early stopping stays
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"instruction": f"v{i}", "output": f"w{i}"}) + "\n"
                           for i in range(20)))
    out = recommend_json(run_cli, "--model", "llama-3.2-1b", "--gpu", "h100", "--data", str(data),
                         "--validation", str(val))
    assert out["samples"] == 20 and out["plan"]["hparams"]["early_stopping_patience"] == 3
    assert not any("validation example" in w for w in out["warnings"])
    # a batch given below 4 is warned about
    out = recommend_json(run_cli, "--model", "llama-3.2-1b", "--gpu", "h100", "--data", str(data),
                         "--effective-batch", "1")
    assert any(w.startswith("effective batch 1: each optimizer step follows fewer than 4") for w in out["warnings"])


LLAMA4_TEXT = dict(model_type="llama4_text", hidden_size=256, intermediate_size=256, intermediate_size_mlp=512,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                   num_local_experts=4, num_experts_per_tok=1, vocab_size=1000)


@pytest.mark.parametrize("model, searched", [
    ("llama-3.2-1b", {"sdpa", "flash"}),
    ("gemma-2-2b", {"eager", "flash"}),  # no SDPA path: its "sdpa" is eager, not another choice
    ("gpt-oss-20b", {"eager"}),  # no SDPA path; flash with sinks is a kernel downloaded from the Hub
    (LLAMA4_TEXT, {"sdpa"}),  # Llama4ForCausalLM has no flash-attention 2 (_supports_flash_attn = False)
])
def test_search_offers_only_the_attention_the_model_runs(model, searched):
    from memplan.catalog.spec import spec_from_config
    from memplan.recommend import hardware
    from memplan.recommend.search import structures

    spec = resolve_model(model) if isinstance(model, str) else spec_from_config(model, "llama4-text")
    target = hardware.gpu_target("a100-80gb", None, 1, 1, 0.1, None, [])
    plans = structures(spec, "llama-3.2-1b", "lora", target, 2048)
    assert {p.attn for p in plans} == searched


def test_comparison_table_names_the_attention_the_model_runs():
    from memplan import fit

    rows = fit.compare(resolve_model("gemma-2-2b"), "gemma-2-2b", {}, gpu="a100-80gb").rows
    assert {r.candidate.plan.attn for r in rows} == {"eager"}


def test_flash_plan_for_a_model_without_flash_attention_is_refused_at_load():
    from memplan.catalog.spec import spec_from_config
    from memplan.errors import UserError
    from memplan.runtime.model import attention

    pytest.importorskip("torch")
    plan = build_plan({"model": "llama-3.2-1b", "attn": "flash", "precision": "bf16"})
    with pytest.raises(UserError, match="no flash-attention for llama4_text"):
        attention(plan, "cuda:0", spec_from_config(LLAMA4_TEXT, "llama4-text"))
    with pytest.raises(UserError, match="no flash-attention for gpt_oss"):
        attention(plan, "cpu", resolve_model("gpt-oss-20b"))
    assert attention(plan, "cpu", resolve_model("gemma-2-2b")) == "eager"  # SDPA's flash kernel's stand-in


MIXTRAL_SMALL = dict(model_type="mixtral", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                     vocab_size=1000)


@pytest.mark.parametrize("model, lora, dropout", [
    (MIXTRAL_SMALL, None, 0.0),  # all-linear: the expert stacks are targets (peft's ParamWrapper, no dropout)
    (MIXTRAL_SMALL, {"targets": "q_proj,v_proj"}, 0.05),  # attention only: the dropout as asked (default)
    (MIXTRAL_SMALL, {"targets": "q_proj,v_proj", "dropout": 0.1}, 0.1),
    ("gpt-oss-20b", None, 0.05),  # all-linear never reaches its expert stacks (Traits.lora_unreachable)
    (LLAMA4_TEXT, None, 0.05),
    ("llama-3.2-1b", None, 0.05),
])
def test_search_keeps_lora_dropout_unless_an_expert_stack_is_a_target(model, lora, dropout):
    from memplan import fit
    from memplan.catalog.spec import spec_from_config
    from memplan.recommend import hardware
    from memplan.recommend.search import structures

    spec = resolve_model(model) if isinstance(model, str) else spec_from_config(model, model["model_type"])
    target = hardware.gpu_target("a100-80gb", None, 1, 1, 0.1, None, [])
    plans = structures(spec, "llama-3.2-1b", "lora", target, 2048, lora)
    assert plans and {p.lora.dropout for p in plans} == {dropout}
    if lora is None:  # estimate's comparison table: its LoRA rows take the default settings
        rows = fit.compare(spec, "llama-3.2-1b", {}, gpu="a100-80gb").rows
        assert {r.candidate.plan.lora.dropout for r in rows if r.candidate.plan.method != "full"} == {dropout}


def test_an_adapters_8bit_optimizer_is_searched_only_where_nothing_fits_without_it():
    """An adapter's AdamW states are a few hundred MiB at most: its 8-bit moments are a last resort."""
    from memplan.recommend import search as plan_search

    work = plan_search.Workload(seq_len=2048, effective_batch=32, examples_per_epoch=1000, epochs=1)
    for model, gpu, fits in (("llama-2-7b", "a100-80gb", True), ("llama-2-13b", "t4-16gb", False)):
        spec, target = resolve_model(model), hardware.gpu_target(gpu, None, 1, 1, 0.1, None, [])
        found = plan_search.search(spec, model, "lora", target, work, "quality", plan_search.Scorer(spec, target),
                                   allow_param_offload=False)
        assert bool(found.fitting) == fits
        searched = {c.plan.optimizer for c in found.fitting + found.not_fitting}
        assert searched == ({"adamw-fused"} if fits else {"adamw-fused", "adamw-8bit"}), (model, gpu)
