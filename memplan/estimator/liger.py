"""Liger's kernels (Liger-Kernel, src/liger_kernel): what they keep and allocate where they replace transformers'
modules. The decoder layers' rope / rms_norm / swiglu are replayed in `layers.py`; this module holds which models
memplan replays them for, and the fused linear cross-entropy that replaces the lm_head and the loss.

transformers' `use_liger_kernel` calls liger_kernel.transformers._apply_liger_kernel_to_instance on the loaded model
(transformers/integrations/liger.py), which runs the model type's apply_liger_kernel_to_<type> with its defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from memplan.errors import UserError

#: The model types whose apply_liger_kernel_to_<type> patches exactly what `layers.py` replays: LigerRMSNorm in the
#: llama casting mode on input_layernorm, post_attention_layernorm and the final norm; LigerSwiGLUMLP's forward on
#: each decoder MLP; liger_rotary_pos_emb; the model's forward replaced by lce_forward (fused_linear_cross_entropy).
#: Others have their own patches (Gemma's offset norms and GeGLU, Phi-3's fused gate_up, the MoE experts, Granite's
#: logit scaling), which memplan does not model.
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3")


def check(spec, plan) -> None:
    """Liger's kernels on a model they are modelled for; a UserError naming those otherwise."""
    if not plan.liger:
        return
    if spec.model_type not in MODEL_TYPES or spec.wrapper or spec.traits.calibrated:
        raise UserError(f"Liger's kernels are modelled for the {', '.join(MODEL_TYPES)} model types; "
                        f"{spec.name} is '{spec.model_type}', which Liger patches differently. Hint: --liger none")


@dataclass(frozen=True)
class FusedLoss:
    """LigerFusedLinearCrossEntropyFunction, in bytes: what it keeps for the backward and its forward's peak."""

    saved: int  # grad_input and grad_weight, computed in the forward and kept until the backward
    forward_peak: int  # saved + its buffers and the largest chunk's transients


def chunk_rows(tokens: int, hidden: int, vocab: int) -> int:
    """fused_linear_cross_entropy_forward's chunk: inc_factor = cdiv(V, H); chunk_size = next_power_of_2(cdiv(BT,
    inc_factor)), so that a chunk's logits are about BT x H elements; at most BT rows."""
    inc = math.ceil(vocab / hidden)
    return min(tokens, 1 << max(0, math.ceil(tokens / inc) - 1).bit_length())


def fused_linear_cross_entropy(*, tokens: int, hidden: int, vocab: int, input_itemsize: int, weight_itemsize: int,
                               compute: int, autocast: bool, weight_trainable: bool, kernels: str,
                               batch: int) -> FusedLoss:
    """Liger-Kernel ops/fused_linear_cross_entropy.py, fused_linear_cross_entropy_forward, reached through
    LigerForCausalLMLoss (transformers/model/loss_utils.py):

    - labels: F.pad(labels, (0, 1)) (`batch` x (s + 1) int64) and shift_labels = labels[..., 1:].contiguous()
      (BT int64), alive through the call;
    - grad_input = zeros_like(_input) (BT x H in the final norm's dtype); grad_weight = zeros_like(weight) when the
      weight needs grad (full fine-tuning; accum_dtype None); loss_1d (BT fp32); target_mask (BT bool);
    - per chunk of `chunk_rows`: logits_chunk = _input_chunk @ weight.t() (autocast: low-precision copies of the
      chunk and of the weight, the weight's view never cached), the CE kernel in place, grad_input[chunk] =
      grad_logits @ weight (a chunk x H result; autocast casts the weight again, a trainable leaf from its cache);
      grad_weight += mm(grad_logits.t(), _input_chunk).float(): a V x H product and its fp32 copy; on CUDA
      (compute capability >= 8, torch >= 2.8) an fp32 grad_weight with 16-bit logits takes torch.addmm(...,
      out_dtype=float32, out=grad_weight) instead, with nothing V x H;
    - ctx.save_for_backward(grad_input, grad_weight): the backward scales them in place (element_mul_kernel) and
      returns them, so grad_input is the final norm's output gradient and grad_weight lm_head's gradient.

    Under autocast (custom_fwd keeps it on) a trainable weight's cached low-precision copy stays until autocast exits.
    """
    c_logits = compute if autocast else input_itemsize
    rows = chunk_rows(tokens, hidden, vocab)
    grad_input = tokens * hidden * input_itemsize
    grad_weight = vocab * hidden * weight_itemsize if weight_trainable else 0
    buffers = 4 * tokens + tokens + 8 * (tokens + batch) + 8 * tokens  # loss_1d, target_mask, padded + shifted labels
    weight_cast = vocab * hidden * compute if autocast and weight_itemsize != compute else 0
    input_cast = rows * hidden * compute if autocast and input_itemsize != compute else 0
    # autocast caches its copy of a trainable leaf weight (grad_input's matmul of the first chunk) until it exits
    cached = weight_cast if weight_trainable else 0
    steps = [input_cast + weight_cast,  # the first chunk's logits
             cached + (0 if weight_trainable else weight_cast) + rows * hidden * c_logits]  # grad_input's matmul
    if math.ceil(tokens / rows) > 1:
        steps.append(cached + input_cast + weight_cast)  # the next chunks' logits, the cached copy alive
    if weight_trainable:
        if kernels == "cuda" and weight_itemsize == 4 and c_logits == 2:  # torch.addmm into grad_weight
            steps.append(cached + (rows * hidden * c_logits if input_itemsize != c_logits else 0))
        else:
            product = vocab * hidden * c_logits
            steps.append(cached + max(input_cast + product, product + (vocab * hidden * 4 if c_logits != 4 else 0)))
    saved = grad_input + grad_weight
    return FusedLoss(saved=saved, forward_peak=saved + buffers + rows * vocab * c_logits + max(steps))
