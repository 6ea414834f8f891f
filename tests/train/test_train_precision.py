"""Precision bf16-master in `memplan train` (memplan.runtime.optim): bf16 weights and gradients, fp32 master
copies stepped by AdamW. On the tiny Llama of helpers.py, on the CPU.

Tolerances (measured on this model, then given about 10x room):
- per-step training loss of bf16-master vs fp32: 1e-3 relative. The forward runs on bf16-rounded weights
  (unit roundoff 2^-9 = 0.2 % per weight), and the token-mean loss averages those errors; measured <= 1e-4.
- validation-loss drop after 8 small-LR steps: within 5 % of fp32's drop (measured 1.4 %). Pure bf16 loses
  updates smaller than half a bf16 step of the weight, and misses fp32's drop by far more (measured 14 %):
  the masters are what makes the difference, so the test checks bf16-master is at least 2x closer.
- 2 processes (FSDP2 FULL_SHARD, each holding its shards of the masters; DDP, each holding all of them) vs 1
  process at the same effective batch: 2e-4 relative (the bf16 gradients are summed in another order and
  rounded to bf16; measured 2e-5).
- resume after SIGKILL (FSDP, whose processes keep their own shards of the masters): 1e-6 relative, the
  bound of the fp32 resume test: the masters are restored exactly, not rebuilt from their bf16 rounding
  (with masters rebuilt from the weights this test fails). One process's optimizer state round-trips
  exactly in test_master_weights_keep_fp32_state_and_follow_the_scheduler.
"""

import io
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import SUBPROCESS_ENV, metrics, run_dir, train_here

SMALL_LR = dict(hparams={"lr": 1e-4, "warmup_steps": 0, "max_steps": 8, "eval_every": 8, "eval_samples": 0,
                         "log_every": 1})


def _losses(run):
    return [r["loss"] for r in metrics(run) if "loss" in r]


def _evals(run):
    return [r["eval_loss"] for r in metrics(run) if "eval_loss" in r]


# ---------------------------------------------------------------- the optimizer itself


def test_master_weights_keep_fp32_state_and_follow_the_scheduler():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import get_scheduler

    from memplan.runtime.optim import MasterWeightsOptimizer, state_tensors

    def make(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)).to(torch.bfloat16)
        opt = MasterWeightsOptimizer([{"params": [model[0].weight, model[1].weight], "weight_decay": 0.1},
                                      {"params": [model[0].bias, model[1].bias], "weight_decay": 0.0}],
                                     lambda groups: torch.optim.AdamW(groups, lr=1e-3))
        return model, opt

    def train(model, opt, sched, steps, seed=1):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x = torch.randn(5, 6, generator=g).to(torch.bfloat16)
            model(x).float().pow(2).mean().backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

    model, opt = make(0)
    assert [m.dtype for m in opt.masters] == [torch.float32] * 4
    assert opt.param_groups is opt.inner.param_groups
    sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=10)
    train(model, opt, sched, 4)
    assert opt.inner.param_groups[0]["lr"] == pytest.approx(sched.get_last_lr()[0])  # the schedule drives it
    assert all(p.grad is None for p in model.parameters()) and all(m.grad is None for m in opt.masters)
    # the weights are the masters rounded to bf16, while the masters keep what bf16 cannot hold
    for (p, m) in opt.pairs:
        assert torch.equal(p, m.to(torch.bfloat16))
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in opt.masters)
    assert all(t.dtype == torch.float32 for t in state_tensors(opt) if t.dim() > 0)

    # state_dict -> a fresh optimizer: the same masters, bit for bit, and the same next steps
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # as a checkpoint holds it (a live state dict shares its tensors)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)
    model2, opt2 = make(5)
    sched2 = get_scheduler("cosine", opt2, num_warmup_steps=2, num_training_steps=10)  # as `train` orders it
    model2.load_state_dict(saved)
    opt2.load_state_dict(state)
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups is opt2.inner.param_groups
    assert all(torch.equal(a, b) for a, b in zip(opt.masters, opt2.masters))
    train(model, opt, sched, 3, seed=9)
    train(model2, opt2, sched2, 3, seed=9)
    assert all(torch.equal(a, b) for a, b in zip(opt.masters, opt2.masters))

    # accelerate's wrapper (what `memplan train` steps) passes state and zero_grad through
    AcceleratorState._reset_state(reset_partial_state=True)
    wrapped = Accelerator(cpu=True).prepare_optimizer(opt)
    assert set(wrapped.state_dict()) == {"inner", "masters"}
    model(torch.ones(2, 6, dtype=torch.bfloat16)).sum().backward()
    wrapped.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError):
        opt.load_state_dict(state["inner"])


