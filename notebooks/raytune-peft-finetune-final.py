# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/medqa-project/medqa/blob/main/notebooks/raytune-peft-finetune-final.ipynb)

# %% [markdown]
# # 4. Ray Tune search and the final test evaluation
#
# Ray Tune searches the learning rate and weight decay (and, when the config says so, LoRA rank, alpha, dropout,
# targets and steps); every trial runs notebook 3's `train()`, and one rule (`tune.objective`) picks each trial's
# checkpoint, prunes trials through ASHA and chooses: the lowest val `answer_loss`, optionally only among adapters
# that kept their knowledge (the abstract loss on PubMedQA dev abstracts, or PubMedQA dev accuracy) within a limit
# of the base model's. Then the frontier scales every kept adapter back after training (alpha x its LoRA update:
# 0 is the base model, 1 the adapter as trained) and the rule chooses from the whole trade-off front. The base,
# fine-tuned and chosen models are then compared on the held-out test split (bootstrap intervals, paired
# p-values, ROUGE and BLEU, PubMedQA and the abstract loss), per source when the data mixes several, and the page
# at the end lets you ask them your own questions. Command line: `medqa tune`, `medqa
# benchmark`, then `medqa evaluate`, each with `--config configs/demo.yaml`.
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
SEARCH: list[str] = []  # [] = the config's tune section; e.g. ["tune.num_samples=2"] for a shorter search
REUSE_SEARCH = False  # True: read the search `medqa tune` already ran on this config instead of running it

# %%
import pandas as pd
from IPython.display import Image, Markdown, display

from medqa.notebook import setup
from medqa.quiet import quiet_libraries

quiet_libraries()
cfg = setup(CONFIG, SEARCH + OVERRIDES, stage="tune", smoke=SMOKE, colab_overrides=COLAB_OVERRIDES)

# %% [markdown]
# ## The search space and the selection rule

# %%
from medqa.findings import search_space_table
from medqa.selection import Rule
from medqa.tune import search_space

print(f"{cfg.tune.num_samples} trials, at most {cfg.tune.max_concurrent} at once; selection: {Rule.of(cfg).describe()}")
pd.DataFrame(search_space_table(search_space(cfg))).set_index("parameter")

# %% [markdown]
# ## The search

# %%
from medqa.tune import load_search, tune

search = load_search(cfg) if REUSE_SEARCH else tune(cfg)

# %% [markdown]
# ## Trials, best first
#
# `gain`: how far the trial's val answer loss fell below the base model's (nats per answer token);
# `knowledge_change`: its PubMedQA dev accuracy minus the base model's on the same questions.

# %%
search.results.drop(columns=["path"])

# %% [markdown]
# Each trial's best val answer loss against its learning rate and weight decay, and its learning curves, as
# `medqa tune` drew them into the experiment folder.

# %%
display(Image(search.experiment_dir / "search.png"), Image(search.experiment_dir / "curves.png"))

# %% [markdown]
# ## The best trial, and what it kept
#
# Every trial as a point: how much it lowered val answer loss below the base model's (right is better) against
# how its PubMedQA dev accuracy moved (up is better; the dev questions are never the test ones), with the
# frontier of the eligible trials and the chosen one.

# %%
import json

best = json.loads((search.best_dir / "trial.json").read_text())
tradeoff = search.experiment_dir / "tradeoff.png"
if tradeoff.exists():
    display(Image(tradeoff))
elif best.get("frontier"):
    print("With a frontier the trials' trade-off is drawn below, every kept adapter at every scale.")
else:
    print("No knowledge scores: set scoring.knowledge_questions.")

# %% [markdown]
# ## The trade-off front: every kept adapter, scaled back after training
#
# Each line is one kept adapter (the plain fine-tune of notebook 3 and each trial's checkpoint) at every scale
# alpha of its LoRA update (0 is the base model, 1 the adapter as trained; exact for LoRA): val answer perplexity
# change against the base model (left is better) and the knowledge measure's change on the PubMedQA dev questions
# (down is better). The dashed line is the Pareto front (no point is better on both), the green box the target,
# the star the point the rule chose; it is saved already scaled to `outputs/best/`, so every later stage uses it
# as is.

