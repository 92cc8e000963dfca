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


# ------------------------------------------------------------------------------------------ Hugging Face Hub


def model_card(cfg: Config, report: dict | None) -> str:
    """README.md for the Hub: what the model is, its data and licence, its measured numbers (from
    outputs/report.json when `medqa evaluate` has run), intended use and limits."""
    from medqa.evaluate import model_card as card_fields

    card = (report or {}).get("model_card") or card_fields(cfg)
    lines = ["---", f"base_model: {card['base_model']}", "library_name: peft", "license: other",
             "license_name: research-only-data", "tags: [medical, lora, peft, medqa]", "---", "",
             f"# LoRA adapter for {card['base_model']}: answers to patients' medical questions", "",
             "Fine-tuned with medqa on doctors' answers. **Not medical advice**: research use "
             "only; never for diagnosis, treatment or any clinical decision.", "",
             "## Data and licence", "", f"- Data: {card['data']}", f"- Licence: {card['licence']}", "",
             "## Training", "", f"- LoRA: {card['lora']}", f"- Training: {card['training']}",
             f"- Prompt: `{card['prompt_template']!r}`", ""]
    if report:
        lines += ["## Results (test split)", "", "| model | answer perplexity | 95% CI | ROUGE-L | BLEU | PubMedQA acc |",
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


def push_to_hub(cfg: Config, repo_id: str, folder: str | Path | None = None, private: bool = True) -> str:
    """Upload the adapter (or any exported folder) with a model card to the Hub repository `repo_id`. The token
    comes from HF_TOKEN, never from a config file. Returns the repository URL."""
    import json
    import os

    from medqa.errors import MedqaError

    folder = Path(folder or Path(cfg.workdir) / "outputs" / "finetune")
    if not folder.is_dir() or not any(folder.iterdir()):
        raise MedqaError(f"{folder} holds nothing to upload. Run `medqa train` (the adapter) or `medqa export` (the "
                         "merged model) first, or pass the folder to upload.")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise MedqaError(f"Cannot push to the Hub: offline mode is on (HF_HUB_OFFLINE=1). The files to publish are in "
                         f"{folder}; copy that folder, or run again with HF_HUB_OFFLINE=0 on a machine that reaches "
                         "huggingface.co.")
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise MedqaError("Pushing to the Hub needs a write token in the HF_TOKEN environment variable (create one at "
                         "huggingface.co/settings/tokens); medqa never reads tokens from config files.")
    report_path = Path(cfg.workdir) / "outputs" / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="medqa: upload model")
        api.upload_file(path_or_fileobj=model_card(cfg, report).encode("utf-8"), path_in_repo="README.md",
                        repo_id=repo_id, commit_message="medqa: model card")
    except Exception as exc:  # network, permissions, name taken: one paragraph, not a traceback
        raise MedqaError(f"Could not push {folder} to the Hub repository {repo_id!r}: {type(exc).__name__}: "
                         f"{str(exc)[:300]}. Check HF_TOKEN's write permission and the network; the files stay in "
                         f"{folder}.") from None
    log.info("export: pushed %s to %s", folder, url)
    return str(url)
