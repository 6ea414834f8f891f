"""recommend's reproducibility on the CPU."""

import json

import pytest

from memplan.recommend import hardware, throughput

GiB = 2**30


@pytest.fixture
def no_local_gpu(monkeypatch):
    import memplan.gpus

    monkeypatch.setattr(memplan.gpus, "local_gpus", lambda: [])


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
    """Without bf16 kernels (AVX2 only) LoRA runs fp32; with AVX512-BF16 the fastest regime by the measured
    speeds (CPU_BF16_SPEED) is chosen."""
    monkeypatch.setattr(hardware, "_read_cpuinfo", lambda: cpuinfo(""))
    out = _cpu_recommend(run_cli)
    assert out["plan"]["precision"] == "fp32"
    assert all(a["plan"]["precision"] == "fp32" for a in out["alternatives"] if a["plan"]["method"] == "lora")
    monkeypatch.setattr(hardware, "_read_cpuinfo", lambda: cpuinfo("avx512f avx512bw avx512vl avx512dq avx512_bf16"))
    out = _cpu_recommend(run_cli)
    info = hardware.cpu_info(cpuinfo("avx512f avx512bw avx512vl avx512dq avx512_bf16"))
    speeds = {p: info.speed(p, "lora", 192) for p in ("fp32", "amp-bf16", "bf16")}  # demo-tiny: d_model 192
    assert speeds[out["plan"]["precision"]] == max(speeds.values())  # ties go to the smaller plan
    # full FT (no quality trade-off: fp32 or amp-bf16): amp-bf16 measured faster
    out = _cpu_recommend(run_cli, "--method", "full")
    assert out["plan"]["precision"] == "amp-bf16" and info.speed("amp-bf16", "full", 192) > 1


def test_at_width_interpolates_the_measurements():
    points = ((192, 1.0), (768, 4.0))
    assert hardware.at_width(points, 100) == 1.0 and hardware.at_width(points, 4096) == 4.0
    assert hardware.at_width(points, 384) == pytest.approx(2.0)  # halfway in log(width)


def test_cpu_time_model_is_the_measured_rate_of_the_processs_cores(monkeypatch):
    from memplan.models import resolve_model
    from memplan.plan import build_plan

    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1, 2, 3}, raising=False)
    info = hardware.cpu_info(cpuinfo("avx512f avx512bw avx512vl avx512dq avx512_bf16", cores=4))
    target = hardware.cpu_target(2, 0.1, [], 16 * GiB, info)
    spec = resolve_model("demo-tiny")  # d_model 192: the first measured width
    gain = hardware.CPU_EXTRA_CORE_GAIN[0][1]
    for method in ("full", "lora"):
        for precision in ("fp32", "amp-bf16", "bf16"):
            plan = build_plan(dict(model="demo-tiny", method=method, precision=precision, device="cpu", gpus=2,
                                   micro_batch=8, seq_len=128))
            step = throughput.step_time(spec, plan, target, 0)
            flops = throughput.train_flops_per_token(spec, plan) * 8 * 128
            kind = "full" if method == "full" else "adapters"
            rate = hardware.CPU_FP32_RATE[kind][0][1] * hardware.CPU_BF16_SPEED["native"][kind].get(
                precision, ((192, 1.0),))[0][1]
            assert step.compute_s == pytest.approx(flops / (rate * (1 + gain)))  # 4 cores / 2 processes = 2 each


def test_cpu_time_model_agrees_with_the_measured_demo_steps():
    """The committed measurements (demo data, one core) against what the time model says for the same steps."""
    import json as _json
    from pathlib import Path

    from memplan.models import resolve_model
    from memplan.plan import build_plan

    root = Path(__file__).resolve().parents[1]
    runs = [_json.loads(x) for x in (root / "benchmarks/results/cpu-precision-speed.jsonl").read_text().splitlines()]
    info = hardware.CpuInfo(name="AMD EPYC", cores=1, bf16="native", flag="avx512_bf16")
    target = hardware.cpu_target(1, 0.1, [], 16 * GiB, info)
    checked = 0
    for run in runs:
        if run.get("onednn_max_cpu_isa") or run.get("clock", "cpu") != "cpu" or run["threads"] != 1:
            continue
        for case in run["cases"]:
            if case["data"] != "data/demo/train.jsonl" or case["model"] != "demo-tiny":
                continue
            spec = resolve_model("demo-tiny")
            for precision, r in case["results"].items():
                plan = build_plan(dict(model="demo-tiny", method=case["method"], precision=precision, device="cpu",
                                       micro_batch=case["micro_batch"], seq_len=case["seq_len"], grad_ckpt=False))
                rate = throughput.step_time(spec, plan, target, 0).peak_flops
                assert r["flops_median"] / rate == pytest.approx(r["step_s_median"], rel=0.05), (case["name"], precision)
                checked += 1
    assert checked == 6