# %%
from medqa.frontier import front_table

print(best["selection"]["message"])
if best.get("frontier"):
    display(Image(search.best_dir.parent / "frontier" / "frontier.png"))
    front = front_table(best)
else:
    front = "No frontier: tune.frontier_alphas is empty (the best trial as trained)."
front  # noqa: B018 (the cell's value is its output)

# %% [markdown]
# The chosen point on all the PubMedQA dev questions (the in-training evaluations and the front answered a
# subset), beside the base model, the majority-answer baseline and the answer shares: at this size accuracy sits
# near the always-"yes" share, so read it beside them.

# %%
from medqa.frontier import final_table

final_table(best)

# %% [markdown]
# ## Standard benchmarks through lm-evaluation-harness
#
# `medqa benchmark` runs the lm-eval tasks named in `evaluate.benchmarks` on each model, loaded once by medqa and
# handed to lm-eval as it is (the demo: `pubmedqa_local`, lm-eval's own PubMedQA task on the shipped test
# questions, offline). Per-question logs go to `outputs/benchmarks/<model>/`.

# %%
from medqa.benchmark import benchmark
from medqa.report import benchmark_frame

bench = benchmark(cfg) if cfg.evaluate.benchmarks else None
benchmark_frame(bench.summary) if bench else "No benchmarks: set evaluate.benchmarks, e.g. [pubmedqa_local]."

# %% [markdown]
# ## Final comparison on the test split

# %%
from medqa.evaluate import evaluate
from medqa.report import final_comparison_frame

final = evaluate(cfg)
final_comparison_frame(final.report)

# %% [markdown]
# Per source, when the data mixes several (`data.sources`): each source's test examples scored alone, with the
# paired change against the base model within that source.

# %%
from medqa.report import by_source_frame

per_source = by_source_frame(final.report)
per_source if per_source is not None else print("One source: the table above is its figure.")

# %% [markdown]
# ## Knowledge kept: PubMedQA before and after fine-tuning
#
# Zero-shot accuracy on PubMedQA's expert-labelled test questions (lm-eval's task above, or medqa's scorer with
# `evaluate.pubmedqa_questions`), beside the HealthCareMagic answer-loss gain: a fine-tune that lowers the answer
# loss but loses PubMedQA accuracy has traded knowledge for style.

# %%
from medqa.report import knowledge_frame

kept = knowledge_frame(final.report)
kept if kept is not None else print("No PubMedQA score: set evaluate.benchmarks or evaluate.pubmedqa_questions.")

# %% [markdown]
# ## Answers side by side

# %%
pd.set_option("display.max_colwidth", 400)
pd.DataFrame(final.report["samples"]).head(3)

# %% [markdown]
# ## What this run found

# %%
from medqa.analysis import load_metrics
from medqa.findings import final_findings

chosen_by = {"fine-tuned": (load_metrics(cfg, "finetune") or {}).get("best_val_answer_loss")}
chosen_by["tuned (best trial)"] = best["best_val_answer_loss"]
Markdown(final_findings(final.report, {k: v for k, v in chosen_by.items() if v is not None}))

# %% [markdown]
# ## Try it
#
# Ask your own questions: the base and the fine-tuned model answer side by side, streamed, with the prompt and
# generation settings used above. Example questions come from the test split, with the doctor's answer; a rating
# of an answer goes to `outputs/chat/feedback.jsonl`. The page is served on 127.0.0.1 (Jupyter and Colab show it
# inline); `medqa chat --config <your config>` serves the same page from the command line. Off in smoke mode.

# %%
if not SMOKE:
    from medqa.chat import launch

    launch(cfg)

# %% [markdown]
# ## Next
#
# The full report, with the model card, is `outputs/report.md`. The same pipeline runs from the command line
# (`medqa prepare`, `baseline`, `train`, `tune`, `benchmark`, `evaluate`), and `medqa ask`, `medqa chat` and
# `medqa export` use the trained adapter: see the [README](../README.md).
