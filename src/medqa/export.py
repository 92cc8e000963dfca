"""`medqa export`: merge the LoRA adapter into the base model and save a standalone model folder that loads with
`AutoModelForCausalLM.from_pretrained` alone (no peft needed), with its tokenizer."""

from __future__ import annotations

import logging
from pathlib import Path

from medqa.artifacts import atomic_dir
from medqa.errors import MedqaError
from medqa.locks import locked
from medqa.modelcard import model_card
from medqa.modeling import load_adapter_model, load_tokenizer
from medqa.schema import Config
from medqa.workdir import paths

log = logging.getLogger(__name__)


@locked("export")
def export(cfg: Config, adapter_dir: str | Path | None = None, out_dir: str | Path | None = None) -> Path:
    """W' = W + (alpha / r) * B @ A for every LoRA layer, saved in safetensors."""
    adapter_dir = Path(adapter_dir or paths(cfg).finetune)
    out_dir = Path(out_dir or paths(cfg).merged)
    model = load_adapter_model(cfg, adapter_dir).merge_and_unload()
    tokenizer = load_tokenizer(cfg)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    log.info("export: merged %s into the base model; saved %s", adapter_dir, out_dir)
    return out_dir


# ------------------------------------------------------------------------------------------ Hugging Face Hub


# What a model repository needs: weights, configs, tokenizer files and the card. Not run files that hold local
# paths or per-example data (config.yaml, manifest.json, metrics.json, per_example.jsonl, tensorboard/).
UPLOAD_PATTERNS = [
    "*.safetensors",
    "*config.json",
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "*.model",
    "chat_template*",
    "generation_config.json",
    "README.md",
]


def check_push(folder: Path) -> str:
    """The HF_TOKEN to push with, or one clear MedqaError (checked before any slow work such as merging)."""
    import os

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise MedqaError(
            f"Cannot push to the Hub: offline mode is on (HF_HUB_OFFLINE=1). The files to publish are in "
            f"{folder}; copy that folder, or run again with HF_HUB_OFFLINE=0 on a machine that reaches "
            "huggingface.co."
        )
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise MedqaError(
            "Pushing to the Hub needs a write token in the HF_TOKEN environment variable (create one at "
            "huggingface.co/settings/tokens); medqa never reads tokens from config files."
        )
    return token


def push_to_hub(
    cfg: Config, repo_id: str, folder: str | Path | None = None, private: bool = True, merged: bool = False
) -> str:
    """Upload the adapter (or, `merged`, the merged model) with a model card to the Hub repository `repo_id`, in one
    commit. The token comes from HF_TOKEN, never from a config file. Returns the repository URL."""
    import json
    import shutil
    import tempfile

    folder = Path(folder or paths(cfg).finetune)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise MedqaError(
            f"{folder} holds nothing to upload. Run `medqa train` (the adapter) or `medqa export` (the "
            "merged model) first, or pass the folder to upload."
        )
    token = check_push(folder)
    report_path = paths(cfg).report_json
    report = None
    if report_path.exists():
        try:
            report = json.loads(report_path.read_text())
        except ValueError:
            raise MedqaError(f"{report_path} is not valid JSON; run `medqa evaluate` again before pushing.") from None
    else:
        log.warning(
            "No %s: the model card has no measured results. Run `medqa evaluate` first to include them.", report_path
        )
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as staging:  # the files and their card, uploaded as one commit
            stage = Path(staging)
            for pattern in UPLOAD_PATTERNS:
                for path in folder.glob(pattern):
                    if path.is_file():
                        shutil.copy2(path, stage / path.name)
            (stage / "README.md").write_text(model_card(cfg, report, merged=merged), encoding="utf-8")
            api.upload_folder(repo_id=repo_id, folder_path=str(stage), commit_message="medqa: model and model card")
    except Exception as exc:  # network, permissions, name taken: one paragraph, not a traceback
        raise MedqaError(
            f"Could not push {folder} to the Hub repository {repo_id!r}: {type(exc).__name__}: "
            f"{str(exc)[:300]}. Check HF_TOKEN's write permission and the network; the files stay in "
            f"{folder}."
        ) from None
    log.info("export: pushed %s to %s", folder, url)
    return str(url)
