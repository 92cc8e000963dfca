"""Stage 4a, `tune(cfg)`: a Ray Tune search whose trials run the same `train()` as `medqa train`.

ASHA stops bad trials early on the `val_objective` each trial reports at every evaluation (`tune.objective`,
`medqa.selection`: val answer_loss, or it and the knowledge kept on the PubMedQA dev questions); the same rule
keeps each trial's best checkpoint and chooses the best trial. Storage stays under `outputs/ray_<timestamp>/`;
each trial keeps only its best adapter (Ray checkpoint, num_to_keep=1). Writes `results.csv` (one row per trial),
`search.png`, `curves.png` and, with knowledge scores, `tradeoff.png` there. Then the frontier (`medqa.frontier`,
tune.frontier_alphas) scores every kept adapter (each trial's, and the plain fine-tune's when it exists) scaled
back by each alpha, and the rule chooses from its Pareto front; the chosen adapter, already scaled, goes to
`outputs/best/` with trial.json (without a frontier: the best trial as trained). `tune.resume=true` restores the
latest interrupted experiment with `Tuner.restore`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from medqa import schema
from medqa.artifacts import atomic_dir, write_json
from medqa.config import config_from_dict
from medqa.errors import Interrupted, MedqaError
from medqa.faults import SearchStop, damaged, keep_sigterm_handler
from medqa.frontier import Source, run_frontier, scale_adapter
from medqa.locks import locked
from medqa.manifest import check_resumable, read_manifest, run_record, write_manifest, write_run_record
from medqa.modeling import load_tokenizer, pick_device_dtype, scoring_dtype, training_base_dtype
from medqa.plots import plot_search, plot_tradeoff
from medqa.schema import Config
from medqa.selection import Rule, candidate, choose
from medqa.train import RUN_SECTIONS, planned_steps, train
from medqa.trainer import ReportToTune
from medqa.workdir import adapter_inputs, load_split, paths, read_metrics

log = logging.getLogger(__name__)

METRIC = "val_objective"  # what ASHA prunes on, Ray keeps checkpoints by and the best trial is chosen by
# ... with a frontier (tune.frontier_alphas): the search overshoots, so trials compete on their gain alone and each
# keeps its lowest val answer loss; the frontier then scales them back and the rule chooses with knowledge.
FRONTIER_METRIC = "val_answer_loss"


def metric(cfg: Config) -> str:
    """What ASHA prunes on and Ray keeps each trial's checkpoint by."""
    return FRONTIER_METRIC if cfg.tune.frontier_alphas else METRIC


FAIL_ENV = "MEDQA_INJECT_TRIAL_FAILURE"  # tests: the first trial attempt of an experiment raises once
ATTEMPTS = "trial_attempts.log"  # one line per trial start: trial id (a retried trial appears twice)
FINISHED = "trial_finished.log"  # one line per trial whose training ran to its end

_TEMP_DIRS: list[Path] = []

# Search-space entries, as `medqa.schema` declares them: field of `tune` -> (the config key it searches, sampler).
SEARCHED = schema.searched()


@dataclass
class TuneResult:
    experiment_dir: Path
    results: object  # pandas DataFrame, one row per trial
    best_dir: Path
    best: dict


def search_space(cfg: Config) -> dict:
    from ray import tune

    space = {}
    for name, (key, sampler) in SEARCHED.items():
        value = getattr(cfg.tune, name)
        if sampler == "choice":
            if value:  # empty: not searched
                space[key] = tune.choice(value)
        elif sampler == "uniform" and value[0] == value[1]:
            space[key] = value[0]
        else:
            space[key] = getattr(tune, sampler)(*value)  # tune.loguniform(low, high), tune.uniform(low, high)
    return space


def run_trial(params: dict, base: dict, experiment_dir: str) -> None:
    """One trial: the base config with the sampled values, trained by `train()` in the trial's folder."""
    import torch
    from ray import tune

    torch.set_num_threads(max(1, int(base["tune"]["cpus_per_trial"])))
    context = tune.get_context()
    trial_id = context.get_trial_id()
    exp = Path(experiment_dir)
    with open(exp / ATTEMPTS, "a") as f:
        f.write(trial_id + "\n")
    if os.environ.get(FAIL_ENV) and not (exp / "injected_failure").exists():
        (exp / "injected_failure").write_text(trial_id)
        raise RuntimeError(f"injected failure in trial {trial_id} ({FAIL_ENV} is set)")
    cfg = config_from_dict(base, [f"{k}={json.dumps(v)}" for k, v in params.items()])
    train(cfg, callbacks=[ReportToTune()], run_dir=context.get_trial_dir(), trial=True)
    with open(exp / FINISHED, "a") as f:
        f.write(trial_id + "\n")


