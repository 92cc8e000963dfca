# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/medqa-project/medqa/blob/main/notebooks/model_selection_and_setup.ipynb)

# %% [markdown]
# # 2. The base model and its baseline: a perplexity that can be trusted
#
# The model the config names (`model.name_or_path`: BioGPT, or any causal LM) is loaded and described, with the
# trainable parameters of each LoRA preset, and its answer perplexity on val and test is measured before any
# fine-tuning: `answer_loss` is the mean negative log-likelihood per answer token over all answer tokens of a
# split, prompt tokens and padding never counting. Every fine-tuned model is compared against this baseline, by
# the same function. Command line: `medqa baseline --config configs/demo.yaml`.
#
# Needs `tokenized/` from notebook 1 (`medqa prepare`).

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
cfg = setup(CONFIG, OVERRIDES, stage="baseline", smoke=SMOKE, colab_overrides=COLAB_OVERRIDES)

# %% [markdown]
# ## The model

# %%
from medqa.modeling import count_parameters, load_model, load_tokenizer, model_path

tokenizer = load_tokenizer(cfg)
model = load_model(cfg)
p = next(model.parameters())
pd.Series(
    {
        "model": model_path(cfg),
        "architecture": type(model).__name__,
        "parameters": f"{count_parameters(model)[1]:,}",
        "dtype": str(p.dtype),
        "device": str(p.device),
        "attention": model.config._attn_implementation,
        "vocabulary": len(tokenizer),
        "pad / eos ids": (tokenizer.pad_token_id, tokenizer.eos_token_id),
    }
).to_frame("value")

# %% [markdown]
# ## LoRA targets and trainable parameters per preset
#
# Counted by peft on a copy of the model, and from the layer shapes (r x (in + out) per targeted layer).

# %%
from medqa.modeling import lora_presets_table

pd.DataFrame(lora_presets_table(model, cfg.lora.r)).round(3)

# %% [markdown]
# ## Baseline on val and test

# %%
from medqa.baseline import baseline

result = baseline(cfg)
print(result.table())

# %%
per_example = pd.read_json(result.out_dir / "per_example.jsonl", lines=True)
per_example["mean_nll"] = per_example.answer_nll / per_example.answer_tokens
ax = per_example.mean_nll.plot.hist(bins=30, title="per-example answer NLL (nats/token)", figsize=(6, 3))
ax.axvline(result.metrics["test"]["answer_loss"], color="k", linestyle="--", label="test answer_loss")
ax.legend()
plt.show()

# %% [markdown]
# ## A few greedy answers from the base model

# %%
from medqa.analysis import load_splits
from medqa.generate import generate_answers

test = load_splits(cfg)["test"][:3]
answers = generate_answers(model, tokenizer, cfg, [r["question"] for r in test])
pd.DataFrame(
    {"question": [r["question"] for r in test], "reference": [r["answer"] for r in test], "base model": answers}
)

# %% [markdown]
# ## What this run found

# %%
from IPython.display import Markdown

from medqa.findings import baseline_findings

Markdown(baseline_findings(result.metrics))

# %% [markdown]
# ## Next
#
# [3. LoRA fine-tuning with logged metrics](peft_finetuning_and_logging.ipynb): fine-tune this model with LoRA
# and compare it with this baseline.
