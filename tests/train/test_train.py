"""`memplan train` end to end on the CPU with a tiny Llama: full FT, LoRA, outputs, dry run, bad input."""

import json
import os

import pytest
import torch

from helpers import metrics, run_dir


@pytest.mark.usefixtures("one_thread")
def test_full_finetune_end_to_end(tmp_path, tiny, run_cli):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plan = run_dir(tmp_path, tiny, data={"retention": "retention.jsonl", "replay": "general.jsonl",
                                         "replay_ratio": 0.2})
    code, out, err = run_cli("train", str(plan))
    assert code == 0, err
    run = plan.parent
    lines = metrics(run)
    train = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    for r in train:
        assert {"step", "loss", "lr", "tokens_per_s", "peak_memory_bytes"} <= set(r)
        assert r["tokens_per_s"] > 0
    assert train[0]["lr"] == 0.0 and train[2]["lr"] == pytest.approx(3e-3)  # 2 warmup steps, then the peak
    assert train[-1]["lr"] < train[5]["lr"] < train[2]["lr"]  # cosine decay
    assert sum(r["loss"] for r in train[-3:]) < sum(r["loss"] for r in train[:3]) - 0.3
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in evals)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["params_trainable"] == summary["params_total"]
    ret = summary["retention"]
    assert ret["change"] == pytest.approx(ret["perplexity_after"] / ret["perplexity_before"] - 1)
    mem = summary["memory"]
    assert mem["measured_steps"] == 2 and mem["measured_bytes"] > 0 and mem["estimated_bytes"] > 0
    assert "peak memory measured" in out and "retention perplexity" in out
    # step time: the steps after the memory meter's two and one more, against recommend's time model on this CPU
    st = summary["step_time"]
    assert st["what"].endswith("9 metrics line(s), steps 4-12")
    assert st["measured_s"] == pytest.approx(sorted(r["step_s"] for r in train[3:])[4])
    assert st["predicted_s"] == pytest.approx(sum(st["predicted_terms_s"].values())) and st["predicted_s"] > 0
    assert st["error"] == pytest.approx(st["predicted_s"] / st["measured_s"] - 1)
    assert "step time measured (median)" in out
    assert (run / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["checkpoint-000006", "checkpoint-000012"]

    model = AutoModelForCausalLM.from_pretrained(run / "model")
    tok = AutoTokenizer.from_pretrained(run / "model")
    ckpt = torch.load(run / "checkpoints" / "checkpoint-000012" / "model.pt", weights_only=True)
    for name, p in model.named_parameters():
        assert torch.equal(p, ckpt[name]), name
    assert tok.chat_template  # the prompt format used in training travels with the model


@pytest.mark.usefixtures("one_thread")
def test_lora_adapter_and_merged_model(tmp_path, tiny, run_cli):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plan = run_dir(tmp_path, tiny, method="lora", lora={"rank": 4, "alpha": 8, "dropout": 0.0},
                   hparams={"lr": 1e-2, "max_steps": 6, "eval_every": 3, "merge_adapter": True})
    code, out, err = run_cli("train", str(plan), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert 0 < summary["params_trainable"] < summary["params_total"]
    assert summary["train_loss_last"] < summary["train_loss_first"]
    run = plan.parent
    assert not (run / "model").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny[0])
    adapted = PeftModel.from_pretrained(base, run / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, atol=1e-5, rtol=1e-5)
        fresh = AutoModelForCausalLM.from_pretrained(tiny[0])
        assert not torch.allclose(fresh(ids).logits, merged(ids).logits)


@pytest.mark.usefixtures("one_thread")
def test_quiet_prints_nothing(tmp_path, tiny, run_cli):
    plan = run_dir(tmp_path, tiny, hparams={"max_steps": 2, "eval_every": 2, "eval_samples": 0})
    code, out, err = run_cli("train", str(plan), "--quiet")
    assert code == 0, err
    assert out == ""
    assert (plan.parent / "summary.json").is_file()


@pytest.mark.usefixtures("one_thread")
def test_the_run_sets_the_plans_cuda_allocator(tmp_path, tiny, run_cli, monkeypatch):
    """PYTORCH_CUDA_ALLOC_CONF as the plan's allocator says, before the run starts CUDA (and for the processes
    it launches), whatever the shell had."""
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "garbage_collection_threshold:0.6")
    plan = run_dir(tmp_path, tiny, allocator="expandable", hparams={"max_steps": 1, "eval_every": 1,
                                                                    "eval_samples": 0})
    code, _, err = run_cli("train", str(plan), "--quiet")
    assert code == 0, err
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "garbage_collection_threshold:0.6,expandable_segments:True"


