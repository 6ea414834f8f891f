"""Evaluation: the loss on held-out examples, greedy exact-match accuracy, retention perplexity.

Every process runs the same evaluation on the same examples (under FSDP every forward needs all of
them), so every process reaches the same early-stopping decision without communication.
"""

from __future__ import annotations

import torch

from memplan.train.data import Example, Record, batches, collate, prompt_ids


def token_loss_sum(model, batch: dict, chunked: bool) -> torch.Tensor:
    """Sum of next-token cross-entropy over the batch's labelled tokens (not the mean: the caller divides
    by the tokens of the whole optimizer step, so every token weighs the same across micro-batches and
    processes, and 1 process x micro-batch 2 gives the same loss as 2 processes x micro-batch 1)."""
    if not chunked:
        # transformers' ForCausalLMLoss: reduction "sum" divided by num_items_in_batch.
        return model(**batch, num_items_in_batch=1, use_cache=False).loss
    from memplan.runtime.loss import chunked_causal_lm_loss, head_options

    decoder, head = _decoder_and_head(model)
    captured = {}
    handle = decoder.register_forward_hook(lambda m, a, out: captured.__setitem__("h", out[0]))
    try:
        # Logits for the last position only (the decoder output is taken from the hook instead).
        model(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    labels = batch["labels"]
    n_valid = (labels[:, 1:] != -100).sum()
    return chunked_causal_lm_loss(captured["h"], head, labels, **head_options(_hf_model(model).config)) * n_valid


def _hf_model(model):
    inner = getattr(model, "module", model)  # DDP
    if hasattr(inner, "get_base_model"):  # peft
        inner = inner.get_base_model()
    return inner


def _decoder_and_head(model):
    hf = _hf_model(model)
    return hf.get_decoder(), hf.get_output_embeddings()


@torch.no_grad()
def mean_loss(model, examples: list[Example], batch_size: int, pad_id: int, device, autocast) -> float | None:
    """Mean token cross-entropy over `examples` (eval mode, no dropout)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for chunk in batches(examples, batch_size):
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id, packed=False).items()}
        with autocast():
            total += token_loss_sum(model, batch, chunked=False).double().cpu()
        count += int((batch["labels"][:, 1:] != -100).sum())
    model.train(was_training)
    return float(total / max(count, 1))


@torch.no_grad()
def exact_match(model, records: list[Record], tokenizer, device, autocast, limit: int,
                batch_size: int = 32) -> float | None:
    """Fraction of the first `limit` records whose greedy completion equals the answer (stripped).
    Prompts are generated in left-padded batches; the completion ends at the first end-of-sequence."""
    scored = records[:limit]
    if not scored:
        return None
    gen = _hf_model(model)
    # FSDP2 gathers the root's own parameters (what no other unit holds: a peft model's final norm, position
    # embeddings) in the root's forward hook, which generating through the inner model (peft) skips: gather them
    # for the whole generation instead.
    # (The caller has run a forward through the root first, which initialises FSDP.)
    gather_root = gen is not model and hasattr(model, "unshard") and hasattr(model, "reshard")
    if gather_root:
        model.unshard()
    was_training = model.training
    model.eval()
    hits = 0
    for chunk in batches(scored, batch_size):
        prompts = [prompt_ids(r, tokenizer) for r in chunk]
        answer_len = max(len(tokenizer(r.answer, add_special_tokens=False)["input_ids"]) for r in chunk)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        with autocast():
            out = gen.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=answer_len + 4,  # room for the end-of-sequence token and a little more
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                use_cache=True,
            )
        for row, record in enumerate(chunk):
            new = out[row, width:].tolist()
            if tokenizer.eos_token_id in new:
                new = new[: new.index(tokenizer.eos_token_id)]
            text = tokenizer.decode(new, skip_special_tokens=True)
            hits += text.strip() == record.answer.strip()
    if gather_root:
        model.reshard()
    model.train(was_training)
    return hits / len(scored)
