"""`memplan train`: run a Plan for real and check its memory estimate against the run.

Modules, in the order a run uses them:
  run         what `memplan train` does: check, lock, then launch or train (memplan.report.train prints it)
  settings    the plan file + `--set` overrides -> a validated Plan with absolute paths
  preflight   every check that needs no heavy import (machine, launch files, model, data, output), all at once
  model       the model directory, tokenizer, precision regime, LoRA / QLoRA, checkpointing
  data        JSONL (alpaca / chat / text) -> token ids with masked prompts, packing, replay mix
  loop        the training loop, top to bottom (accelerate, AdamW, warmup + cosine, eval, saving)
  evaluate    validation loss, exact-match accuracy, retention perplexity
  checkpoint  atomic resumable checkpoints and the final model / adapter
  memory      the run's own peak memory, next to the plan's estimate
  metrics     metrics.jsonl, the plot, summary.json
  launch      several processes: torchrun (CPU, gloo) or accelerate launch (CUDA), run by agent
  agent       the launcher's process: it ends with memplan train, and its workers with it
  lock        one run per output directory
"""
