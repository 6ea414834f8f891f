"""The estimate against traced training steps for every supported family besides Llama/Qwen2, each once here
(test_estimator_arch_variants.py has the other cases of each).

Small configs derived from the presets (hidden >= 256, 2 layers, b 2, s 512): each keeps what makes its
family's replay different - Gemma's (1+w) fp32 RMSNorm, GeGLU and MQA with head_dim 256, Gemma2's four
norms, soft-capping and two masks, Phi3's fused qkv/gate_up and torch.cat rotary, Mixtral's router and
grouped_mm experts, GPT-2's Conv1D, dropouts (SDPA's math kernel on the CPU) and gelu_new, OPT's ReLU,
dropout and offset positions, Mistral's sliding-window mask and an explicit head_dim, Granite's
multipliers. Vocabularies are cut so that the layers'
activations are a visible part of the step (8192) where that does not move the forward peak into a
layer; checkpointed cases keep a 32000-token vocabulary so the loss stays the forward peak (what the
estimator models). Each trace runs two optimizer steps on fake tensors (seconds).
"""

import pytest

from memplan.catalog.spec import spec_from_config
from memplan.estimator import estimate
from memplan.plan import Plan
from memplan.profile.trace import trace_training

GEMMA = dict(model_type="gemma", hidden_size=256, intermediate_size=2048, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=1, head_dim=256, hidden_act="gelu_pytorch_tanh")
GEMMA2 = dict(model_type="gemma2", hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=256, attn_logit_softcapping=50.0,
              final_logit_softcapping=30.0, sliding_window=256, query_pre_attn_scalar=256,
              hidden_activation="gelu_pytorch_tanh")
