"""GPU presets, memory-size parsing and the local-GPU query (no GPU needed)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import types

import pytest

from memplan.catalog import gpus as gpus_mod
from memplan.catalog.gpus import (
    COMMON_SIZES_GIB,
    Gpu,
    custom_gpu,
    load_gpus,
    local_gpus,
    match_device_name,
    parse_memory,
    resolve_gpu,
)
from memplan.catalog.paths import write_table
from memplan.errors import UserError
from memplan.report.units import GiB, MiB, format_bytes

from support import REPO

REQUIRED_IDS = """
a100-40gb a100-80gb h100-80gb h100-pcie-80gb h200-141gb l40s-48gb l4-24gb a10g-24gb rtx3090-24gb
rtx4090-24gb rtx6000ada-48gb t4-16gb v100-16gb v100-32gb mi300x-192gb
""".split()

# Totals the driver reports (nvidia-smi / NVML), MiB.
REPORTED_MIB = {
    "a100-40gb": 40960,
    "a100-80gb": 81920,
    "h100-80gb": 81559,
    "h200-141gb": 143771,
    "l40s-48gb": 46068,
    "l4-24gb": 23034,
    "a10g-24gb": 23028,
    "rtx3090-24gb": 24576,
    "rtx4090-24gb": 24564,
    "t4-16gb": 15360,
    "v100-16gb": 16384,
}


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


def test_every_required_preset_loads():
    presets = load_gpus()
    assert sorted(presets) == sorted(REQUIRED_IDS)
    for gid, gpu in presets.items():
        assert isinstance(gpu, Gpu) and gpu.id == gid
        assert isinstance(gpu.memory_bytes, int) and gpu.memory_bytes > 0, gid
        assert gpu.name and gpu.source and gpu.source.startswith("https://"), gid
        assert gpu.memory_source in ("reported", "nominal"), gid
        assert gpu.interconnect, gid
        for key in ("fp16_tflops", "fp32_tflops", "memory_bandwidth_gbps", "interconnect_gbps", "host_link_gbps"):
            value = getattr(gpu, key)
            assert isinstance(value, float) and value > 0, (gid, key)
        # Dense tensor peaks are well above the non-tensor FP32 rate.
        assert gpu.fp16_tflops > gpu.fp32_tflops, gid
        if gpu.bf16_tflops is not None:
            assert gpu.bf16_tflops > gpu.fp32_tflops, gid


def test_h100_reports_81559_mib_exactly():
    h100 = resolve_gpu("h100-80gb")
    assert h100.memory_bytes == 81559 * MiB == 85_520_809_984
    assert h100.memory_source == "reported"
    assert h100.bf16_tflops == pytest.approx(989.4)  # dense, not the 1,979 sparse figure


@pytest.mark.parametrize("gid, mib", sorted(REPORTED_MIB.items()))
def test_reported_totals(gid, mib):
    gpu = resolve_gpu(gid)
    assert gpu.memory_source == "reported"
    assert gpu.memory_bytes == mib * MiB


def test_nominal_memory_is_whole_gib():
    for gpu in load_gpus().values():
        if gpu.memory_source == "nominal":
            assert gpu.memory_bytes % GiB == 0, gpu.id
    assert {g.id for g in load_gpus().values() if g.memory_source == "nominal"} <= {
        "h100-pcie-80gb", "rtx6000ada-48gb", "v100-32gb", "mi300x-192gb"
    }


def test_no_bf16_on_volta_and_turing():
    for gid in ("v100-16gb", "v100-32gb", "t4-16gb"):
        gpu = resolve_gpu(gid)
        assert gpu.bf16_tflops is None and gpu.fp16_tflops is not None


def test_amd_is_data_only():
    mi300x = resolve_gpu("mi300x")
    assert mi300x.vendor == "amd" and mi300x.memory_bytes == 192 * GiB
    assert all(g.vendor == "nvidia" for g in load_gpus().values() if g.id != "mi300x-192gb")


def test_load_is_cached_but_returns_a_copy():
    first = load_gpus()
    first.pop("h100-80gb")
    assert "h100-80gb" in load_gpus()
    assert load_gpus()["a100-80gb"] is load_gpus()["a100-80gb"]


# ---------------------------------------------------------------------------------------------
# resolve_gpu
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref, gid",
    [
        ("h100", "h100-80gb"),
        ("H100", "h100-80gb"),
        ("  h100-80GB ", "h100-80gb"),
        ("a100", "a100-40gb"),  # bare family name -> the smaller card
        ("a100-80g", "a100-80gb"),
        ("A100-80G", "a100-80gb"),
        ("4090", "rtx4090-24gb"),
        ("3090", "rtx3090-24gb"),
        ("RTX4090", "rtx4090-24gb"),
        ("h100-pcie", "h100-pcie-80gb"),
        ("h200", "h200-141gb"),
        ("l40s", "l40s-48gb"),
        ("l4", "l4-24gb"),
        ("a10g", "a10g-24gb"),
        ("t4", "t4-16gb"),
        ("v100", "v100-16gb"),
        ("v100-32g", "v100-32gb"),
        ("rtx6000ada", "rtx6000ada-48gb"),
        ("mi300x", "mi300x-192gb"),
    ],
)
def test_aliases_resolve(ref, gid):
    assert resolve_gpu(ref).id == gid


def test_every_id_and_alias_resolves_to_itself():
    for gid, gpu in load_gpus().items():
        assert resolve_gpu(gid.upper()) is gpu
        for alias in gpu.aliases:
            assert resolve_gpu(alias) is gpu


def test_unknown_gpu_names_closest_and_known():
    with pytest.raises(UserError) as err:
        resolve_gpu("h10")
    msg = str(err.value)
    assert msg.startswith("unknown GPU 'h10'. Closest: h100-80gb")
    assert "(known: a100-40gb, a100-80gb, h100-80gb" in msg and "mi300x-192gb)" in msg


def test_unknown_gpu_without_close_match():
    with pytest.raises(UserError) as err:
        resolve_gpu("zzzzzz")
    msg = str(err.value)
    assert "Closest" not in msg and msg.startswith("unknown GPU 'zzzzzz' (known: ")


def test_duplicate_alias_in_data_is_rejected(tmp_path, monkeypatch):
    (tmp_path / "gpus").mkdir()
    (tmp_path / "gpus" / "gpus.yaml").write_text(
        "gpus:\n"
        "  x-1gb: {name: X, memory_bytes: 1073741824, source: 'https://x', aliases: [same]}\n"
        "  y-1gb: {name: Y, memory_bytes: 1073741824, source: 'https://y', aliases: [same]}\n"
    )
    write_table(tmp_path / "gpus" / "gpus.yaml")  # memplan reads the JSON twin
    monkeypatch.setattr(gpus_mod, "data_dir", lambda: tmp_path)
    gpus_mod._load.cache_clear()
    try:
        with pytest.raises(ValueError, match="'same' is used by both x-1gb and y-1gb"):
            load_gpus()
    finally:
        monkeypatch.undo()
        gpus_mod._load.cache_clear()
    assert "h100-80gb" in load_gpus()


# ---------------------------------------------------------------------------------------------
# parse_memory, custom_gpu, format_bytes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("24GiB", 24 * GiB),
        ("24gib", 24 * GiB),
        ("24GB", 24 * 10**9),
        ("24gb", 24 * 10**9),
        ("24G", 24 * GiB),  # a bare G is binary
        ("24g", 24 * GiB),
        ("81559MiB", 81559 * MiB),
        ("81559M", 81559 * MiB),
        ("80 GiB", 80 * GiB),
        (" 80  GiB ", 80 * GiB),
        ("24", 24 * GiB),  # a plain number is GiB
        ("1.5", 3 * GiB // 2),
        ("1.5GiB", 3 * GiB // 2),
        ("0.5 TiB", 512 * GiB),
        ("2TB", 2 * 10**12),
        ("1024KiB", MiB),
        ("500MB", 500 * 10**6),
        ("4096B", 4096),
    ],
)
def test_parse_memory_forms(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["0", "0GiB", "-24GB", "-1", "0.0000000001B"])
def test_parse_memory_rejects_zero_and_negative(text):
    with pytest.raises(UserError, match="more than zero") as err:
        parse_memory(text)
    assert "24GiB" in str(err.value) and "81559MiB" in str(err.value)


@pytest.mark.parametrize(
    "text", ["", "   ", "GiB", "abc", "24XB", "24 GiBs", "24GiB extra", "1,5GB", "nan", "inf"]
)
def test_parse_memory_rejects_garbage(text):
    with pytest.raises(UserError, match="bad memory size") as err:
        parse_memory(text)
    msg = str(err.value)
    for form in ("24GiB", "80 GiB", "81559MiB", "24GB", "24G", "plain number"):
        assert form in msg


def test_custom_gpu():
    gpu = custom_gpu(24 * GiB)
    assert gpu.id == "custom-24gib" and gpu.memory_bytes == 24 * GiB
    assert gpu.bf16_tflops is gpu.fp16_tflops is gpu.fp32_tflops is gpu.memory_bandwidth_gbps is None
    assert gpu.interconnect_gbps is gpu.host_link_gbps is gpu.source is None
    assert custom_gpu(parse_memory("81559MiB")).id == "custom-79.65gib"
    assert custom_gpu(parse_memory("1.5GiB")).id == "custom-1.5gib"
    for bad in (0, -1, 1.5, "24GiB", True):
        with pytest.raises(UserError):
            custom_gpu(bad)


def test_format_bytes():
    assert format_bytes(85_520_809_984) == "79.65 GiB"
    assert format_bytes(24 * GiB) == "24.00 GiB"
    assert format_bytes(24 * GiB, unit="MiB") == "24576.00 MiB"
    assert format_bytes(24 * 10**9, unit="GB") == "24.00 GB"
    assert format_bytes(1536 * MiB, digits=1) == "1.5 GiB"
    assert format_bytes(4096, unit="B") == "4096 B"
    with pytest.raises(ValueError):
        format_bytes(1, unit="gibibytes")


def test_common_sizes():
    assert COMMON_SIZES_GIB == (16, 24, 40, 48, 80)


# ---------------------------------------------------------------------------------------------
# local_gpus
# ---------------------------------------------------------------------------------------------


class _NVMLError(Exception):
    pass


@pytest.fixture(autouse=True)
def _driver_present(request, monkeypatch):
    """The stand-in pynvml tests run as if an NVIDIA driver were installed (memplan skips NVML without one)."""
    if request.node.name != "test_local_gpus_on_this_machine":
        import memplan.catalog.gpus

        monkeypatch.setattr(memplan.catalog.gpus, "_no_nvidia_driver", lambda: False)


def _fake_pynvml(devices=(), fail_at=None, shutdown_log=None):
    """A stand-in pynvml: ``devices`` is [(name, total_bytes)]; ``fail_at`` names the call that raises."""

    def call(name, result=None):
        def fn(*args):
            if fail_at == name:
                raise _NVMLError(f"{name} failed")
            return result(*args) if callable(result) else result

        return fn

    mod = types.ModuleType("pynvml")
    mod.NVMLError = _NVMLError
    mod.nvmlInit = call("nvmlInit")
    mod.nvmlShutdown = lambda: shutdown_log.append(True) if shutdown_log is not None else None
    mod.nvmlDeviceGetCount = call("nvmlDeviceGetCount", len(devices))
    mod.nvmlDeviceGetHandleByIndex = call("nvmlDeviceGetHandleByIndex", lambda i: i)
    mod.nvmlDeviceGetName = call("nvmlDeviceGetName", lambda h: devices[h][0])
    mod.nvmlDeviceGetMemoryInfo = call(
        "nvmlDeviceGetMemoryInfo", lambda h: types.SimpleNamespace(total=devices[h][1], free=0, used=0)
    )
    return mod


def _nvml_device_count() -> int | None:
    """How many GPUs the real NVML sees, or None where it cannot start (no driver: CI, laptops)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