def _init_ray(cfg: Config) -> bool:
    """Join `tune.address` / RAY_ADDRESS, or start a local Ray sized to this machine. True if we connected (then
    `tune` disconnects at the end: a local Ray stops, a cluster keeps running)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Workers import medqa from the same place as the driver, and stay offline like it.
    src = str(Path(__file__).resolve().parents[1])
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    for var in (
        "HF_HUB_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "HF_HOME",
        "HF_TOKEN",
        "MPLCONFIGDIR",
        FAIL_ENV,
        "TOKENIZERS_PARALLELISM",
    ):
        if os.environ.get(var):
            env[var] = os.environ[var]
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]
    address = cfg.tune.address or os.environ.get("RAY_ADDRESS", "")
    if ray.is_initialized():
        return False
    if address:
        # Every node runs trials: each needs medqa importable at this PYTHONPATH and the workdir (data, model and
        # outputs/, Ray's storage) at the same absolute path, i.e. on a shared filesystem.
        log.info(
            "tune: joining the Ray cluster at %s (workdir %s must be the same shared folder on every node)",
            address,
            paths(cfg).root.resolve(),
        )
        ray.init(address=address, runtime_env={"env_vars": env})
        return True
    # Ray's socket paths must stay short (Unix sockets allow ~107 bytes), so a long workdir gets a temp dir.
    temp = paths(cfg).cache.resolve() / "ray"
    if len(str(temp)) > 40:
        temp = Path(tempfile.mkdtemp(prefix="medqa-ray-"))
        _TEMP_DIRS.append(temp)  # removed after ray.shutdown()
    temp.mkdir(parents=True, exist_ok=True)
    ray.init(
        num_cpus=os.cpu_count() or 1,
        include_dashboard=False,
        _temp_dir=str(temp),
        runtime_env={"env_vars": env},
        log_to_driver=False,
        configure_logging=False,
    )
    return True


def _with_absolute_paths(cfg: Config) -> Config:
    """Make workdir and every local path (the fields `medqa.schema` declares path=True) absolute, so trials
    resolve them from their own folders."""
    values = cfg.to_dict()
    for key in schema.keys(path=True):
        *sections, name = key.split(".")
        node = values
        for section in sections:
            node = node[section]
        value = node[name]
        if _local(value):
            node[name] = str(Path(value).resolve())
    for entry in values["data"]["sources"]:  # each source of a mix (its weight must stay in the run fingerprint)
        if _local(entry.get("source")):
            entry["source"] = str(Path(entry["source"]).resolve())
    values["workdir"] = str(paths(cfg).root.resolve())  # even before it exists
    return config_from_dict(values)


def _local(value) -> bool:
    return bool(value) and "${" not in value and not value.startswith("pkg://") and Path(value).exists()


def search_steps(cfg: Config, train_ds) -> int:
    """The longest trial's optimizer steps (ASHA's max_t): with train.max_steps searched (tune.max_steps), the
    longest choice's, so ASHA never cuts that trial short."""
    replicas = max(1, int(cfg.tune.gpus_per_trial))
    return max(
        planned_steps(config_from_dict(cfg.to_dict(), [f"train.max_steps={n}"]), train_ds, replicas=replicas)
        for n in (cfg.tune.max_steps or [cfg.train.max_steps])
    )


def tune_config(cfg: Config, total_steps: int):
    """Tune's settings: random search, ASHA on `metric(cfg)` (the objective every trial reports, or its val answer
    loss when a frontier follows), lower is better."""
    from ray import tune as rt
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    grace_steps = cfg.tune.grace_period * cfg.train.eval_steps
    return rt.TuneConfig(
        metric=metric(cfg),
        mode="min",
        num_samples=cfg.tune.num_samples,
        search_alg=BasicVariantGenerator(random_state=cfg.tune.seed, max_concurrent=cfg.tune.max_concurrent),
        # Time is the optimizer step (not Tune's report count), so a trial restarted after an interruption is
        # compared at the same points as the others.
        scheduler=ASHAScheduler(
            time_attr="step",
            max_t=max(total_steps, grace_steps),
            grace_period=grace_steps,
            reduction_factor=cfg.tune.reduction_factor,
        ),
    )


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


