"""The estimate command as a user meets it: tables, --json, and one clear line with exit 2 on bad input."""

import json

import pytest


def test_main_job_table(run_cli):
    code, out, _ = run_cli("estimate", "--model", "llama-7b", "--gpus", "4")
    assert code == 0
    assert "llama-1-7b: 6,738,415,616 parameters on 4 GPU(s)" in out
    for row in ("full FT · DDP · amp-bf16", "ZeRO-3 + offload optimizer", "LoRA r16", "QLoRA r16"):
        assert row in out
    assert "best plan:" in out and "peak allocated" in out and "GiB" in out


def test_table_json_has_every_plan(run_cli):
    code, out, _ = run_cli("estimate", "--model", "llama-2-7b", "--gpus", "2", "--json")
    data = json.loads(out)
    assert code == 0 and data["model"] == {"name": "llama-2-7b", "params_total": 6738415616}
    assert len(data["results"]) == 10 and all(r["plan"]["gpus"] == 2 for r in data["results"])


def test_single_plan_json(run_cli):
    code, out, _ = run_cli("estimate", "--model", "qwen2.5-7b", "--method", "lora", "--lora-rank", "8",
                           "--lora-targets", "q_proj,v_proj", "--batch-size", "4", "--seq-len", "1024",
                           "--no-grad-ckpt", "--gpu", "a100-80gb", "--json")
    data = json.loads(out)
    (r,) = data["results"]
    assert r["plan"]["lora"] == {"rank": 8, "alpha": 32.0, "dropout": 0.05, "targets": ["q_proj", "v_proj"]}
    assert r["plan"]["micro_batch"] == 4 and r["plan"]["grad_ckpt"] is False
    # 74.05 GiB: within the GPU's 80 GiB, not within the 72 GiB left by the default 10 % headroom
    assert code == 1 and r["fits"] is False and r["gpu_memory_bytes"] == 81920 * 2**20
    assert r["fit"]["usable_bytes"] == int(81920 * 2**20 * 0.9)


def test_config_file_and_flags_override(tmp_path, run_cli):
    cfg = tmp_path / "plan.yaml"
    cfg.write_text("model: mistral-7b\nmethod: lora\nmicro_batch: 2\nseq_len: 4096\n")
    code, out, _ = run_cli("estimate", "--config", str(cfg), "--batch-size", "8", "--json")
    (r,) = json.loads(out)["results"]
    assert code == 0 and r["plan"]["model"] == "mistral-7b" and r["plan"]["micro_batch"] == 8
    assert r["plan"]["seq_len"] == 4096


def test_max_batch_and_seq(run_cli):
    code, out, _ = run_cli("estimate", "--model", "llama-3-8b", "--method", "lora", "--precision", "bf16",
                           "--gpu-memory", "24GiB", "--max-batch", "--max-seq", "--json")
    data = json.loads(out)
    assert code == 0 and data["max_batch"] >= 1 and data["max_seq"] > 2048


def test_no_gpu_shows_common_sizes(run_cli):
    code, out, _ = run_cli("estimate", "--model", "llama-3.2-1b", "--method", "qlora", "--precision", "bf16")
    assert code == 0 and "fits GPUs of 16 GiB" in out


@pytest.mark.parametrize("args, needle", [
    (["--model", "llama7b"], "unknown model 'llama7b'"),
    (["--model", "llama-2-7b", "--batch-size", "0"], "micro_batch"),
    (["--model", "llama-2-7b", "--seq-len", "-1"], "seq_len"),
    (["--model", "llama-2-7b", "--method", "lora", "--lora-targets", "q_proj,x_proj"], "LoRA target 'x_proj'"),
    (["--model", "llama-2-7b", "--gpu", "h10"], "unknown GPU 'h10'"),
    (["--model", "llama-2-7b", "--gpu-memory", "lots"], "lots"),
    (["--model", "llama-2-7b", "--method", "qlora", "--precision", "fp32"], "Hint:"),
    (["--model", "llama-2-7b", "--offload", "optimizer"], "Hint:"),
    (["--model", "llama-2-7b", "--method", "lora", "--max-batch"], "--gpu"),
    ([], "no model"),
    (["--model", "mixtral-8x7b", "--method", "lora"], "--lora-dropout 0"),
])
def test_bad_input_is_one_line_and_exit_2(run_cli, args, needle):
    code, out, err = run_cli("estimate", *args)
    assert code == 2, (out, err)
    assert needle in err
    assert err.startswith("memplan: error:") and err.count("\n") == 1


def test_closest_names_suggested(run_cli):
    _, _, err = run_cli("estimate", "--model", "llama7b")
    assert "llama-7b" in err


def test_malformed_files(tmp_path, run_cli):
    bad_cfg = tmp_path / "config.json"
    bad_cfg.write_text("{not json")
    code, _, err = run_cli("estimate", "--model", str(bad_cfg))
    assert code == 2 and str(bad_cfg) in err
    bad_plan = tmp_path / "plan.yaml"
    bad_plan.write_text("model: llama-2-7b\nmethod: [oops\n")
    code, _, err = run_cli("estimate", "--config", str(bad_plan))
    assert code == 2 and "malformed YAML" in err


def test_local_model_directory(tmp_path, run_cli):
    from conftest import preset_config

    (tmp_path / "config.json").write_text(json.dumps(preset_config("qwen2.5-0.5b")))
    code, out, _ = run_cli("estimate", "--model", str(tmp_path), "--method", "lora", "--json")
    assert code == 0 and json.loads(out)["model"]["params_total"] == 494032768


def test_models_and_gpus_lists(run_cli):
    code, out, _ = run_cli("models", "--json")
    rows = json.loads(out)
    assert code == 0 and len(rows) >= 25 and {"llama-2-7b", "mixtral-8x7b", "gpt2"} <= {r["id"] for r in rows}
    code, out, _ = run_cli("gpus")
    assert code == 0 and "h100-80gb" in out


def test_help_states_units_and_defaults(run_cli):
    code, out, _ = run_cli("estimate", "--help")
    assert code == 0
    for needle in ("GiB", "--batch-size", "(default: 2048)", "--grad-ckpt / --no-grad-ckpt", "default 16"):
        assert needle in out, needle
