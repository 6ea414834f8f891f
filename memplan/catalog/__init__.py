"""What exists, torch-free: the models and GPUs memplan knows and where their data lives.

- ``spec``: ModelSpec (a model's shapes and exact parameter counts) and ``spec_from_config``;
- ``families``: one module per model family (``model_type``), and the registry of them;
- ``presets``: the model presets (data/models/presets.yaml) and the rows ``memplan models`` lists;
- ``resolve``: a model reference (config.json, model directory, preset, offline HF cache) -> ModelSpec;
- ``gpus``: GPU presets, memory sizes, the local-GPU query;
- ``paths``: where the shipped data lives, and its YAML tables' JSON twins.
"""