def test_local_gpus_on_this_machine():
    count = _nvml_device_count()
    found = local_gpus()
    if count is None:
        # No NVIDIA driver here: nvmlInit fails inside pynvml, and local_gpus swallows it.
        assert found == []
    else:  # run on a GPU machine: one entry per device, memory straight from NVML
        assert len(found) == count and all(g.memory_bytes > 0 for g in found)


@pytest.mark.parametrize(
    "fail_at",
    ["nvmlInit", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetName", "nvmlDeviceGetMemoryInfo"],
)
def test_local_gpus_swallows_nvml_errors(monkeypatch, fail_at):
    shutdowns: list[bool] = []
    fake = _fake_pynvml([("NVIDIA H100 80GB HBM3", 81559 * MiB)], fail_at=fail_at, shutdown_log=shutdowns)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert local_gpus() == []
    assert shutdowns == ([] if fail_at == "nvmlInit" else [True])


def test_local_gpus_without_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert local_gpus() == []


def test_local_gpus_when_shutdown_raises(monkeypatch):
    fake = _fake_pynvml([("NVIDIA L4", 23034 * MiB)])

    def boom():
        raise _NVMLError("shutdown")

    fake.nvmlShutdown = boom
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert [g.id for g in local_gpus()] == ["l4-24gb"]


def test_local_gpus_matches_presets(monkeypatch):
    devices = [
        ("NVIDIA H100 80GB HBM3", 81559 * MiB),
        (b"NVIDIA A100-SXM4-40GB", 40960 * MiB),  # old nvidia-ml-py returns bytes
        ("Tesla T4", 15360 * MiB),
        ("NVIDIA H100 NVL", 95830 * MiB),  # a different part: no preset, memory only
        ("NVIDIA A10", 23028 * MiB),  # not the A10G
    ]
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(devices))
    found = local_gpus()
    assert [g.id for g in found] == ["h100-80gb", "a100-40gb", "t4-16gb", "local-nvidia-h100-nvl", "local-nvidia-a10"]
    h100 = found[0]
    assert h100.name == "NVIDIA H100 80GB HBM3" and h100.memory_bytes == 81559 * MiB
    assert h100.bf16_tflops == resolve_gpu("h100").bf16_tflops and h100.memory_source == "nvml"
    same = ("name", "memory_bytes", "memory_source")  # the device's own; every other figure is the preset's
    assert h100 == dataclasses.replace(resolve_gpu("h100"), **{k: getattr(h100, k) for k in same})
    assert found[1].name == "NVIDIA A100-SXM4-40GB"
    nvl = found[3]
    assert nvl.memory_bytes == 95830 * MiB and nvl.bf16_tflops is None and nvl.name == "NVIDIA H100 NVL"