def _latest_experiment(outputs: Path) -> Path | None:
    from ray import tune

    runs = sorted(p for p in outputs.glob("ray_*") if p.is_dir())
    return next((p for p in reversed(runs) if tune.Tuner.can_restore(str(p))), None)


RESTART = "medqa tune tune.resume=false"  # a new experiment folder; the damaged one stays for a person to read


def _restorable(outputs: Path, record: dict) -> Path | None:
    """tune.resume=true: the latest experiment Ray can restore, checked before Ray starts: made by this same search
    (its run record) and readable (what `Tuner.restore` and `fit` read first). None when there is none."""
    experiment = _latest_experiment(outputs)
    if experiment is None:
        log.warning("tune.resume=true but no restorable experiment under %s; starting a new one.", outputs)
        return None
    check_resumable(experiment, record, "Ray Tune experiment", "tune.resume=false (a new experiment folder)")
    _check_readable(experiment)
    return experiment


def _check_readable(experiment: Path) -> None:
    """Read the files Ray's restore reads (the Tuner's state, the newest experiment and search-algorithm states), so
    a damaged one (cut short by a full disk or a kill mid-write) is named in one paragraph (`medqa.faults.damaged`)
    instead of failing inside Ray's controller with its traceback."""
    import ray.cloudpickle as pickle

    # file -> how Ray reads it (the search algorithm's state is a cloudpickle, despite its .json name)
    for pattern, load in (
        ("tuner.pkl", pickle.loads),
        ("experiment_state-*.json", lambda data: json.loads(data.decode("utf-8"))),
        ("basic-variant-state-*.json", pickle.loads),
    ):
        newest = max(experiment.glob(pattern), default=None)  # the one Ray reads: the newest by its timestamp
        if newest is not None:
            with damaged(newest, RESTART, writer="Ray Tune"):
                load(newest.read_bytes())


@locked("tune")
def tune(cfg: Config, callbacks: list | None = None) -> TuneResult:
    """Search, write results.csv and plots, copy the best adapter to outputs/best/."""
    from ray import tune as rt

    cfg = _with_absolute_paths(cfg)  # Ray runs each trial in its own folder
    outputs = paths(cfg).outputs
    tokenizer = load_tokenizer(cfg)
    train_ds = load_split(cfg, "train", tokenizer)  # fail here, clearly, not in every trial
    # What determines the search (its space, ASHA, the training settings, the data and base model): a resume
    # must continue the same search, never relabel another one's results.
    record = run_record(cfg, (*RUN_SECTIONS, "tune"), adapter_inputs(cfg, tokenizer))
    t = cfg.train
    # The Trainer's own count of optimizer steps (packed rows and token budgets included), so ASHA's last rung is
    # the trial's last step and never cuts its final evaluation.
    # A trial with N whole GPUs trains in one process over all of them (the Trainer's torch DataParallel): N
    # micro-batches per step. Several processes per trial (DDP) would need Ray Train; see the README.
    total_steps = search_steps(cfg, train_ds)
    if t.packing and not t.tokens_per_step and not t.tokens_per_batch and cfg.tune.gpus_per_trial:
        log.warning(
            "train.tokens_per_batch=0 sizes each trial's batches from its GPU's free memory, so the step "
            "count ASHA plans with (%d) may differ from the trials'. Set train.tokens_per_step (as "
            "configs/biogpt.yaml does) to make every trial's step the same.",
            total_steps,
        )
    experiment = _restorable(outputs, record) if cfg.tune.resume else None  # refused here, before Ray starts
    with keep_sigterm_handler():  # SIGTERM stays medqa's graceful stop, not Ray's exit (medqa.faults)
        started = _init_ray(cfg)
    try:
        if experiment is None:
            experiment = outputs / f"ray_{time.strftime('%Y%m%d-%H%M%S')}"
            experiment.mkdir(parents=True)
            write_run_record(experiment, record)
        trainable = rt.with_resources(
            rt.with_parameters(run_trial, base=cfg.to_dict(), experiment_dir=str(experiment)),
            {"cpu": cfg.tune.cpus_per_trial, "gpu": cfg.tune.gpus_per_trial},
        )
        if cfg.tune.resume and rt.Tuner.can_restore(str(experiment)):
            log.info("tune: restoring %s", experiment)
            with damaged(experiment, RESTART, writer="Ray Tune"):
                tuner = rt.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
        else:
            tuner = rt.Tuner(
                trainable,
                param_space=search_space(cfg),
                tune_config=tune_config(cfg, total_steps),
                run_config=rt.RunConfig(
                    name=experiment.name,
                    storage_path=str(outputs),
                    callbacks=callbacks,
                    failure_config=rt.FailureConfig(max_failures=cfg.tune.max_failures),
                    checkpoint_config=rt.CheckpointConfig(
                        num_to_keep=1, checkpoint_score_attribute=metric(cfg), checkpoint_score_order="min"
                    ),
                    verbose=1,
                ),
            )
        with SearchStop() as stop:  # SIGTERM: Tune's own graceful stop, as Ctrl-C (medqa.faults)
            grid = tuner.fit()
        if stop.signum is not None:
            raise Interrupted(
                f"stopped by {signal.Signals(stop.signum).name}: Ray Tune stopped the trials and kept the "
                f"experiment's state in {experiment}; run again with tune.resume=true to continue it.",
                stop.signum,
            )
        write_run_record(experiment, {**record, "finished": True})
    finally:
        if started:
            import ray

            ray.shutdown()
            while _TEMP_DIRS:
                shutil.rmtree(_TEMP_DIRS.pop(), ignore_errors=True)
    return _summarize(cfg, grid, experiment)