def test_fp32_parameters_are_their_own_master():
    from memplan.runtime.optim import MasterWeightsOptimizer, wants_masters

    adapter = torch.nn.Parameter(torch.zeros(3))
    base = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    assert not wants_masters("bf16-master", [adapter]) and wants_masters("bf16-master", [adapter, base])
    assert not wants_masters("bf16", [base])
    opt = MasterWeightsOptimizer([adapter, base], lambda groups: torch.optim.SGD(groups, lr=0.1))
    assert len(opt.masters) == 1 and opt.pairs[0][1] is adapter


# ---------------------------------------------------------------- memplan train


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_bf16_master_tracks_fp32_where_pure_bf16_drifts(tmp_path, tiny, run_cli):
    from transformers import AutoModelForCausalLM

    runs = {}
    for precision in ("fp32", "bf16-master", "bf16"):
        plan = run_dir(tmp_path / precision, tiny, precision=precision, **SMALL_LR)
        code, out, err = run_cli("train", str(plan), "--quiet")
        assert code == 0, err
        runs[precision] = plan.parent

    fp32, master, bf16 = (runs[p] for p in ("fp32", "bf16-master", "bf16"))
    assert len(_losses(master)) == 8
    for a, b in zip(_losses(master), _losses(fp32)):
        assert a == pytest.approx(b, rel=1e-3)
    drop = {name: _evals(run)[0] - _evals(run)[-1] for name, run in runs.items()}
    assert drop["bf16-master"] > 0.01  # it learns
    assert drop["bf16-master"] == pytest.approx(drop["fp32"], rel=0.05)
    assert abs(drop["bf16"] - drop["fp32"]) > 2 * abs(drop["bf16-master"] - drop["fp32"])

    summary = json.loads((master / "summary.json").read_text())
    mem = summary["memory"]
    assert mem["flag"] is False and abs(mem["gap"]) <= 0.10, mem
    model = AutoModelForCausalLM.from_pretrained(master / "model")
    assert model.dtype == torch.bfloat16
    ckpt = torch.load(master / "checkpoints" / "checkpoint-000008" / "model.pt", weights_only=True)
    assert all(torch.equal(p, ckpt[n]) for n, p in model.named_parameters())
    saved = torch.load(master / "checkpoints" / "checkpoint-000008" / "optimizer.pt", weights_only=False)
    assert len(saved["masters"]) == len(ckpt) and all(m.dtype == torch.float32 for m in saved["masters"])


def _memplan(*args):
    return [sys.executable, "-m", "memplan", *args]


def _kill_tree(pid):
    """SIGKILL a process and all its descendants, as a machine failure would (torchrun starts each worker in
    a session of its own, so a process-group kill would miss them)."""
    import psutil

    descendants = psutil.Process(pid).children(recursive=True)
    for p in descendants + [psutil.Process(pid)]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(descendants, timeout=30)  # not the caller's own child: Popen.wait collects its status


def _train(plan, *args):
    done = subprocess.run(_memplan("train", str(plan), "--quiet", *args), capture_output=True, text=True,
                          env=SUBPROCESS_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return _curve(plan.parent)


def _curve(run):
    return {(r["step"], k): r[k] for r in metrics(run) for k in ("loss", "eval_loss", "lr") if k in r}


# micro_batch 4 on one process = micro_batch 2 on each of two (torchrun, gloo): the same effective batch
RUN = dict(precision="bf16-master", hparams={"lr": 3e-3, "max_steps": 8, "eval_every": 4, "save_every": 2,
                                              "eval_samples": 2, "save_total_limit": 2})
LAYOUTS = {"one": dict(micro_batch=4), "fsdp": dict(micro_batch=2, gpus=2, sharding="fsdp", zero=3),
           "ddp": dict(micro_batch=2, gpus=2, sharding="ddp")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny):
    runs = {}

    def get(layout):
        if layout not in runs:
            plan = run_dir(tmp_path_factory.mktemp(f"straight-{layout}"), tiny, **LAYOUTS[layout], **RUN)
            if layout == "one":
                train_here(plan)
                runs[layout] = (plan.parent, _curve(plan.parent))
            else:
                runs[layout] = (plan.parent, _train(plan))
        return runs[layout]

    return get


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout, optimizer_files", [
    ("fsdp", ["optimizer-0.pt", "optimizer-1.pt"]),  # each process's shards of the masters and states
    ("ddp", ["optimizer.pt"])])
