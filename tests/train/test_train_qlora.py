"""QLoRA on the CPU: bitsandbytes' 4-bit NF4 base, LoRA trained on top, adapter loadable by peft."""

import json

import pytest
import torch

from helpers import build_tiny_model, run_dir


@pytest.fixture(scope="module")
def wide(tmp_path_factory, tiny):  # noqa: F811
    """The tiny task's data with a 64-wide model: every layer of it fits bitsandbytes' CPU 4-bit packing
    (input widths multiples of 64, output widths of 32; the 32-wide tiny model's do not)."""
    model = build_tiny_model(tmp_path_factory.mktemp("wide"), width=64, name="wide-llama")
    return model, tiny[1]


def qlora_plan(tmp_path, model_and_data, **hparams):
    return run_dir(tmp_path, model_and_data, method="qlora", precision="bf16", micro_batch=2, grad_accum=1,
                   lora={"rank": 4, "dropout": 0.0},
                   hparams={"lr": 2e-2, "max_steps": 4, "eval_every": 4, "eval_samples": 1, "warmup_steps": 0,
                            **hparams})


@pytest.mark.usefixtures("one_thread")
def test_qlora_trains_on_the_cpu(tmp_path, wide, run_cli):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plan = qlora_plan(tmp_path, wide)
    code, out, err = run_cli("train", str(plan), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["method"] == "qlora"
    assert summary["eval_last"]["eval_loss"] < summary["eval_first"]["eval_loss"]
    base = AutoModelForCausalLM.from_pretrained(wide[0])
    model = PeftModel.from_pretrained(base, plan.parent / "adapter")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: it was trained
    assert torch.isfinite(model(torch.tensor([[1, 50, 60]])).logits).all()


@pytest.mark.usefixtures("one_thread")
def test_qlora_trains_layers_narrower_than_the_4bit_block(tmp_path, tiny, run_cli):  # noqa: F811
    """The 32-wide model's layers are narrower than bitsandbytes' 64-weight block: its CPU repacking
    (evaluation, generation) could not take them; memplan keeps 4-bit layers off that path, so they train,
    evaluate and merge."""
    plan = qlora_plan(tmp_path, tiny, merge_adapter=True)
    code, out, err = run_cli("train", str(plan), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["eval_last"]["eval_loss"] < summary["eval_first"]["eval_loss"]
    assert (plan.parent / "merged" / "config.json").is_file()


def _has_avx512bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


@pytest.mark.skipif(not _has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")
@pytest.mark.usefixtures("one_thread")
def test_an_evaluation_leaves_the_gradient_through_4bit_layers_intact(tmp_path):
    """bitsandbytes repacks a 4-bit layer's weight at its first eval-mode forward on such CPUs; later forwards
    then run gemv_4bit, which has no autograd formula (torch warns; the gradient through the base is lost).
    LoRA gradients after an evaluation must equal those without one, with no such warning."""
    import warnings

    from transformers import LlamaConfig, LlamaForCausalLM

    from memplan.plan import build_plan
    from memplan.runtime.model import load_model

    torch.manual_seed(0)
    path = tmp_path / "llama"  # layer widths bitsandbytes' CPU repacking accepts (multiples of its 64-block)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(path)
    plan = build_plan(dict(model=str(path), method="qlora", precision="bf16", device="cpu", grad_ckpt=False,
                           lora={"rank": 4, "dropout": 0.0}))
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])

    def lora_grads(evaluate_first: bool):
        torch.manual_seed(0)  # LoRA's A is drawn at random
        model = load_model(plan, path, "cpu", False)
        with torch.no_grad():  # B starts at zero; non-zero, the gradients depend on what flows through the base
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.linspace(-0.1, 0.1, p.numel()).reshape(p.shape))
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(ids)
            model.train()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(input_ids=ids, labels=ids).loss.backward()
        assert not [w for w in caught if "gemv_4bit" in str(w.message)]
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, evaluated = lora_grads(False), lora_grads(True)
    assert plain.keys() == evaluated.keys()
    for name in plain:
        assert torch.equal(plain[name], evaluated[name]), name


@pytest.mark.slow
def test_bitsandbytes_is_imported_offline_and_quietly(tmp_path):
    """memplan's HF set-up (memplan.runtime.hf, imported by train and profile): importing bitsandbytes looks up
    no host (it asks huggingface.co for an optional CPU kernel otherwise) and prints nothing."""
    import os
    import subprocess
    import sys

    code = ("import socket\nlooked_up = []\n"
            "def refuse(host, *a, **k):\n    looked_up.append(host)\n    raise OSError('no network in this test')\n"
            "socket.getaddrinfo = refuse\n"
            "import memplan.runtime.hf\nimport bitsandbytes\nimport peft\nprint('looked up:', sorted(set(looked_up)))")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "looked up: []"
    assert "kernels-community" not in done.stderr and "gemm_4bit" not in done.stderr, done.stderr
