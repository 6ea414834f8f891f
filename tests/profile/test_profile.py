"""`memplan profile`: real steps measured per phase next to the estimate, on every backend this machine has."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from memplan.estimator.phases import TERMS
from memplan.plan import Plan
from memplan.profile.launch import search_max
from memplan.profile.meters import CudaMeter
from memplan.profile.run import measure

from support import REPO, without_network

MiB = 2**20
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
PLAN = ["--batch-size", "2", "--seq-len", "64"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny") / "config.json"
    path.write_text(LlamaConfig(**TINY).to_json_string())
    return str(path)


def profile_json(run_cli, *args):
    code, out, err = run_cli("profile", *args, "--json")
    assert code in (0, 1), err
    return code, json.loads(out)


def check_errors(result):
    """error_pct is 100 x (estimate - measured) / measured, from the printed numbers."""
    m = result["measured"]
    assert result["error_pct"] == pytest.approx(
        100 * (result["peak_allocated_bytes"] - m["peak_allocated_bytes"]) / m["peak_allocated_bytes"], abs=1e-3)
    for ph, err in result["phase_error_pct"].items():
        est, meas = result["phase_peaks"][ph], m["phase_peaks"][ph]
        assert err == pytest.approx(100 * (est - meas) / meas, abs=1e-3)


# ---------------------------------------------------------------- cpu backend: full, LoRA, QLoRA


def test_cpu_full_json_shape(run_cli, tiny):
    code, out = profile_json(run_cli, "--model", tiny, *PLAN, "--precision", "fp32", "--backend", "cpu",
                             "--grad-accum", "2")
    assert code == 0
    assert out["profile"]["backend"] == "cpu" and out["profile"]["estimate_kernels"] == "cpu"
    assert "CUDA context" in out["profile"]["not_seen"]
    (result,) = out["results"]
    m = result["measured"]
    assert m["backend"] == "cpu"
    assert m["reserved_bytes"] is None and m["nvml_used_bytes"] is None  # not measurable on the CPU
    assert set(m["phase_peaks"]) == {"forward", "backward", "optimizer"}
    assert set(m["breakdown"]) == set(TERMS)
    assert m["breakdown"]["workspace"] is None  # kernels' workspaces: only a GPU's allocator sees them
    assert m["breakdown"]["gathered_params"] == m["breakdown"]["comm_buffers"] == 0  # one process
    peak = m["phase_peaks"][m["peak_phase"]]
    assert sum(v for v in m["breakdown"].values() if v) == peak
    # grad_accum 2: the gradients of the first micro-batch are alive during the second forward
    assert m["phase_breakdown"]["forward"]["gradients"] == m["phase_breakdown"]["optimizer"]["gradients"] > 0
    assert m["peak_allocated_bytes"] >= peak
    check_errors(result)
    assert -2.0 <= result["error_pct"] <= 3.0


def test_cpu_lora_trains_only_adapters(tiny):
    plan = Plan(method="lora", precision="bf16", micro_batch=2, seq_len=64, lora={"rank": 4})
    result = measure(tiny, plan, backend="cpu", steps=2)
    at_step = result.steady.breakdown["optimizer"]
    base = sum(p.numel() for p in AutoModelForCausalLM.from_config(LlamaConfig(**TINY)).parameters())
    assert 0 < at_step["gradients"] < 0.2 * 4 * base  # fp32 adapters only
    assert at_step["weights"] == result.after_load
    assert result.oom is None and result.backend == "cpu"


def test_cpu_qlora_and_trace_refuses_it(run_cli, tiny):
    code, out, _ = run_cli("profile", "--model", tiny, *PLAN, "--method", "qlora", "--precision", "bf16",
                           "--backend", "cpu", "--no-grad-ckpt")
    assert code == 0
    assert "breakdown at the" in out and "verdict: estimate" in out
    code, _, err = run_cli("profile", "--model", tiny, *PLAN, "--method", "qlora", "--precision", "bf16",
                           "--backend", "trace")
    assert code == 2
    assert "4-bit kernels" in err and "--backend cpu" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("profile", "--model", tiny, *PLAN, "--optimizer", "adamw-8bit", "--backend", "trace")
    assert code == 2 and "8-bit optimizer" in err


def test_weights_dir_is_loaded(run_cli, tiny, tmp_path):
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY))
    model.save_pretrained(tmp_path / "ckpt")
    code, out = profile_json(run_cli, "--weights", str(tmp_path / "ckpt"), *PLAN, "--precision", "fp32",
                             "--backend", "cpu", "--steps", "1")
    _, random = profile_json(run_cli, "--model", tiny, *PLAN, "--precision", "fp32", "--backend", "cpu",
                             "--steps", "1")
    assert code == 0
    assert out["results"][0]["measured"]["after_load_bytes"] == random["results"][0]["measured"]["after_load_bytes"]


TERM_PLANS = [["--method", "lora", "--seq-len", "128"], ["--method", "lora", "--no-grad-ckpt"],
              ["--batch-size", "2", "--seq-len", "256"], ["--precision", "fp32"]]


@pytest.mark.slow
@pytest.mark.parametrize("plan", TERM_PLANS)
def test_terms_are_measured_as_the_estimate_defines_them(run_cli, plan):
    """At the loss, the output embedding's own saved inputs (autocast's weight copy, the cast hidden states) and
    the labels are activations in both; logits_loss is the logits and what the loss computes from them. The
    table shows the same terms (checked on the first plan: each run traces the step again)."""
    args = ["--model", "demo-tiny", *plan, "--backend", "trace", "--steps", "2"]
    _, out = profile_json(run_cli, *args)
    result = out["results"][0]
    assert result["measured"]["peak_phase"] == "backward" and result["term_note"] is None
    terms = result["term_error_pct"]
    assert terms["logits_loss"] is not None and terms["activations"] is not None
    assert all(abs(err) < 0.5 for err in terms.values()), terms
    if plan != TERM_PLANS[0]:
        return
    _, table, _ = run_cli("profile", *args)
    rows = table.split("breakdown at the backward peak", 1)[1].split("\n\n", 1)[0].splitlines()[3:]
    assert [r.split()[0] for r in rows] == ["weights", "optimizer_states", "activations", "logits_loss"]
    assert all(abs(float(r.split()[-1])) < 0.5 for r in rows), rows


def test_terms_of_peaks_at_different_points_are_not_compared(run_cli, tiny):
    """Rank-8 LoRA in bf16 on the tiny model: the backward peaks about as high in its first layer's recompute
    (measured: the last layer's adapter gradients exist) as at the end of that layer's backward (estimated: all of
    them)."""
    args = ["--model", tiny, *PLAN, "--method", "lora", "--precision", "bf16", "--lora-rank", "8", "--backend",
            "trace", "--steps", "2"]
    _, out = profile_json(run_cli, *args)
    result = out["results"][0]
    assert abs(result["phase_error_pct"]["backward"]) < 0.5
    assert result["term_error_pct"] is None
    assert "different points of the backward (gradients:" in result["term_note"]
    _, table, _ = run_cli("profile", *args)
    rows = table.split("breakdown at the backward peak", 1)[1].split("\n\n", 1)[0].splitlines()[3:]
    assert all(r.split()[-1] == "-" for r in rows[:-1]), rows
    assert "different points of the backward" in rows[-1]


# ---------------------------------------------------------------- trace backend


def test_trace_equals_cpu_and_says_what_it_cannot_see(run_cli, tiny):
    args = ["--model", tiny, *PLAN, "--precision", "amp-bf16", "--loss", "chunked", "--steps", "2"]
    _, trace = profile_json(run_cli, *args, "--backend", "trace")
    _, cpu = profile_json(run_cli, *args, "--backend", "cpu")
    t, c = trace["results"][0]["measured"], cpu["results"][0]["measured"]
    assert t["backend"] == "trace"
    for ph in ("forward", "backward", "optimizer"):
        assert t["phase_peaks"][ph] == pytest.approx(c["phase_peaks"][ph], rel=1e-3)
    code, out, _ = run_cli("profile", *args, "--backend", "trace")
    assert code == 0
    assert "not seen by the trace" in out and "caching allocator" in out and "NCCL" in out
    assert "first step" in out and "steady" in out


def test_trace_of_a_cuda_plan_replays_the_caching_allocator(run_cli, tiny):
    """A CUDA plan traced on the CPU also says what a GPU would reserve: the step's allocations served by the
    allocator model, for the plan's allocator and the other one, the CUDA context added for the total."""
    from memplan.estimator.allocator import round_size
    from memplan.estimator.overhead import CUBLAS_WORKSPACE_BYTES, CUDA_CONTEXT_BYTES

    args = ["--model", tiny, *PLAN, "--precision", "bf16", "--steps", "2", "--backend", "trace"]
    _, out = profile_json(run_cli, *args, "--allocator", "expandable")
    replayed = out["profile"]["replayed"]
    assert replayed["allocator"] == "expandable"
    peak = out["results"][0]["measured"]["peak_allocated_bytes"]
    for allocator in ("default", "expandable"):
        reserved = replayed["reserved_bytes"][allocator]
        # at least every tensor and the cuBLAS workspace, each rounded as the allocator rounds
        assert reserved >= round_size(peak) + CUBLAS_WORKSPACE_BYTES
        assert replayed["total_bytes"][allocator] == reserved + CUDA_CONTEXT_BYTES
    # the tiny model's blocks all come from the small pool's 2 MiB segments and 20 MiB large-pool segments
    assert replayed["reserved_bytes"]["default"] % (2 << 20) == 0
    code, text, _ = run_cli("profile", *args)
    assert code == 0 and "replayed through the caching allocator model" in text
    _, cpu_plan = profile_json(run_cli, *args, "--device", "cpu")
    assert "replayed" not in cpu_plan["profile"]


# ---------------------------------------------------------------- the CUDA meter and out of memory


class FakeCudaStats:
    """torch.cuda's memory-stat functions, driven by the live-bytes meter plus a fixed workspace."""

    WORKSPACE = 1 * MiB

    def __init__(self) -> None:
        self.meter = None
        self.resets = 0

    def synchronize(self, device) -> None:
        pass

    def reset_peak_memory_stats(self, device) -> None:
        self.resets += 1

    def _tracker(self):
        return self.meter.tracker

    def max_memory_allocated(self, device) -> int:
        peak = self._tracker()._peak
        return (peak.total if peak is not None else self._tracker().live) + self.WORKSPACE

    def max_memory_reserved(self, device) -> int:
        return 2 * self.max_memory_allocated(device)

    def memory_allocated(self, device) -> int:
        return self._tracker().live


def test_cuda_meter_phases_without_a_gpu(tiny):
    plan = Plan(precision="fp32", micro_batch=2, seq_len=64, grad_accum=2)
    stats = FakeCudaStats()
    meter = CudaMeter("cpu", stats=stats)
    stats.meter = meter
    result = measure(tiny, plan, backend="cpu", steps=2, meter=meter)
    plain = measure(tiny, plan, backend="cpu", steps=2)
    for ph in ("forward", "backward", "optimizer"):
        assert result.steady.peaks[ph] == plain.steady.peaks[ph] + FakeCudaStats.WORKSPACE
        assert result.steady.tensor_peaks[ph] == plain.steady.peaks[ph]
        assert result.steady.reserved[ph] == 2 * result.steady.peaks[ph]
    assert result.reserved_peak == 2 * result.peak
    # per step: forward and backward of each micro-batch, the optimizer, the end of the step
    assert stats.resets == 2 * (2 * 2 + 1 + 1)
    assert result.nvml_used is None  # no NVML here: not measured, not invented


def test_out_of_memory_is_reported_not_raised(run_cli, tiny, monkeypatch):
    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.Tensor, "backward", oom)
    code, out, err = run_cli("profile", "--model", tiny, *PLAN, "--backend", "cpu")
    assert code == 1
    assert "does not fit: out of memory in backward at" in out and "Traceback" not in out + err
    code, data = profile_json(run_cli, "--model", tiny, *PLAN, "--backend", "cpu")
    assert code == 1
    m = data["results"][0]["measured"]
    assert m["oom"]["phase"] == "backward" and m["oom"]["step"] == 1 and m["oom"]["allocated_bytes"] > 0
    assert data["results"][0]["error_pct"] is None


