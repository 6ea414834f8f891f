"""Reading the configs of the trainers people use as memplan plans: TRL / transformers TrainingArguments,
axolotl, LLaMA-Factory and torchtune (and memplan's own plan.yaml), each with where every plan field came from
(memplan.trainers.source). `memplan estimate --config` and `memplan recommend --config` call `read_config`.

Pure Python: nothing here imports torch or transformers.
"""

from __future__ import annotations

from pathlib import Path

from memplan.errors import UserError
from memplan.files import read_yaml
from memplan.trainers.source import FORMAT_NAMES, ConfigSource


def read_config(path: str | Path) -> ConfigSource:
    """A config file as a plan dict and its provenance. An unrecognised file is a UserError naming the
    formats memplan reads."""
    from memplan.trainers.detect import detect

    path = str(path)
    data = read_yaml(path, "config file")  # JSON is YAML too
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file is a mapping of settings, got {type(data).__name__}")
    fmt = detect(data)
    if fmt is None:
        raise UserError(f"{path}: not a config memplan reads; it reads {', '.join(FORMAT_NAMES.values())} configs "
                        f"(YAML or JSON)")
    if fmt == "memplan":
        from memplan.plan import read_plan_yaml

        return ConfigSource("memplan", path, read_plan_yaml(path))
    from importlib import import_module

    module = import_module(f"memplan.trainers.{fmt.replace('-', '')}")
    return module.read(data, path)
