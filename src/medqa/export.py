"""`medqa export`: merge the LoRA adapter into the base model and save a standalone model folder that loads with
`AutoModelForCausalLM.from_pretrained` alone (no peft needed), with its tokenizer."""

from __future__ import annotations

import logging
from pathlib import Path

from medqa.artifacts import atomic_dir
from medqa.schema import Config
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


# ------------------------------------------------------------------------------------------ Hugging Face Hub


def model_card(cfg: Config, report: dict | None, merged: bool = False) -> str:
    """README.md for the Hub: what the model is (the LoRA adapter, or the merged model), its data and licence, its
    measured numbers (from outputs/report.json when `medqa evaluate` has run), intended use and limits."""
    import re

    from medqa.evaluate import model_card as card_fields

    card = (report or {}).get("model_card") or card_fields(cfg)
    base = str(card["base_model"])
    on_hub = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", base) is not None  # a local path is no Hub base_model
    what = "Merged model (LoRA adapter folded into" if merged else "LoRA adapter for"
    lines = ["---", *([f"base_model: {base}"] if on_hub else []),
             *([] if merged else ["library_name: peft"]), "license: other", "license_name: research-only-data",
             "tags: [medical, lora, medqa]", "---", "",
             f"# {what} {base}{')' if merged else ''}: answers to patients' medical questions", "",
             "Fine-tuned with medqa on doctors' answers. **Not medical advice**: research use "
             "only; never for diagnosis, treatment or any clinical decision.", "",
             "## Data and licence", "", f"- Data: {card['data']}", f"- Licence: {card['licence']}", "",
             "## Training", "", f"- LoRA: {card['lora']}", f"- Training: {card['training']}",
             f"- Prompt: `{card['prompt_template']!r}`", ""]
    if report:
        lines += ["## Results (test split)", "", "These weights are the row `fine-tuned` (the base model is the "
                  "comparison).", "", "| model | answer perplexity | 95% CI | ROUGE-L | BLEU | PubMedQA acc |",
                  "|---|---|---|---|---|---|"]
        for name, m in report["models"].items():
            t, g, p = m["test"], m["generation"], m.get("pubmedqa")
            ci = t.get("answer_perplexity_ci95")
            lines.append(f"| {name} | {t['answer_perplexity']:.2f} | {f'{ci[0]:.2f}–{ci[1]:.2f}' if ci else '-'} | "
                         f"{g['rougeL']:.3f} | {g['bleu']:.2f} | {_acc(p)} |")
        lines += ["", "Answer perplexity: exp of the mean negative log-likelihood per answer token over every answer "
                      f"token of the test split ({report['test_examples']} examples), scored in {report.get('dtype')}.", ""]
    lines += ["## Intended use and limits", "", card["intended_use"], "", card["limits"], ""]
    return "\n".join(lines)


def _acc(pubmedqa: dict | None) -> str:
    return f"{pubmedqa['acc']:.3f}" if pubmedqa else "-"


# What a model repository needs: weights, configs, tokenizer files and the card. Not run files that hold local
# paths or per-example data (config.yaml, manifest.json, metrics.json, per_example.jsonl, tensorboard/).
UPLOAD_PATTERNS = ["*.safetensors", "*config.json", "tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json",
                   "*.model", "chat_template*", "generation_config.json", "README.md"]


def check_push(folder: Path) -> str:
    """The HF_TOKEN to push with, or one clear MedqaError (checked before any slow work such as merging)."""
    import os

    from medqa.errors import MedqaError

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise MedqaError(f"Cannot push to the Hub: offline mode is on (HF_HUB_OFFLINE=1). The files to publish are in "
                         f"{folder}; copy that folder, or run again with HF_HUB_OFFLINE=0 on a machine that reaches "
                         "huggingface.co.")
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise MedqaError("Pushing to the Hub needs a write token in the HF_TOKEN environment variable (create one at "
                         "huggingface.co/settings/tokens); medqa never reads tokens from config files.")
    return token


def push_to_hub(cfg: Config, repo_id: str, folder: str | Path | None = None, private: bool = True,
                merged: bool = False) -> str:
    """Upload the adapter (or, `merged`, the merged model) with a model card to the Hub repository `repo_id`, in one
    commit. The token comes from HF_TOKEN, never from a config file. Returns the repository URL."""
    import json
    import shutil
    import tempfile

    from medqa.errors import MedqaError

    folder = Path(folder or Path(cfg.workdir) / "outputs" / "finetune")
    if not folder.is_dir() or not any(folder.iterdir()):
        raise MedqaError(f"{folder} holds nothing to upload. Run `medqa train` (the adapter) or `medqa export` (the "
                         "merged model) first, or pass the folder to upload.")
    token = check_push(folder)
    report_path = Path(cfg.workdir) / "outputs" / "report.json"
    report = None
    if report_path.exists():
        try:
            report = json.loads(report_path.read_text())
        except ValueError:
            raise MedqaError(f"{report_path} is not valid JSON; run `medqa evaluate` again before pushing.") from None
    else:
        log.warning("No %s: the model card has no measured results. Run `medqa evaluate` first to include them.",
                    report_path)
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
        raise MedqaError(f"Could not push {folder} to the Hub repository {repo_id!r}: {type(exc).__name__}: "
                         f"{str(exc)[:300]}. Check HF_TOKEN's write permission and the network; the files stay in "
                         f"{folder}.") from None
    log.info("export: pushed %s to %s", folder, url)
    return str(url)
