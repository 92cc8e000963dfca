"""What a finished search chose (`medqa tune`'s last step): a row per trial (results.csv), the choice (the best
trial as trained, or with a frontier the rule's choice among every kept adapter at every scale) and the chosen
adapter saved already scaled to outputs/best/ with trial.json."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from medqa.artifacts import atomic_dir, write_json, write_text_atomic
from medqa.config import config_from_dict
from medqa.errors import MedqaError
from medqa.frontier import Source, run_frontier, scale_adapter
from medqa.manifest import read_manifest, write_manifest
from medqa.modeling import load_tokenizer, pick_device_dtype, scoring_dtype, training_base_dtype
from medqa.plots import plot_search, plot_tradeoff
from medqa.schema import Config
from medqa.selection import Rule, candidate, choose
from medqa.workdir import adapter_inputs, paths, read_metrics

log = logging.getLogger(__name__)

ATTEMPTS = "trial_attempts.log"  # one line per trial start: trial id (a retried trial appears twice)
METRIC = "val_objective"  # what ASHA prunes on, Ray keeps checkpoints by and the best trial is chosen by
# ... with a frontier (tune.frontier_alphas): the search overshoots, so trials compete on their gain alone and each
# keeps its lowest val answer loss; the frontier then scales them back and the rule chooses with knowledge.
FRONTIER_METRIC = "val_answer_loss"


def metric(cfg: Config) -> str:
    """What ASHA prunes on and Ray keeps each trial's checkpoint by."""
    return FRONTIER_METRIC if cfg.tune.frontier_alphas else METRIC


@dataclass
class TuneResult:
    experiment_dir: Path
    results: object  # pandas DataFrame, one row per trial
    best_dir: Path
    best: dict


# What a trial's row keeps of its kept checkpoint's knowledge evaluation (val_* in its reports).
KNOWLEDGE_COLUMNS = (
    "knowledge_acc",
    "knowledge_base_acc",
    "knowledge_change",
    "abstract_loss",
    "abstract_base_loss",
    "abstract_delta",
    "abstract_change",
)


def _candidate(row: dict) -> dict:
    """A trial's row as `medqa.selection` compares it."""
    return candidate(row, "best_val_answer_loss")


FINETUNE = "plain fine-tune"  # the plain fine-tune's name among the frontier's sources
# A trial row's fields that the frontier's chosen point has its own value for (trial.json takes the point's).
POINT_FIELDS = (
    "best_step",
    "best_val_objective",
    "best_val_answer_perplexity",
    "gain",
    "eligible",
    *KNOWLEDGE_COLUMNS,
)


def _kept(v) -> bool:
    return not isinstance(v, float) or v == v


def _trial_source(cfg: Config, row: dict, result) -> Source:
    """A trial's kept checkpoint (by `metric(cfg)`, as Ray's CheckpointConfig keeps it)."""
    checkpoint = result.get_best_checkpoint(metric(cfg), "min")
    if checkpoint is None:
        raise MedqaError(f"Trial {row['trial']} reported no checkpoint; see {result.path}.")
    params = {k: v for k, v in result.config.items()}
    return Source(row["trial"], Path(checkpoint.path), row.get("best_step"), params)


def _finetune_source(cfg: Config, tokenizer) -> list[Source]:
    """The plain fine-tune (outputs/finetune), when it was trained on this base model and data: the frontier
    compares it beside the trials."""
    folder = paths(cfg).finetune
    manifest = read_manifest(folder) if (folder / "adapter_config.json").exists() else None
    if manifest is None or manifest.get("inputs") != adapter_inputs(cfg, tokenizer):
        return []
    metrics = read_metrics(folder) or {}
    return [Source(FINETUNE, folder, (metrics.get("selection", {}).get("checkpoint") or {}).get("step"))]


