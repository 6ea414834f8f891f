"""The tracer is memplan's ground truth: fake tensors must equal real CPU tensors, byte counts must add up."""

from __future__ import annotations

import contextlib
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from memplan.errors import UserError
from memplan.estimator.phases import PHASES
from memplan.plan import Plan
from memplan.profile.trace import trace_training
from memplan.runtime.loss import chunked_causal_lm_loss
from memplan.runtime.meter import METERED_TERMS, LiveBytes

GiB = 2**30


def tiny_llama(**kw) -> LlamaConfig:
    base = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=128,
    )
    base.update(kw)
    return LlamaConfig(**base)


def tiny_plan(**kw) -> Plan:
    return Plan(**{"micro_batch": 2, "seq_len": 32, **kw})


def meta_model(config, dtype=torch.float32):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def param_count(config) -> int:
    return sum(p.numel() for p in meta_model(config).parameters())


# ---------------------------------------------------------------- the tracker itself


def test_tracker_counts_each_storage_once_and_frees_it():
    tracker = LiveBytes()
    with tracker:
        tracker.new_step()
        tracker.phase("forward")
        a = torch.ones(1000)  # 4000 B
        v = a.view(10, 100).t()  # a view: same storage
        assert tracker.live == 4000
        b = a * 2
        assert tracker.live == 8000
        del a
        assert tracker.live == 8000  # the view keeps the storage alive
        del v
        assert tracker.live == 4000
        b.add_(1)  # in place: nothing new
        assert tracker.live == 4000
        del b
        assert tracker.live == 0
        tracker.phase(None)
    assert tracker.result()[0].forward == 8000


# ---------------------------------------------------------------- fake == real


SETUPS = {
    "fp32-foreach": dict(precision="fp32", grad_ckpt=False),
    "amp-bf16-ckpt": dict(precision="amp-bf16", grad_ckpt=True),
    "bf16-eager": dict(precision="bf16", attn="eager", grad_ckpt=False),
    "lora": dict(method="lora", precision="amp-bf16", grad_ckpt=True),
    "grad-accum-2": dict(precision="fp32", grad_accum=2, grad_ckpt=False),
    "chunked-loss": dict(precision="amp-bf16", loss="chunked", grad_ckpt=False),
    # beyond the required six: the other precisions and optimizers
    "bf16-master-fused": dict(precision="bf16-master", optimizer="adamw-fused"),
    "amp-fp16-adafactor": dict(precision="amp-fp16", optimizer="adafactor", grad_ckpt=False),
    "lora-sgd-chunked": dict(method="lora", precision="bf16", optimizer="sgd", loss="chunked"),
}


@pytest.mark.parametrize("name", list(SETUPS))
def test_fake_equals_real(name):
    config, plan = tiny_llama(), tiny_plan(**SETUPS[name])
    fake = trace_training(config, plan, backend="trace")
    real = trace_training(config, plan, backend="cpu")
    assert fake.after_load == real.after_load
    assert len(fake.steps) == len(real.steps) == 2
    for f, r in zip(fake.steps, real.steps):
        for phase in PHASES:
            assert getattr(f, phase) == pytest.approx(getattr(r, phase), rel=1e-3), phase
            assert set(f.breakdown[phase]) == set(METERED_TERMS)
            assert sum(f.breakdown[phase].values()) == getattr(f, phase)
    assert fake.peak == pytest.approx(real.peak, rel=1e-3)


# ---------------------------------------------------------------- numbers that cannot be faked


def test_after_load_is_parameter_and_buffer_bytes():
    config = tiny_llama()
    model = meta_model(config)
    expected = sum(p.numel() * p.element_size() for p in model.parameters())
    expected += sum(b.numel() * b.element_size() for b in model.buffers())
    result = trace_training(config, tiny_plan(precision="fp32"), steps=1)
    assert result.after_load == expected


def test_config_as_dict_or_json_file(tmp_path):
    config = tiny_llama()
    path = tmp_path / "config.json"
    path.write_text(config.to_json_string())
    plan = tiny_plan(precision="fp32")
    expected = trace_training(config, plan, steps=1).steady
    assert trace_training(config.to_dict(), plan, steps=1).steady == expected
    assert trace_training(str(path), plan, steps=1).steady == expected
    with pytest.raises(UserError, match="no such file"):
        trace_training(str(tmp_path / "missing"), plan)


