"""MemplanCallback in real Trainer runs of demo-tiny on the CPU: the estimate at the first forward, the
measured peak against it after two optimizer steps, the warning, and standing aside."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import memplan  # noqa: E402
from memplan.catalog.presets import models_dir  # noqa: E402
from memplan.catalog.resolve import resolve_model  # noqa: E402
from memplan.integrations import MemplanCallback  # noqa: E402
from memplan.integrations.hf import Unmodelled, _precision, _sharding  # noqa: E402

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
def test_an_unmodelled_optimizer_stands_aside(tmp_path):
    cb, lines = run(tmp_path, optim="adagrad")
    assert cb.skipped.startswith("the optimizer 'adagrad'") and cb.measured is None
    assert lines == [f"memplan: no estimate for this run: memplan does not model {cb.skipped}"]


def test_sharding_from_the_trainer_arguments():
    ds = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    args = SimpleNamespace(deepspeed="ds.json", hf_deepspeed_config=SimpleNamespace(config=ds), fsdp=[])
    assert _sharding(args) == {"sharding": "deepspeed", "zero": 3, "offload": "optimizer"}
    args = SimpleNamespace(deepspeed=None, fsdp=["shard_grad_op"])
    assert _sharding(args) == {"sharding": "fsdp", "zero": 2, "offload": "none"}
    args = SimpleNamespace(deepspeed=None, fsdp=["full_shard", "offload", "auto_wrap"])
    assert _sharding(args) == {"sharding": "fsdp", "zero": 3, "offload": "optimizer+params"}
    assert _sharding(SimpleNamespace(deepspeed=None, fsdp=[])) == {"sharding": "ddp"}


@pytest.mark.parametrize("bf16, fp16, weights, deepspeed, regime", [
    (True, False, torch.float32, False, "amp-bf16"),
    (False, True, torch.float32, False, "amp-fp16"),
    (False, False, torch.float32, False, "fp32"),
    (True, False, torch.bfloat16, False, "bf16"),
    (False, False, torch.bfloat16, False, "bf16"),
    (True, False, torch.float32, True, "bf16-master"),
])
def test_precision_regimes(bf16, fp16, weights, deepspeed, regime):
    assert _precision(SimpleNamespace(bf16=bf16, fp16=fp16), weights, deepspeed) == regime


def test_fp16_weights_are_not_modelled():
    with pytest.raises(Unmodelled, match="fp16 weights"):
        _precision(SimpleNamespace(bf16=False, fp16=True), torch.float16, False)
