# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/medqa-project/medqa/blob/main/notebooks/data_preparation.ipynb)

# %% [markdown]
# # 1. Data preparation
#
# The raw HealthCareMagic records become clean, de-duplicated train/val/test splits, split by a hash of the
# normalised question (so no question leaks across splits) and tokenized with the prompt masked out of the loss.
# Below: what was kept or rejected and why (per source when `data.sources` lists several), lengths in tokens,
# what cleaning changed, and the specialties and urgencies asked about; at the end, what this run found. Command
# line: `medqa prepare --config configs/demo.yaml`.
#
# Writes `data/{train,val,test}_data.json`, `data/rejected.jsonl`, `data/prepare_report.json` and
# `tokenized/tokenized_{train,val,test}`.

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
cfg = setup(CONFIG, OVERRIDES, stage="prepare", smoke=SMOKE, colab_overrides=COLAB_OVERRIDES)

# %% [markdown]
# ## Run the stage

# %%
from medqa.prepare import prepare

result = prepare(cfg)

# %% [markdown]
# ## What was kept and what was rejected
#
# Every record read is kept in a split or listed in `data/rejected.jsonl` with its reason; the counts add up.

# %%
report = result.report
summary = pd.Series(
    {
        "read": report["read"],
        **{f"kept: {k}": v for k, v in report["kept"].items()},
        "rejected": sum(report["rejected"].values()),
        "truncated": report["truncated"],
    }
)
summary.to_frame("records")

# %% [markdown]
# Per source, when the config mixes several (`data.sources`, e.g. `configs/mix.yaml`): each source's records
# read, kept per split and rejected by reason add up to the totals above.

# %%
from medqa.analysis import per_source_table

per_source_table(report) if report.get("sources") else print(f"One source: {report['source']}")

# %%
reasons = pd.Series(report["rejected"], name="records").sort_values()
ax = reasons.plot.barh(title="Rejected records by reason", figsize=(6, 3))
plt.show()
pd.read_json(result.data_dir / "rejected.jsonl", lines=True)[["index", "reason"]].head(10)

# %% [markdown]
# ## Lengths in tokens
#
# The original project padded everything to 512 tokens. Nothing is padded here: training packs several examples
# into each row (`train.packing`, on in the GPU config) or groups them by length and pads each batch to its
# longest, as the config says; scoring batches by length.

# %%
from medqa.analysis import token_lengths

lengths = token_lengths(cfg)
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
lengths["prompt_tokens"].plot.hist(bins=40, ax=axes[0], title="prompt (question) tokens")
lengths["answer_tokens"].plot.hist(bins=40, ax=axes[1], title="answer tokens (with EOS)")
plt.show()
lengths.groupby("split")[["prompt_tokens", "answer_tokens", "total_tokens"]].describe().T.round(1)

# %% [markdown]
# ## Cleaning at work: originals beside the cleaned text

# %%
from medqa.analysis import before_after

pd.set_option("display.max_colwidth", 300)
before_after(cfg, n=5)[["original_answer", "answer", "chars_removed"]]

# %% [markdown]
# ## The original project's views: specialty and urgency by keyword

# %%
from medqa.analysis import SPECIALTY_KEYWORDS, keyword_counts, load_splits, urgency_counts

questions = [r["question"] for rows in load_splits(cfg).values() for r in rows]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
keyword_counts(questions, SPECIALTY_KEYWORDS).plot.bar(ax=axes[0], title="questions by specialty")
urgency_counts(questions).plot.bar(ax=axes[1], title="questions by urgency", color="tab:red")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## What this run found

# %%
from IPython.display import Markdown

from medqa.findings import prepare_findings

Markdown(prepare_findings(report))

# %% [markdown]
# ## Next
#
# [2. The base model and its baseline](model_selection_and_setup.ipynb): the base model and its answer perplexity
# before fine-tuning, on the splits written here.