def test_dry_run_judges_the_plan_against_its_recorded_target(tmp_path, tiny, run_cli):
    """The dry run's verdict is estimate --config's: the plan's `target` (here a CPU host of a given RAM),
    settable with --set; exit 1 when the plan does not fit it."""
    plan = run_dir(tmp_path, tiny)
    code, out, err = run_cli("train", str(plan), "--dry-run", "--set", "target.host_memory=64GiB")
    assert code == 0, err
    assert "\nfits: " in out
    code, out, err = run_cli("train", str(plan), "--dry-run", "--set", "target.host_memory=400MiB")
    assert code == 1 and err == ""
    assert "does not fit" in out
    code, out, _ = run_cli("train", str(plan), "--dry-run", "--json", "--set", "target.host_memory=400MiB")
    assert code == 1 and json.loads(out)["fit"]["fits"] is False


@pytest.mark.usefixtures("one_thread")
def test_dry_run_prints_the_resolved_plan_and_estimate(tmp_path, tiny, run_cli):
    plan = run_dir(tmp_path, tiny)
    code, out, err = run_cli("train", str(plan), "--dry-run", "--set", "method=lora", "--set", "rank=8",
                             "--set", "hparams.lr=1e-4")
    assert code == 0, err
    assert "method: lora" in out and "rank: 8" in out and "lr: 0.0001" in out
    assert "peak tensor memory" in out
    assert not (plan.parent / "metrics.jsonl").exists()
    code, out, _ = run_cli("train", str(plan), "--dry-run", "--json", "--set", "micro_batch=2")
    data = json.loads(out)
    assert data["plan"]["micro_batch"] == 2
    assert data["estimate"]["results"][0]["peak_allocated_bytes"] > 0


def _expect_error(run_cli, *args, match: str):
    code, out, err = run_cli(*args)
    assert code == 2, (out, err)
    assert match in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.usefixtures("one_thread")
def test_bad_input_exits_2_before_training(tmp_path, tiny, run_cli):
    plan = run_dir(tmp_path, tiny)
    run = plan.parent
    train = run / "train.jsonl"
    good = train.read_text()
    train.write_text(good.splitlines()[0] + "\n{\"instruction\": \"x\"\n")
    _expect_error(run_cli, "train", str(plan), match="train.jsonl:2: malformed JSON")
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    train.write_text(good)

    _expect_error(run_cli, "train", str(plan), "--set", "model=llama-2-7b", match="without shipped weights")
    _expect_error(run_cli, "train", str(plan), "--set", "model=/no/such/dir", match="no such directory")
    _expect_error(run_cli, "train", str(plan), "--set", "lerning_rate=1", match="not a plan field")
    _expect_error(run_cli, "train", str(plan), "--set", "method=qlora", "--set", "precision=fp32",
                  match="QLoRA computes in 16-bit")
    _expect_error(run_cli, "train", str(plan), "--set", "lora.targets=no_such_proj", "--set", "method=lora",
                  match="LoRA targets")
    _expect_error(run_cli, "train", str(plan), "--resume", match="no checkpoint")

    code, _, err = run_cli("train", str(plan), "--quiet", "--set", "max_steps=2", "--set", "eval_samples=0")
    assert code == 0, err
    _expect_error(run_cli, "train", str(plan), match="already holds checkpoints")


