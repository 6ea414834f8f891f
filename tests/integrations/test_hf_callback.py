"""MemplanCallback in real Trainer runs of demo-tiny on the CPU: the estimate at the first forward, the
measured peak against it after two optimizer steps, the warning, and standing aside."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import memplan  # noqa: E402
from memplan.catalog.presets import models_dir  # noqa: E402
from memplan.catalog.resolve import resolve_model  # noqa: E402
from memplan.integrations import MemplanCallback  # noqa: E402
from memplan.integrations.hf import Unmodelled  # noqa: E402

DEMO = models_dir() / "demo-tiny"
ROWS, TOKENS = 4, 48


class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        ids = torch.tensor([(i * 7 + j) % 200 + 3 for j in range(TOKENS)])
        return {"input_ids": ids, "labels": ids.clone()}


def run(tmp_path, lora: bool = False, extra: list | None = None, **arguments):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0))
    lines: list[str] = []
    callback = MemplanCallback(log=lines.append)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=ROWS, max_steps=3, use_cpu=True,
                             report_to=[], save_strategy="no", disable_tqdm=True, **arguments)
    Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[callback, *(extra or [])]).train()
    return callback, lines


@pytest.mark.slow
def test_lora_run_estimate_and_measured_peak(tmp_path):
    cb, lines = run(tmp_path, lora=True, optim="adamw_torch", gradient_accumulation_steps=2)
    p = cb.plan
    assert (p.method, p.lora.rank, p.lora.alpha, p.lora.targets) == ("lora", 8, 16.0, ["q_proj", "v_proj"])
    assert (p.precision, p.optimizer, p.device, p.micro_batch, p.seq_len, p.grad_accum) == \
        ("fp32", "adamw", "cpu", ROWS, TOKENS, 2)
    # the estimate the callback printed is the API's for the same plan
    assert cb.estimate.to_json()["results"][0]["phase_peaks"] == \
        memplan.api.estimate_spec(resolve_model(str(DEMO)), p).phase_peaks
    assert lines[0].startswith("memplan: ") and "estimated peak" in lines[0] and f"{ROWS} x {TOKENS} tokens" in lines[0]
    assert "measured peak" in lines[1] and len(lines) == 2
    assert abs(cb.measured["gap"]) < 0.01 and not cb.measured["flag"]


@pytest.mark.slow
def test_full_amp_bf16_run_and_a_gap_warns(tmp_path):
    class Hoard(TrainerCallback):
        """Something memplan does not know about: 16 MiB kept alive from step 1 on."""

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                self.kept = torch.ones(4 << 20)

    cb, lines = run(tmp_path, bf16=True, extra=[Hoard()])
    assert (cb.plan.method, cb.plan.precision, cb.plan.optimizer) == ("full", "amp-bf16", "adamw-fused")
    assert cb.measured["measured_bytes"] - cb.measured["estimated_bytes"] >= 16 << 20
    assert cb.measured["flag"] and lines[-1].startswith("memplan: warning: the measured peak is more than 10 %")


@pytest.mark.slow
def test_an_unmodelled_optimizer_is_named_and_a_partly_frozen_model_stands_aside(tmp_path):
    cb, lines = run(tmp_path, optim="adagrad")
    assert cb.plan.optimizer == "adamw" and cb.measured is not None  # counted as AdamW, as `--config` counts it
    assert lines[1].startswith("memplan: not in this estimate (changes memory, not modelled): optim: adagrad")

    class Freeze(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.get_input_embeddings().weight.requires_grad_(False)

    cb, lines = run(tmp_path, extra=[Freeze()])
    assert cb.skipped.startswith("a partly frozen model") and cb.measured is None
    assert lines == [f"memplan: no estimate for this run: memplan does not model {cb.skipped}"]


def test_a_run_reads_as_its_trl_config_reads(tmp_path):
    """plan_from_run hands the run to memplan.trainers.trl: the same arguments written as a `trl sft --config`
    file give the same plan (FSDP from fsdp / fsdp_config, as TrainingArguments take it, included)."""
    from memplan.integrations.hf import plan_from_run
    from memplan.trainers import read_config

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=4,
                             optim="adamw_torch", bf16=True, gradient_checkpointing=True, use_cpu=True,
                             report_to=[], fsdp="full_shard", fsdp_config={"reshard_after_forward": False})
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32)
    plan, source = plan_from_run(args, model, rows=2, tokens=256)
    config = tmp_path / "sft.yaml"
    config.write_text(f"model_name_or_path: {DEMO}\nper_device_train_batch_size: 2\ngradient_accumulation_steps: 4\n"
                      "optim: adamw_torch\nbf16: true\ngradient_checkpointing: true\nmax_length: 256\n"
                      "loss_type: nll\nfsdp: full_shard\nfsdp_config:\n  reshard_after_forward: false\n"
                      "attn_implementation: sdpa\n")
    from_file = read_config(config).plan
    assert {k: getattr(plan, k) for k in ("method", "precision", "optimizer", "micro_batch", "grad_accum", "seq_len",
                                          "grad_ckpt", "sharding", "zero", "offload", "loss", "attn")} == \
        {k: from_file[k] for k in ("method", "precision", "optimizer", "micro_batch", "grad_accum", "seq_len",
                                   "grad_ckpt", "sharding", "zero", "offload", "loss", "attn")}
    assert (plan.sharding, plan.zero, plan.precision, plan.device) == ("fsdp", 2, "amp-bf16", "cpu")
    assert source.format == "trl" and source.taken["micro_batch"] == "per_device_train_batch_size"


def test_fp16_weights_are_not_modelled_and_an_8bit_base_is_lora_8bit(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from memplan.integrations.hf import plan_from_run

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float16)
    with pytest.raises(Unmodelled, match="fp16 weights"):
        plan_from_run(args, model, rows=1, tokens=8)
    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.bfloat16)
    model.is_loaded_in_8bit = True  # as transformers marks a bitsandbytes LLM.int8 load
    plan, source = plan_from_run(args, get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])), 1, 8)
    assert (plan.method, plan.precision) == ("lora-8bit", "bf16")
    assert source.taken["method"] == "use_peft + load_in_8bit"
