"""Stage 4a, `tune(cfg)`: a Ray Tune search whose trials run the same `train()` as `medqa train`.

ASHA stops bad trials early on the `val_objective` each trial reports at every evaluation (`tune.objective`,
`medqa.selection`: val answer_loss, or it and the knowledge kept on the PubMedQA dev questions); the same rule
keeps each trial's best checkpoint and chooses the best trial. Storage stays under `outputs/ray_<timestamp>/`;
each trial keeps only its best adapter (Ray checkpoint, num_to_keep=1). Writes `results.csv` (one row per trial),
`search.png`, `curves.png` and, with knowledge scores, `tradeoff.png` there. Then the frontier (`medqa.frontier`,
tune.frontier_alphas) scores every kept adapter (each trial's, and the plain fine-tune's when it exists) scaled
back by each alpha, and the rule chooses from its Pareto front; the chosen adapter, already scaled, goes to
`outputs/best/` with trial.json (without a frontier: the best trial as trained): `medqa.tunechoice`.
`tune.resume=true` restores the latest interrupted experiment with `Tuner.restore`; `load_search` reads a finished
one back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from medqa import schema
from medqa.config import config_from_dict
from medqa.errors import Interrupted, MedqaError
from medqa.faults import SearchStop, damaged, keep_sigterm_handler
from medqa.locks import locked
from medqa.manifest import check_resumable, run_record, write_run_record
from medqa.modeling import load_tokenizer
from medqa.runplan import planned_steps
from medqa.runrecord import RUN_SECTIONS
from medqa.schema import Config
from medqa.train import train
from medqa.trainer import ReportToTune
from medqa.tunechoice import ATTEMPTS, FRONTIER_METRIC, METRIC, TuneResult, metric, summarize  # noqa: F401
from medqa.workdir import adapter_inputs, load_split, paths

log = logging.getLogger(__name__)

# The selection rule's settings: with a frontier they choose only after the search (trials compete on val answer
# loss), so a finished search may be chosen from again under another rule (tune.resume=true, `load_search`).
RULE_KEYS = tuple(
    f"tune.{k}"
    for k in (
        "objective",
        "knowledge_measure",
        "max_knowledge_drop",
        "max_abstract_loss_rise",
        "knowledge_weight",
        "accuracy_weight",
    )
)


def _applied_after(cfg: Config) -> tuple[str, ...]:
    return RULE_KEYS if cfg.tune.frontier_alphas else ()


FAIL_ENV = "MEDQA_INJECT_TRIAL_FAILURE"  # tests: the first trial attempt of an experiment raises once
FINISHED = "trial_finished.log"  # one line per trial whose training ran to its end

_TEMP_DIRS: list[Path] = []

# Search-space entries, as `medqa.schema` declares them: field of `tune` -> (the config key it searches, sampler).
SEARCHED = schema.searched()


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


def _latest_experiment(outputs: Path) -> Path | None:
    from ray import tune

    runs = sorted(p for p in outputs.glob("ray_*") if p.is_dir())
    return next((p for p in reversed(runs) if tune.Tuner.can_restore(str(p))), None)


RESTART = "medqa tune tune.resume=false"  # a new experiment folder; the damaged one stays for a person to read


def _restorable(outputs: Path, record: dict, applied_after: tuple[str, ...] = ()) -> Path | None:
    """tune.resume=true: the latest experiment Ray can restore, checked before Ray starts: made by this same search
    (its run record) and readable (what `Tuner.restore` and `fit` read first). None when there is none."""
    experiment = _latest_experiment(outputs)
    if experiment is None:
        log.warning("tune.resume=true but no restorable experiment under %s; starting a new one.", outputs)
        return None
    check_resumable(
        experiment, record, "Ray Tune experiment", "tune.resume=false (a new experiment folder)", applied_after
    )
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
    cfg = _with_absolute_paths(cfg)  # Ray runs each trial in its own folder
    outputs = paths(cfg).outputs
    tokenizer = load_tokenizer(cfg)
    train_ds = load_split(cfg, "train", tokenizer)  # fail here, clearly, not in every trial
    # What determines the search (its space, ASHA, the training settings, the data and base model): a resume
    # must continue the same search, never relabel another one's results.
    record = run_record(cfg, (*RUN_SECTIONS, "tune"), adapter_inputs(cfg, tokenizer))
    total_steps = _trial_steps(cfg, train_ds)
    # refused here, before Ray starts
    experiment = _restorable(outputs, record, _applied_after(cfg)) if cfg.tune.resume else None
    with keep_sigterm_handler():  # SIGTERM stays medqa's graceful stop, not Ray's exit (medqa.faults)
        started = _init_ray(cfg)
    try:
        if experiment is None:
            experiment = _new_experiment(outputs, record)
        tuner = _tuner(cfg, experiment, total_steps, callbacks)
        grid = _fit(tuner, experiment)
        write_run_record(experiment, {**record, "finished": True})
    finally:
        if started:
            _stop_ray()
    return summarize(cfg, grid, experiment)


def _trial_steps(cfg: Config, train_ds) -> int:
    """`search_steps`, warning when the trials may plan other step counts than ASHA does."""
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
    return total_steps


def _new_experiment(outputs: Path, record: dict) -> Path:
    """A new experiment folder, outputs/ray_<timestamp>/, holding the search's run record."""
    experiment = outputs / f"ray_{time.strftime('%Y%m%d-%H%M%S')}"
    experiment.mkdir(parents=True)
    write_run_record(experiment, record)
    return experiment


