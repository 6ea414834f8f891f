"""One notion of "fits" and "best" for estimate and recommend, the hardware a plan records (`target`), the
exit-code contract, and recommend's reproducibility on the CPU."""

import json

import pytest
import yaml

from memplan.recommend import hardware, search, throughput

GiB = 2**30
MiB = 2**20


@pytest.fixture
def no_local_gpu(monkeypatch):
    import memplan.catalog.gpus

    monkeypatch.setattr(memplan.catalog.gpus, "local_gpus", lambda: [])


def estimate_json(run_cli, *args, code=0):
    rc, out, err = run_cli("estimate", *args, "--json")
    assert rc == code, (out, err)
    return json.loads(out)


def rows_by_plan(out):
    """The comparison table's rows by (method, sharding, zero, offload, precision)."""
    return {(r["plan"]["method"], r["plan"]["sharding"], r["plan"]["zero"], r["plan"]["offload"],
             r["plan"]["precision"]): r for r in out["results"]}


# ------------------------------------------------------------------------- estimate's "fits" is recommend's

def test_70b_on_8_h100_checks_host_ram_for_offload(run_cli):
    out = estimate_json(run_cli, "--model", "llama-3.1-70b", "--gpus", "8", "--gpu", "h100-80gb")
    rows = rows_by_plan(out)
    offload = rows[("full", "deepspeed", 3, "optimizer", "bf16-master")]
    assert offload["host_offload_bytes"] > 0.9 * 8 * 128 * GiB  # 1051 GiB > 90 % of the default 1024 GiB per node
    # the host peak is when it saves: rank 0 consolidates the 16-bit model and copies it, the states stay
    assert offload["host_peak_phase"] == "save" and offload["host_bytes"] == offload["host_peak_bytes"]
    assert offload["host_bytes"] > offload["host_offload_bytes"] and offload["fits"] is False
    best = out["results"][out["best"]]["plan"]
    assert (best["method"], best["zero"], best["offload"]) == ("lora", 3, "none")
    code, text, _ = run_cli("estimate", "--model", "llama-3.1-70b", "--gpus", "8", "--gpu", "h100-80gb")
    assert code == 0
    line = next(ln for ln in text.splitlines() if ln.startswith("full FT · ZeRO-3 + offload optimizer ·"))
    assert line.rstrip().endswith("no (host RAM)") and f"{offload['host_bytes'] / GiB:.2f}" in line
    assert "host RAM 1024 GiB per node" in text and "best plan: LoRA r16 · ZeRO-3 · bf16-master" in text


def test_enough_host_ram_makes_the_offload_plan_the_best(run_cli):
    out = estimate_json(run_cli, "--model", "llama-3.1-70b", "--gpus", "8", "--gpu", "h100-80gb",
                        "--host-memory", "2TiB")
    best = out["results"][out["best"]]["plan"]
    assert (best["method"], best["zero"], best["offload"]) == ("full", 3, "optimizer")
    assert out["target"]["host_usable_bytes"] == int(2048 * GiB * 0.9)


def test_recommend_judges_the_70b_offload_plan_alike(run_cli):
    """recommend rejects DeepSpeed ZeRO-3 + optimizer offload for the host RAM, as estimate does, and takes it
    with 2 TiB."""
    args = ("recommend", "--model", "llama-3.1-70b", "--gpus", "8", "--gpu", "h100-80gb", "--dataset-size", "5000",
            "--method", "full", "--json")

    def zero3_offload(out):
        plans = [out["plan"] | {"fits": True, "why_not": ""}] + [a["plan"] | a for a in out["alternatives"]]
        return [p for p in plans if (p["sharding"], p["zero"], p["offload"]) == ("deepspeed", 3, "optimizer")]

    code, out, _ = run_cli(*args)
    (alt,) = zero3_offload(json.loads(out))
    assert alt["fits"] is False and "GiB of host RAM per node (peak: save;" in alt["why_not"]
    code, out, _ = run_cli(*args, "--host-memory", "2TiB")
    assert code == 0 and all(a["fits"] for a in zero3_offload(json.loads(out)))


@pytest.mark.parametrize("model", ["llama-3-8b", "llama-3.1-8b"])
def test_8b_on_one_4090_is_lora_not_full_ft_offloading_everything(run_cli, model):
    out = estimate_json(run_cli, "--model", model, "--gpu", "rtx4090-24gb")
    rows = rows_by_plan(out)
    everything = rows[("full", "deepspeed", 3, "optimizer+params", "bf16-master")]
    assert everything["host_bytes"] > 115.2 * GiB and everything["fits"] is False  # 135 GiB > 90 % of 128 GiB
    best = out["results"][out["best"]]["plan"]
    assert best["method"] == "lora"
    rec = json.loads(run_cli("recommend", "--model", model, "--gpu", "rtx4090-24gb", "--dataset-size", "5000",
                             "--json")[1])
    assert rec["plan"]["method"] == best["method"]
    code, text, _ = run_cli("estimate", "--model", model, "--gpu", "rtx4090-24gb")
    line = next(ln for ln in text.splitlines() if ln.startswith("full FT · ZeRO-3 + offload optimizer+params"))
    assert line.rstrip().endswith("no (host RAM)")


