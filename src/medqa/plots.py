"""Plots read from the run files (metrics.jsonl), shared by the stages and the notebooks."""

from __future__ import annotations

from pathlib import Path


def _figure(size: tuple[float, float], inline: bool):
    """A pyplot figure for notebooks (shown inline), or a bare Figure for files: stages that save plots from
    inside a notebook then leave its inline backend alone."""
    if inline:
        import matplotlib.pyplot as plt

        return plt.figure(figsize=size)
    from matplotlib.figure import Figure

    return Figure(figsize=size)


def plot_training(history: list[dict], baseline_loss: float | None = None, path: str | Path | None = None):
    """Train loss and val answer_loss per step (left), learning rate per step (right)."""
    fig = _figure((11, 3.6), inline=path is None)
    train = [r for r in history if "train_loss" in r]
    evals = [r for r in history if "eval_answer_loss" in r]
    ax, ax_lr = fig.subplots(1, 2)
    ax.plot([r["step"] for r in train], [r["train_loss"] for r in train], label="train loss (batch mean)")
    ax.plot([r["step"] for r in evals], [r["eval_answer_loss"] for r in evals], "o-", label="val answer_loss")
    if baseline_loss is not None:
        ax.axhline(baseline_loss, color="gray", linestyle="--", label="baseline val answer_loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats per answer token")
    ax.set_title("loss")
    ax.legend()
    ax_lr.plot([r["step"] for r in train], [r["learning_rate"] for r in train], color="tab:green")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_title("learning rate")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def plot_search(table, curves: dict[str, dict], out_dir: str | Path | None = None):
    """Left: best val answer_loss against learning rate (log) and weight decay. Right: learning curves per trial.
    Saved as search.png and curves.png under `out_dir` when given; returns the two figures."""
    done = table.dropna(subset=["best_val_answer_loss"]) if "best_val_answer_loss" in table else table.iloc[0:0]
    search = _figure((10, 3.5), inline=out_dir is None)
    ax_lr, ax_wd = search.subplots(1, 2)
    ax_lr.scatter(done["learning_rate"], done["best_val_answer_loss"])
    ax_lr.set_xscale("log")
    ax_lr.set_xlabel("learning rate")
    ax_lr.set_ylabel("best val answer_loss")
    ax_wd.scatter(done["weight_decay"], done["best_val_answer_loss"], color="tab:orange")
    ax_wd.set_xlabel("weight decay")
    search.tight_layout()
    curve_fig = _figure((6, 3.5), inline=out_dir is None)
    ax = curve_fig.subplots()
    for trial, curve in curves.items():
        ax.plot(curve["step"], curve["val_answer_loss"], "o-", label=trial)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("val answer_loss")
    ax.set_title("learning curves per trial")
    if curves:
        ax.legend(fontsize=7)
    curve_fig.tight_layout()
    if out_dir is not None:
        search.savefig(Path(out_dir) / "search.png", dpi=110)
        curve_fig.savefig(Path(out_dir) / "curves.png", dpi=110)
    return search, curve_fig
