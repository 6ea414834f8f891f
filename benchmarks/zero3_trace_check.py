"""DeepSpeed ZeRO-3's gathered parameters, event by event: `memplan profile --backend cpu` runs a small model on two
gloo ranks through DeepSpeed's engine (as deepspeed_gloo_check.py does), with DeepSpeed's parameter coordinator
instrumented to log, after each module's fetch and release, how many parameter elements it holds gathered
(`__n_available_params`) and the sizes of the parameters it fetches for the module. The last step's events (the
trace complete) are stored per plan; tests/estimator/test_zero3_gather.py checks that memplan's replay of the
coordinator (memplan.estimator.zero3_gather) gives the same count at every event.

Plans: full fine-tuning and LoRA, with and without checkpointing, grouped-query attention (several parameters per
prefetch: coalesced gathers), tied embeddings, other families' module trees, and, set on the coordinator, a shorter
`stage3_max_reuse_distance` than DeepSpeed's 1e9 (which releases what the default keeps) and a lower
`stage3_max_live_parameters` (the cap that stops the prefetch: at full size the default binds, in this model it does
not).

DeepSpeed is not a memplan dependency; run this with a Python that has it (see benchmarks/deepspeed_cpu_check.py):

    python benchmarks/zero3_trace_check.py [--out benchmarks/results/zero3-trace.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from fsdp_gloo_check import LARGE_ROOT, SMALL_ROOT  # noqa: E402

GQA = dict(SMALL_ROOT, num_key_value_heads=1)
PLAN = dict(sharding="deepspeed", zero=3, gpus=2, device="cuda", precision="bf16-master", micro_batch=2, seq_len=128,
            method="full", grad_ckpt=False)
# (config, plan, {reuse distance, live parameters} set on the coordinator where not DeepSpeed's 1e9)
RUNS = [
    (SMALL_ROOT, dict(PLAN), {}),
    (SMALL_ROOT, dict(PLAN, grad_ckpt=True), {}),
    (SMALL_ROOT, dict(PLAN, method="lora"), {}),
    (SMALL_ROOT, dict(PLAN, method="lora", grad_ckpt=True), {}),
    (GQA, dict(PLAN), {}),
    (dict(LARGE_ROOT, tie_word_embeddings=True), dict(PLAN), {}),
    (SMALL_ROOT, dict(PLAN), {"reuse": 1_000_000}),
    (SMALL_ROOT, dict(PLAN, grad_ckpt=True), {"reuse": 1_000_000}),
    (GQA, dict(PLAN), {"reuse": 500_000}),
    # the cap on gathered elements that stops the prefetch (what binds at full size)
    (SMALL_ROOT, dict(PLAN), {"live": 1_000_000}),
    (SMALL_ROOT, dict(PLAN, grad_ckpt=True), {"live": 1_000_000, "reuse": 1_000_000}),
    (SMALL_ROOT, dict(PLAN, method="lora"), {"live": 500_000}),
]
# other families' module trees: GPT-2's Conv1D and dropout modules, Qwen3's q/k norms, Gemma-2's sandwich norms,
# Phi-3's fused projections, Mixtral's router and fused experts
SMALL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=2048, max_position_embeddings=512)
RUNS += [
    (dict(model_type="gpt2", n_embd=256, n_layer=2, n_head=4, vocab_size=2048, n_positions=512, bos_token_id=0,
          eos_token_id=0), dict(PLAN), {}),
    (dict(SMALL, model_type="qwen3", head_dim=64), dict(PLAN), {}),
    (dict(SMALL, model_type="qwen3", head_dim=64), dict(PLAN, method="lora", grad_ckpt=True), {}),
    (dict(SMALL, model_type="gemma2", head_dim=64), dict(PLAN), {}),
    (dict(SMALL, model_type="phi3", num_key_value_heads=4, pad_token_id=0, eos_token_id=0), dict(PLAN), {}),
    (dict(SMALL, model_type="mixtral", intermediate_size=344, num_local_experts=4, num_experts_per_tok=2),
     dict(PLAN), {}),
]

# Loaded by every process of the run (sitecustomize): wraps the coordinator once DeepSpeed imports it.
PROBE = '''
import importlib.abc, importlib.util, json, os, sys

LOG = os.environ["ZERO3_TRACE_LOG"]
REUSE, LIVE = os.environ.get("ZERO3_TRACE_REUSE"), os.environ.get("ZERO3_TRACE_LIVE")


def _instrument(module):
    C = module.PartitionedParameterCoordinator
    fetch, release, init = C.fetch_sub_module, C.release_sub_module, C.__init__

    from deepspeed.utils import z3_leaf_module

    def log(self, kind, sub, forward):
        # what the coordinator fetches for the module: its own and external parameters, a leaf module's all
        own = [p.ds_numel for p in module.iter_params(sub, recurse=z3_leaf_module(sub))]
        with open(f"{LOG}.{os.environ.get('RANK', '0')}", "a") as f:
            f.write(json.dumps([kind, bool(forward), self._PartitionedParameterCoordinator__step_id,
                                self._PartitionedParameterCoordinator__n_available_params, own]) + "\\n")

    def fetch_sub_module(self, sub, forward):
        out = fetch(self, sub, forward)
        log(self, "fetch", sub, forward)
        return out

    def release_sub_module(self, sub, forward=False):
        out = release(self, sub, forward)
        log(self, "release", sub, forward)
        return out

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if REUSE:
            self._PartitionedParameterCoordinator__max_reuse_dist_in_numel = int(REUSE)
        if LIVE:
            self._PartitionedParameterCoordinator__max_n_available_params = int(LIVE)

    C.fetch_sub_module, C.release_sub_module, C.__init__ = fetch_sub_module, release_sub_module, __init__


class _Finder(importlib.abc.MetaPathFinder):
    NAME = "deepspeed.runtime.zero.partitioned_param_coordinator"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.NAME:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _instrument(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Finder())
'''


def last_step(lines: list[list]) -> list[list]:
    """The events of the last forward and backward (each step's first fetch is step 1), those of modules with
    parameters of their own: [kind, forward, gathered elements]."""
    starts = [i for i, e in enumerate(lines) if e[0] == "fetch" and e[2] == 1]
    return [[kind[0], forward, available] for kind, forward, _, available, own in lines[starts[-1]:] if own]


def config_json(config: dict) -> str:
    """A config's JSON: `model_type` names the family (else Llama), the rest its fields."""
    from transformers import AutoConfig

    fields = dict(config)
    return AutoConfig.for_model(fields.pop("model_type", "llama"), **fields).to_json_string()


def run(config: dict, plan: dict, rules: dict, tmp: Path) -> dict:
    (tmp / "config.json").write_text(config_json(config))
    (tmp / "sitecustomize.py").write_text(PROBE)
    log = tmp / "coordinator"
    for old in tmp.glob("coordinator.*"):
        old.unlink()
    env = dict(os.environ, ZERO3_TRACE_LOG=str(log),
               PYTHONPATH=os.pathsep.join([str(tmp), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for rule, value in rules.items():
        env[f"ZERO3_TRACE_{rule.upper()}"] = str(value)
    flags = ["--model", str(tmp / "config.json"), "--backend", "cpu", "--gpus", str(plan["gpus"]),
             "--sharding", "deepspeed", "--zero", "3", "--method", plan["method"], "--precision", plan["precision"],
             "--batch-size", str(plan["micro_batch"]), "--seq-len", str(plan["seq_len"]), "--device", plan["device"],
             "--grad-ckpt" if plan["grad_ckpt"] else "--no-grad-ckpt", "--steps", "3", "--json"]
    subprocess.run([sys.executable, "-m", "memplan", "profile", *flags], env=env, check=True, cwd=tmp,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks = [last_step([json.loads(x) for x in p.read_text().splitlines()]) for p in sorted(tmp.glob("coordinator.*"))]
    assert all(r == ranks[0] for r in ranks), "the ranks' coordinators disagree"
    return {"config": config, "plan": plan, "rules": rules, "wrappers": 1, "events": ranks[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zero3-trace.jsonl"))
    out = Path(parser.parse_args().out)
    import deepspeed

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config, plan, rules in RUNS:
            row = run(config, plan, rules, Path(tmp))
            row["deepspeed"] = deepspeed.__version__
            rows.append(row)
            print(f"{config.get('model_type', 'llama')} {plan['method']} ckpt={plan['grad_ckpt']} {rules}: "
                  f"{len(row['events'])} events, at most {max(e[2] for e in row['events'])} elements gathered",
                  flush=True)
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp_out.replace(out)


if __name__ == "__main__":
    main()