@pytest.mark.usefixtures("one_thread")
def test_remote_code_needs_the_flag(tmp_path, tiny, run_cli):
    import shutil

    model = tmp_path / "remote"
    shutil.copytree(tiny[0], model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    plan = run_dir(tmp_path, tiny, model=str(model))
    _expect_error(run_cli, "train", str(plan), match="--trust-remote-code")


@pytest.mark.usefixtures("one_thread")
def test_early_stopping_keeps_the_best_weights(tmp_path, tiny, run_cli):
    # The validation answers are the words unchanged while training teaches upper case: after the model
    # has learnt the format, the validation loss rises, and training stops.
    plan = run_dir(tmp_path, tiny, grad_accum=1,
                   hparams={"lr": 1e-2, "lr_scheduler": "constant", "warmup_steps": 0, "max_steps": 30,
                            "eval_every": 2, "early_stopping_patience": 2, "eval_samples": 0,
                            "save_total_limit": 1})
    val = plan.parent / "val.jsonl"
    rows = [json.loads(line) for line in val.read_text().splitlines()]
    val.write_text("".join(json.dumps(dict(r, output=r["input"])) + "\n" for r in rows))
    code, out, err = run_cli("train", str(plan), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["stopped_early"] and summary["steps"] < 30
    best = summary["eval_best"]["step"]
    assert summary["final_weights_step"] == best < summary["steps"]
    evals = [r for r in metrics(plan.parent) if "eval_loss" in r]
    assert all(r["eval_loss"] >= summary["eval_best"]["eval_loss"] for r in evals)
    kept = sorted(p.name for p in (plan.parent / "checkpoints").iterdir())
    assert f"checkpoint-{best:06d}" in kept  # the best is kept beside the newest
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(plan.parent / "model")
    ckpt = torch.load(plan.parent / "checkpoints" / f"checkpoint-{best:06d}" / "model.pt", weights_only=True)
    assert all(torch.equal(p, ckpt[n]) for n, p in model.named_parameters())


@pytest.mark.usefixtures("one_thread")
def test_chunked_loss_and_packing(tmp_path, tiny, run_cli):
    """The chunked loss gives the standard loss; packed sequences train (and differ from unpacked)."""
    runs = {}
    for name, sets in (("standard", []), ("chunked", ["loss=chunked"]), ("packed", ["packing=true"])):
        plan = run_dir(tmp_path / name, tiny, hparams={"max_steps": 3, "eval_every": 3, "eval_samples": 0})
        args = ["train", str(plan), "--json"]
        for s in sets:
            args += ["--set", s]
        code, out, err = run_cli(*args)
        assert code == 0, err
        runs[name] = [r["loss"] for r in metrics(plan.parent) if "loss" in r]
    assert runs["chunked"] == pytest.approx(runs["standard"], rel=1e-5)
    assert len(runs["packed"]) == 3 and runs["packed"] != pytest.approx(runs["standard"], rel=1e-3)


@pytest.mark.usefixtures("one_thread")
def test_status_lines_are_not_glued_onto_the_progress_bar(tmp_path, tiny):
    from click.testing import CliRunner

    from memplan.cli import main

    plan = run_dir(tmp_path, tiny, hparams={"max_steps": 3, "eval_every": 3, "eval_samples": 0})
    result = CliRunner().invoke(main, ["train", str(plan)])
    assert result.exit_code == 0, result.output
    text = result.output  # stdout and stderr interleaved, as a terminal shows them
    assert "3/3 [" in text  # the bar was drawn
    for status in ("memory: measured peak", "step 3: validation loss"):
        i = text.index(status)
        assert text[i - 1] in "\r\n", repr(text[i - 100:i + 20])


@pytest.mark.usefixtures("one_thread")
def test_a_tiny_data_set_warns_and_does_not_stop_on_a_few_validation_examples(tmp_path, tiny, run_cli):
    from memplan.train.data import held_out_count

    # ceil(5 %), raised to 20 where 20 % of the data allows it
    assert [held_out_count(n, 0.05) for n in (1, 4, 20, 40, 100, 1000)] == [0, 1, 4, 8, 20, 50]
    plan = run_dir(tmp_path, tiny, micro_batch=1, grad_accum=1, data={"validation": None},
                   hparams={"lr": 3e-2, "lr_scheduler": "constant", "warmup_steps": 0, "max_steps": 8,
                            "eval_every": 1, "early_stopping_patience": 1, "eval_samples": 0})
    # (with one held-out example, as before, this run stopped at step 4 and kept step 3's weights)
    train = plan.parent / "train.jsonl"
    train.write_text("".join(train.read_text().splitlines(keepends=True)[:20]))
    code, out, _ = run_cli("train", str(plan), "--dry-run")
    assert code == 0 and "warning: 4 validation example(s), fewer than 20" in out
    code, out, err = run_cli("train", str(plan))
    assert code == 0, err
    assert "warning: effective batch 1: each optimizer step follows fewer than 4 examples" in out
    assert "Hint: --set grad_accum=4 (effective batch 4)" in out
    assert "warning: 4 validation example(s), fewer than 20: their loss is logged, but early stopping" in out
    summary = json.loads((plan.parent / "summary.json").read_text())
    assert not summary["stopped_early"] and summary["steps"] == summary["final_weights_step"] == 8
    assert len([r for r in metrics(plan.parent) if "eval_loss" in r]) == 9  # still evaluated, steps 0-8


def test_ctrl_c_exits_130_and_says_how_to_resume(tmp_path, tiny, run_cli, monkeypatch):
    """What `memplan train` prints when the run stops on Ctrl-C: nothing on stdout, the --resume line on
    stderr, exit code 130; the output directory's lock is released."""
    from memplan.train import loop

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", interrupted)
    plan = run_dir(tmp_path, tiny)
    code, out, err = run_cli("train", str(plan))
    assert (code, out) == (130, "")
    assert err == f"\nmemplan: interrupted; continue from the newest checkpoint with: memplan train {plan} --resume\n"
    code, _, err = run_cli("train", str(plan))
    assert code == 130, err
