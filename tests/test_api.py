"""The Python API gives the commands' numbers: `to_json()` equals `--json` for the same inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import memplan
from memplan.plan import Plan

from support import REPO


def _cli_json(run_cli, *args: str) -> tuple[int, dict]:
    code, out, _ = run_cli(*args, "--json")
    return code, json.loads(out)


def test_estimate_equals_the_command(run_cli):
    e = memplan.estimate("llama-2-7b", method="lora", micro_batch=4, lora={"rank": 8}, gpu="a100-80gb",
                         max_batch=True)
    code, out = _cli_json(run_cli, "estimate", "--model", "llama-2-7b", "--method", "lora", "--batch-size", "4",
                          "--lora-rank", "8", "--gpu", "a100-80gb", "--max-batch")
    assert code == 0 and e.to_json() == out
    r = out["results"][0]
    assert (e.fits, e.total_bytes, e.reserved_bytes, e.peak_allocated_bytes) == \
        (True, r["total_bytes"], r["reserved_bytes"], r["peak_allocated_bytes"])
    assert e.breakdown == r["breakdown"] and e.phase_peaks == r["phase_peaks"]
    assert e.reserved_basis == r["reserved_basis"] == "replayed"
    assert e.limits == {"max_batch": out["max_batch"]} and e.limits["max_batch"] > 4
    assert e.plan.lora.rank == 8 and e.plan.micro_batch == 4 and e.params_total == out["model"]["params_total"]


def test_estimate_takes_a_plan_object_a_dict_or_a_file(tmp_path):
    plan = Plan(model="tinyllama-1.1b", method="qlora", seq_len=1024)
    by_object = memplan.estimate(plan=plan, micro_batch=2, gpu_memory="24GiB")
    path = tmp_path / "plan.yaml"
    path.write_text("model: tinyllama-1.1b\nmethod: qlora\nseq_len: 1024\n")
    by_file = memplan.estimate(plan=path, micro_batch=2, gpu_memory=24 * 2**30)  # bytes as an int
    by_dict = memplan.estimate(plan={"model": "tinyllama-1.1b", "method": "qlora", "seq_len": 1024},
                               micro_batch=2, gpu_memory="24GiB")
    assert by_object.to_json() == by_file.to_json() == by_dict.to_json()
    assert by_object.plan.micro_batch == 2 and by_object.gpu_memory_bytes == 24 * 2**30


def test_compare_equals_the_command(run_cli):
    table = memplan.compare("llama-2-7b", gpus=4, gpu="a100-80gb")
    code, out = _cli_json(run_cli, "estimate", "--model", "llama-2-7b", "--gpus", "4", "--gpu", "a100-80gb")
    assert code == 0 and table.to_json() == out
    assert [r.total_bytes for r in table.rows] == [r["total_bytes"] for r in out["results"]]
    assert table.best is table.rows[out["best"]] and table.best.fits


def test_recommend_equals_the_command(run_cli, tmp_path):
    written = tmp_path / "plan"
    rec = memplan.recommend("tinyllama-1.1b", gpu="rtx-4090", dataset_size=20000, out_dir=str(written))
    files = {f: (written / f).read_text() for f in rec.files}
    code, out = _cli_json(run_cli, "recommend", "--model", "tinyllama-1.1b", "--gpu", "rtx-4090",
                          "--dataset-size", "20000", "--output", str(written))
    assert code == 0 and rec.to_json() == out
    assert files == {f: (written / f).read_text() for f in out["files"]}
    assert str(written / "plan.yaml") in files


def test_recommend_raises_no_plan_fits_with_the_suggestions():
    with pytest.raises(memplan.NoPlanFits) as err:
        memplan.recommend("llama-2-7b", gpu_memory="2GiB", dataset_size=1000)
    assert err.value.rec.plan is None and err.value.rec.suggestions


@pytest.mark.parametrize("call, message", [
    (lambda: memplan.estimate("llama-2-7b", micro_batch=0), "micro_batch: must be greater than 0"),
    (lambda: memplan.estimate("llama-2-7b", method="lora", lora={"rnk": 4}), "did you mean 'rank'"),
    (lambda: memplan.estimate(), "no model"),
    (lambda: memplan.estimate("llama-2-7b", gpu_memory=-1), "positive number of bytes"),
    (lambda: memplan.estimate("lama-2-7b"), "llama-2-7b"),
    (lambda: memplan.compare("llama-2-7b", gpus=0), "gpus: must be greater than 0"),
    (lambda: memplan.recommend("llama-2-7b", gpuz=2), "did you mean 'gpu'"),
])
def test_bad_input_raises_the_commands_error(call, message):
    with pytest.raises(memplan.UserError, match=message):
        call()


def test_the_estimate_api_imports_neither_torch_nor_transformers():
    code = ("import sys, memplan\n"
            "memplan.estimate('llama-2-7b', method='lora')\nmemplan.compare('llama-2-7b', gpus=2)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_memplan_recommend_is_the_package_and_the_call():
    import memplan.recommend.core  # the package imported first: still callable

    assert callable(memplan.recommend) and memplan.recommend.core.gather
    assert "estimate" in dir(memplan)


def test_estimate_reads_a_trainers_config_as_the_command_does(run_cli):
    config = REPO / "tests/trainers/configs/torchtune/recipes/configs/llama3_1/8B_lora_single_device.yaml"
    e = memplan.estimate(plan=config, gpus=2, gpu="h100-80gb")
    code, out = _cli_json(run_cli, "estimate", "--config", str(config), "--gpus", "2", "--gpu", "h100-80gb")
    assert e.to_json() == out and out["config_source"]["format"] == "torchtune"
    assert (e.plan.method, e.plan.gpus) == ("lora", 2)
