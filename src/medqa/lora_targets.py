"""Which layers LoRA adapts, per architecture: the presets (`qv`, `attention`, `all-linear`) resolved to module-name
suffixes for a model, an explicit list checked against its linear layers, and the trainable parameters that gives,
counted from the layer shapes (`modeling.lora_presets_table` checks it against peft's own count)."""

from __future__ import annotations

from medqa.errors import ModelError

# Per architecture (config.model_type): module-name suffixes for each preset. peft has no default for BioGPT.
LORA_PRESETS: dict[str, dict[str, list[str]]] = {
    "biogpt": {
        "qv": ["q_proj", "v_proj"],  # what the original project used
        "attention": ["q_proj", "k_proj", "v_proj", "out_proj"],
        "all-linear": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    },
    "llama": {
        "qv": ["q_proj", "v_proj"],
        "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
}
LORA_PRESETS["mistral"] = LORA_PRESETS["qwen2"] = LORA_PRESETS["llama"]


def _linear_names(model) -> list[str]:
    import torch

    out_emb = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not out_emb]


def resolve_lora_targets(model, targets: str | list[str]) -> list[str]:
    """Module-name suffixes for LoRA: a preset (`qv`, `attention`, `all-linear`) resolved for this architecture,
    or an explicit list checked against the model's linear layers."""
    linear = _linear_names(model)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear})
    if isinstance(targets, list):
        missing = [t for t in targets if t not in suffixes]
        if missing:
            raise ModelError(
                f"lora.targets {missing} match no linear layer of this model. Its linear layers end in: "
                f"{', '.join(suffixes)}."
            )
        return list(targets)
    model_type = getattr(model.config, "model_type", "")
    presets = LORA_PRESETS.get(model_type)
    if presets and targets in presets:
        return list(presets[targets])
    if targets == "all-linear":
        return suffixes
    known = ", ".join(sorted({p for v in LORA_PRESETS.values() for p in v}))
    raise ModelError(
        f"No LoRA preset {targets!r} for model type {model_type!r} (presets: {known}; all-linear works "
        f"for any model). Or give lora.targets as a list of layer names from: {', '.join(suffixes)}."
    )


def lora_parameter_count(model, targets: list[str], r: int) -> int:
    """Trainable LoRA parameters from the shapes: r * (in + out) for every targeted linear layer."""
    linear = set(_linear_names(model))
    return sum(
        r * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if name in linear and name.rsplit(".", 1)[-1] in targets
    )