def test_after_load_counts_tied_embeddings_once():
    config = tiny_llama(tie_word_embeddings=True)
    untied = trace_training(tiny_llama(), tiny_plan(precision="fp32"), steps=1).after_load
    tied = trace_training(config, tiny_plan(precision="fp32"), steps=1).after_load
    assert untied - tied == 4 * config.vocab_size * config.hidden_size


def test_fp32_adamw_states_and_gradients():
    config = tiny_llama()
    n_params = param_count(config)
    n_tensors = len(list(meta_model(config).parameters()))
    result = trace_training(config, tiny_plan(precision="fp32", optimizer="adamw"))
    at_step = result.steady.breakdown["optimizer"]
    # exp_avg + exp_avg_sq in fp32, plus torch's 0-dim fp32 `step` tensor per parameter tensor
    assert at_step["optimizer_states"] == 2 * 4 * n_params + 4 * n_tensors
    assert at_step["gradients"] == 4 * n_params
    assert at_step["weights"] == result.after_load
    # foreach AdamW: about one parameter-sized set of temporaries during step()
    assert at_step["optimizer_temporaries"] == 4 * n_params
    assert at_step["activations"] == at_step["logits_loss"] == 0
    forloop = trace_training(config, tiny_plan(precision="fp32", optimizer="adamw-forloop"))
    assert forloop.steady.optimizer < result.steady.optimizer


def test_states_are_created_in_step_one():
    result = trace_training(tiny_llama(), tiny_plan(precision="fp32"))
    first, steady = result.steps
    assert first.breakdown["forward"]["optimizer_states"] == 0
    assert steady.breakdown["forward"]["optimizer_states"] > 0
    assert steady.forward > first.forward
    assert result.peak == max(s.peak for s in result.steps)


def test_grad_accum_keeps_gradients_through_the_next_forward():
    config = tiny_llama()
    n_params = param_count(config)
    result = trace_training(config, tiny_plan(precision="fp32", grad_accum=2, grad_ckpt=False))
    assert result.steady.breakdown["forward"]["gradients"] == 4 * n_params
    single = trace_training(config, tiny_plan(precision="fp32", grad_accum=1, grad_ckpt=False))
    assert single.steady.breakdown["forward"]["gradients"] == 0


def test_bf16_master_keeps_fp32_masters():
    config = tiny_llama()
    n_params, n_tensors = param_count(config), len(list(meta_model(config).parameters()))
    result = trace_training(config, tiny_plan(precision="bf16-master", optimizer="adamw"))
    at_step = result.steady.breakdown["optimizer"]
    # fp32 masters; fp32 exp_avg, exp_avg_sq + step tensors
    assert at_step["master_weights"] == 4 * n_params
    assert at_step["optimizer_states"] == 2 * 4 * n_params + 4 * n_tensors
    # bf16 grads + the fp32 grads built for the masters during step()
    assert at_step["gradients"] == (2 + 4) * n_params