def _tuner(cfg: Config, experiment: Path, total_steps: int, callbacks: list | None):
    """The Ray Tuner of `experiment`: restored with tune.resume=true when Ray can, else a new search."""
    from ray import tune as rt

    trainable = rt.with_resources(
        rt.with_parameters(run_trial, base=cfg.to_dict(), experiment_dir=str(experiment)),
        {"cpu": cfg.tune.cpus_per_trial, "gpu": cfg.tune.gpus_per_trial},
    )
    if cfg.tune.resume and rt.Tuner.can_restore(str(experiment)):
        log.info("tune: restoring %s", experiment)
        with damaged(experiment, RESTART, writer="Ray Tune"):
            return rt.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
    return rt.Tuner(
        trainable,
        param_space=search_space(cfg),
        tune_config=tune_config(cfg, total_steps),
        run_config=rt.RunConfig(
            name=experiment.name,
            storage_path=str(paths(cfg).outputs),
            callbacks=callbacks,
            failure_config=rt.FailureConfig(max_failures=cfg.tune.max_failures),
            checkpoint_config=rt.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=metric(cfg), checkpoint_score_order="min"
            ),
            verbose=1,
        ),
    )


def _fit(tuner, experiment: Path):
    """Run the search; a SIGTERM or Ctrl-C stops it the way Tune does (its state kept) and raises `Interrupted`."""
    with SearchStop() as stop:  # SIGTERM: Tune's own graceful stop, as Ctrl-C (medqa.faults)
        grid = tuner.fit()
    if stop.signum is not None:
        raise Interrupted(
            f"stopped by {signal.Signals(stop.signum).name}: Ray Tune stopped the trials and kept the "
            f"experiment's state in {experiment}; run again with tune.resume=true to continue it.",
            stop.signum,
        )
    return grid


def _stop_ray() -> None:
    """Disconnect from Ray (a local Ray stops, a cluster keeps running) and remove the temp dirs `_init_ray` made."""
    import ray

    ray.shutdown()
    while _TEMP_DIRS:
        shutil.rmtree(_TEMP_DIRS.pop(), ignore_errors=True)


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
    stored = check_resumable(
        experiment, record, "Ray Tune experiment", "medqa tune (a new search)", _applied_after(cfg)
    )
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
