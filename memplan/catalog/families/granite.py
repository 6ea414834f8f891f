"""Granite (modeling_granite.py): a LlamaDecoderLayer stack with four scalar multipliers. The counts are
Llama's (attention_bias on q/k/v/o, mlp_bias on the MLP, kv heads default = heads, untied lm_head by
default). Of the multipliers, one changes what a training step keeps in memory:

- ``embedding_multiplier``: GraniteModel.forward ``inputs_embeds = inputs_embeds * embedding_multiplier``,
  so layer 0 gets a new tensor, not the (hooked) embedding output (Traits.embedding_scaled, read by
  activations.embedding_saved: under LoRA with checkpointing the hooked output is a leaf kept alive).

The others change no peak: ``logits_scaling`` (GraniteForCausalLM.forward ``logits = logits /
logits_scaling``) makes a new b x s x V tensor in the compute dtype, but the division by a Python scalar
saves nothing, so the lm_head output is freed at once: 2 x c x b x s x V at the division, less than the
loss's c + 4 + 4 bytes per logit after it; in the backward the division's gradient (c per logit) comes
after the fp32 log-softmax gradients are freed (traced equal to Llama's loss peaks, fp32 / bf16 / amp). The
allocation stream makes both tensors (Traits.logits_scaled): they move where the caching allocator puts the loss's.
``residual_multiplier`` (``residual + h * m``: a product by a Python scalar saves nothing) and
``attention_multiplier`` (the softmax scale passed to the attention instead of head_dim ** -0.5) change
no tensor's size. GraniteConfig's defaults are 1.0 for all four; the multiplications run even then.
"""

from __future__ import annotations

from dataclasses import replace

from memplan.catalog.families import llama
from memplan.catalog.spec import Arch, Cfg


def build(cfg: Cfg) -> Arch:
    arch = llama.build(cfg)  # GraniteConfig has LlamaConfig's keys and defaults (tie_word_embeddings False)
    arch.traits = replace(arch.traits, decoder_layer="GraniteDecoderLayer", embedding_scaled=True,
                          logits_scaled=True)
    return arch