def summarize(cfg: Config, grid, experiment: Path) -> TuneResult:
    """results.csv, the search's plots and outputs/best/: a row per trial, the choice, the chosen adapter saved."""
    import pandas as pd

    rows, curves, results = _trial_rows(cfg, grid, experiment)
    table = pd.DataFrame(rows)
    if "best_val_answer_loss" not in table or table["best_val_answer_loss"].isna().all():
        write_text_atomic(experiment / "results.csv", table.to_csv(index=False))
        errors = "; ".join(str(r.error)[:200] for r in grid if r.error)
        raise MedqaError(
            f"No trial of {experiment} reported a val answer_loss (errors: {errors or 'none'}). See "
            f"{experiment / 'results.csv'} and the trial folders there."
        )
    tokenizer = load_tokenizer(cfg)
    pick = _pick(cfg, rows, results, tokenizer)
    table["eligible"] = pick.eligible
    table["chosen"] = table["trial"] == pick.source.name
    table = table.sort_values(["chosen", "best_val_objective"], ascending=[False, True], na_position="last")
    best = _best_record(table, pick)
    # outputs/best first: a write refused there leaves the search's previous results.csv and plots as they were
    save_best(cfg, experiment, pick.source, best, pick.front, pick.choice, tokenizer)
    write_text_atomic(experiment / "results.csv", table.to_csv(index=False))
    plot_search(table, curves, experiment)
    if "knowledge_change" in table and "gain" in table:
        plot_tradeoff(table.to_dict("records"), Rule.of(cfg).drop_limit, experiment / "tradeoff.png")
    return TuneResult(experiment, table, paths(cfg).best, best)


def _trial_rows(cfg: Config, grid, experiment: Path) -> tuple[list[dict], dict, list]:
    """One row per trial (its searched values, its kept checkpoint's scores, its status), each reported trial's
    val curve, and Ray's results in the same order."""
    attempts_file = experiment / ATTEMPTS
    attempts = attempts_file.read_text().split() if attempts_file.exists() else []
    baseline = read_metrics(paths(cfg).baseline)
    base_val = baseline["val"]["answer_loss"] if baseline else None
    rows, curves = [], {}
    for result in grid:
        trial_id = Path(result.path).name
        short = result.metrics.get("trial_id", trial_id) if result.metrics else trial_id
        df = result.metrics_dataframe
        kept_by = metric(cfg)
        reported = df is not None and kept_by in getattr(df, "columns", [])
        row = {
            "trial": short,
            **{
                k.split(".", 1)[1] if k.startswith("train.") else k.replace(".", "_"): v
                for k, v in result.config.items()
            },
        }
        if reported:
            # The trial's kept checkpoint: as Ray's CheckpointConfig keeps it (by `metric(cfg)`).
            best = df.loc[df[kept_by].idxmin()]
            curves[short] = df[["step", "val_answer_loss"]].to_dict("list")
            row.update(_kept_scores(best, df, base_val))
        status = (
            "error"
            if result.error
            else ("completed" if reported and row["steps"] >= row["max_steps"] else "stopped early")
        )
        row.update(status=status, attempts=attempts.count(short), path=result.path)
        rows.append(row)
    return rows, curves, list(grid)


def _kept_scores(best, df, base_val: float | None) -> dict:
    """A trial's row fields from its kept evaluation `best` (a row of its metrics dataframe `df`)."""
    out = {
        "best_val_objective": float(best[METRIC]),
        "best_val_answer_loss": float(best["val_answer_loss"]),
        "best_val_answer_perplexity": float(best["val_answer_perplexity"]),
        "best_step": int(best["step"]),
        "steps": int(df["step"].max()),
        "max_steps": int(df["max_steps"].max()),
    }
    if base_val is not None:
        out["gain"] = base_val - out["best_val_answer_loss"]  # nats per answer token, > 0: better than base
    for key in KNOWLEDGE_COLUMNS:
        if f"val_{key}" in df:
            out[key] = float(best[f"val_{key}"])
    return out


@dataclass
class _Pick:
    source: Source  # the chosen adapter as trained
    alpha: float  # its scale (1: as trained)
    val_loss: float  # the val answer loss of the adapter saved in outputs/best
    choice: object  # medqa.selection.Choice
    front: object  # medqa.frontier.Front, or None without a frontier
    eligible: list  # per trial row: within the rule's limits (None: not scored)