def load_search(cfg: Config) -> TuneResult:
    """The search `medqa tune` already ran for this config (e.g. `make real-search`), read back instead of run
    again: its experiment folder, results.csv, outputs/best/ and trial.json. Refuses, in one paragraph, a search
    that is missing, unfinished or made with other settings (the same check as tune.resume=true)."""
    import pandas as pd

    cfg = _with_absolute_paths(cfg)
    best_dir = paths(cfg).best
    trial = best_dir / "trial.json"
    if not trial.is_file():
        raise MedqaError(
            f"No search to read: {trial} does not exist. Run the search first (`medqa tune --config <config>`, "
            "or `make real-search` for configs/smollm2-offline.yaml), or run it here (REUSE_SEARCH = False)."
        )
    with damaged(trial, "medqa tune"):
        best = json.loads(trial.read_text(encoding="utf-8"))
    experiment = Path(best.get("experiment", ""))
    results = experiment / "results.csv"
    if not results.is_file():
        raise MedqaError(
            f"{trial} names the experiment {experiment}, whose results.csv is gone. Run `medqa tune` again."
        )
    record = run_record(cfg, (*RUN_SECTIONS, "tune"), adapter_inputs(cfg, load_tokenizer(cfg)))
    stored = check_resumable(experiment, record, "Ray Tune experiment", "medqa tune (a new search)")
    if not (stored or {}).get("finished"):
        raise MedqaError(f"The search in {experiment} did not finish: run `medqa tune ... tune.resume=true`.")
    with damaged(results, "medqa tune tune.resume=true (it writes results.csv again)"):
        table = pd.read_csv(results)
        _check_whole(table, experiment)
    log.info("tune: read the finished search %s (not run again)", experiment)
    return TuneResult(experiment, table, best_dir, best)


def _check_whole(table, experiment: Path) -> None:
    """results.csv as `_summarize` writes it whole: a row per trial folder, each ending in its `chosen` flag (a file
    cut short by a full disk parses, but with rows missing or its last row cut)."""
    trials = len(list(experiment.glob("*/params.json")))
    if len(table) != trials or "chosen" not in table or not table["chosen"].isin([True, False]).all():
        raise ValueError(f"cut short: {len(table)} row(s) for {trials} trial(s), or a row without its end")


