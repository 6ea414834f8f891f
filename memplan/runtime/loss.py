"""Chunked causal-LM cross-entropy: the loss without the full b·s·V fp32 logits.

Hugging Face's `ForCausalLMLoss` computes `lm_head(hidden)` for every token (b·s·V in the compute dtype),
upcasts it to fp32 and runs cross-entropy on it; the fp32 logits, the log-softmax saved for backward and
the logits' gradient each cost b·s·V·4 bytes. Here the token axis is cut into chunks of `chunk_tokens`;
each chunk's lm_head matmul + fp32 cross-entropy runs under non-reentrant activation checkpointing, so
only the chunk's inputs are kept for backward and at most one chunk's logits are alive at a time (in the
forward and again while the backward recomputes it). Same loss and gradients as the standard loss
(torchtune's chunked CE and Liger's fused linear cross-entropy use the same idea).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def head_options(config) -> dict:
    """What a model's ForCausalLM does to the logits before its loss, from its (text) config, as keyword
    arguments of chunked_causal_lm_loss: Gemma-2's final_logit_softcapping, Granite's logits_scaling."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {"softcap": getattr(text, "final_logit_softcapping", None),
            "logits_scaling": getattr(text, "logits_scaling", None)}


def _chunk_loss_sum(
    hidden: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    softcap: float | None,
    ignore_index: int,
    logits_scaling: float | None = None,
) -> torch.Tensor:
    logits = lm_head(hidden)
    if logits_scaling is not None:
        # granite: GraniteForCausalLM.forward divides the logits by logits_scaling before its loss
        logits = logits / logits_scaling
    if softcap is not None:
        # gemma2/gemma3: final logit soft-capping, in the compute dtype, before the fp32 upcast (as HF does).
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    chunk_tokens: int = 1024,
    *,
    softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    logits_scaling: float | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy over the valid labels, one checkpointed chunk of tokens at a time.

    `hidden_states` (b, s, h) is the decoder's final (normed) output; `lm_head` maps (n, h) to (n, V);
    `labels` (b, s) are unshifted, as for HF's `ForCausalLMLoss` (token t predicts label t+1; -100 is
    ignored). Returns sum over chunks of the summed fp32 cross-entropy, divided by the number of valid
    labels — HF's "mean" reduction. ``softcap`` and ``logits_scaling`` do to each chunk's logits what the
    model's ForCausalLM does (``head_options`` reads them from its config).
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    # Shift so that tokens < n predict n (the same pad-and-slice as transformers' ForCausalLMLoss).
    shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    flat_labels = shift_labels.reshape(-1)
    n_tokens = hidden.shape[0]

    total = None
    for start in range(0, n_tokens, chunk_tokens):
        end = min(start + chunk_tokens, n_tokens)
        part = checkpoint(
            _chunk_loss_sum,
            hidden[start:end],
            lm_head,
            flat_labels[start:end],
            softcap,
            ignore_index,
            logits_scaling,
            use_reentrant=False,
        )
        total = part if total is None else total + part
    n_valid = (flat_labels != ignore_index).sum()
    # All labels ignored gives 0/0 = nan, as HF's mean reduction does.
    return total / n_valid