def test_local_gpus_uses_nvml_total_for_memory(monkeypatch):
    # A T4 with ECC turned off reports the full 16 GiB; the NVML total wins over the preset's figure.
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([("Tesla T4", 16 * GiB)]))
    (t4,) = local_gpus()
    assert t4.id == "t4-16gb" and t4.memory_bytes == 16 * GiB


def test_device_name_matching():
    assert match_device_name("NVIDIA H100 80GB HBM3").id == "h100-80gb"
    assert match_device_name("nvidia  h100 80gb hbm3 ").id == "h100-80gb"
    assert match_device_name("NVIDIA H100 PCIe").id == "h100-pcie-80gb"
    assert match_device_name("NVIDIA H200").id == "h200-141gb"
    assert match_device_name("NVIDIA GeForce RTX 4090").id == "rtx4090-24gb"
    assert match_device_name("NVIDIA RTX 6000 Ada Generation").id == "rtx6000ada-48gb"
    others = ("NVIDIA H200 NVL", "NVIDIA RTX A6000", "NVIDIA GeForce RTX 3090 Ti", "NVIDIA L40", "AMD Instinct MI300X")
    for other in others:
        assert match_device_name(other) is None, other


# ---------------------------------------------------------------------------------------------
# The fast path stays free of torch
# ---------------------------------------------------------------------------------------------


def test_import_does_not_load_torch_or_pynvml():
    code = (
        "import sys, memplan.catalog.gpus as g; g.load_gpus(); g.resolve_gpu('h100'); g.parse_memory('24GiB'); "
        "heavy = [m for m in ('torch', 'transformers', 'pynvml') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