def test_out_of_memory_in_the_optimizer_on_the_cuda_meter(tiny, monkeypatch):
    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch.optim.AdamW, "step", oom)
    stats = FakeCudaStats()
    meter = CudaMeter("cpu", stats=stats)
    stats.meter = meter
    result = measure(tiny, Plan(precision="fp32", micro_batch=2, seq_len=64), backend="cpu", meter=meter)
    assert result.oom["phase"] == "optimizer"
    assert result.oom["allocated_bytes"] > FakeCudaStats.WORKSPACE
    assert result.steps[0].peaks["backward"] > 0  # the phases before the failure are kept


# ---------------------------------------------------------------- --find-max-batch


def test_search_max_finds_the_boundary_from_any_start():
    for truth in (0, 1, 5, 17, 64):
        for start in (1, 3, 16, 100):
            calls = []

            def fits(n, calls=calls, truth=truth):
                calls.append(n)
                return n <= truth

            assert search_max(fits, start, 64) == truth
            assert len(calls) <= 14


@pytest.mark.slow
def test_find_max_batch_probes_in_subprocesses(run_cli, tiny):
    plan = dict(device="cpu", precision="fp32", seq_len=64, grad_ckpt=False)
    peaks = {b: measure(tiny, Plan(micro_batch=b, **plan), backend="trace", steps=2).peak for b in (3, 4)}
    capacity = (peaks[3] + peaks[4]) // 2  # a CPU plan fits when its measured peak does
    code, out = profile_json(run_cli, "--model", tiny, "--device", "cpu", "--precision", "fp32", "--seq-len", "64",
                             "--no-grad-ckpt", "--backend", "trace", "--steps", "2", "--find-max-batch",
                             "--gpu-memory", f"{capacity}B")
    assert code == 0
    found = out["max_batch"]
    assert found["value"] == 3
    assert "cannot run out of GPU memory" in found["criterion"]
    assert {p["micro_batch"] for p in found["probes"]} >= {3, 4}
    for p in found["probes"]:
        assert p["fits"] == (p["needed_bytes"] <= capacity)
        if p["micro_batch"] in peaks:
            assert p["peak_allocated_bytes"] == peaks[p["micro_batch"]]