HOST_CASE = ("--model", "llama-3-8b", "--gpus", "8", "--gpu", "h100-80gb")
ZERO1 = ("--sharding", "deepspeed", "--zero", "1", "--precision", "bf16-master")
ZERO1_ROW = ("full", "deepspeed", 1, "none", "bf16-master")


def test_host_ram_alone_makes_a_plan_not_fit_its_estimate(run_cli):
    """ZeRO-1 of an 8B model fits 8 H100s but, when it saves, every process holds a clone of the model
    (accelerate's get_state_dict): 170 GiB of host RAM. With 100 GiB per node it does not fit."""
    fits = estimate_json(run_cli, *HOST_CASE, *ZERO1)["results"][0]  # the default 1 TiB per node
    assert fits["fits"] is True and fits["host_peak_phase"] == "save"
    out = estimate_json(run_cli, *HOST_CASE, *ZERO1, "--host-memory", "100GiB", code=1)["results"][0]
    assert out["fits"] is False and out["total_bytes"] <= out["fit"]["usable_bytes"]  # the GPUs are not the reason
    assert out["host_peak_bytes"] > out["fit"]["host_usable_bytes"] == int(100 * GiB * 0.9)
    code, text, _ = run_cli("estimate", *HOST_CASE, *ZERO1, "--host-memory", "100GiB")
    peak = f"{out['host_peak_bytes'] / GiB:.2f} GiB"  # 169 GiB
    assert code == 1 and 160 * GiB < out["host_peak_bytes"] < 180 * GiB
    assert text.rstrip().splitlines()[-1].startswith(f"does not fit: needs {peak} of host RAM per node (peak: save;")
    assert f"host RAM per node: peak {peak} in the save phase" in text


def test_host_ram_alone_changes_the_tables_best_plan(run_cli):
    table = estimate_json(run_cli, *HOST_CASE, "--host-memory", "100GiB")
    rows = rows_by_plan(table)
    assert rows[ZERO1_ROW]["fits"] is False
    best = table["results"][table["best"]]
    assert (best["plan"]["method"], best["plan"]["zero"]) == ("full", 3)  # ZeRO-1 with the default 1 TiB
    assert best["host_peak_bytes"] <= table["target"]["host_usable_bytes"]
    assert all(r["host_peak_bytes"] <= table["target"]["host_usable_bytes"] for r in table["results"] if r["fits"])
    default = estimate_json(run_cli, *HOST_CASE)
    assert default["results"][default["best"]]["plan"]["zero"] == 1
    _, text, _ = run_cli("estimate", *HOST_CASE, "--host-memory", "100GiB")
    line = next(ln for ln in text.splitlines() if ln.startswith("full FT · ZeRO-1 · bf16-master"))
    assert line.rstrip().endswith("no (host RAM)") and f"{rows[ZERO1_ROW]['host_peak_bytes'] / GiB:.2f}" in line
    assert "the host RAM peak within 90.00 GiB per node" in text


def test_recommend_never_chooses_a_plan_over_the_hosts_ram(run_cli):
    args = ("recommend", *HOST_CASE, "--dataset-size", "5000", "--method", "full", "--json")
    default = json.loads(run_cli(*args)[1])
    assert default["plan"]["zero"] == 1  # the fastest full-FT plan with the default 1 TiB per node
    rec = json.loads(run_cli(*args, "--host-memory", "100GiB")[1])
    usable = rec["target"]["host_usable_bytes"]
    assert usable == int(100 * GiB * 0.9) and rec["estimate"]["host_peak_bytes"] <= usable
    assert (rec["plan"]["sharding"], rec["plan"]["zero"]) != ("deepspeed", 1)
    # runners-up that fit the GPUs and were refused for the host RAM alone
    refused = [a for a in rec["alternatives"] if not a["fits"] and "of host RAM per node (peak: " in a["why_not"]]
    assert refused and all(a["total_bytes"] <= rec["target"]["usable_bytes"] for a in refused)
    code, out, _ = run_cli(*args, "--host-memory", "8GiB")  # not even loading fits: no plan, and what would
    assert code == 1 and "--host-memory" in " ".join(json.loads(out)["suggestions"])


