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


def plot_training(
    history: list[dict],
    baseline_loss: float | None = None,
    path: str | Path | None = None,
    max_knowledge_drop: float | None = None,
):
    """Train loss and val answer_loss per step (left), learning rate per step (right); with PubMedQA dev scores in
    the evaluations (scoring.knowledge_questions), their accuracy beside the base model's (middle), and the
    lowest accuracy tune.max_knowledge_drop allows when given."""
    train = [r for r in history if "train_loss" in r]
    evals = [r for r in history if "eval_answer_loss" in r]
    knowledge = [r for r in evals if "eval_knowledge_acc" in r]
    fig = _figure((16, 3.6) if knowledge else (11, 3.6), inline=path is None)
    axes = fig.subplots(1, 3 if knowledge else 2)
    ax, ax_lr = axes[0], axes[-1]
    ax.plot([r["step"] for r in train], [r["train_loss"] for r in train], label="train loss (batch mean)")
    ax.plot([r["step"] for r in evals], [r["eval_answer_loss"] for r in evals], "o-", label="val answer_loss")
    if baseline_loss is not None:
        ax.axhline(baseline_loss, color="gray", linestyle="--", label="baseline val answer_loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats per answer token")
    ax.set_title("loss")
    ax.legend()
    if knowledge:
        ax_k = axes[1]
        steps = [r["step"] for r in knowledge]
        ax_k.plot(steps, [r["eval_knowledge_acc"] for r in knowledge], "o-", color="tab:purple", label="accuracy")
        base = knowledge[-1]["eval_knowledge_base_acc"]
        ax_k.axhline(base, color="gray", linestyle="--", label="base model")
        if max_knowledge_drop is not None:
            ax_k.axhline(
                base - max_knowledge_drop,
                color="tab:red",
                linestyle=":",
                label=f"allowed drop ({max_knowledge_drop:g})",
            )
        ax_k.set_xlabel("optimizer step")
        ax_k.set_ylabel("accuracy")
        ax_k.set_title("knowledge: PubMedQA dev")
        ax_k.legend()
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


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (higher is better on both), by x."""
    keep = [
        i for i, (x, y) in enumerate(points) if not any(x2 >= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points)
    ]
    return sorted(keep, key=lambda i: points[i][0])


def plot_tradeoff(trials: list[dict], max_knowledge_drop: float | None = None, path: str | Path | None = None):
    """Every trial as a point: val answer-loss gain over the base model (right is better) against PubMedQA dev
    accuracy change (up is better); the frontier of the eligible trials (none beats them on both), the allowed
    drop, and the chosen trial. `trials`: dicts with gain, knowledge_change, eligible, chosen and trial."""
    fig = _figure((6.5, 4.2), inline=path is None)
    ax = fig.subplots()
    shown = [t for t in trials if _finite(t.get("gain")) and _finite(t.get("knowledge_change"))]
    for eligible, style in (
        (True, {"color": "tab:blue", "label": "eligible trial"}),
        (False, {"color": "lightgray", "edgecolor": "gray", "label": "forgets too much"}),
    ):
        pts = [t for t in shown if bool(t.get("eligible", True)) == eligible]
        if pts:
            ax.scatter([t["gain"] for t in pts], [t["knowledge_change"] for t in pts], s=36, zorder=3, **style)
    ok = [t for t in shown if t.get("eligible", True)]
    front = [ok[i] for i in pareto_front([(t["gain"], t["knowledge_change"]) for t in ok])]
    if len(front) > 1:
        ax.plot(
            [t["gain"] for t in front],
            [t["knowledge_change"] for t in front],
            "--",
            color="tab:blue",
            zorder=2,
            label="eligible frontier",
        )
    chosen = [t for t in shown if t.get("chosen")]
    if chosen:
        ax.scatter(
            [chosen[0]["gain"]],
            [chosen[0]["knowledge_change"]],
            marker="*",
            s=260,
            color="tab:orange",
            edgecolor="black",
            zorder=4,
            label=f"chosen ({chosen[0].get('trial', '')})",
        )
    ax.axhline(0, color="gray", linewidth=0.8)
    if max_knowledge_drop is not None:
        ax.axhline(-max_knowledge_drop, color="tab:red", linestyle=":", label=f"allowed drop ({max_knowledge_drop:g})")
    for t in shown:
        ax.annotate(
            str(t.get("trial", "")),
            (t["gain"], t["knowledge_change"]),
            fontsize=6,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("val answer_loss gain over the base model (nats)")
    ax.set_ylabel("PubMedQA dev accuracy change")
    ax.set_title("gain vs knowledge kept, per trial")
    ax.legend(fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def plot_frontier(rows: list[dict], rule, path: str | Path | None = None):
    """The frontier (`medqa.frontier`): every (adapter, scale) point as val answer perplexity change against the
    base model (left is better) and abstract loss change (down is better; PubMedQA dev accuracy drop when the
    abstract loss is not measured); the Pareto front, the target box (perplexity at least 40% lower, knowledge
    within the rule's limit) and the chosen point."""
    fig = _figure((7.0, 4.6), inline=path is None)
    ax = fig.subplots()
    use_abstract = rule.knowledge_measure in ("abstract_loss", "both") and any(
        _finite(r.get("abstract_change")) for r in rows
    )
    y = _knowledge_axis(use_abstract)
    limit = rule.max_abstract_loss_rise if use_abstract else rule.max_knowledge_drop
    # drawn in this order, which is also the legend's
    _plot_frontier_points(ax, rows, y)
    _plot_pareto_front(ax, rows, y)
    _plot_target_box(ax, rows, limit)
    _plot_chosen_point(ax, rows, y)
    _label_frontier(ax, rows, y, limit, use_abstract)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _knowledge_axis(use_abstract: bool):
    """A row's y value: its abstract loss change, or its PubMedQA dev accuracy drop (the change, negated, so that
    down is better on both); 0 where it was not measured."""
    key = "abstract_change" if use_abstract else "knowledge_change"
    sign = 1.0 if use_abstract else -1.0

    def y(r):
        v = r.get(key)
        return sign * v if _finite(v) else 0.0

    return y


def _plot_frontier_points(ax, rows: list[dict], y) -> None:
    """One line per adapter through its scales, each point labelled with its alpha, and the base model at (0, 0)."""
    sources = sorted({r["source"] for r in rows if r["source"] != "base"})
    colors = dict(zip(sources, _colors(len(sources))))
    for src in sources:
        pts = [r for r in rows if r["source"] == src]
        ax.plot(
            [r["answer_perplexity_change"] for r in pts],
            [y(r) for r in pts],
            "-o",
            ms=4,
            lw=0.8,
            color=colors[src],
            label=src,
            zorder=2,
        )
        for r in pts:
            ax.annotate(
                f"{r['alpha']:g}",
                (r["answer_perplexity_change"], y(r)),
                fontsize=6,
                xytext=(3, 2),
                textcoords="offset points",
            )
    ax.scatter([0], [0], marker="s", color="black", zorder=3, label="base model")


def _plot_pareto_front(ax, rows: list[dict], y) -> None:
    """The points on the Pareto front, joined from left to right (nothing to join with fewer than two)."""
    front = sorted([r for r in rows if r.get("on_front")], key=lambda r: r["answer_perplexity_change"])
    if len(front) > 1:
        ax.plot(
            [r["answer_perplexity_change"] for r in front],
            [y(r) for r in front],
            "--",
            color="gray",
            lw=1.5,
            zorder=1,
            label="Pareto front",
        )


def _plot_target_box(ax, rows: list[dict], limit: float) -> None:
    """The target: perplexity at least 40% below the base model's, knowledge within the rule's `limit`."""
    x = [r["answer_perplexity_change"] for r in rows]
    ax.axvline(-0.40, color="tab:green", linestyle=":", lw=1)
    ax.axhline(limit, color="tab:green", linestyle=":", lw=1)
    ax.fill_between(
        [min(min(x), -0.40) - 0.05, -0.40],
        -1,
        limit,
        color="tab:green",
        alpha=0.08,
        label="target (perplexity -40%, knowledge within limit)",
    )


def _plot_chosen_point(ax, rows: list[dict], y) -> None:
    """The chosen (adapter, scale) as a star, when there is one."""
    chosen = [r for r in rows if r.get("chosen")]
    if chosen:
        c = chosen[0]
        ax.scatter(
            [c["answer_perplexity_change"]],
            [y(c)],
            marker="*",
            s=280,
            color="tab:orange",
            edgecolor="black",
            zorder=4,
            label=f"chosen ({c['source']}, alpha {c['alpha']:g})",
        )


def _label_frontier(ax, rows: list[dict], y, limit: float, use_abstract: bool) -> None:
    """Axis ranges (every point, the base model and the target's edges in view), percent ticks, labels, legend."""
    x = [r["answer_perplexity_change"] for r in rows]
    ys = [y(r) for r in rows]
    ax.set_ylim(min(min(ys), 0) - 0.01, max(max(ys), limit) + 0.01)
    ax.set_xlim(min(min(x), -0.40) - 0.05, max(max(x), 0) + 0.05)
    ax.xaxis.set_major_formatter(_percent())
    ax.yaxis.set_major_formatter(_percent())
    ax.set_xlabel("val answer perplexity change against the base model")
    ax.set_ylabel("abstract loss change (PubMedQA dev abstracts)" if use_abstract else "PubMedQA dev accuracy drop")
    ax.set_title("the trade-off front: every kept adapter at every scale")
    ax.legend(fontsize=6, loc="best")


def _colors(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _percent():
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(1.0, decimals=0)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and x == x and abs(x) != float("inf")
