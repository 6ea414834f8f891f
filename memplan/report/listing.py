"""`memplan models`: the presets and the families memplan supports, as tables or one JSON object."""

from __future__ import annotations


def multimodal_rows() -> list[dict]:
    """The multimodal config types memplan reads (memplan.catalog.vision): the language model's default
    model_type and the vision model."""
    from memplan.catalog.families import FAMILIES
    from memplan.catalog.vision import WRAPPERS

    return [{"model_type": mt, "language_model": w.text_default, "vision_model": w.vision_default,
             "language_model_supported": w.text_default in FAMILIES} for mt, w in WRAPPERS.items()]


def models_json(presets: list[dict], families: list[dict], multimodal: list[dict]) -> dict:
    return {"presets": presets, "families": families, "multimodal": multimodal}


def models_text(presets: list[dict], families: list[dict], multimodal: list[dict]) -> str:
    from tabulate import tabulate

    def params(r: dict) -> str:
        if r["params_total"] is None:
            return "- (unsupported)"
        return f"{r['params_total']:,}" + (f" + {r['params_frozen']:,} frozen" if r.get("params_frozen") else "")

    def text(m: dict) -> str:
        return m["language_model"] + ("" if m["language_model_supported"] else " (unsupported)")

    table = [[r["id"], r["family"], params(r), ", ".join(r["aliases"]), r["hub_id"]] for r in presets]
    out = [f"presets ({len(presets)}):",
           tabulate(table, headers=["id", "family", "parameters", "aliases", "hub id"], disable_numparse=True), "",
           f"supported families ({len(families)}; --model takes any config.json of these model_types):",
           tabulate([[f["model_type"], f["estimate"], f["about"]] for f in families],
                    headers=["model_type", "estimate", "transformers model"], disable_numparse=True), "",
           "multimodal configs (the language model from text_config; vision tower and projector frozen):",
           tabulate([[m["model_type"], text(m), m["vision_model"]] for m in multimodal],
                    headers=["model_type", "language model", "vision model"], disable_numparse=True)]
    unsupported = [r for r in presets if r["params_total"] is None]
    if unsupported:
        out += ["", "unsupported presets: " + "; ".join(r["unsupported"] for r in unsupported)]
    return "\n".join(out)
