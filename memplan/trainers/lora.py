"""LoRA settings as the trainers name them: targets, and the adapter features memplan does not count. Shared by
the trainer modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memplan.plan import ALL_LINEAR
from memplan.trainers.source import Reading

#: peft's default targets when none are given, for the llama, mistral, qwen2/3 and gemma families
#: (peft/utils/constants.py TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING: ["q_proj", "v_proj"]).
PEFT_DEFAULT_TARGETS = ["q_proj", "v_proj"]

def targets(r: Reading, value: Any, key: str) -> None:
    """A list of module names, "all-linear" / "all", a comma list; a regex string (peft matches a string
    target in full as a regular expression) is counted as all-linear."""
    if value is None:
        r.assume("lora.targets", PEFT_DEFAULT_TARGETS, f"{key} not set; peft's default for the llama, mistral, "
                                                       "qwen and gemma families")
        return
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        if value in (ALL_LINEAR, "all"):
            r.take("lora.targets", ALL_LINEAR, key)
            return
        names = [v.strip() for v in value.split(",") if v.strip()]
        if all(n.isidentifier() for n in names):
            r.take("lora.targets", names, key)
            return
        r.take("lora.targets", ALL_LINEAR, key)
        r.unmodelled(key, value, "a regular expression of modules: counted as every linear layer of the "
                                 "decoder layers")
        return
    r.take("lora.targets", [str(v) for v in value], key)


def modules_to_save(r: Reading, key: str) -> None:
    value = r.get(key)
    if value:
        r.unmodelled(key, value, "whole modules trained next to the adapters (their weights, gradients and "
                                 "optimizer states at full size)")


def local_data(r: Reading, value: Any, key: str) -> None:
    """data.train when the file names a local JSON/JSONL file (a Hub dataset name is not memory)."""
    if not isinstance(value, str) or not value.endswith((".json", ".jsonl")):
        r.ignore(key)
        return
    for base in (Path.cwd(), Path(r.path).resolve().parent):
        candidate = base / value
        if candidate.is_file():
            r.take("data.train", str(candidate), key)
            return
    r.ignore(key)