def test_lora_trains_only_adapters():
    config = tiny_llama()
    plan = tiny_plan(method="lora", precision="bf16", lora={"rank": 4, "targets": "q_proj,v_proj"})
    result = trace_training(config, plan)
    layers, h, kv = config.num_hidden_layers, config.hidden_size, 2 * (64 // 4)  # v_proj out = kv heads * head dim
    adapter_params = layers * (4 * (h + h) + 4 * (h + kv))
    at_step = result.steady.breakdown["optimizer"]
    assert at_step["gradients"] == 4 * adapter_params  # peft keeps adapters in fp32
    assert at_step["weights"] == result.after_load == 2 * param_count(config) + 4 * adapter_params + 64


# ---------------------------------------------------------------- chunked loss


def test_chunked_loss_matches_standard_loss_and_gradients():
    torch.manual_seed(0)
    config = tiny_llama()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ids = torch.randint(0, config.vocab_size, (2, 24))
    labels = ids.clone()
    labels[0, :5] = -100  # some ignored labels (a prompt)

    standard = model(input_ids=ids, labels=labels, use_cache=False).loss
    standard.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    hidden = model.get_decoder()(input_ids=ids, use_cache=False)[0]
    chunked = chunked_causal_lm_loss(hidden, model.get_output_embeddings(), labels, chunk_tokens=7)
    chunked.backward()
    torch.testing.assert_close(chunked, standard, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_chunked_loss_applies_final_logit_softcapping():
    from transformers import Gemma2Config

    torch.manual_seed(0)
    config = Gemma2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=256,
        final_logit_softcapping=2.0,
        attn_implementation="eager",
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    standard = model(input_ids=ids, labels=ids, use_cache=False).loss
    hidden = model.get_decoder()(input_ids=ids, use_cache=False)[0]
    chunked = chunked_causal_lm_loss(hidden, model.get_output_embeddings(), ids, chunk_tokens=5, softcap=2.0)
    torch.testing.assert_close(chunked, standard, rtol=1e-5, atol=1e-6)


def test_chunked_loss_drops_the_full_logits():
    # 4096 tokens = 4 chunks of 1024: the standard loss keeps bf16 logits + fp32 logits + fp32 log-softmax
    # for all tokens (2.5 x the fp32 logits); the chunked one the same for one chunk only.
    config = tiny_llama(vocab_size=32000, max_position_embeddings=4096)
    plan = dict(micro_batch=1, seq_len=4096, precision="bf16")
    standard = trace_training(config, Plan(**plan), steps=1).steps[0]
    chunked = trace_training(config, Plan(loss="chunked", **plan), steps=1).steps[0]
    fp32_logits = 4096 * 32000 * 4
    assert standard.breakdown["forward"]["logits_loss"] > 2.5 * fp32_logits
    assert chunked.breakdown["forward"]["logits_loss"] < 2.5 * fp32_logits / 4 * 1.05
    assert chunked.backward < standard.backward - 2 * fp32_logits


# ---------------------------------------------------------------- refusals


def test_bitsandbytes_plans_are_refused_on_fake_tensors():
    with pytest.raises(UserError, match="fake tensors"):
        trace_training(tiny_llama(), tiny_plan(method="qlora", precision="bf16"))
    with pytest.raises(UserError, match="fake tensors"):
        trace_training(tiny_llama(), tiny_plan(optimizer="adamw-8bit"))


def test_bad_backend_is_a_user_error():
    with pytest.raises(UserError, match="trace, cpu"):
        trace_training(tiny_llama(), tiny_plan(), backend="cuda")


def test_real_bitsandbytes_plans_need_bitsandbytes():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install bitsandbytes"):
            trace_training(tiny_llama(), tiny_plan(method="qlora", precision="bf16"), backend="cpu")
    else:
        result = trace_training(tiny_llama(), tiny_plan(method="qlora", precision="bf16"), backend="cpu")
        assert result.steady.breakdown["optimizer"]["gradients"] > 0


# ---------------------------------------------------------------- full size


@pytest.mark.slow
def test_llama2_7b_pure_bf16_optimizer_step():
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    n_params = 6_738_415_616
    assert param_count(config) == n_params
    plan = dict(method="full", precision="bf16", micro_batch=1, seq_len=512)
    foreach = trace_training(config, Plan(optimizer="adamw", **plan))
    forloop = trace_training(config, Plan(optimizer="adamw-forloop", **plan))
    for result in (foreach, forloop):
        at_step = result.steady.breakdown["optimizer"]
        assert at_step["gradients"] == 2 * n_params
        # bf16 exp_avg + exp_avg_sq, + a 0-dim fp32 `step` tensor for each of the 291 parameter tensors
        assert at_step["optimizer_states"] == 4 * n_params + 4 * 291
    assert foreach.steady.optimizer / GiB == pytest.approx(62.76, abs=0.01)
    assert forloop.steady.optimizer / GiB == pytest.approx(50.69, abs=0.01)
    # foreach: a parameter-sized set of temporaries (sqrt(exp_avg_sq) / bias_correction2_sqrt over all
    # params at once). The for-loop: the same two temporaries of the largest tensor (lm_head, last), while
    # the previous parameter's `denom` (model.norm.weight, 4096 bf16) is still referenced by the loop.
    assert foreach.steady.breakdown["optimizer"]["optimizer_temporaries"] == 2 * n_params
    assert forloop.steady.breakdown["optimizer"]["optimizer_temporaries"] == 2 * (2 * 32000 * 4096) + 2 * 4096


def test_chunked_loss_applies_granite_logits_scaling():
    """GraniteForCausalLM divides the logits by logits_scaling before its loss; the chunked loss (profile, train
    --loss chunked, evaluation) does the same, with the options read from the model's config."""
    from transformers import GraniteConfig

    from memplan.runtime.loss import head_options

    torch.manual_seed(0)
    config = GraniteConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           vocab_size=256, embedding_multiplier=12.0, logits_scaling=16.0, residual_multiplier=0.22,
                           attention_multiplier=0.125)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    assert head_options(model.config) == {"softcap": None, "logits_scaling": 16.0}
    ids = torch.randint(0, config.vocab_size, (2, 16))
    standard = model(input_ids=ids, labels=ids, use_cache=False).loss
    hidden = model.get_decoder()(input_ids=ids, use_cache=False)[0]
    chunked = chunked_causal_lm_loss(hidden, model.get_output_embeddings(), ids, chunk_tokens=5,
                                     **head_options(model.config))
    torch.testing.assert_close(chunked, standard, rtol=1e-5, atol=1e-6)
    unscaled = chunked_causal_lm_loss(hidden, model.get_output_embeddings(), ids, chunk_tokens=5)
    assert not torch.allclose(unscaled, standard)


def _live_peak(events) -> int:
    live, peak, sizes = 0, 0, {}
    for ev in events:
        if ev[0] == "a":
            sizes[ev[1]] = ev[2]
            live += ev[2]
            peak = max(peak, live)
        elif ev[0] == "f":
            live -= sizes.pop(ev[1])
    return peak


def test_recorded_events_replay_the_traced_live_bytes():
    """The allocation order the allocator model replays holds the same bytes as the meter, at every moment."""
    result = trace_training(tiny_llama(), tiny_plan(precision="bf16", grad_ckpt=False), steps=2,
                            record_events=True)
    assert result.events.count(("s",)) == 2
    assert _live_peak(result.events) == result.peak
    frees = {ev[1] for ev in result.events if ev[0] == "f"}
    assert frees <= {ev[1] for ev in result.events if ev[0] == "a"}


def test_cuda_kernels_keep_bool_dropout_masks():
    """With CUDA's kernels, dropout saves a bool mask instead of an input-dtype noise tensor: the fp32
    forward holds 3 B per dropped element less."""
    config = tiny_llama(attention_dropout=0.0, num_key_value_heads=4)  # fp32 GQA would run SDPA's math kernel
    plan = tiny_plan(method="lora", precision="fp32", grad_ckpt=False, lora={"dropout": 0.1})
    cpu = trace_training(config, plan, steps=1).steady.forward
    cuda = trace_training(config, plan, steps=1, kernels="cuda").steady.forward
    tokens = plan.micro_batch * plan.seq_len
    # each adapter drops out its own copy of its input: q, k, v, o, gate, up (width 64) and down (128); the
    # mask is kept only where the input needs a gradient, so not for q/k/v of layer 0 (the frozen embedding's)
    per_layer = 6 * 64 + 128
    inputs = tokens * (per_layer * config.num_hidden_layers - 3 * 64)
    assert cpu - cuda == inputs * 3
    with pytest.raises(UserError):
        trace_training(config, plan, backend="cpu", kernels="cuda")


# ---------------------------------------------------------------- CUDA's kernel memory (kernels="cuda")


class ToyLM(torch.nn.Module):
    """Every way a gradient gets two contributions in a decoder: a residual stream, an fp32 norm input used
    twice, one normed input feeding three projections (their gradients are views of their matmuls' results),
    a transposed use of a tensor, and an output projection tied to the input embedding."""

    def __init__(self, vocab: int = 64, h: int = 16, dtype=torch.bfloat16) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, h, dtype=dtype)
        self.q, self.k, self.v = (torch.nn.Linear(h, h, bias=False, dtype=dtype) for _ in range(3))
        self.up = torch.nn.Linear(h, 2 * h, bias=False, dtype=dtype)
        self.down = torch.nn.Linear(2 * h, h, bias=False, dtype=dtype)

    @staticmethod
    def norm(x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    def forward(self, ids):
        x = self.emb(ids)
        for _ in range(2):
            n = self.norm(x)
            q, k = self.q(n), self.k(n)
            x = x + (q @ k.transpose(1, 2)).softmax(-1) @ self.v(n)
            x = x + self.down(torch.relu(self.up(self.norm(x))))
        return (x @ self.emb.weight.t()).float().log_softmax(-1).mean()


def _gradient_sums(loss) -> list[tuple[str, int, int]]:
    """Per input buffer that got more than one gradient, in the order the engine consumed them: (node, input,
    which contribution the sum ended in, -1 for a new tensor). Contributions are remembered by weak reference: a
    reference (to the tensor or a Python storage object) would change the engine's choice, and an address
    (`_cdata`) can be reused by the new tensor once a contribution is freed. torch keeps a tensor's Python object
    while the tensor lives, so the weak reference lives exactly as long as the contribution."""
    nodes, stack = [], [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in nodes:
            nodes.append(node)
            stack += [f for f, _ in node.next_functions]
    arrived, sums = {}, []

    def post(node):
        def hook(grad_inputs, grad_outputs):
            for (nxt, nr), g in zip(node.next_functions, grad_inputs):
                if nxt is not None and g is not None:
                    arrived.setdefault((nxt, nr), []).append(weakref.ref(g))
        return hook

    def pre(node):
        def hook(grad_outputs):
            for nr, g in enumerate(grad_outputs):
                got = arrived.get((node, nr), [])
                if g is not None and len(got) > 1:
                    sums.append((type(node).__name__, nr, next((i for i, w in enumerate(got) if w() is g), -1)))
        return hook

    handles = [h for n in nodes for h in (n.register_hook(post(n)), n.register_prehook(pre(n)))]
    loss.backward()
    for h in handles:
        h.remove()
    return sums


def test_cuda_kernels_sum_gradients_in_place_where_plain_tensors_do():
    """autograd sums two gradients of one tensor in place when its input buffer holds the only reference to
    the first (InputBuffer::accumulate); a dispatch mode (the meter, fake tensors) makes every sum out of
    place. With kernels="cuda" the trace sums exactly where plain tensors do: the residual stream and the
    norm's fp32 input in place, the projections' view gradients and the tied embedding's out of place."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memplan.profile.trace import cuda_kernel_memory

    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 8))
    plain = _gradient_sums(ToyLM()(ids))
    assert ("AccumulateGrad", 0, -1) in plain  # the tied embedding: its first gradient is a view
    assert ("AddBackward0", 0, 0) in plain  # the residual stream
    assert {s for _, _, s in plain} == {-1, 0}

    def traced(kernels: str):
        with FakeTensorMode(allow_non_fake_inputs=True) as fake:
            model = ToyLM()
            with LiveBytes(), cuda_kernel_memory() if kernels == "cuda" else contextlib.nullcontext():
                return _gradient_sums(model(fake.from_tensor(ids)))

    assert traced("cuda") == plain
    assert {s for _, _, s in traced("cpu")} == {-1}


def test_cuda_kernels_keep_softmax_backwards_temporary():
    """CUDA's softmax backward allocates `grad * output` after its result and frees it when the kernel returns
    (SoftMax.cu, softmax_backward_cuda_out): one more score-sized tensor at that moment; log_softmax has none."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memplan.profile.trace import cuda_kernel_memory

    def backward_events(fn, kernels: str) -> list[tuple]:
        with FakeTensorMode():
            scores = torch.randn(2, 4, 16, 16, requires_grad=True)
            meter = LiveBytes(record_events=True)
            with meter, cuda_kernel_memory() if kernels == "cuda" else contextlib.nullcontext():
                out = fn(scores)
                start = len(meter.events)
                out.backward(torch.ones_like(out))
        return meter.events[start:]

    nbytes = 2 * 4 * 16 * 16 * 4
    softmax, cpu = backward_events(lambda s: s.softmax(-1), "cuda"), backward_events(lambda s: s.softmax(-1), "cpu")
    assert _live_peak(softmax) - _live_peak(cpu) == nbytes
    allocs = [ev for ev in softmax if ev[0] == "a" and ev[2] == nbytes]
    assert len(allocs) == len([ev for ev in cpu if ev[0] == "a" and ev[2] == nbytes]) + 1
    assert ("f", allocs[-1][1]) in softmax  # the temporary is freed within the backward
    log_softmax = [backward_events(lambda s: s.log_softmax(-1), k) for k in ("cuda", "cpu")]
    assert _live_peak(log_softmax[0]) == _live_peak(log_softmax[1])


@pytest.mark.parametrize(("precision", "kv_heads", "math"), [
    ("fp32", 2, True),  # fp32 with grouped-query heads: CUDA's math kernel keeps the probabilities
    ("fp32", 4, False),  # fp32, as many kv heads as heads: the memory-efficient kernel
    ("bf16", 2, False),  # 16-bit: flash attention takes grouped-query heads
    ("amp-bf16", 2, False),  # autocast hands SDPA bf16 inputs
])
def test_cuda_kernels_choose_sdpa_math_for_fp32_grouped_query_attention(precision, kv_heads, math):
    config = tiny_llama(num_key_value_heads=kv_heads)
    plan = tiny_plan(precision=precision, grad_ckpt=False)
    cpu = trace_training(config, plan, steps=1).steady.forward
    cuda = trace_training(config, plan, steps=1, kernels="cuda").steady.forward
    probabilities = config.num_hidden_layers * plan.micro_batch * config.num_attention_heads * plan.seq_len ** 2 * 4
    if math:
        assert cuda - cpu >= probabilities
    else:
        assert cuda == cpu


# DeepSeek-V3's MLA: q/k head dim 48 (nope 32 + rope 16), v head dim 32
MLA = dict(model_type="deepseek_v3", hidden_size=256, intermediate_size=768, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
           qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
           moe_intermediate_size=128, n_shared_experts=1, first_k_dense_replace=1, vocab_size=4096)


def test_cuda_kernels_run_mla_on_the_memory_efficient_kernel():
    """A value head dim other than the query's: CUDA runs its memory-efficient kernel (no s x s tensor) where the
    CPU's SDPA falls back to its math kernel. Each trace, every phase, is its kernels' estimate, less cuBLAS's
    workspaces (which the trace marks for the allocator replay, not as tensors). (bf16: the experts' grouped_mm
    takes no other dtype in a trace.)"""
    from memplan.catalog.spec import spec_from_config
    from memplan.estimator import estimate

    plan = Plan(precision="bf16", grad_ckpt=False, micro_batch=1, seq_len=1024, attn="sdpa")
    spec = spec_from_config(dict(MLA), "deepseek_v3")
    forward = {}
    for kernels in ("cpu", "cuda"):
        steady = trace_training(dict(MLA), plan, kernels=kernels).steady
        forward[kernels] = steady.forward
        est = estimate(spec, plan, kernels=kernels)
        for phase in ("forward", "backward", "optimizer"):
            err = 100 * ((est.phase_peaks[phase] - est.phases[phase]["workspace"]) / getattr(steady, phase) - 1)
            assert -2.0 <= err <= 3.0, f"{kernels}, {phase}: {err:+.2f} %"
    # the math kernel's fp32 probabilities, kept by every layer
    assert forward["cpu"] - forward["cuda"] >= MLA["num_hidden_layers"] * MLA["num_attention_heads"] * 1024 ** 2 * 4


@pytest.mark.parametrize("tokens", [3072, 4096])
def test_cuda_kernels_keep_the_embedding_backwards_sort_buffers(tokens):
    """Past 3072 indices CUDA's embedding backward sorts them and sums each segment in buffers sized by the
    number of indices (Embedding.cu, EmbeddingBackwardKernel.cu): two index arrays kept through the op, four
    more and two scalars with the fp32 partial sums (tokens x width) when the result is allocated."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memplan.profile.trace import cuda_kernel_memory

    def backward_peak(kernels: str) -> int:
        with FakeTensorMode():
            emb = torch.nn.Embedding(100, 8, dtype=torch.bfloat16)
            ids = torch.randint(0, 100, (tokens,))
            meter = LiveBytes(record_events=True)
            with meter, cuda_kernel_memory() if kernels == "cuda" else contextlib.nullcontext():
                out = emb(ids)
                start = len(meter.events)
                out.backward(torch.ones_like(out))
        return _live_peak(meter.events[start:])

    extra = 6 * 8 * tokens + 2 * 8 + 4 * tokens * 8 if tokens > 3072 else 0
    assert backward_peak("cuda") - backward_peak("cpu") == extra


def test_cuda_kernels_mark_where_each_thread_allocates_its_cublas_workspace():
    """cuBLAS workspaces belong to a (handle, stream) and handles to a thread; CUDA's backward runs on the autograd
    engine's device thread: with kernels="cuda" the events mark the first cuBLAS op of the forward's thread and
    of the backward's, once per process."""
    plan = tiny_plan(precision="bf16", grad_ckpt=True)
    events = trace_training(tiny_llama(), plan, steps=2, record_events=True, kernels="cuda").events
    marks = [(i, ev) for i, ev in enumerate(events) if ev[0] == "w"]
    assert [ev for _, ev in marks] == [("w", "main"), ("w", "autograd")]
    assert marks[0][0] < events.index(("p", "backward")) < marks[1][0] < events.index(("p", "optimizer"))
    assert not [ev for ev in trace_training(tiny_llama(), plan, steps=1, record_events=True).events if ev[0] == "w"]


# ---------------------------------------------------------------- benchmarks/allocator_check.py's replay


def _allocator_check():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "allocator_check.py"
    spec = importlib.util.spec_from_file_location("allocator_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_allocator_check_replays_a_run_as_its_process_served_it():
    """A fresh process allocates each thread's cuBLAS workspaces (32 + 1 MiB) where the trace marks them; in a run
    of rows in one process they stay, and the segment a workspace landed in stays reserved for the later rows."""
    check, MiB = _allocator_check(), 2**20
    first = {"events": [("a", 1, 10 * MiB), ("s",), ("a", 2, 200 * MiB), ("f", 2), ("w", "main"), ("w", "autograd")],
             "after_load": 10 * MiB, "tied": 0}
    second = {"events": [("a", 1, 100 * MiB), ("s",), ("a", 2, 30 * MiB), ("f", 2), ("w", "main")],
              "after_load": 100 * MiB, "tied": 0}
    first["plan"] = second["plan"] = {}
    alone = {"events": [("a", 1, 500 * MiB), ("s",)], "after_load": 500 * MiB, "tied": 0, "fresh": True,
             "fresh_default": [502 * MiB], "plan": {}}
    expandable = {**alone, "fresh": False, "fresh_expandable": [520 * MiB], "plan": {"allocator": "expandable"}}
    check.replay_run([first, alone, second, expandable])
    # the first row: its weights, the 200 MiB block both 32 MiB workspaces went into once freed, the 2 MiB small
    # segment of the 1 MiB ones
    assert first["as_measured"] == [(10 + 200 + 2) * MiB]
    # a row measured in a process of its own (gpu_check.py --fresh), or with expandable segments: its fresh replay
    assert alone["as_measured"] == [502 * MiB] and expandable["as_measured"] == [520 * MiB]
    # the second: its weights and its step fit in the 136 MiB left beside them in the segment that stayed
    assert second["as_measured"] == [(200 + 2) * MiB]


def test_allocator_check_frees_the_untied_copy_of_a_tied_embedding_after_the_weights():
    """The measuring harness built the model with to_empty, which gives the tied output embedding its own tensor,
    and tie_weights freed it: a hole of the tied weight's size right after the weights."""
    check = _allocator_check()
    row = {"events": [("a", 1, 2 * 6), ("a", 2, 7), ("s",), ("a", 3, 1)], "after_load": 19, "tied": 6}
    assert check._with_untied_copy(row) == row["events"][:2] + [("a", -1, 12), ("f", -1)] + row["events"][2:]
    assert check._with_untied_copy(dict(row, tied=0)) == row["events"]


def test_gpu_check_fresh_runs_each_case_in_a_process_of_its_own(monkeypatch, tmp_path):
    """gpu_check.py --fresh: one process per case, its allocator in PYTORCH_CUDA_ALLOC_CONF before CUDA starts
    (the user's other allocator options kept), so that a case's reserved memory owes nothing to the cases before."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    expandable = next(i for i, (_, fields) in enumerate(gpu_check.CASES) if fields.get("allocator") == "expandable")
    calls = []
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda cmd, env, **kw: calls.append((cmd, env)))
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "garbage_collection_threshold:0.8")
    gpu_check.run_fresh(tmp_path / "out.jsonl", {expandable, 0})
    assert [cmd[-3:] for cmd, _ in calls] == [[str(tmp_path / "out.jsonl"), "--one", "0"],
                                             [str(tmp_path / "out.jsonl"), "--one", str(expandable)]]
    assert calls[0][1]["PYTORCH_CUDA_ALLOC_CONF"] == "garbage_collection_threshold:0.8"
    assert calls[1][1]["PYTORCH_CUDA_ALLOC_CONF"] == "garbage_collection_threshold:0.8,expandable_segments:True"