def _pick(cfg: Config, rows: list[dict], results: list, tokenizer) -> _Pick:
    """The best trial as trained, by the rule that chose each trial's checkpoint (`medqa.selection`); with a
    frontier, the rule's choice among every kept adapter (the plain fine-tune's too) at every scale."""
    rule = Rule.of(cfg)
    scored = [i for i, r in enumerate(rows) if "best_val_answer_loss" in r]
    choice = choose([_candidate(rows[i]) for i in scored], rule, "trial")
    eligible = [rule.eligible(_candidate(r)) if i in scored else None for i, r in enumerate(rows)]
    sources = [_trial_source(cfg, rows[i], results[i]) for i in scored]
    if not cfg.tune.frontier_alphas:
        row = rows[scored[choice.index]]
        return _Pick(sources[choice.index], 1.0, row["best_val_answer_loss"], choice, None, eligible)
    candidates = [*_finetune_source(cfg, tokenizer), *sources]
    front = run_frontier(cfg, candidates, tokenizer)
    point = front.rows[front.chosen]
    source = next(s for s in candidates if s.name == point["source"])
    return _Pick(source, point["alpha"], point["val_answer_loss"], front.choice, front, eligible)


def _best_record(table, pick: _Pick) -> dict:
    """trial.json's fields of the chosen adapter: its trial's row (none for the plain fine-tune), with a frontier
    the chosen point's own numbers instead of its source's as trained."""
    trial = next((r for r in table.to_dict("records") if r["trial"] == pick.source.name), {})
    if pick.front:
        point = pick.front.rows[pick.front.chosen]
        trial = {k: v for k, v in trial.items() if k not in POINT_FIELDS}
        trial.update(
            best_step=point["step"],
            best_val_objective=point["objective"],
            **{k: point[k] for k in POINT_FIELDS if k in point},
        )
    return {
        **{k: v for k, v in trial.items() if _kept(v)},
        "trial": pick.source.name,
        "source": "the plain fine-tune (outputs/finetune)" if pick.source.name == FINETUNE else "search trial",
        # the val answer loss of the adapter saved in outputs/best: the frontier's score of the chosen point (in
        # the scoring dtype), or the trial's in-training evaluation without a frontier
        "best_val_answer_loss": pick.val_loss,
        # the adapter's LoRA update as trained, times adapter_scale (`medqa.frontier`)
        "adapter_scale": pick.alpha,
    }


def save_best(cfg: Config, experiment: Path, source: Source, best: dict, front, choice, tokenizer) -> None:
    """outputs/best/: the chosen adapter, scaled by best["adapter_scale"], its tokenizer and manifest, and
    trial.json (what was chosen, from which search and front, by which rule)."""
    rule = Rule.of(cfg)
    if source.name == FINETUNE:  # the plain fine-tune's own settings, as its manifest recorded them
        best_cfg = config_from_dict(read_manifest(source.path)["config"])
    else:
        best_cfg = config_from_dict(cfg.to_dict(), [f"{k}={json.dumps(v)}" for k, v in (source.params or {}).items()])
    base_dtype = str(training_base_dtype(cfg, pick_device_dtype(cfg)[0])).replace("torch.", "")
    with atomic_dir(paths(cfg).best) as tmp:
        scale_adapter(source.path, tmp, best["adapter_scale"])
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, "tune", cfg, adapter_inputs(cfg, tokenizer))
        write_json(
            tmp / "trial.json",
            {
                "experiment": str(experiment),
                **best,
                "frontier": front.summary() if front else None,
                "config": best_cfg.to_dict(),
                # the search compares trials by their in-training evaluations, on the training weights (the
                # frozen base in `training_base_dtype`, LoRA in fp32); `medqa evaluate` re-scores this adapter in
                # model.dtype beside the base model
                "dtype": "nf4 base, float32 adapter" if cfg.train.qlora else f"{base_dtype} base, float32 adapter",
                "scored_by_evaluate_in": scoring_dtype(cfg),
                "selection": {
                    **rule.to_dict(),
                    "rule": rule.describe(),
                    "eligible": choice.eligible,
                    "message": choice.message,
                },
            },
        )
    log.info(
        "tune: chose %s at adapter scale %.2f (%s) -> %s",
        source.name,
        best["adapter_scale"],
        choice.message,
        paths(cfg).best,
    )
