"""Hyperparameters from the recommended values, scaled to the data.

The recommended values of the fine-tuning guide the decision tree comes from (全参数微调流程图解,
关键概念 / 推荐值): learning rate 1e-5 to 5e-5 (full fine-tuning), batch "as large as possible",
gradient accumulation 4-16 steps, warmup 3-10 % of the total steps, cosine decay to 0; against
catastrophic forgetting (灾难性遗忘): a lower learning rate, a mix of general data, early stopping on the
validation set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: Peak learning rates. Full FT: 2e-5, inside the recommended range 1e-5..5e-5. LoRA/QLoRA: 2e-4, the QLoRA
#: paper's setting for 7B-13B models (Dettmers et al. 2023, appendix B.2: 2e-4, 1e-4 above 33B);
#: adapters start at zero and need the larger step.
LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4}
#: High domain shift (the first guard against forgetting: lower the learning rate): half, still inside
#: the recommended range for full FT (1e-5) and the QLoRA paper's for adapters (1e-4).
LR_HIGH_SHIFT = {"full": 1e-5, "lora": 1e-4, "qlora": 1e-4}
LR_RANGE = {"full": (1e-5, 5e-5), "lora": (1e-4, 2e-4), "qlora": (1e-4, 2e-4)}
#: The width these rates are for: d_model 4096, LLaMA-7B's (the guide's model; QLoRA's 7B).
REF_WIDTH = 4096

#: The recommended warmup range, as fractions of the total optimizer steps.
WARMUP_MIN, WARMUP_MAX = 0.03, 0.10
#: AdamW's beta2 (torch default). Untuned linear warmup over 2 / (1 - beta2) steps suffices for Adam's
#: second-moment estimate (Ma & Yarats 2021, "On the adequacy of untuned warmup for adaptive
#: optimization"): 2,000 steps, clamped into the recommended 3-10 %.
ADAM_BETA2 = 0.999

#: Evaluations over a run (eval_every = steps / this): enough points for early stopping to act on.
EVALS_PER_RUN = 20
#: Early-stopping patience in evaluations; one less under a high domain shift (stop sooner as the
#: validation loss turns, the third guard against forgetting).
PATIENCE, PATIENCE_HIGH_SHIFT = 3, 2

#: Share of training examples drawn from general text under a high domain shift (the second guard
#: against forgetting): 5 %, the smallest replay Ibrahim et al. 2024 ("Simple and Scalable Strategies to Continually
#: Pre-train LLMs") found to undo most forgetting; Scialom et al. 2022 ("Fine-tuned Language Models are
#: Continual Learners") needed 1 % rehearsal for instruction tasks.
REPLAY_RATIO_HIGH_SHIFT = 0.05

#: Default effective batch (sequences per optimizer step) when --effective-batch is not given: 32, the
#: Alpaca/LLaMA-Factory scale for instruction tuning, lowered for small sets to the largest power of two
#: that still gives an epoch this many optimizer steps (so warmup, evaluation and early stopping have
#: steps to act on), but not below MIN_EFFECTIVE_BATCH.
DEFAULT_EFFECTIVE_BATCH = 32
MIN_STEPS_PER_EPOCH = 25
#: The smallest default effective batch: 4 examples per step. The learning rates above were set at batches
#: of 16 (QLoRA, Dettmers et al. 2023, appendix B.2) to 128 (Alpaca); a gradient averaged over B examples
#: has 1/B of one example's variance, so at 4 the step is within 4x of QLoRA's batch-16 noise, at 1 it
#: is 16x (one example steers the whole step). A set too small for 25 steps per epoch at batch 4 gets
#: fewer steps, and a warning, rather than single-example steps.
MIN_EFFECTIVE_BATCH = 4

#: The recommended gradient-accumulation range, a guideline for one GPU.
ACCUM_RANGE = (4, 16)


@dataclass
class Hparams:
    lr: float
    warmup_steps: int
    total_steps: int
    epochs: float
    eval_every: int
    early_stopping_patience: int
    replay_ratio: float
    reasons: list[str] = field(default_factory=list)

    def plan_fields(self) -> dict:
        return {"lr": self.lr, "warmup_steps": self.warmup_steps, "lr_scheduler": "cosine", "epochs": self.epochs,
                "eval_every": self.eval_every, "save_every": self.eval_every,
                "early_stopping_patience": self.early_stopping_patience}


def _power_of_two_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def default_effective_batch(samples: int) -> int:
    """min(32, the largest power of two giving >= 25 steps per epoch), at least 4 (at most the samples)."""
    batch = min(DEFAULT_EFFECTIVE_BATCH, _power_of_two_at_most(samples // MIN_STEPS_PER_EPOCH))
    return max(batch, min(MIN_EFFECTIVE_BATCH, _power_of_two_at_most(samples)))


def validation_examples(examples: int, validation_file: str | None) -> int:
    """Validation examples `memplan train` will have: the validation file's records, else the split it holds
    out of the training file's `examples` (memplan.train.data.held_out_count at the Plan's default val_ratio)."""
    from memplan.plan import DataSettings
    from memplan.train.data import held_out_count, read_jsonl

    if validation_file:
        return len(read_jsonl(validation_file))
    return held_out_count(examples, DataSettings.model_fields["val_ratio"].default)


def small_data_warnings(samples: int, effective_batch: int, validation: int | None) -> list[str]:
    """What a small data set costs: few optimizer steps per epoch; a validation set too small to stop on."""
    from memplan.train.data import MIN_EARLY_STOPPING_EXAMPLES

    out = []
    per_epoch = samples // effective_batch
    if per_epoch < MIN_STEPS_PER_EPOCH:
        out.append(f"only {samples:,} training examples: an effective batch of {effective_batch} gives {per_epoch} "
                   f"optimizer step(s) per epoch, fewer than the {MIN_STEPS_PER_EPOCH} that warmup, evaluation "
                   "and early stopping need to act on; more examples help most")
    if effective_batch < min(MIN_EFFECTIVE_BATCH, samples):
        out.append(f"effective batch {effective_batch}: each optimizer step follows fewer than {MIN_EFFECTIVE_BATCH} "
                   "examples, so single examples steer it")
    if validation is not None and validation < MIN_EARLY_STOPPING_EXAMPLES:
        out.append(f"{validation} validation example(s), fewer than {MIN_EARLY_STOPPING_EXAMPLES}: their loss is too "
                   "noisy to stop on, so early stopping is off and training keeps its last step's weights; "
                   f"--validation FILE with {MIN_EARLY_STOPPING_EXAMPLES} or more examples turns it on")
    return out


def warmup_steps(total_steps: int) -> int:
    """2 / (1 - beta2) steps, within 3-10 % of the total (at least 1)."""
    lo = max(1, math.ceil(WARMUP_MIN * total_steps))
    hi = max(lo, math.floor(WARMUP_MAX * total_steps))
    return int(min(max(round(2 / (1 - ADAM_BETA2)), lo), hi))


def width_scale(hidden_size: int) -> float:
    """REF_WIDTH / d_model: Adam's learning rate for hidden weights goes as 1 / width.

    Theory: muP (Yang et al. 2022, "Tensor Programs V", table 3: Adam, hidden weights, LR ∝ 1/fan_in).
    Practice: GPT-3's pre-training rates (Brown et al. 2020, table 2.1) give LR x d_model ≈ 0.4-0.5 from
    125M (d 768, 6e-4) to 13B (d 5140, 1e-4); QLoRA halves its adapter rate from 7B/13B (d 4096/5120, 2e-4)
    to 33B/65B (d 6656/8192, 1e-4). The recommended rates are for a 7B (d 4096): a 70B (d 8192) gets half,
    a 0.5B (d 896) 4.6x."""
    return REF_WIDTH / hidden_size


def choose(method: str, domain_shift: str, total_steps: int, epochs: float, lr: float | None = None,
           hidden_size: int = REF_WIDTH, validation: int | None = None) -> Hparams:
    """The recommended hyperparameters for the run; `validation` (examples, when known) below
    memplan.train.data.MIN_EARLY_STOPPING_EXAMPLES turns early stopping off."""
    from memplan.train.data import MIN_EARLY_STOPPING_EXAMPLES

    high = domain_shift == "high"
    reasons = []
    if lr is None:
        scale = width_scale(hidden_size)
        base = (LR_HIGH_SHIFT if high else LR)[method]
        lr = float(f"{base * scale:.3g}")
        lo, hi = LR_RANGE[method]
        what = "full fine-tuning" if method == "full" else "adapters (LoRA/QLoRA)"
        width = "" if hidden_size == REF_WIDTH else (
            f" for a 7B (d_model {REF_WIDTH}), x {REF_WIDTH}/{hidden_size} = {scale:.3g} for this model's "
            f"d_model {hidden_size} (learning rate ∝ 1/width)")
        reasons.append(f"learning rate {lr:g}: {what} {base:g} (range {lo:g}-{hi:g}){width}"
                       + ("; lowered for the high domain shift (forgetting guard)" if high else ""))
    else:
        reasons.append(f"learning rate {lr:g}: given")
    warm = warmup_steps(total_steps)
    reasons.append(f"warmup {warm} of {total_steps} steps ({100 * warm / total_steps:.1f} %): 2/(1-beta2) = "
                   f"{round(2 / (1 - ADAM_BETA2))} steps clamped to the recommended 3-10 %; then cosine decay to 0")
    eval_every = max(1, round(total_steps / EVALS_PER_RUN))
    evals = total_steps // eval_every  # EVALS_PER_RUN, or one per step in a run with fewer steps
    patience = PATIENCE_HIGH_SHIFT if high else PATIENCE
    if validation is not None and validation < MIN_EARLY_STOPPING_EXAMPLES:
        patience = 0
        reasons.append(f"evaluate every {eval_every} steps (~{evals} evaluations); no early stopping: "
                       f"{validation} validation example(s), fewer than {MIN_EARLY_STOPPING_EXAMPLES}")
    else:
        reasons.append(f"evaluate every {eval_every} steps (~{evals} evaluations), early stopping after "
                       f"{patience} without a better validation loss")
    return Hparams(lr=lr, warmup_steps=warm, total_steps=total_steps, epochs=epochs, eval_every=eval_every,
                   early_stopping_patience=patience, replay_ratio=REPLAY_RATIO_HIGH_SHIFT if high else 0.0,
                   reasons=reasons)