PHI3 = dict(model_type="phi3", hidden_size=384, intermediate_size=1024, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, resid_pdrop=0.0, embd_pdrop=0.0,
            attention_dropout=0.0, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MIXTRAL = dict(model_type="mixtral", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
               sliding_window=None)
GPT2 = dict(model_type="gpt2", n_embd=256, n_head=4, n_layer=2, n_positions=1024, vocab_size=50257,
            activation_function="gelu_new", attn_pdrop=0.1, embd_pdrop=0.1, resid_pdrop=0.1)
OPT = dict(model_type="opt", hidden_size=256, ffn_dim=1024, num_hidden_layers=2, num_attention_heads=4,
           vocab_size=50272, word_embed_proj_dim=256, dropout=0.1, attention_dropout=0.0,
           activation_function="relu", do_layer_norm_before=True, max_position_embeddings=2048,
           pad_token_id=1, bos_token_id=2, eos_token_id=2)
MISTRAL = dict(model_type="mistral", hidden_size=256, intermediate_size=768, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)
QWEN3 = dict(model_type="qwen3", hidden_size=256, intermediate_size=768, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=128)
OLMO2 = dict(model_type="olmo2", hidden_size=256, intermediate_size=768, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, pad_token_id=1, eos_token_id=2)
# sliding_window_pattern 2: layer 0 local (window 256), layer 1 global
GEMMA3 = dict(model_type="gemma3_text", hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=256,
              sliding_window_pattern=2, query_pre_attn_scalar=256)
# no_rope_layer_interval 2: layers 1 and 3 skip the rotary
SMOLLM3 = dict(model_type="smollm3", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, no_rope_layer_interval=2, pad_token_id=0,
               bos_token_id=1, eos_token_id=2)
# Granite-3.3-8B's multipliers; embedding_multiplier makes layer 0's input a new tensor
GRANITE = dict(model_type="granite", hidden_size=256, intermediate_size=768, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, embedding_multiplier=12.0, logits_scaling=16.0,
               residual_multiplier=0.22, attention_multiplier=0.0078125)
# GPT-OSS: sinks in eager attention, biased top-k-then-softmax router, biased experts with the clamped SwiGLU,
# sliding (128) / full layers. No amp or fp32 case: the experts' grouped_mm has no fp32 kernel on fake tensors.
GPT_OSS = dict(model_type="gpt_oss", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=8, num_experts_per_tok=4,
               pad_token_id=0, bos_token_id=1, eos_token_id=1)
# Llama 4's text model, all layers MoE (as Scout): 3 rotary layers (complex rotary, weightless q/k norm,
# chunked attention: a chunk of 256 <= s gives SDPA a mask) and a NoPE layer (temperature tuning); every token
# through every expert, a shared expert. LoRA targets: the linears peft can train here (not the router).
LLAMA4 = dict(model_type="llama4_text", hidden_size=256, intermediate_size=256, intermediate_size_mlp=512,
              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=4,
              num_experts_per_tok=1, attention_chunk_size=256, pad_token_id=0)
LLAMA4_LORA = {"targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
# Qwen2-MoE: 8 experts (top 2, not renormalized), a shared expert with its sigmoid gate, layer 0 dense
QWEN2_MOE = dict(model_type="qwen2_moe", hidden_size=256, intermediate_size=768, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                 moe_intermediate_size=256, shared_expert_intermediate_size=512, mlp_only_layers=[0])
# DeepSeek-V3: MLA (q and kv low-rank with their norms; q/k head dim 48 != v head dim 32, so the CPU's SDPA
# runs its math kernel), layer 0 dense, then 8 routed experts (sigmoid, group-limited top 2) + a shared expert
DEEPSEEK_V3 = dict(model_type="deepseek_v3", hidden_size=256, intermediate_size=768, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=4, q_lora_rank=96, kv_lora_rank=64,
                   qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8,
                   num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=128, n_shared_experts=1,
                   first_k_dense_replace=1)
# Qwen3-MoE: q_norm / k_norm over the head dim, 8 experts (top 2, renormalized), layer 2 dense
QWEN3_MOE = dict(model_type="qwen3_moe", hidden_size=256, intermediate_size=768, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=8, num_experts_per_tok=2,
                 moe_intermediate_size=256, norm_topk_prob=True, mlp_only_layers=[2])
# Qwen2.5-VL's language model, traced inside Qwen2_5_VLForConditionalGeneration (a text-only batch; the small
# vision tower frozen, its weights counted): Qwen2's layer, head_dim 128 (the mrope sections 16 + 24 + 24), cos/sin
# of shape (b, s, head_dim)
QWEN2_5_VL = dict(model_type="qwen2_5_vl", hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                  vision_config=dict(depth=2, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=512,
                                     fullatt_block_indexes=[1]))
# the chunked loss with four chunks of 1024 tokens (b 2, s 2048), where the loss is most of the step
LLAMA = dict(model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=32000)
CHUNKED = dict(loss="chunked", seq_len=2048)


def cfg(base: dict, **over) -> dict:
    return {**base, **over}


FULL_BF16 = dict(precision="bf16", grad_ckpt=False)
FULL_AMP = dict(precision="amp-bf16", grad_ckpt=False)
LORA_CKPT = dict(method="lora", precision="bf16", grad_ckpt=True)
LORA = dict(method="lora", precision="bf16", grad_ckpt=False)
REENTRANT = dict(grad_ckpt=True, ckpt_reentrant=True)

ALL_CASES = [
    # (id, config, plan fields)
    ("gemma-full-bf16-sdpa", cfg(GEMMA, vocab_size=8192), dict(FULL_BF16, attn="sdpa")),
    ("gemma-lora-ckpt-eager", cfg(GEMMA, vocab_size=32000), dict(LORA_CKPT, attn="eager")),
    # Gemma2 has no SDPA path in transformers 5: eager, with its sliding (256) and full masks
    ("gemma2-full-amp-eager-window", cfg(GEMMA2, vocab_size=8192), dict(FULL_AMP, attn="eager")),
    ("gemma2-lora-ckpt-eager", cfg(GEMMA2, vocab_size=32000), dict(LORA_CKPT, attn="eager")),
    ("phi3-full-bf16-sdpa", cfg(PHI3, vocab_size=8192), dict(FULL_BF16, attn="sdpa")),
    ("phi3-lora-sdpa-window-mask", cfg(PHI3, vocab_size=8192, sliding_window=256), dict(LORA, attn="sdpa")),
    ("phi3-full-amp-ckpt-eager", cfg(PHI3, vocab_size=32000), dict(FULL_AMP, grad_ckpt=True, attn="eager")),
    ("mixtral-full-bf16-sdpa", cfg(MIXTRAL, vocab_size=8192), dict(FULL_BF16, attn="sdpa")),
    ("mixtral-full-bf16-ckpt-eager", cfg(MIXTRAL, vocab_size=32000), dict(FULL_BF16, grad_ckpt=True, attn="eager")),
    # attention dropout 0.1: PyTorch's CPU SDPA runs its math kernel (s x s probabilities, fp32)
    ("gpt2-full-bf16-sdpa-math", GPT2, dict(FULL_BF16, attn="sdpa")),
    ("gpt2-full-amp-eager", GPT2, dict(FULL_AMP, attn="eager")),
    ("gpt2-lora-ckpt-sdpa", GPT2, dict(LORA_CKPT, attn="sdpa")),
    ("opt-full-amp-eager", OPT, dict(FULL_AMP, attn="eager")),
    ("opt-lora-ckpt-sdpa", OPT, dict(LORA_CKPT, attn="sdpa")),
    # sliding window 256 <= s: SDPA gets a mask (repeat_kv copies, the mask saved per layer)
    ("mistral-full-bf16-sdpa-window-mask", cfg(MISTRAL, vocab_size=8192, sliding_window=256),
     dict(FULL_BF16, attn="sdpa")),
    ("mistral-lora-eager", cfg(MISTRAL, vocab_size=8192, sliding_window=4096), dict(LORA, attn="eager")),
    # per-head q/k norms (fp32 under autocast: fp32 weight times the bf16 projection)
    ("qwen3-full-bf16-sdpa", cfg(QWEN3, vocab_size=8192), dict(FULL_BF16, attn="sdpa")),
    ("qwen3-full-amp-sdpa", cfg(QWEN3, vocab_size=8192), dict(FULL_AMP, attn="sdpa")),
    ("qwen3-lora-ckpt-eager", cfg(QWEN3, vocab_size=32000), dict(LORA_CKPT, attn="eager")),
    # post-norms only, full-width q/k norms, (w * x).to(dtype) norms, the rotary cast back
    ("olmo2-full-bf16-sdpa", cfg(OLMO2, vocab_size=8192), dict(FULL_BF16, attn="sdpa")),
    ("olmo2-full-amp-eager", cfg(OLMO2, vocab_size=8192), dict(FULL_AMP, attn="eager")),
    ("olmo2-lora-sdpa", cfg(OLMO2, vocab_size=8192), dict(LORA, attn="sdpa")),
    # sandwich (1 + w) norms, per-head q/k norms, local layers with their SDPA mask (one kv head: repeat_kv
    # is a view, no copies), two rotary tables
    ("gemma3-full-bf16-sdpa-window-mask", cfg(GEMMA3, vocab_size=8192, num_hidden_layers=4, sliding_window_pattern=4),
     dict(FULL_BF16, attn="sdpa")),
    ("gemma3-full-amp-eager", cfg(GEMMA3, vocab_size=8192), dict(FULL_AMP, attn="eager")),
    ("gemma3-lora-ckpt-sdpa", cfg(GEMMA3, vocab_size=32000), dict(LORA_CKPT, attn="sdpa")),
    # NoPE layers: q/k reach the attention as projected
    ("smollm3-full-bf16-sdpa", cfg(SMOLLM3, vocab_size=8192), dict(FULL_BF16, attn="sdpa")),
    ("smollm3-full-amp-eager", cfg(SMOLLM3, vocab_size=8192), dict(FULL_AMP, attn="eager")),
    ("smollm3-lora-sdpa", cfg(SMOLLM3, vocab_size=8192), dict(LORA, attn="sdpa")),
    ("granite-full-bf16-sdpa", cfg(GRANITE, vocab_size=8192), dict(FULL_BF16, attn="sdpa")),
    ("granite-lora-ckpt-amp-sdpa", cfg(GRANITE, vocab_size=32000),
     dict(LORA_CKPT, precision="amp-bf16", attn="sdpa")),
    ("granite-full-fp32-eager", cfg(GRANITE, vocab_size=8192), dict(precision="fp32", grad_ckpt=False, attn="eager")),
    # an explicit head_dim (Mistral-Small-3, Ministral: 32 x 128 with hidden 5120): heads x head_dim != hidden
    ("mistral-head-dim-full-bf16-sdpa", cfg(MISTRAL, vocab_size=8192, head_dim=128, sliding_window=None),
     dict(FULL_BF16, attn="sdpa")),
    ("mistral-head-dim-lora-eager", cfg(MISTRAL, vocab_size=8192, head_dim=128, sliding_window=None),
     dict(LORA, attn="eager")),
    # GPT-OSS has no SDPA path: eager (the model's only attention on the CPU)
    ("gpt_oss-full-bf16-eager-sinks", cfg(GPT_OSS, vocab_size=8192), dict(FULL_BF16, attn="eager")),
    ("gpt_oss-lora-eager", cfg(GPT_OSS, vocab_size=8192), dict(LORA, attn="eager")),
    ("gpt_oss-full-bf16-ckpt-eager", cfg(GPT_OSS, vocab_size=32000), dict(FULL_BF16, grad_ckpt=True, attn="eager")),
    ("llama4_text-full-bf16-sdpa-chunk-mask", cfg(LLAMA4, vocab_size=8192), dict(FULL_BF16, attn="sdpa")),
    ("llama4_text-full-amp-sdpa", cfg(LLAMA4, vocab_size=8192), dict(FULL_AMP, attn="sdpa")),
    ("llama4_text-lora-eager", cfg(LLAMA4, vocab_size=8192), dict(LORA, attn="eager", lora=LLAMA4_LORA)),
    ("llama4_text-lora-ckpt-sdpa", cfg(LLAMA4, vocab_size=32000), dict(LORA_CKPT, attn="sdpa", lora=LLAMA4_LORA)),
    # "all-linear": the same modules (memplan does not hand peft its own "all-linear", which wraps the router)
    ("llama4_text-lora-all-linear-sdpa", cfg(LLAMA4, vocab_size=8192), dict(LORA, attn="sdpa")),
    # Maverick's layout: layers 0 and 2 dense (Llama4TextMLP of intermediate_size_mlp), 1 and 3 MoE
    ("llama4_text-interleaved-full-bf16-sdpa", cfg(LLAMA4, vocab_size=8192, interleave_moe_layer_step=2),
     dict(FULL_BF16, attn="sdpa")),
    ("llama4_text-interleaved-lora-sdpa", cfg(LLAMA4, vocab_size=8192, interleave_moe_layer_step=2),
     dict(LORA, attn="sdpa", lora=LLAMA4_LORA)),
    ("qwen2_moe-full-bf16-sdpa", cfg(QWEN2_MOE, vocab_size=8192), dict(FULL_BF16, attn="sdpa")),
    # (grouped_mm takes only bf16 on the CPU, so no amp-bf16 case for the expert families)
    ("qwen2_moe-full-bf16-eager-norm", cfg(QWEN2_MOE, vocab_size=8192, norm_topk_prob=True),
     dict(FULL_BF16, attn="eager")),
    # with use_sliding_window the even layers below max_window_layers slide: 0 and 2 here, with their SDPA masks
    ("qwen2_moe-full-bf16-sdpa-window", cfg(QWEN2_MOE, vocab_size=8192, use_sliding_window=True, sliding_window=256,
                                            max_window_layers=3), dict(FULL_BF16, attn="sdpa")),
    # all-linear on qwen2_moe (peft >= 0.22): attention, the dense and shared MLPs, the shared expert's gate, and the
    # router and expert stacks (no LoRA dropout there)
    ("qwen2_moe-lora-ckpt-sdpa", cfg(QWEN2_MOE, vocab_size=32000), dict(LORA_CKPT, attn="sdpa", lora={"dropout": 0.0})),
    ("qwen2_moe-lora-sdpa", cfg(QWEN2_MOE, vocab_size=8192), dict(LORA, attn="sdpa", lora={"dropout": 0.0})),
    ("deepseek_v3-full-bf16-sdpa", cfg(DEEPSEEK_V3, vocab_size=8192), dict(FULL_BF16, attn="sdpa")),
    ("deepseek_v3-full-bf16-eager", cfg(DEEPSEEK_V3, vocab_size=8192), dict(FULL_BF16, attn="eager")),
    # peft's MoE conversion adapts the router and the expert stacks (no LoRA dropout there)
    ("deepseek_v3-lora-ckpt-sdpa", cfg(DEEPSEEK_V3, vocab_size=32000),
     dict(LORA_CKPT, attn="sdpa", lora={"dropout": 0.0})),
    # DeepSeek-V2: softmax router (group-limited: its masked_fill keeps a mask), complex rotary, no q low rank
    ("deepseek_v2-full-bf16-sdpa", cfg(DEEPSEEK_V3, model_type="deepseek_v2", vocab_size=8192, q_lora_rank=None,
                                       topk_method="group_limited_greedy"), dict(FULL_BF16, attn="sdpa")),
    ("deepseek_v2-lora-ckpt-eager", cfg(DEEPSEEK_V3, model_type="deepseek_v2", vocab_size=32000, n_group=1,
                                        topk_group=1), dict(LORA_CKPT, attn="eager", lora={"dropout": 0.0})),
    ("qwen3_moe-full-bf16-sdpa", cfg(QWEN3_MOE, vocab_size=8192), dict(FULL_BF16, attn="sdpa")),
    ("qwen3_moe-lora-ckpt-eager", cfg(QWEN3_MOE, vocab_size=32000), dict(LORA_CKPT, attn="eager",
                                                                          lora={"dropout": 0.0})),
    ("qwen3_moe-lora-sdpa-attention", cfg(QWEN3_MOE, vocab_size=8192),
     dict(LORA, attn="sdpa", lora={"targets": "q_proj,k_proj,v_proj,o_proj"})),
    # rank-64 adapters on 32-expert stacks: the backward peaks at the lowest MoE layer (layer 1), with every
    # MoE layer's adapter gradients
    ("deepseek_v3-lora-ckpt-backward-peak", cfg(DEEPSEEK_V3, vocab_size=4096, num_hidden_layers=5, n_routed_experts=32,
                                               n_group=1, topk_group=1),
     dict(LORA_CKPT, attn="sdpa", lora={"dropout": 0.0, "rank": 64})),
    # one 2048-token row: the math kernel's s x s tensors (its causal mask, the upcast inputs, the scores and
    # probabilities; in the backward their gradients) outweigh the rest inside the checkpointed layers
    ("deepseek_v3-lora-ckpt-long-rows", cfg(DEEPSEEK_V3, vocab_size=4096, num_hidden_layers=5, n_routed_experts=32,
                                            n_group=1, topk_group=1),
     dict(LORA_CKPT, attn="sdpa", lora={"dropout": 0.0, "rank": 64}, micro_batch=1, seq_len=2048)),
    ("deepseek_v3-lora-eager-no-q-lora", cfg(DEEPSEEK_V3, vocab_size=8192, q_lora_rank=None),
     dict(LORA, attn="eager", lora={"dropout": 0.0})),
    ("qwen2_5_vl-full-bf16-sdpa", cfg(QWEN2_5_VL, vocab_size=8192), dict(FULL_BF16, attn="sdpa")),
    ("qwen2_5_vl-lora-ckpt-sdpa", cfg(QWEN2_5_VL, vocab_size=32000), dict(LORA_CKPT, attn="sdpa")),
    ("qwen2_5_vl-full-amp-sdpa", cfg(QWEN2_5_VL, vocab_size=8192), dict(FULL_AMP, attn="sdpa")),
    # layer 1 slides (max_window_layers 1): eager builds both masks
    ("qwen2_5_vl-lora-eager-window", cfg(QWEN2_5_VL, vocab_size=8192, use_sliding_window=True, sliding_window=256,
                                         max_window_layers=1), dict(LORA, attn="eager")),
    # chunked loss: each chunk recomputed in the backward; lm_head's gradient summed over the chunks
    ("llama-full-bf16-chunked-loss", LLAMA, dict(FULL_BF16, attn="sdpa", **CHUNKED)),
    ("llama-full-amp-chunked-loss", LLAMA, dict(FULL_AMP, attn="sdpa", **CHUNKED)),
    ("granite-lora-ckpt-amp-chunked-loss", cfg(GRANITE, vocab_size=32000),
     dict(LORA_CKPT, precision="amp-bf16", attn="sdpa", **CHUNKED)),
    ("gemma2-full-bf16-chunked-loss-softcap", cfg(GEMMA2, vocab_size=32000), dict(FULL_BF16, attn="eager", **CHUNKED)),
    # reentrant checkpointing (use_reentrant=True): full FT and LoRA (frozen embeddings, their hooked output
    # requiring grad), sdpa and eager, Llama and Qwen3
    # attention dropout: the CPU's SDPA runs its math kernel; one 2048-token row, checkpointed
    ("llama-lora-ckpt-sdpa-math-long-rows", cfg(LLAMA, vocab_size=4096, attention_dropout=0.1),
     dict(LORA_CKPT, attn="sdpa", micro_batch=1, seq_len=2048)),
    # ... with q/k norms and head_dim 128 under autocast: the backward peaks in the layer's recompute, as the
    # kernel returns (its causal mask, fp32 q, k, v and the probabilities' bf16 copy beside what the layer saved)
    ("qwen3-lora-ckpt-amp-sdpa-math-long-rows", cfg(QWEN3, vocab_size=4096, attention_dropout=0.1),
     dict(LORA_CKPT, precision="amp-bf16", attn="sdpa", micro_batch=1, seq_len=2048)),
    ("llama-full-bf16-sdpa-reentrant", LLAMA, dict(FULL_BF16, attn="sdpa", **REENTRANT)),
    ("llama-lora-amp-eager-reentrant", LLAMA, dict(LORA_CKPT, precision="amp-bf16", attn="eager", **REENTRANT)),
    ("qwen3-full-amp-eager-reentrant", cfg(QWEN3, vocab_size=32000), dict(FULL_AMP, attn="eager", **REENTRANT)),
    ("qwen3-lora-bf16-sdpa-reentrant", cfg(QWEN3, vocab_size=32000), dict(LORA_CKPT, attn="sdpa", **REENTRANT)),
]


def _family(case) -> str:
    return case[1]["model_type"]


# Here every family once (its first case), at the dependency floors too (.ci/run); the other cases, with other
# precisions, kernels, masks, checkpointing and LoRA targets: test_estimator_arch_variants.py.
CASES = [c for i, c in enumerate(ALL_CASES) if _family(c) not in {_family(d) for d in ALL_CASES[:i]}]
VARIANTS = [c for c in ALL_CASES if c[0] not in {first[0] for first in CASES}]


# Known over-statements, above the +3 % every other case keeps: the backward's layer candidate counts all of a layer's
# saved tensors beside all of its gradients, where the backward releases the saved tensors as the gradients form
# (rank-64 adapters on 32-expert stacks: gradients as large as a third of what the layer saves)
OVER = {"deepseek_v3-lora-ckpt-backward-peak": 4.0}


def assert_phase_peaks_match_the_trace(config: dict, fields: dict, over: float = 3.0) -> None:
    plan = Plan(**{"micro_batch": 2, "seq_len": 512, **fields})
    est = estimate(spec_from_config(dict(config), config["model_type"]), plan, kernels="cpu")
    steady = trace_training(dict(config), plan, backend="trace").steady
    for phase in ("forward", "backward", "optimizer"):
        measured = getattr(steady, phase)
        err = 100 * (est.phase_peaks[phase] - measured) / measured
        assert -2.0 <= err <= over, f"{phase}: estimate {est.phase_peaks[phase]:,} vs trace {measured:,} ({err:+.2f} %)"


@pytest.mark.parametrize("config, fields", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_phase_peaks_match_the_trace(config, fields):
    assert_phase_peaks_match_the_trace(config, fields)


def test_every_family_is_here_once():
    assert len(CASES) == len({_family(c) for c in ALL_CASES}) == 20 and len(CASES) + len(VARIANTS) == len(ALL_CASES)


@pytest.mark.parametrize("precision, residual", [("bf16", 2), ("amp-bf16", 4)])
def test_granite_embedding_multiplier_keeps_the_hooked_embedding_output(precision, residual):
    """Under LoRA with checkpointing the hooked embedding output is a leaf its AccumulateGrad node keeps; Granite's
    layer 0 gets embedding_multiplier times it, a new tensor, so the leaf is b x s x h more than Llama's."""
    plan = Plan(method="lora", precision=precision, grad_ckpt=True, micro_batch=2, seq_len=512)
    llama = estimate(spec_from_config(cfg(GRANITE, model_type="llama", vocab_size=32000), "l"), plan, kernels="cpu")
    granite = estimate(spec_from_config(cfg(GRANITE, vocab_size=32000), "g"), plan, kernels="cpu")
    extra = 2 * 512 * 256 * residual
    assert granite.phase_peaks["forward"] - llama.phase_peaks["forward"] == extra
    no_ckpt = plan.model_copy(update=dict(grad_ckpt=False))
    assert (estimate(spec_from_config(cfg(GRANITE, vocab_size=32000), "g"), no_ckpt, kernels="cpu").phase_peaks
            == estimate(spec_from_config(cfg(GRANITE, model_type="llama", vocab_size=32000), "l"), no_ckpt,
                        kernels="cpu").phase_peaks)


def test_estimator_import_stays_torch_free():
    import subprocess
    import sys

    code = ("import sys, memplan.estimator\n"
            "from memplan.estimator import estimate\n"
            "from memplan.catalog.spec import spec_from_config\n"
            "from memplan.plan import Plan\n"
            f"estimate(spec_from_config({MIXTRAL!r} | {{'vocab_size': 1000}}, 'm'), Plan())\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_rotary_tables_and_nope_layers_in_the_shared_bytes():
    """cos/sin (residual dtype, s x head_dim each) are kept once per table the layers use: none when every
    layer skips the rotary (SmolLM3 NoPE), two for Gemma-3's local and global bases."""
    from memplan.estimator.activations import activations

    plan = Plan(micro_batch=2, seq_len=512, precision="bf16", grad_ckpt=False)
    table = 2 * 512 * 64 * 2
    rope = activations(spec_from_config(cfg(SMOLLM3, vocab_size=1000, num_hidden_layers=2, no_rope_layers=[1, 0]),
                                        "s"), plan).shared
    nope = activations(spec_from_config(cfg(SMOLLM3, vocab_size=1000, num_hidden_layers=2, no_rope_layers=[0, 0]),
                                        "s"), plan).shared
    assert rope - nope == table
    one = activations(spec_from_config(cfg(GEMMA3, vocab_size=1000, sliding_window_pattern=1), "g"), plan).shared
    two = activations(spec_from_config(cfg(GEMMA3, vocab_size=1000), "g"), plan).shared
    assert two - one == 2 * 512 * 256 * 2


def test_mrope_tables_are_per_sequence():
    """Qwen2.5-VL's cos/sin are (b, s, head_dim) each (its position ids expanded to (3, b, s)): b times the
    (1, s, head_dim) tables of Qwen2's rotary, in the residual dtype."""
    from memplan.estimator.activations import activations

    qwen2 = dict(QWEN2_5_VL, model_type="qwen2", num_key_value_heads=2, vocab_size=1000)
    del qwen2["vision_config"], qwen2["rope_scaling"]
    for b, precision, residual in ((2, "bf16", 2), (4, "amp-bf16", 4)):
        plan = Plan(micro_batch=b, seq_len=512, precision=precision, grad_ckpt=False)
        vl = activations(spec_from_config(cfg(QWEN2_5_VL, vocab_size=1000), "q"), plan).shared
        text = activations(spec_from_config(qwen2, "q"), plan).shared
        assert vl - text == (b - 1) * 2 * 512 * 128 * residual
