"""Write the stage notebooks from the cell sources below (outputs empty). Run: python tools/make_notebooks.py

Keeping the cells here makes notebook diffs reviewable; the committed .ipynb files are what users open.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]

REPO = "medqa-project/medqa"  # GitHub owner/name the notebooks are published under (badge and Colab install)

COLAB = f"""\
# Colab only; does nothing elsewhere. Installs medqa from the repository, picks settings for the GPU, and
# (optional) keeps workdir on Google Drive so a reconnected runtime resumes training instead of restarting.
REPO_URL = "https://github.com/{REPO}"
DRIVE_WORKDIR = ""  # e.g. "/content/drive/MyDrive/medqa"
import sys
COLAB_OVERRIDES: list[str] = []
if "google.colab" in sys.modules:
    import os
    import subprocess
    if not os.path.isdir("/content/medqa"):
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, "/content/medqa"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "/content/medqa"], check=True)
    os.chdir("/content/medqa")
    from medqa.colab import colab_overrides
    COLAB_OVERRIDES = colab_overrides(DRIVE_WORKDIR)"""


def badge(name: str):
    return new_markdown_cell(f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
                             f"(https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{name})")


SETUP = """\
import os
from pathlib import Path
if Path.cwd().name == "notebooks":  # run from the repo root, so configs/ and data/ resolve
    os.chdir("..")
import logging
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
import pandas as pd
import matplotlib.pyplot as plt
from medqa.config import load_config
cfg = load_config(CONFIG, COLAB_OVERRIDES + OVERRIDES + (SMOKE_OVERRIDES if SMOKE else []))
print(cfg.data.source, "->", cfg.workdir)"""

PARAMS = """\
# Parameters (papermill-style: tests replace this cell)
CONFIG = "configs/demo.yaml"  # configs/biogpt.yaml for the real model and the full dataset
OVERRIDES: list[str] = []      # e.g. ["data.source=path/to/HealthCareMagic-100k.json", "workdir=/tmp/run"]
SMOKE = False                  # True: a quick run on a few records"""


KERNEL = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}


def params(smoke: str) -> str:
    return PARAMS + f"\nSMOKE_OVERRIDES = {smoke}"


def data_preparation() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(
            "# 1. Data preparation\n\n"
            "Load the HealthCareMagic records, clean them, drop duplicates, split train/val/test by a hash of the "
            "normalised question (so no question leaks across splits), and tokenize with the prompt masked out "
            "of the loss. The same function runs from the command line: "
            "`medqa prepare --config configs/demo.yaml`.\n\n"
            "Writes `data/{train,val,test}_data.json`, `data/rejected.jsonl`, `data/prepare_report.json` and "
            "`tokenized/tokenized_{train,val,test}`."),
        new_code_cell(params('["data.max_records=120"]'), metadata={"tags": ["parameters"]}),
        new_code_cell(SETUP),
        new_markdown_cell("## Run the stage"),
        new_code_cell("from medqa.data import prepare\nresult = prepare(cfg)"),
        new_markdown_cell("## What was kept and what was rejected\n\nEvery record read is kept in a split or "
                          "listed in `data/rejected.jsonl` with its reason; the counts add up."),
        new_code_cell(
            "report = result.report\n"
            "summary = pd.Series({'read': report['read'], **{f'kept: {k}': v for k, v in report['kept'].items()},\n"
            "                     'rejected': sum(report['rejected'].values()), 'truncated': report['truncated']})\n"
            "summary.to_frame('records')"),
        new_code_cell(
            "reasons = pd.Series(report['rejected'], name='records').sort_values()\n"
            "ax = reasons.plot.barh(title='Rejected records by reason', figsize=(6, 3))\n"
            "plt.show()\n"
            "pd.read_json(result.data_dir / 'rejected.jsonl', lines=True)[['index', 'reason']].head(10)"),
        new_markdown_cell("## Lengths in tokens\n\nThe original project padded everything to 512 tokens. Here "
                          "nothing is padded at this stage; batches are padded dynamically later."),
        new_code_cell(
            "from medqa.analysis import token_lengths\n"
            "lengths = token_lengths(cfg)\n"
            "fig, axes = plt.subplots(1, 2, figsize=(10, 3))\n"
            "lengths['prompt_tokens'].plot.hist(bins=40, ax=axes[0], title='prompt (question) tokens')\n"
            "lengths['answer_tokens'].plot.hist(bins=40, ax=axes[1], title='answer tokens (with EOS)')\n"
            "plt.show()\n"
            "lengths.groupby('split')[['prompt_tokens', 'answer_tokens', 'total_tokens']].describe().T.round(1)"),
        new_markdown_cell("## Cleaning at work: originals beside the cleaned text"),
        new_code_cell(
            "from medqa.analysis import before_after\n"
            "pd.set_option('display.max_colwidth', 300)\n"
            "before_after(cfg, n=5)[['original_answer', 'answer', 'chars_removed']]"),
        new_markdown_cell("## The original project's views: specialty and urgency by keyword"),
        new_code_cell(
            "from medqa.analysis import SPECIALTY_KEYWORDS, keyword_counts, load_splits, urgency_counts\n"
            "questions = [r['question'] for rows in load_splits(cfg).values() for r in rows]\n"
            "fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))\n"
            "keyword_counts(questions, SPECIALTY_KEYWORDS).plot.bar(ax=axes[0], title='questions by specialty')\n"
            "urgency_counts(questions).plot.bar(ax=axes[1], title='questions by urgency', color='tab:red')\n"
            "plt.tight_layout()\n"
            "plt.show()"),
    ]
    return new_notebook(cells=cells, metadata=KERNEL)


