# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/medqa-project/medqa/blob/main/notebooks/peft_finetuning_and_logging.ipynb)

# %% [markdown]
# # 3. LoRA fine-tuning with logged metrics
#
# The base model is wrapped with LoRA (peft) and trained with transformers' `Trainer`; val `answer_loss` is
# measured during training with the baseline's function (and, with `scoring.knowledge_questions`, PubMedQA dev
# accuracy), and the checkpoint the selection rule prefers is kept. Below: the logged curves, the fine-tuned
# answer perplexity beside the baseline's, answers before and after, and what this run found. Command line:
# `medqa train --config configs/demo.yaml`, then `medqa export` to merge the adapter into a standalone model.
#
# Needs `tokenized/` (notebook 1). Writes `outputs/finetune/`: the adapter, `metrics.jsonl`, `metrics.json`,
# `loss_curves.png` and TensorBoard logs (`tensorboard --logdir outputs/finetune/tensorboard`).

# %%
# Colab only; does nothing elsewhere. Installs medqa from the repository, picks settings for the GPU, and
# (optional) keeps workdir on Google Drive so a reconnected runtime resumes training instead of restarting.
REPO_URL = "https://github.com/medqa-project/medqa"
DRIVE_WORKDIR = ""  # e.g. "/content/drive/MyDrive/medqa"
import sys

COLAB_OVERRIDES: list[str] = []
if "google.colab" in sys.modules:
    import os
    import subprocess

    if not os.path.isdir("/content/medqa"):
        cloned = subprocess.run(
            ["git", "clone", "--depth", "1", REPO_URL, "/content/medqa"], env={**os.environ, "GIT_TERMINAL_PROMPT": "0"}
        )
        if cloned.returncode:
            raise SystemExit(f"Could not clone {REPO_URL}: set REPO_URL above to your fork of medqa and rerun.")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "/content/medqa"], check=True)
    os.chdir("/content/medqa")
    from medqa.colab import colab_overrides

    COLAB_OVERRIDES = colab_overrides(DRIVE_WORKDIR)

# %% tags=["parameters"]
# Parameters (papermill-style: the tests and tools/sync_notebooks.py --execute set these)
CONFIG = "configs/demo.yaml"  # configs/biogpt.yaml for the real model and the full dataset
OVERRIDES: list[str] = []  # e.g. ["data.source=path/to/HealthCareMagic-100k.json", "workdir=outputs/run2"]
SMOKE = False  # True: a quick run on a few records

# %%
import matplotlib.pyplot as plt
import pandas as pd

from medqa.notebook import setup
from medqa.quiet import quiet_libraries

quiet_libraries()
cfg = setup(CONFIG, OVERRIDES, stage="train", smoke=SMOKE, colab_overrides=COLAB_OVERRIDES)

# %% [markdown]
# ## The LoRA setup
#
# Trainable parameters per preset (peft's count and the count from the layer shapes); this run uses
# `lora.targets` from the config.

# %%
from medqa.modeling import load_model, load_tokenizer, lora_presets_table

tokenizer = load_tokenizer(cfg)
base_model = load_model(cfg)
print("this run:", cfg.lora)
pd.DataFrame(lora_presets_table(base_model, cfg.lora.r)).round(3)

# %% [markdown]
# ## Baseline (from notebook 2, or computed now)

# %%
from medqa.analysis import load_metrics
from medqa.baseline import baseline

base_metrics = load_metrics(cfg, "baseline") or baseline(cfg).metrics

# %% [markdown]
# ## Train

# %%
from medqa.train import train

result = train(cfg)
t = result.metrics["training"]
print(
    f"batches: {'packed rows' if t['packing'] else 'grouped by length, padded to the longest'}; "
    f"{t['train_rows']} rows; median step {t['median_step_seconds']:.2f} s"
)

# %% [markdown]
# ## Loss and learning-rate curves

# %%
from medqa.plots import plot_training
from medqa.selection import Rule

fig = plot_training(
    result.history, baseline_loss=base_metrics["val"]["answer_loss"], max_knowledge_drop=Rule.of(cfg).drop_limit
)
plt.show()
pd.DataFrame(result.history).tail(8)

# %% [markdown]
# ## Baseline vs fine-tuned (answer perplexity with 95% bootstrap intervals)

# %%
from medqa.analysis import metrics_frame

metrics_frame({"baseline": base_metrics, "fine-tuned": result.metrics}).round(3)

# %% [markdown]
# ## Answers before and after, beside the reference

# %%
from medqa.analysis import load_splits
from medqa.generate import generate_answers
from medqa.modeling import load_adapter_model

test = load_splits(cfg)["test"][:3]
questions = [r["question"] for r in test]
tuned_model = load_adapter_model(cfg, result.out_dir)
pd.DataFrame(
    {
        "question": questions,
        "reference": [r["answer"] for r in test],
        "base model": generate_answers(base_model, tokenizer, cfg, questions),
        "fine-tuned": generate_answers(tuned_model, tokenizer, cfg, questions),
    }
)

# %% [markdown]
# ## What this run found

# %%
from IPython.display import Markdown

from medqa.findings import train_findings

Markdown(train_findings(result.metrics, base_metrics))

# %% [markdown]
# ## Next
#
# [4. Ray Tune search and the final test evaluation](raytune-peft-finetune-final.ipynb): search the learning
# rate and weight decay, then compare base, fine-tuned and tuned models on the test split.