# ---------------------------------------------------------------- several processes (gloo)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_ddp_and_fsdp_on_gloo(tmp_path, tiny):
    """Run as a user runs it, with every host name look-up but this machine's refused and recorded
    (support.without_network): neither `memplan profile` nor its ranks look anything up."""
    run = without_network(tmp_path)
    base = ["--model", tiny, *PLAN, "--precision", "fp32", "--backend", "cpu", "--gpus", "2", "--steps", "2"]

    def profile(*args):
        done, looked_up = run("profile", *base, *args, "--json")
        assert done.returncode == 0, done.stderr[-3000:]
        assert looked_up == []
        return json.loads(done.stdout)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY), dtype=torch.float32)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    m = profile()["results"][0]["measured"]
    assert [r["rank"] for r in m["ranks"]] == [0, 1]
    # the ranks hold the same tensors, but which scalars are still alive at a peak can differ between two processes
    # (one rank's forward peak was 4 bytes above the other's in one CI run)
    for phase, peak in m["ranks"][0]["phase_peaks"].items():
        assert abs(peak - m["ranks"][1]["phase_peaks"][phase]) <= 64, phase
    assert m["after_load_bytes"] == weights
    # DDP's gradient buckets: one more copy of the gradients (gradient_as_bucket_view=False)
    assert m["phase_breakdown"]["optimizer"]["comm_buffers"] == m["phase_breakdown"]["optimizer"]["gradients"]
    f = profile("--sharding", "fsdp", "--zero", "3")["results"][0]["measured"]
    assert len(f["ranks"]) == 2
    assert f["after_load_bytes"] == pytest.approx(weights / 2, rel=0.01)  # each rank holds half
    assert f["phase_breakdown"]["optimizer"]["optimizer_states"] == pytest.approx(
        m["phase_breakdown"]["optimizer"]["optimizer_states"] / 2, rel=0.01)
    # FULL_SHARD gathers a unit's parameters for its forward and frees them after
    assert f["phase_breakdown"]["forward"]["gathered_params"] > 0
    assert f["phase_breakdown"]["optimizer"]["gathered_params"] == 0


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, message", [
    (["--backend", "trace", "--gpus", "2"], "trace backend runs one"),
    (["--backend", "trace", "--find-max-batch"], "needs the GPU's memory"),
    (["--sharding", "deepspeed", "--zero", "2", "--precision", "bf16-master", "--backend", "trace"],
     "DeepSpeed's engine runs real tensors"),
    (["--backend", "cuda"], None),
])
def test_bad_input_is_one_line_and_exit_2(run_cli, tiny, args, message):
    if args == ["--backend", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --backend cuda is valid here")
    code, out, err = run_cli("profile", "--model", tiny, *PLAN, *args)
    assert code == 2
    assert err.startswith("memplan: error:") and len(err.strip().splitlines()) == 1
    assert message is None or message in err
    if message is None:
        assert "no CUDA device" in err


def test_no_model_and_bad_steps(run_cli):
    code, _, err = run_cli("profile", "--backend", "trace")
    assert code == 2 and "no model" in err
    code, _, err = run_cli("profile", "--model", "llama-2-7b", "--steps", "0")
    assert code == 2


# ---------------------------------------------------------------- the GPU check runs the same path


def test_gpu_check_rows_come_from_the_profile_path(tiny, tmp_path, monkeypatch):
    """benchmarks/gpu_check.py on the CPU: torch.cuda replaced by FakeCudaStats, the preset by the tiny config."""
    import importlib.util
    import shutil

    import memplan.catalog.presets
    import memplan.profile.meters
    import memplan.profile.run

    (tmp_path / "tiny").mkdir()
    shutil.copy(tiny, tmp_path / "tiny" / "config.json")
    monkeypatch.setattr(memplan.catalog.presets, "models_dir", lambda: tmp_path)

    class CpuCudaMeter(CudaMeter):
        def __init__(self, device, attribute=True):
            stats = FakeCudaStats()
            super().__init__("cpu", stats=stats, attribute=attribute)
            stats.meter = self

    real_measure = memplan.profile.run.measure
    monkeypatch.setattr(memplan.profile.meters, "CudaMeter", CpuCudaMeter)
    monkeypatch.setattr(memplan.profile.run, "measure",
                        lambda config, plan, backend, **kw: real_measure(config, plan, backend="cpu", **kw))
    path = REPO / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    row = gpu_check.measure("tiny", dict(precision="bf16", micro_batch=2, seq_len=64, grad_ckpt=False), steps=2)
    assert len(row["steps"]) == 2 and row["attributed"] and row["oom"] is None
    for step in row["steps"]:
        for ph in ("forward", "backward", "optimizer"):
            assert step[ph] == step["tensor_peaks"][ph] + FakeCudaStats.WORKSPACE
        assert step["reserved"] == 2 * max(step[ph] for ph in ("forward", "backward", "optimizer"))


def test_a_teardown_failure_after_every_rank_measured_keeps_the_figures(monkeypatch, tiny):
    """torchrun's exit code fails, but every rank wrote its measurement first: the figures stand, with a note."""
    import subprocess

    from memplan.plan import build_plan
    from memplan.profile import launch
    from memplan.profile.run import Measured

    plan = build_plan(dict(model=tiny, precision="fp32", device="cpu", gpus=2, micro_batch=2, seq_len=64))

    def torchrun_that_aborts_at_exit(cmd, **kwargs):
        out_dir = Path(cmd[-1])
        for rank in (0, 1):
            measured = Measured(backend="cpu", steps=[], after_load=1024, rank=rank, world_size=2)
            (out_dir / f"rank-{rank:04d}.json").write_text(json.dumps(measured.to_json()))
        return subprocess.CompletedProcess(cmd, -6, "", "terminate called without an active exception\n")

    monkeypatch.setattr(launch.subprocess, "run", torchrun_that_aborts_at_exit)
    req = launch.MeasureRequest(config=tiny, plan=plan.model_dump(mode="json"), backend="cpu", steps=2)
    results = launch.measure_plan(req)
    assert [r.rank for r in results] == [0, 1] and results[0].after_load == 1024
    assert "exited with code -6 after every rank had written its measurement" in results[0].notes[0]

    def torchrun_that_fails_early(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "Traceback: a rank died\n")

    monkeypatch.setattr(launch.subprocess, "run", torchrun_that_fails_early)
    with pytest.raises(RuntimeError, match="torchrun with 2 processes failed"):
        launch.measure_plan(req)


def test_a_trainers_config_is_profiled_with_its_provenance(run_cli, tiny, tmp_path):
    """--config takes a trainer's config as estimate --config does: the same plan, what came from where first."""
    config = tmp_path / "sft.yaml"
    config.write_text(f"model_name_or_path: {tiny}\nuse_peft: true\nlora_r: 4\nlora_target_modules: [q_proj, v_proj]\n"
                      "per_device_train_batch_size: 2\nmax_length: 64\nbf16: false\ngradient_checkpointing: false\n")
    code, out = profile_json(run_cli, "--config", str(config), "--device", "cpu", "--backend", "trace", "--steps", "2")
    assert code == 0
    plan = out["results"][0]["plan"]
    assert (plan["method"], plan["lora"]["rank"], plan["micro_batch"], plan["seq_len"], plan["precision"]) == \
        ("lora", 4, 2, 64, "fp32")
    assert out["config_source"]["format"] == "trl" and out["config_source"]["taken"]["seq_len"] == "max_length"
    _, estimated = run_cli("estimate", "--config", str(config), "--device", "cpu", "--json")[:2]
    assert json.loads(estimated)["results"][0]["plan"] == plan
    code, text, _ = run_cli("profile", "--config", str(config), "--device", "cpu", "--backend", "trace", "--steps", "2")
    assert code == 0 and text.startswith(f"Read {config} as a TRL / transformers TrainingArguments config:")