def model_selection_and_setup() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(
            "# 2. Model selection and setup: a baseline perplexity that can be trusted\n\n"
            "Load BioGPT (or any causal LM), describe it, and measure how well it predicts the doctors' answers "
            "before any fine-tuning. `answer_loss` is the mean negative log-likelihood per answer token over all "
            "answer tokens of a split; prompt tokens and padding never count. The same function scores the "
            "fine-tuned models later. Command line: `medqa baseline --config configs/demo.yaml`.\n\n"
            "Needs `tokenized/` from notebook 1 (`medqa prepare`)."),
        new_code_cell(params('["scoring.max_examples=16", "scoring.bootstrap_samples=200"]'),
                      metadata={"tags": ["parameters"]}),
        new_code_cell(SETUP),
        new_markdown_cell("## The model"),
        new_code_cell(
            "from medqa.modeling import count_parameters, load_model, load_tokenizer, model_path\n"
            "tokenizer = load_tokenizer(cfg)\n"
            "model = load_model(cfg)\n"
            "p = next(model.parameters())\n"
            "pd.Series({'model': model_path(cfg), 'architecture': type(model).__name__,\n"
            "           'parameters': f'{count_parameters(model)[1]:,}', 'dtype': str(p.dtype), 'device': str(p.device),\n"
            "           'attention': model.config._attn_implementation, 'vocabulary': len(tokenizer),\n"
            "           'pad / eos ids': (tokenizer.pad_token_id, tokenizer.eos_token_id)}).to_frame('value')"),
        new_markdown_cell("## LoRA targets and trainable parameters per preset\n\n"
                          "Counted by peft on a copy of the model, and from the layer shapes (r x (in + out) per "
                          "targeted layer)."),
        new_code_cell("from medqa.modeling import lora_presets_table\n"
                      "pd.DataFrame(lora_presets_table(model, cfg.lora.r)).round(3)"),
        new_markdown_cell("## Baseline on val and test"),
        new_code_cell("from medqa.baseline import baseline\n"
                      "result = baseline(cfg)\n"
                      "print(result.table())"),
        new_code_cell(
            "per_example = pd.read_json(result.out_dir / 'per_example.jsonl', lines=True)\n"
            "per_example['mean_nll'] = per_example.answer_nll / per_example.answer_tokens\n"
            "ax = per_example.mean_nll.plot.hist(bins=30, title='per-example answer NLL (nats/token)', figsize=(6, 3))\n"
            "ax.axvline(result.metrics['test']['answer_loss'], color='k', linestyle='--', label='test answer_loss')\n"
            "ax.legend()\n"
            "plt.show()"),
        new_markdown_cell("## A few greedy answers from the base model"),
        new_code_cell(
            "from medqa.analysis import load_splits\n"
            "from medqa.generate import generate_answers\n"
            "test = load_splits(cfg)['test'][:3]\n"
            "answers = generate_answers(model, tokenizer, cfg, [r['question'] for r in test])\n"
            "pd.DataFrame({'question': [r['question'] for r in test], 'reference': [r['answer'] for r in test],\n"
            "              'base model': answers})"),
    ]
    return new_notebook(cells=cells, metadata=KERNEL)