def test_cpu_plan_must_fit_the_host_ram_with_its_load_and_save(run_cli, tmp_path, no_local_gpu):
    """A CPU plan's processes fit their share of the RAM, and the node's host peak must fit it too."""
    code, _, err = run_cli("recommend", "--model", "demo-tiny", "--gpus", "1", "--data", "data/demo/train.jsonl",
                           "-o", str(tmp_path / "run"))
    assert code == 0, err
    plan = str(tmp_path / "run" / "plan.yaml")
    e = estimate_json(run_cli, "--config", plan)["results"][0]
    # just over the host peak / 0.9, yet enough for the process's tensors and interpreter
    size = int(e["host_peak_bytes"] / 0.9 / 2**20) - 1
    assert (size * 2**20 - hardware.PROCESS_BASELINE_BYTES) * 0.9 > e["total_bytes"]
    out = estimate_json(run_cli, "--config", plan, "--host-memory", f"{size}MiB", code=1)["results"][0]
    assert out["fits"] is False and "of host RAM per node" in out["fit"]["verdict"]


def test_headroom_is_recommends_and_can_be_changed(run_cli):
    """Default 10 % headroom, as recommend; --headroom 0 lets a plan use the whole GPU."""
    row = ("lora", "ddp", 0, "none", "bf16")
    plan = rows_by_plan(estimate_json(run_cli, "--model", "llama-3.1-8b", "--gpu", "rtx4090-24gb"))[row]
    total, tensors = plan["total_bytes"], plan["peak_allocated_bytes"] + plan["overheads"]["cuda_context"]
    memory = f"{total / 0.999 / 2**30:.3f}GiB"  # holds the plan whole; with 10 % kept free, not even its tensors
    assert 0.9 * total / 0.999 < tensors
    tight = rows_by_plan(estimate_json(run_cli, "--model", "llama-3.1-8b", "--gpu-memory", memory))
    loose = rows_by_plan(estimate_json(run_cli, "--model", "llama-3.1-8b", "--gpu-memory", memory, "--headroom", "0"))
    assert tight[row]["fits"] is False and loose[row]["fits"] is True


def test_best_rule_is_one_function(monkeypatch, run_cli):
    """estimate's best row and recommend's method choice both come from search.choose (through choose_fitting,
    which confirms the chosen plan's fit by its replayed allocations)."""
    from memplan.recommend import core, search

    assert core.choose_fitting is search.choose_fitting
    calls = []
    real = search.choose
    monkeypatch.setattr(search, "choose", lambda *a: calls.append(a) or real(*a))
    run_cli("estimate", "--model", "llama-3.1-8b", "--gpu", "rtx4090-24gb")
    assert calls


# ------------------------------------------------------------------------- exit codes

FSDP_1B = ("--model", "llama-3.2-1b", "--method", "full", "--precision", "bf16", "--sharding", "fsdp", "--zero", "3",
           "--gpus", "2", "--batch-size", "1", "--seq-len", "1024", "--grad-ckpt", "--headroom", "0")


