"""The model card: what a fine-tuned model is, its data and licence, its measured numbers, intended use and
limits. `card_fields` goes into outputs/report.json (`medqa evaluate`); `model_card` renders the Hub README
(`medqa export --push-to-hub`).
"""

from __future__ import annotations

import re

from medqa.schema import Config


def _acc(pubmedqa: dict | None) -> str:
    return f"{pubmedqa['acc']:.3f}" if pubmedqa else "-"


DATA_LICENCE = (
    "HealthCareMagic-100k (ChatDoctor) is for academic research only; commercial and clinical use are "
    "prohibited. The copyright of the original dialogues belongs to healthcaremagic.com."
)


def card_fields(cfg: Config) -> dict:
    """What the report and the Hub model card say about a run: base model, data, LoRA, training, use and limits."""
    return {
        "base_model": cfg.model.name_or_path,
        "data": f"{cfg.data.source} (question field `{cfg.data.question_field}`, answer field "
        f"`{cfg.data.answer_field}`), split {cfg.data.train_fraction}/{cfg.data.val_fraction}/"
        f"{cfg.data.test_fraction} by a hash of the normalised question",
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout, "targets": cfg.lora.targets},
        "training": {
            k: getattr(cfg.train, k)
            for k in (
                "learning_rate",
                "weight_decay",
                "epochs",
                "max_steps",
                "batch_size",
                "grad_accum",
                "warmup_ratio",
                "scheduler",
            )
        },
        "prompt_template": "the tokenizer's chat template" if cfg.prompt.use_chat_template else cfg.prompt.template,
        "intended_use": "Research on fine-tuning language models for patient-question answering. Not for "
        "diagnosis, treatment or any clinical decision.",
        "limits": "Answers can be wrong, outdated or unsafe while sounding confident; the training answers are "
        "online consultations of uneven quality; perplexity and ROUGE/BLEU measure similarity to one "
        "doctor's answer, not medical correctness.",
        "licence": DATA_LICENCE,
    }


def model_card(cfg: Config, report: dict | None, merged: bool = False) -> str:
    """README.md for the Hub: what the model is (the LoRA adapter, or the merged model), its data and licence, its
    measured numbers (from outputs/report.json when `medqa evaluate` has run), intended use and limits."""
    card = (report or {}).get("model_card") or card_fields(cfg)
    base = str(card["base_model"])
    on_hub = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", base) is not None  # a local path is no Hub base_model
    what = "Merged model (LoRA adapter folded into" if merged else "LoRA adapter for"
    lines = [
        "---",
        *([f"base_model: {base}"] if on_hub else []),
        *([] if merged else ["library_name: peft"]),
        "license: other",
        "license_name: research-only-data",
        "tags: [medical, lora, medqa]",
        "---",
        "",
        f"# {what} {base}{')' if merged else ''}: answers to patients' medical questions",
        "",
        "Fine-tuned with medqa on doctors' answers. **Not medical advice**: research use "
        "only; never for diagnosis, treatment or any clinical decision.",
        "",
        "## Data and licence",
        "",
        f"- Data: {card['data']}",
        f"- Licence: {card['licence']}",
        "",
        "## Training",
        "",
        f"- LoRA: {card['lora']}",
        f"- Training: {card['training']}",
        f"- Prompt: `{card['prompt_template']!r}`",
        "",
    ]
    if report:
        lines += [
            "## Results (test split)",
            "",
            "These weights are the row `fine-tuned` (the base model is the comparison).",
            "",
            "| model | answer perplexity | 95% CI | ROUGE-L | BLEU | PubMedQA acc |",
            "|---|---|---|---|---|---|",
        ]
        for name, m in report["models"].items():
            t, g, p = m["test"], m["generation"], m.get("pubmedqa")
            ci = t.get("answer_perplexity_ci95")
            lines.append(
                f"| {name} | {t['answer_perplexity']:.2f} | {f'{ci[0]:.2f}–{ci[1]:.2f}' if ci else '-'} | "
                f"{g['rougeL']:.3f} | {g['bleu']:.2f} | {_acc(p)} |"
            )
        lines += [
            "",
            "Answer perplexity: exp of the mean negative log-likelihood per answer token over every answer "
            f"token of the test split ({report['test_examples']} examples), scored in {report.get('dtype')}.",
            "",
        ]
    lines += ["## Intended use and limits", "", card["intended_use"], "", card["limits"], ""]
    return "\n".join(lines)