def peft_finetuning_and_logging() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(
            "# 3. LoRA fine-tuning with logged metrics\n\n"
            "Wrap the base model with LoRA (peft), train with transformers' `Trainer` on batches grouped by length "
            "and padded dynamically, evaluate val `answer_loss` during training with the baseline's function, and "
            "keep the best checkpoint. Command line: `medqa train --config configs/demo.yaml`, then "
            "`medqa export` to merge the adapter into a standalone model.\n\n"
            "Needs `tokenized/` (notebook 1). Writes `outputs/finetune/`: the adapter, `metrics.jsonl`, "
            "`metrics.json`, `loss_curves.png` and TensorBoard logs (`tensorboard --logdir outputs/finetune/tensorboard`)."),
        new_code_cell(params('["train.epochs=1", "scoring.bootstrap_samples=200"]'), metadata={"tags": ["parameters"]}),
        new_code_cell(SETUP),
        new_markdown_cell("## The LoRA setup\n\nTrainable parameters per preset (peft's count and the count from the "
                          "layer shapes); this run uses `lora.targets` from the config."),
        new_code_cell(
            "from medqa.modeling import load_model, load_tokenizer, lora_presets_table\n"
            "tokenizer = load_tokenizer(cfg)\n"
            "base_model = load_model(cfg)\n"
            "print('this run:', cfg.lora)\n"
            "pd.DataFrame(lora_presets_table(base_model, cfg.lora.r)).round(3)"),
        new_markdown_cell("## Baseline (from notebook 2, or computed now)"),
        new_code_cell(
            "from medqa.analysis import load_metrics\n"
            "from medqa.baseline import baseline\n"
            "base_metrics = load_metrics(cfg, 'baseline') or baseline(cfg).metrics"),
        new_markdown_cell("## Train"),
        new_code_cell("from medqa.train import train\n"
                      "result = train(cfg)"),
        new_markdown_cell("## Loss and learning-rate curves"),
        new_code_cell(
            "from medqa.plots import plot_training\n"
            "fig = plot_training(result.history, baseline_loss=base_metrics['val']['answer_loss'])\n"
            "plt.show()\n"
            "pd.DataFrame(result.history).tail(8)"),
        new_markdown_cell("## Baseline vs fine-tuned (answer perplexity with 95% bootstrap intervals)"),
        new_code_cell(
            "from medqa.analysis import metrics_frame\n"
            "metrics_frame({'baseline': base_metrics, 'fine-tuned': result.metrics}).round(3)"),
        new_markdown_cell("## Answers before and after, beside the reference"),
        new_code_cell(
            "from medqa.analysis import load_splits\n"
            "from medqa.generate import generate_answers\n"
            "from medqa.modeling import load_adapter_model\n"
            "test = load_splits(cfg)['test'][:3]\n"
            "questions = [r['question'] for r in test]\n"
            "tuned_model = load_adapter_model(cfg, result.out_dir)\n"
            "pd.DataFrame({'question': questions, 'reference': [r['answer'] for r in test],\n"
            "              'base model': generate_answers(base_model, tokenizer, cfg, questions),\n"
            "              'fine-tuned': generate_answers(tuned_model, tokenizer, cfg, questions)})"),
    ]
    return new_notebook(cells=cells, metadata=KERNEL)