def test_a_plan_fits_where_its_allocator_releases_its_cache_to_stay_within_the_gpu(run_cli):
    """A GPU with room for the step's tensors but not for all the caching allocator would keep cached: torch's
    allocator releases its cache and tries again before it reports out of memory, so the step runs (more
    slowly), and estimate and recommend say it fits; with no room to spare at all it does not, and says why."""
    from memplan.catalog.resolve import resolve_model
    from memplan.estimator import estimate
    from memplan.plan import build_plan
    from memplan.recommend.search import Scorer

    plan = build_plan(dict(model="llama-3.2-1b", method="full", precision="bf16", sharding="fsdp", zero=3, gpus=2,
                           micro_batch=1, seq_len=1024, grad_ckpt=True))
    e = estimate(resolve_model("llama-3.2-1b"), plan)
    between = (e.least_total + e.total) // 2 // MiB  # MiB: the allocated peak fits, the unbounded total does not
    out = estimate_json(run_cli, *FSDP_1B, "--gpu-memory", f"{between}MiB")["results"][0]
    usable = out["fit"]["usable_bytes"]
    assert out["fits"] is True and out["total_bytes"] > usable >= out["fit"]["total_within_usable_bytes"]
    first, per_step = out["fit"]["cache_releases"]["first_step"], out["fit"]["cache_releases"]["per_step"]
    assert first + per_step > 0 and (first, per_step) == e.cache_releases(usable)
    capped = e.replayed_within(usable)
    assert not capped.oom and capped.peak_reserved < e.replayed.peak_reserved
    code, text, _ = run_cli("estimate", *FSDP_1B, "--gpu-memory", f"{between}MiB")
    assert code == 0 and "releases its cache" in text.rstrip().splitlines()[-1]
    scorer = Scorer(resolve_model("llama-3.2-1b"), hardware.gpu_target(None, between * MiB, 2, 1, 0.0, None, []))
    assert scorer.decide(e)[0] is True
    # the tensors alone: every segment the allocator keeps has some slack, so it cannot serve the step
    tight = -(-e.least_total // MiB)
    code, text, _ = run_cli("estimate", *FSDP_1B, "--gpu-memory", f"{tight}MiB")
    assert code == 1 and "the caching allocator cannot place them within it even releasing its cache" in text
    assert e.total_within(tight * MiB) == e.total


def test_a_4bit_base_under_fsdp_must_fit_its_whole_load_on_every_gpu(run_cli):
    """accelerate loads a 4-bit model whole on every GPU before FSDP shards it: Llama-2-70B QLoRA on eight GPUs
    needs about 40 GiB before its first step, where the steps need 25: every verdict counts the load, even the
    search's bound that spares a replay, and the reason says so."""
    from memplan.catalog.resolve import resolve_model
    from memplan.estimator import estimate
    from memplan.plan import build_plan
    from memplan.recommend.search import Scorer

    fields = dict(model="llama-2-70b", method="qlora", precision="bf16", sharding="fsdp", zero=3, gpus=8,
                  micro_batch=1, seq_len=2048, grad_ckpt=True)
    e = estimate(resolve_model("llama-2-70b"), build_plan(fields))
    assert e.load_allocated > 1.4 * e.peak_allocated
    assert e.load_allocated <= e.replayed.setup_allocated < 1.01 * e.load_allocated
    assert e.least_total > e.load_allocated
    gpu = 40 * GiB  # the steps, with the search's reserve bound, fit within 36 usable GiB; the load does not
    scorer = Scorer(resolve_model("llama-2-70b"), hardware.gpu_target(None, gpu, 8, 1, 0.1, None, []))
    assert e.peak_allocated * (1 + search.RESERVE_BOUND) < scorer.target.usable_bytes < e.least_total
    assert scorer.decide(e)[0] is False
    args = ["--model", "llama-2-70b", "--method", "qlora", "--precision", "bf16", "--sharding", "fsdp", "--zero",
            "3", "--gpus", "8", "--batch-size", "1", "--seq-len", "2048", "--grad-ckpt", "--gpu-memory", "40GiB"]
    code, text, _ = run_cli("estimate", *args)
    assert code == 1 and "loading alone holds" in text.rstrip().splitlines()[-1]
    assert "the whole 4-bit model on every GPU until FSDP has made its shards, peaks higher" in text


def test_estimate_single_plan_exit_codes(run_cli):
    code, out, _ = run_cli("estimate", "--model", "llama-3-8b", "--method", "lora", "--precision", "bf16",
                           "--batch-size", "4", "--gpu", "rtx4090-24gb")
    assert code == 1 and out.rstrip().splitlines()[-1].startswith("does not fit: needs 34.88 GiB per GPU")
    code, out, _ = run_cli("estimate", "--model", "llama-3-8b", "--method", "qlora", "--precision", "bf16",
                           "--gpu", "rtx4090-24gb")
    assert code == 0 and out.rstrip().splitlines()[-1].startswith("fits:")
    data = estimate_json(run_cli, "--model", "llama-3-8b", "--method", "lora", "--precision", "bf16",
                         "--batch-size", "4", "--gpu", "rtx4090-24gb", code=1)
    assert data["results"][0]["fits"] is False and data["results"][0]["fit"]["usable_bytes"] < 24 * GiB


def test_estimate_without_gpu_exit_code_is_the_largest_common_size(run_cli, no_local_gpu):
    code, out, _ = run_cli("estimate", "--model", "llama-3.2-1b", "--method", "qlora", "--precision", "bf16")
    assert code == 0 and "fits GPUs of 16 GiB" in out
    code, out, _ = run_cli("estimate", "--model", "llama-3.1-70b", "--method", "full")
    assert code == 1 and "does not fit a 80 GiB GPU" in out


def test_estimate_table_exit_code(run_cli):
    code, out, _ = run_cli("estimate", "--model", "llama-3.1-70b", "--gpu", "t4-16gb")
    assert code == 1 and "no plan fits" in out
    code, _, _ = run_cli("estimate", "--model", "llama-3.2-1b", "--gpu", "t4-16gb")
    assert code == 0


@pytest.mark.parametrize("command", [[], ["estimate"], ["recommend"], ["profile"], ["train"]])
def test_every_help_states_the_exit_codes(run_cli, command):
    code, out, _ = run_cli(*command, "--help")
    assert code == 0 and "Exit codes" in out
    assert "0 " in out and "1 " in out and "2 " in out


# ------------------------------------------------------------------------- the plan records its target

def test_recommend_records_the_target_and_estimate_checks_it(run_cli, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli("recommend", "--model", "llama-2-7b", "--gpu", "a100-80gb", "--gpus", "4",
                           "--dataset-size", "50000", "--host-memory", "512GiB", "-o", str(out))
    assert code == 0, err
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    assert plan["target"] == {"gpu": "a100-80gb", "gpu_memory": None, "host_memory": "512GiB", "headroom": 0.1}
    code, text, _ = run_cli("estimate", "--config", str(out / "plan.yaml"))
    assert code == 0 and "(the plan's recorded target)" in text
    assert text.rstrip().splitlines()[-1].startswith("fits:") and "GiB per GPU of 72.00 GiB usable (80.00 GiB, less 10 % headroom)" in text
    # the same plan on a smaller GPU, by flag or by the recorded target
    code, text, _ = run_cli("estimate", "--config", str(out / "plan.yaml"), "--gpu", "t4-16gb")
    assert code == 1 and text.rstrip().splitlines()[-1].startswith("does not fit:")
    plan["target"]["gpu"] = "t4-16gb"
    (out / "small.yaml").write_text(yaml.safe_dump(plan))
    code, text, _ = run_cli("estimate", "--config", str(out / "small.yaml"))
    assert code == 1 and "NVIDIA T4" in text


def test_recorded_host_memory_decides_offload_plans(run_cli, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli("recommend", "--model", "llama-3.1-70b", "--gpus", "8", "--gpu", "h100-80gb",
                           "--dataset-size", "5000", "--method", "full", "--host-memory", "2TiB", "-o", str(out))
    assert code == 0, err
    code, _, _ = run_cli("estimate", "--config", str(out / "plan.yaml"))
    assert code == 0
    code, text, _ = run_cli("estimate", "--config", str(out / "plan.yaml"), "--host-memory", "1TiB")
    assert code == 1 and "of host RAM per node (peak: save;" in text


def test_cpu_plan_records_host_ram(run_cli, tmp_path, no_local_gpu):
    out = tmp_path / "run"
    code, _, err = run_cli("recommend", "--model", "demo-tiny", "--gpus", "1", "--data", "data/demo/train.jsonl",
                           "--host-memory", "8GiB", "-o", str(out))
    assert code == 0, err
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    assert plan["device"] == "cpu"
    assert plan["target"] == {"gpu": None, "gpu_memory": None, "host_memory": "8GiB", "headroom": 0.1}
    code, text, _ = run_cli("estimate", "--config", str(out / "plan.yaml"))
    assert code == 0 and "per process" in text and "the CPU (1 process), 8.00 GiB host RAM" in text
    # 600 MiB less 512 MiB for the interpreter, less 10 %: 79 MiB < demo-tiny's plan
    code, text, _ = run_cli("estimate", "--config", str(out / "plan.yaml"), "--host-memory", "600MiB")
    assert code == 1 and "host RAM shared by 1 process(es)" in text
    code, _, err = run_cli("estimate", "--config", str(out / "plan.yaml"), "--gpu", "h100")
    assert code == 2 and "CPU plan" in err


@pytest.mark.parametrize("target, needle", [
    ({"gpu": "h10"}, "target.gpu: unknown GPU 'h10'"),
    ({"gpu_memory": "lots"}, "target.gpu_memory: bad memory size 'lots'"),
    ({"headroom": 1.5}, "target.headroom"),
    ({"cpu": "epyc"}, "unknown key 'target.cpu'; did you mean 'gpu'?; allowed keys under target: gpu, gpu_memory, host_memory, headroom"),
])
def test_target_section_is_validated(run_cli, tmp_path, target, needle):
    cfg = tmp_path / "plan.yaml"
    cfg.write_text(yaml.safe_dump({"model": "llama-2-7b", "target": target}))
    code, _, err = run_cli("estimate", "--config", str(cfg))
    assert code == 2 and needle in err and err.count("\n") == 1


def test_plan_verdict_for_other_commands():
    """fit.plan_verdict: the verdict and exit code for a resolved plan (what a dry run prints)."""
    from memplan import fit
    from memplan.catalog.resolve import resolve_model
    from memplan.plan import build_plan

    spec = resolve_model("llama-2-7b")
    plan = build_plan({"model": "llama-2-7b", "method": "lora", "precision": "bf16",
                       "target": {"gpu": "a100-80gb", "host_memory": "512GiB"}})
    v = fit.plan_verdict(spec, plan)
    assert v.fits is True and v.exit_code == 0 and v.text.startswith("fits:")
    v = fit.plan_verdict(spec, plan, gpu_memory="12GiB")
    assert v.fits is False and v.exit_code == 1 and "needs" in v.text


@pytest.mark.parametrize("sizes", [range(1, 4097), [1, 2, 3, 4, 6, 8, 12, 16, 24, 48], [1]])
@pytest.mark.parametrize("limit", [0, 1, 5, 16, 4096, 10**6])
def test_largest_that_fits_is_the_linear_scans_answer(sizes, limit):
    from memplan.estimator.search import largest

    probed = []
    got = largest(lambda n: probed.append(n) or n <= limit, sizes)
    assert got == max((n for n in sizes if n <= limit), default=None)
    assert probed[0] == sizes[0] and len(probed) <= len(sizes).bit_length() + 1


def test_estimate_recommend_and_profile_search_one_way(monkeypatch):
    """--max-batch / --max-seq (fit.limits), recommend's micro-batch per plan and profile's starting point
    (largest_fitting) all ask estimator.search.largest."""
    from memplan import fit
    from memplan.catalog.resolve import resolve_model
    from memplan.estimator import estimate, search
    from memplan.plan import build_plan
    from memplan.recommend import hardware
    from memplan.recommend import search as plan_search

    calls = []
    real = search.largest
    spy = lambda fits, sizes: calls.append(list(sizes)[-1]) or real(fits, sizes)  # noqa: E731
    for module in (search, fit, plan_search):
        monkeypatch.setattr(module, "largest", spy)
    spec = resolve_model("llama-2-7b")
    plan = build_plan({"model": "llama-2-7b", "method": "lora", "precision": "bf16"})
    target = hardware.gpu_target("a100-80gb", None, 1, 1, 0.1, None, [])
    limits = fit.limits(spec, plan, target, True, True)
    assert calls == [fit.MAX_BATCH_SEARCHED, fit.MAX_SEQ_SEARCHED] and limits["max_batch"] > 1
    work = plan_search.Workload(seq_len=2048, effective_batch=48, examples_per_epoch=1000, epochs=1)
    best, smallest, decided = plan_search.largest_micro_batch(plan, work, plan_search.Scorer(spec, target))
    assert calls[-1] == 48 and decided == 10 and smallest.plan.micro_batch == 1 and best.fits
    capacity = estimate(spec, plan.model_copy(update={"micro_batch": 3})).total
    assert search.largest_fitting(lambda b: estimate(spec, plan.model_copy(update={"micro_batch": b})),
                                  capacity, 64) == 3 and calls[-1] == 64


def test_comparison_is_gathered_apart_from_its_printing(run_cli):
    """fit.compare returns the table's rows and best plan; report.estimate words them, as the command prints."""
    from memplan import fit
    from memplan.catalog.resolve import resolve_model
    from memplan.report import estimate as report

    spec = resolve_model("llama-2-7b")
    comparison = fit.compare(spec, "llama-2-7b", {"gpus": 2}, gpu="rtx4090-24gb")
    assert len(comparison.rows) == len(fit.STANDARD_PLANS)
    assert all(r.candidate.plan.world_size == 2 for r in comparison.rows)
    assert comparison.best is not None and comparison.best.marks == ["yes"] and comparison.exit_code == 0
    code, out, _ = run_cli("estimate", "--model", "llama-2-7b", "--gpus", "2", "--gpu", "rtx4090-24gb")
    assert code == comparison.exit_code and out == report.comparison_text(spec, comparison) + "\n"


# ------------------------------------------------------------------------- the CPU: the same plan every run

CPUINFO = """processor\t: {n}
vendor_id\t: AuthenticAMD
model name\t: Test CPU
physical id\t: 0
core id\t: {core}
flags\t\t: fpu sse2 avx avx2 fma {extra}
"""


def cpuinfo(extra: str, cores: int = 2, smt: int = 1) -> str:
    return "\n".join(CPUINFO.format(n=i, core=i // smt, extra=extra) for i in range(cores * smt))


@pytest.mark.parametrize("extra, cls", [
    ("avx512f avx512bw avx512vl avx512dq avx512_bf16", "native"),
    ("avx512f avx512bw avx512vl avx512dq avx512_bf16 amx_bf16 amx_tile", "amx"),
    ("avx512f avx512bw avx512vl avx512dq", "converted"),
    ("", "none"),
])
def test_bf16_class_from_the_cpu_flags(monkeypatch, extra, cls):
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1, 2, 3}, raising=False)
    info = hardware.cpu_info(cpuinfo(extra, cores=2, smt=2))
    assert info.bf16 == cls and info.name == "Test CPU"
    assert info.cores == 2  # two hyper-threads per core count once


def test_arm_bf16_feature():
    text = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n\nprocessor\t: 1\nFeatures\t: fp asimd sve bf16 i8mm\n"
    info = hardware.cpu_info(text)
    assert (info.bf16, info.flag) == ("native", "bf16")


def _cpu_recommend(run_cli, *extra):
    code, out, err = run_cli("recommend", "--model", "demo-tiny", "--gpus", "1", "--data", "data/demo/train.jsonl",
                             "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def test_cpu_plan_is_the_same_whatever_a_speed_probe_would_read(run_cli, monkeypatch, no_local_gpu):
    """Readings of 25/79, 5/1.4 and 190/327 GFLOP/s (fp32/bf16) were seen on one machine; none may change the
    plan or its time."""
    plans = []
    for fp32, bf16 in ((25e9, 79e9), (5e9, 1.4e9), (190e9, 327e9), (190e9, 30e9)):
        monkeypatch.setattr(hardware, "measure_cpu_matmul", lambda d, f=fp32, b=bf16: {"fp32": f, "bf16": b}[d],
                            raising=False)
        monkeypatch.setattr(hardware, "_CPU_PEAKS", {}, raising=False)
        out = _cpu_recommend(run_cli)
        plans.append((out["plan"], out["time"]["step_s"]))
    assert all(p == plans[0] for p in plans)


def test_cpu_plan_follows_the_instruction_set(run_cli, monkeypatch, no_local_gpu):
    """Without bf16 kernels (AVX2 only) LoRA runs fp32; with AVX512-BF16 the regime the measured rates make fastest
    for the demo's rows and this machine's cores is chosen (ties go to the smaller plan)."""
    monkeypatch.setattr(hardware, "_read_cpuinfo", lambda: cpuinfo(""))
    out = _cpu_recommend(run_cli)
    assert out["plan"]["precision"] == "fp32"
    assert all(a["plan"]["precision"] == "fp32" for a in out["alternatives"] if a["plan"]["method"] == "lora")
    monkeypatch.setattr(hardware, "_read_cpuinfo", lambda: cpuinfo("avx512f avx512bw avx512vl avx512dq avx512_bf16"))
    info = hardware.cpu_info(cpuinfo("avx512f avx512bw avx512vl avx512dq avx512_bf16"))
    demo_rows = min(hardware.CPU_FP32_RATE["full"])  # the rate tables' short rows are the demo's own
    for method in ("lora", "full"):
        out = _cpu_recommend(run_cli, "--method", method)
        rates = {p: info.rate(p, method, 192, info.cores, demo_rows) for p in ("fp32", "amp-bf16", "bf16")}
        if method == "full":
            rates.pop("bf16")  # pure bf16 weights trade quality: not chosen for speed alone
        chosen = out["plan"]["precision"]
        assert rates[chosen] >= max(rates.values()) * (1 - search.SAME_TIME), (method, rates, chosen)


def test_at_width_interpolates_the_measurements():
    points = ((192, 1.0), (768, 4.0))
    assert hardware.at_width(points, 100) == 1.0 and hardware.at_width(points, 4096) == 4.0
    assert hardware.at_width(points, 384) == pytest.approx(2.0)  # halfway in log(width)


def test_cpu_time_model_is_the_measured_rate_of_the_processs_cores(monkeypatch):
    from memplan.catalog.resolve import resolve_model
    from memplan.plan import build_plan

    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1, 2, 3}, raising=False)
    info = hardware.cpu_info(cpuinfo("avx512f avx512bw avx512vl avx512dq avx512_bf16", cores=4))
    target = hardware.cpu_target(2, 0.1, [], 16 * GiB, info)
    spec = resolve_model("demo-tiny")  # d_model 192: the first measured width; rows of 256: the packed rows
    n = hardware.ROW_LEN
    for method in ("full", "lora"):
        kind = "full" if method == "full" else "adapters"
        for precision in ("fp32", "amp-bf16", "bf16"):
            gain = hardware.CPU_EXTRA_CORE_GAIN[kind][precision][n][0][1]  # each regime's own
            plan = build_plan(dict(model="demo-tiny", method=method, precision=precision, device="cpu", gpus=2,
                                   micro_batch=8, seq_len=n))
            step = throughput.step_time(spec, plan, target, 1_000_000)
            flops = throughput.train_flops_per_token(spec, plan) * 8 * n
            speed = hardware.CPU_BF16_SPEED["native"][kind][precision][n][0][1] if precision != "fp32" else 1.0
            rate = hardware.CPU_FP32_RATE[kind][n][0][1] * speed
            assert step.compute_s == pytest.approx(flops / (rate * (1 + gain)))  # 4 cores / 2 processes = 2 each
            # checkpointing (on by default) reruns a third of the per-layer cost beyond the FLOPs
            assert step.terms["overhead"] == pytest.approx(
                4 * hardware.CPU_OVERHEAD_MS_PER_LAYER[kind][0][1] * 1e-3 * 4 / 3)
            # the optimizer step: measured ns per parameter at 1 and 2 threads (AdamW foreach, fp32 parameters
            # except pure bf16's full fine-tuning)
            p_item = 2 if (method == "full" and precision == "bf16") else 4
            assert step.terms["optimizer"] == pytest.approx(
                1_000_000 * hardware.CPU_OPTIMIZER_NS_PER_PARAM["adamw"][p_item][1] * 1e-9)


def test_cpu_rates_follow_the_row_length():
    """Short rows (the CPU demo's, about 43 tokens) train at another rate than packed rows of 256: each is measured,
    and a row length between them is log-linear."""
    info = hardware.CpuInfo(name="AMD EPYC", cores=1, bf16="native", flag="avx512_bf16")
    short, packed = sorted(hardware.CPU_FP32_RATE["full"])
    at_short, at_packed = (info.rate("fp32", "full", 192, 1, n) for n in (short, packed))
    assert at_short == hardware.CPU_FP32_RATE["full"][short][0][1] and at_packed == hardware.CPU_FP32_RATE["full"][
        packed][0][1]
    middle = (short * packed) ** 0.5
    assert info.rate("fp32", "full", 192, 1, middle) == pytest.approx((at_short * at_packed) ** 0.5)
    assert info.rate("fp32", "full", 192, 1, 8192) == at_packed and info.rate("fp32", "full", 192, 1, 4) == at_short


def _calibration():
    import importlib.util
    import json as _json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("cpu_time_calibration", root / "benchmarks/cpu_time_calibration.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [_json.loads(x) for x in (root / hardware.CPU_RATES).read_text().splitlines()]
    return module, rows


def test_cpu_tables_are_the_fit_of_the_stored_calibration():
    """The tables the CPU time model reads are what benchmarks/cpu_time_calibration.py --fit makes of its rows."""
    module, rows = _calibration()
    fitted = module.fit(rows)
    assert fitted["CPU_OPTIMIZER_NS_PER_PARAM"] == hardware.CPU_OPTIMIZER_NS_PER_PARAM
    assert fitted["CPU_EXTRA_CORE_GAIN"] == hardware.CPU_EXTRA_CORE_GAIN
    assert fitted["CPU_OVERHEAD_MS_PER_LAYER"] == hardware.CPU_OVERHEAD_MS_PER_LAYER
    assert fitted["CPU_BF16_SPEED"] == hardware.CPU_BF16_SPEED["native"]
    assert fitted["CPU_FP32_RATE"] == {kind: {n: tuple((w, round(r / 1e9, 2)) for w, r in points)
                                              for n, points in by_len.items()}
                                       for kind, by_len in hardware.CPU_FP32_RATE.items()}


def test_cpu_time_model_gives_back_its_calibration_steps():
    """Each calibration step, predicted on the machine it ran on (its threads as cores) at the row length it ran:
    the model's terms add up to what was measured within 1 % (the tables round to 3-4 digits)."""
    from memplan.catalog.resolve import resolve_model
    from memplan.plan import build_plan

    _, rows = _calibration()
    checked = 0
    for r in rows:
        if r["kind"] != "train" or r["model"] != "demo-tiny":
            continue  # the d_model 512 model is built by the benchmark, not shipped
        info = hardware.CpuInfo(name="AMD EPYC", cores=r["threads"], bf16="native", flag="avx512_bf16")
        target = hardware.cpu_target(1, 0.1, [], 16 * GiB, info)
        plan = build_plan(dict(model="demo-tiny", method=r["method"], precision=r["precision"], device="cpu",
                               micro_batch=r["micro_batch"], seq_len=r["seq_len"], grad_ckpt=False,
                               optimizer=r["optimizer"], data={"packing": r["packed"]}))
        step = throughput.step_time(resolve_model("demo-tiny"), plan, target, r["trainable"], seq_tokens=r["row_len"])
        assert step.flops == pytest.approx(r["flops"])
        if r["micro_batch"] == 2:
            continue  # the small micro-batch fixes the per-layer cost: the line through it, not a table entry
        assert step.total_s == pytest.approx(r["step_s"], rel=0.01), (r["method"], r["precision"], r["threads"])
        checked += 1
    assert checked == 24  # 3 regimes x 2 thread counts x 2 methods, on packed rows and on the demo's short rows


def test_cpu_regimes_without_a_measurement_of_their_own():
    """bf16-master computes in bf16 (its fp32 masters only add to the optimizer step); fp16 regimes are not
    measured on the CPU and run at fp32's speed in the model."""
    info = hardware.CpuInfo(name="AMD EPYC", cores=1, bf16="native", flag="avx512_bf16")
    assert info.speed("bf16-master", "full", 192) == info.speed("bf16", "full", 192) != 1.0
    assert info.speed("amp-fp16", "lora", 512) == 1.0
