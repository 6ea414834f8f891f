"""Which trainer wrote a config: told from the keys each format uses, memplan's own plan file first.

- memplan: a `plan:` section (recommend's plan.yaml), or top-level keys that are all Plan fields;
- torchtune: `_component_` keys (its recipes instantiate every section from one);
- accelerate launch: distributed_type or compute_environment (memplan.trainers.accelerate);
- axolotl: base_model with one of adapter / micro_batch_size / sequence_len / datasets;
- LLaMA-Factory: model_name_or_path with stage and finetuning_type;
- TRL / transformers TrainingArguments: model_name_or_path or one of the TrainingArguments batch keys;
- else, a mapping of mostly Plan fields is memplan's (so that a typo gets the plan's "unknown key" error).
"""

from __future__ import annotations

from typing import Any

AXOLOTL_KEYS = ("adapter", "micro_batch_size", "sequence_len", "datasets")
HF_KEYS = ("model_name_or_path", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
           "learning_rate", "use_peft")


def _has_component(data: Any) -> bool:
    if isinstance(data, dict):
        return "_component_" in data or any(_has_component(v) for v in data.values() if isinstance(v, dict))
    return False


def detect(data: dict[str, Any]) -> str | None:
    """The format's id (memplan.trainers.source.FORMAT_NAMES), or None."""
    from memplan.plan import Plan

    fields = set(Plan.model_fields)
    if isinstance(data.get("plan"), dict) or not data:
        return "memplan"
    if _has_component(data):
        return "torchtune"
    if "distributed_type" in data or "compute_environment" in data:
        return "accelerate"
    if set(data) <= fields:
        return "memplan"
    if "base_model" in data and any(k in data for k in AXOLOTL_KEYS):
        return "axolotl"
    if "model_name_or_path" in data and "stage" in data and "finetuning_type" in data:
        return "llama-factory"
    if any(k in data for k in HF_KEYS):
        return "trl"
    if len(set(data) & fields) * 2 >= len(data):
        return "memplan"
    return None