def raytune_final() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(
            "# 4. Ray Tune search and the final test evaluation\n\n"
            "Search learning rate and weight decay (and optionally LoRA rank, alpha, dropout and targets) with Ray "
            "Tune; every trial runs the same `train()` as notebook 3, and ASHA stops bad trials early on val "
            "`answer_loss`. Then compare the base, fine-tuned and best tuned models on the held-out test split, by "
            "likelihood (with bootstrap intervals and a paired p-value) and by the answers they write (ROUGE, BLEU). "
            "Command line: `medqa tune --config configs/demo.yaml` then `medqa evaluate --config configs/demo.yaml`."
            "\n\nNeeds `tokenized/` (notebook 1). On a cluster, set `RAY_ADDRESS` (or `tune.address`)."),
        new_code_cell(params('["tune.num_samples=2", "train.epochs=1", "train.eval_steps=20", '
                             '"scoring.bootstrap_samples=200", "evaluate.num_questions=4"]'),
                      metadata={"tags": ["parameters"]}),
        new_code_cell(SETUP),
        new_markdown_cell("## The search space"),
        new_code_cell("from medqa.tune import search_space\n"
                      "print(cfg.tune)\n"
                      "search_space(cfg)"),
        new_markdown_cell("## The search"),
        new_code_cell("from medqa.tune import tune\n"
                      "search = tune(cfg)"),
        new_markdown_cell("## Trials, best first"),
        new_code_cell("search.results.drop(columns=['path'])"),
        new_code_cell(
            "from medqa.plots import plot_search\n"
            "curves = {row.trial: pd.read_csv(next(Path(row.path).glob('progress.csv')))[['step', 'val_answer_loss']]"
            ".to_dict('list')\n"
            "          for row in search.results.itertuples() if list(Path(row.path).glob('progress.csv'))}\n"
            "fig_search, fig_curves = plot_search(search.results, curves)\n"
            "plt.show()"),
        new_markdown_cell("## The best configuration"),
        new_code_cell("import json\n"
                      "best = json.loads((search.best_dir / 'trial.json').read_text())\n"
                      "pd.Series({k: v for k, v in best.items() if k != 'config'}).to_frame('best trial')"),
        new_markdown_cell("## Final comparison on the test split"),
        new_code_cell(
            "from medqa.evaluate import evaluate\n"
            "final = evaluate(cfg)\n"
            "rows = {name: {'answer_loss': m['test']['answer_loss'], 'answer_perplexity': m['test']['answer_perplexity'],\n"
            "               '95% CI': m['test']['answer_perplexity_ci95'], 'p vs base': m.get('vs_base', {}).get('p_value'),\n"
            "               **{k: m['generation'][k] for k in ('rouge1', 'rouge2', 'rougeL', 'bleu', 'repetitive_share')}}\n"
            "        for name, m in final.report['models'].items()}\n"
            "pd.DataFrame(rows).T"),
        new_markdown_cell("## Knowledge kept: PubMedQA before and after fine-tuning\n\n"
                          "Zero-shot accuracy on PubMedQA's expert-labelled test questions "
                          "(`evaluate.pubmedqa_questions`), beside the HealthCareMagic answer-loss gain: a fine-tune "
                          "that lowers the answer loss but loses PubMedQA accuracy has traded knowledge for style."),
        new_code_cell("kept = {name: {'PubMedQA acc': m['pubmedqa']['acc'], 'macro-F1': m['pubmedqa']['macro_f1'],\n"
                      "               'Δ acc vs base': m['pubmedqa'].get('vs_base', {}).get('acc_delta'),\n"
                      "               'test answer perplexity': m['test']['answer_perplexity'],\n"
                      "               'Δ answer_loss vs base': m.get('vs_base', {}).get('loss_delta')}\n"
                      "        for name, m in final.report['models'].items() if 'pubmedqa' in m}\n"
                      "pd.DataFrame(kept).T if kept else 'PubMedQA is off: set evaluate.pubmedqa_questions (500 = all).'"),
        new_markdown_cell("## Answers side by side"),
        new_code_cell("pd.set_option('display.max_colwidth', 400)\n"
                      "pd.DataFrame(final.report['samples']).head(3)"),
        new_markdown_cell("The full report, with the model card, is `outputs/report.md`."),
    ]
    return new_notebook(cells=cells, metadata=KERNEL)


NOTEBOOKS = {"raytune-peft-finetune-final.ipynb": raytune_final, "peft_finetuning_and_logging.ipynb": peft_finetuning_and_logging, "data_preparation.ipynb": data_preparation, "model_selection_and_setup.ipynb": model_selection_and_setup}


def main() -> int:
    for name, build in NOTEBOOKS.items():
        nb = build()
        nb.cells[:0] = [badge(name), new_code_cell(COLAB)]
        for i, cell in enumerate(nb.cells):
            cell["id"] = f"{Path(name).stem[:20]}-{i}"
        nbformat.write(nb, ROOT / "notebooks" / name)
        print("wrote", ROOT / "notebooks" / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