def _summarize(cfg: Config, grid, experiment: Path) -> TuneResult:
    import pandas as pd

    attempts_file = experiment / ATTEMPTS
    attempts = attempts_file.read_text().split() if attempts_file.exists() else []
    baseline = read_metrics(paths(cfg).baseline)
    base_val = baseline["val"]["answer_loss"] if baseline else None
    rows, curves, results = [], {}, []
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
            row.update(
                best_val_objective=float(best[METRIC]),
                best_val_answer_loss=float(best["val_answer_loss"]),
                best_val_answer_perplexity=float(best["val_answer_perplexity"]),
                best_step=int(best["step"]),
                steps=int(df["step"].max()),
                max_steps=int(df["max_steps"].max()),
            )
            if base_val is not None:
                row["gain"] = base_val - row["best_val_answer_loss"]  # nats per answer token, > 0: better than base
            for key in KNOWLEDGE_COLUMNS:
                if f"val_{key}" in df:
                    row[key] = float(best[f"val_{key}"])
        status = (
            "error"
            if result.error
            else ("completed" if reported and row["steps"] >= row["max_steps"] else "stopped early")
        )
        row.update(status=status, attempts=attempts.count(short), path=result.path)
        rows.append(row)
        results.append(result)
    table = pd.DataFrame(rows)
    if "best_val_answer_loss" not in table or table["best_val_answer_loss"].isna().all():
        table.to_csv(experiment / "results.csv", index=False)
        errors = "; ".join(str(r.error)[:200] for r in grid if r.error)
        raise MedqaError(
            f"No trial of {experiment} reported a val answer_loss (errors: {errors or 'none'}). See "
            f"{experiment / 'results.csv'} and the trial folders there."
        )
    # The best trial as trained, by the rule that chose each trial's checkpoint (`medqa.selection`); then, with a
    # frontier, the rule's choice among every kept adapter at every scale (`medqa.frontier`).
    rule = Rule.of(cfg)
    scored = [i for i, r in enumerate(rows) if "best_val_answer_loss" in r]
    choice = choose([_candidate(rows[i]) for i in scored], rule, "trial")
    table["eligible"] = [rule.eligible(_candidate(r)) if i in scored else None for i, r in enumerate(rows)]
    tokenizer = load_tokenizer(cfg)
    sources = [_trial_source(cfg, rows[i], results[i]) for i in scored]
    front = None
    if cfg.tune.frontier_alphas:
        candidates = [*_finetune_source(cfg, tokenizer), *sources]
        front = run_frontier(cfg, candidates, tokenizer)
        point = front.rows[front.chosen]
        source = next(s for s in candidates if s.name == point["source"])
        choice, alpha, val_loss = front.choice, point["alpha"], point["val_answer_loss"]
    else:
        source, alpha = sources[choice.index], 1.0
        val_loss = rows[scored[choice.index]]["best_val_answer_loss"]
    table["chosen"] = table["trial"] == source.name
    table = table.sort_values(["chosen", "best_val_objective"], ascending=[False, True], na_position="last")
    table.to_csv(experiment / "results.csv", index=False)
    plot_search(table, curves, experiment)
    if "knowledge_change" in table and "gain" in table:
        plot_tradeoff(table.to_dict("records"), rule.drop_limit, experiment / "tradeoff.png")
    trial = next((r for r in table.to_dict("records") if r["trial"] == source.name), {})  # {}: the plain fine-tune
    if front:  # the chosen point's own numbers, not its source's as trained
        trial = {k: v for k, v in trial.items() if k not in POINT_FIELDS}
        trial.update(
            best_step=point["step"],
            best_val_objective=point["objective"],
            **{k: point[k] for k in POINT_FIELDS if k in point},
        )
    best = {
        **{k: v for k, v in trial.items() if _kept(v)},
        "trial": source.name,
        "source": "the plain fine-tune (outputs/finetune)" if source.name == FINETUNE else "search trial",
        # the val answer loss of the adapter saved in outputs/best: the frontier's score of the chosen point (in
        # the scoring dtype), or the trial's in-training evaluation without a frontier
        "best_val_answer_loss": val_loss,
        # the adapter's LoRA update as trained, times adapter_scale (`medqa.frontier`)
        "adapter_scale": alpha,
    }
    save_best(cfg, experiment, source, best, front, choice, tokenizer)
    return TuneResult(experiment, table, paths(cfg).best, best)


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
