"""`medqa export`: merge the LoRA adapter into the base model and save a standalone model folder that loads with
`AutoModelForCausalLM.from_pretrained` alone (no peft needed), with its tokenizer."""

from __future__ import annotations

import logging
from pathlib import Path

from medqa.artifacts import atomic_dir
from medqa.config import Config
from medqa.modeling import load_adapter_model, load_tokenizer

log = logging.getLogger(__name__)


def export(cfg: Config, adapter_dir: str | Path | None = None, out_dir: str | Path | None = None) -> Path:
    """W' = W + (alpha / r) * B @ A for every LoRA layer, saved in safetensors."""
    adapter_dir = Path(adapter_dir or Path(cfg.workdir) / "outputs" / "finetune")
    out_dir = Path(out_dir or Path(cfg.workdir) / "outputs" / "merged")
    model = load_adapter_model(cfg, adapter_dir).merge_and_unload()
    tokenizer = load_tokenizer(cfg)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    log.info("export: merged %s into the base model; saved %s", adapter_dir, out_dir)
    return out_dir
