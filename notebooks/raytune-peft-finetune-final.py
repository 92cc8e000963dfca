# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/medqa-project/medqa/blob/main/notebooks/raytune-peft-finetune-final.ipynb)

# %% [markdown]
# # 4. Ray Tune search and the final test evaluation
#
# This notebook searches the learning rate and weight decay with Ray Tune and shows every trial's val answer
# loss. It then compares the base, fine-tuned and best tuned models on the held-out test split, by likelihood
# and by the answers they write.
#
# Every trial runs the same `train()` as notebook 3 (the search can also cover LoRA rank, alpha, dropout and
# targets), and ASHA stops bad trials early on val `answer_loss`. The final comparison gives bootstrap intervals
# and a paired p-value for the likelihood, and ROUGE and BLEU for the answers. Command line:
# `medqa tune --config configs/demo.yaml`, `medqa benchmark --config configs/demo.yaml`, then
# `medqa evaluate --config configs/demo.yaml`.
#
# Needs `tokenized/` (notebook 1). On a cluster, set `RAY_ADDRESS` (or `tune.address`).

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
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, "/content/medqa"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "/content/medqa"], check=True)
    os.chdir("/content/medqa")
    from medqa.colab import colab_overrides

    COLAB_OVERRIDES = colab_overrides(DRIVE_WORKDIR)

# %% tags=["parameters"]
# Parameters (papermill-style: the tests and tools/sync_notebooks.py --execute set these)
CONFIG = "configs/demo.yaml"  # configs/biogpt.yaml for the real model and the full dataset
OVERRIDES: list[str] = []  # e.g. ["data.source=path/to/HealthCareMagic-100k.json", "workdir=outputs/run2"]
SMOKE = False  # True: a quick run on a few records
SEARCH = ["tune.num_samples=2"]  # a short search: each trial is a training run; [] = the config's tune section

# %%
import matplotlib.pyplot as plt
import pandas as pd

from medqa.notebook import setup

cfg = setup(CONFIG, SEARCH + OVERRIDES, stage="tune", smoke=SMOKE, colab_overrides=COLAB_OVERRIDES)

# %% [markdown]
# ## The search space

# %%
from medqa.tune import search_space

print(cfg.tune)
search_space(cfg)

# %% [markdown]
# ## The search

# %%
from medqa.tune import tune

search = tune(cfg)

# %% [markdown]
# ## Trials, best first

# %%
search.results.drop(columns=["path"])

# %%
from pathlib import Path

from medqa.plots import plot_search

curves = {
    row.trial: pd.read_csv(next(Path(row.path).glob("progress.csv")))[["step", "val_answer_loss"]].to_dict("list")
    for row in search.results.itertuples()
    if list(Path(row.path).glob("progress.csv"))
}
fig_search, fig_curves = plot_search(search.results, curves)
plt.show()

# %% [markdown]
# ## The best configuration

# %%
import json

best = json.loads((search.best_dir / "trial.json").read_text())
pd.Series({k: v for k, v in best.items() if k != "config"}).to_frame("best trial")

# %% [markdown]
# ## Standard benchmarks through lm-evaluation-harness
#
# `medqa benchmark` runs the lm-eval tasks named in `evaluate.benchmarks` on each model, loaded once by medqa and
# handed to lm-eval as it is (the demo: `pubmedqa_local`, lm-eval's own PubMedQA task on the shipped questions,
# offline). Per-question logs go to `outputs/benchmarks/<model>/`; the report below carries the table.

# %%
from medqa.benchmark import benchmark

bench = benchmark(cfg) if cfg.evaluate.benchmarks else None
pd.DataFrame(
    [
        {
            "task": t,
            "metric": k,
            "model": name,
            "score": s["value"],
            "stderr": s["stderr"],
            "Δ vs base": m.get("vs_base", {}).get(t, {}).get(k, {}).get("delta"),
            "p (lost)": m.get("vs_base", {}).get(t, {}).get(k, {}).get("p_lost"),
        }
        for name, m in bench.summary["models"].items()
        for t, metrics in m["tasks"].items()
        for k, s in metrics.items()
    ]
) if bench else "No benchmarks: set evaluate.benchmarks, e.g. [pubmedqa_local]."

# %% [markdown]
# ## Final comparison on the test split

# %%
from medqa.evaluate import evaluate

final = evaluate(cfg)
rows = {
    name: {
        "answer_loss": m["test"]["answer_loss"],
        "answer_perplexity": m["test"]["answer_perplexity"],
        "95% CI": m["test"]["answer_perplexity_ci95"],
        "p vs base": m.get("vs_base", {}).get("p_value"),
        **{k: m["generation"][k] for k in ("rouge1", "rouge2", "rougeL", "bleu", "repetitive_share")},
    }
    for name, m in final.report["models"].items()
}
pd.DataFrame(rows).T  # noqa: B018 (the cell's value is its output)

# %% [markdown]
# ## Knowledge kept: PubMedQA before and after fine-tuning
#
# Zero-shot accuracy on PubMedQA's expert-labelled test questions (`evaluate.pubmedqa_questions`), beside the
# HealthCareMagic answer-loss gain: a fine-tune that lowers the answer loss but loses PubMedQA accuracy has
# traded knowledge for style.

# %%
kept = {
    name: {
        "PubMedQA acc": m["pubmedqa"]["acc"],
        "macro-F1": m["pubmedqa"]["macro_f1"],
        "Δ acc vs base": m["pubmedqa"].get("vs_base", {}).get("acc_delta"),
        "test answer perplexity": m["test"]["answer_perplexity"],
        "Δ answer_loss vs base": m.get("vs_base", {}).get("loss_delta"),
    }
    for name, m in final.report["models"].items()
    if "pubmedqa" in m
}
pd.DataFrame(kept).T if kept else "PubMedQA is off: set evaluate.pubmedqa_questions (500 = all)."

# %% [markdown]
# ## Answers side by side

# %%
pd.set_option("display.max_colwidth", 400)
pd.DataFrame(final.report["samples"]).head(3)

# %% [markdown]
# ## Next
#
# The full report, with the model card, is `outputs/report.md`. The same pipeline runs from the command line
# (`medqa prepare`, `baseline`, `train`, `tune`, `benchmark`, `evaluate`), and `medqa ask` and `medqa export`
# use the trained adapter: see the [README](../README.md).