def test_two_processes_match_one(uninterrupted, layout, optimizer_files):
    _, one = uninterrupted("one")
    run, two = uninterrupted(layout)
    assert one.keys() == two.keys()
    for key, value in one.items():
        assert two[key] == pytest.approx(value, rel=2e-4), key
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert model.dtype == torch.bfloat16
    ckpt = torch.load(run / "checkpoints" / "checkpoint-000008" / "model.pt", weights_only=True)
    assert all(torch.equal(p, ckpt[n]) for n, p in model.named_parameters())
    assert sorted(p.name for p in (run / "checkpoints" / "checkpoint-000008").glob("optimizer*.pt")) == optimizer_files


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_after_a_kill_gives_the_same_losses(tmp_path, tiny, uninterrupted):
    _, straight = uninterrupted("fsdp")
    plan = run_dir(tmp_path, tiny, **LAYOUTS["fsdp"], **RUN)
    ckpts = plan.parent / "checkpoints"
    # the whole tree dies at once, as on a machine failure: the launcher's temporary directory stays, in tmp_path
    proc = subprocess.Popen(_memplan("train", str(plan), "--quiet"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(SUBPROCESS_ENV, TMPDIR=str(tmp_path)))
    while proc.poll() is None and not (ckpts / "checkpoint-000002" / "trainer.json").is_file():
        time.sleep(0.01)
    _kill_tree(proc.pid)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    # every process is gone: what is on disk now is what the resumed run starts from
    assert max(r["step"] for r in metrics(plan.parent)) < 8
    assert not (ckpts / "checkpoint-000008").exists()

    resumed = _train(plan, "--resume")
    assert straight.keys() == resumed.keys()
    for key, value in straight.items():
        assert abs(resumed[key] - value) <= 1e-6 * max(1.0, abs(value)), (key, value, resumed[key])


def test_fsdp_with_bf16_master_refuses_what_it_cannot_shard(tmp_path, tiny, run_cli):
    plan = run_dir(tmp_path, tiny, precision="bf16-master", gpus=2, sharding="fsdp", zero=3, optimizer="adafactor")
    code, out, err = run_cli("train", str(plan))
    assert code == 2
    assert err.count("\n") == 1 and "'adafactor' has others" in err and "Hint: --set optimizer=adamw" in err


@pytest.mark.parametrize("kind, hf_name", [("cosine", "cosine"), ("linear", "linear"),
                                           ("constant", "constant_with_warmup")])
def test_the_lr_schedule_is_transformers(kind, hf_name):
    """memplan train's schedule, step by step and in its saved state, is transformers' get_scheduler's."""
    from transformers import get_scheduler

    from memplan.runtime.optim import lr_schedule

    def run(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        sched = make(opt)
        lrs = []
        for _ in range(10):
            opt.step()
            sched.step()
            lrs.append(sched.get_last_lr()[0])
        return lrs, sched.state_dict()

    ours, our_state = run(lambda opt: lr_schedule(opt, kind, 3, 10))
    theirs, their_state = run(lambda opt: get_scheduler(hf_name, opt, num_warmup_steps=3, num_training_steps=10))
    assert ours == theirs and ours[1] > ours[0] and ours[-1] == (0.5 if kind == "constant" else 0.0)
    assert our_state.keys() == their_state.keys()
    assert [{k: v for k, v in s.items() if k != "lr_lambdas"} for s in (our_state, their_state)] == [
        {k: v for k, v in their_state.items() if k != "lr_lambdas"}] * 2
