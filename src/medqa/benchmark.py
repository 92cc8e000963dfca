"""Stage 4c, `benchmark(cfg)`: the standard benchmarks through lm-evaluation-harness (PyPI `lm-eval`, MIT).

Runs the tasks in `evaluate.benchmarks` on the base model, the `medqa train` adapter and the best trial (whichever
exist), each loaded once by medqa in the one scoring dtype and handed to lm-eval's HF wrapper as a model instance
(no second load, no merge). `pubmedqa_local` is lm-eval's own `pubmedqa` task (its YAML included as is) pointed at
the PubMedQA test questions shipped in data/pubmedqa/, so it runs offline; any other name is an lm-eval task or
group whose data comes from the Hub or the datasets cache.

Writes under outputs/benchmarks/: `<model>/results.json` and `<model>/samples_<task>.jsonl` (lm-eval's per-question
log), `tasks/` (the local task) and `summary.json`: per task and metric the score and stderr of each model, and
each fine-tuned model's change against the base with a paired bootstrap over the logged per-question results.
`medqa evaluate` puts that table in the report ("Knowledge kept").
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medqa.artifacts import atomic_dir, write_json
from medqa.batching import eval_tokens_per_batch
from medqa.errors import ConfigError, MedqaError
from medqa.locks import locked
from medqa.metrics import paired_bootstrap
from medqa.modeling import load_adapter_model, load_model, load_tokenizer, model_path, scoring_dtype
from medqa.pubmedqa import DEFAULT_TEST as DEFAULT_PUBMEDQA
from medqa.pubmedqa import check_no_dev_overlap
from medqa.pubmedqa import load_items as load_pubmedqa
from medqa.pubmedqa import subset as pubmedqa_subset
from medqa.report_markdown import benchmark_rows
from medqa.schema import Config
from medqa.workdir import adapter_inputs, candidate_adapters, paths

log = logging.getLogger(__name__)

LOCAL_PUBMEDQA = "pubmedqa_local"
NOT_METRICS = {"alias", "samples", "name", "sample_len", "sample_count"}


class BenchmarkDataError(MedqaError):
    """A benchmark task whose data cannot be loaded (offline and not cached, or an unknown task)."""


@dataclass
class BenchmarkResult:
    summary: dict
    out_dir: Path

    def table(self) -> str:
        return "\n".join(benchmark_rows(self.summary))


@locked("benchmark")
def benchmark(cfg: Config) -> BenchmarkResult:
    """Run the lm-eval tasks on every available model; write per-question logs, results and the summary."""
    start = time.perf_counter()
    names = list(cfg.evaluate.benchmarks)
    if not names:
        raise ConfigError(
            "evaluate.benchmarks is empty: name the lm-eval tasks to run, e.g. "
            "`medqa benchmark --config configs/demo.yaml evaluate.benchmarks=[pubmedqa_local]`."
        )
    out = paths(cfg).benchmarks
    task_manager = build_task_manager(cfg, out / "tasks")
    check_tasks(names, task_manager)  # every task's data, before a model is loaded
    tokenizer = load_tokenizer(cfg)
    expected = adapter_inputs(cfg, tokenizer)
    runs, seconds = {}, {}
    for name, adapter in candidate_adapters(cfg).items():
        model = load_model(cfg) if adapter is None else load_adapter_model(cfg, adapter, expected)
        t0 = time.perf_counter()
        runs[name] = run_tasks(cfg, model, tokenizer, names, task_manager)
        seconds[name] = round(time.perf_counter() - t0, 2)
        write_run(out / slug(name), runs[name])
        log.info("benchmark: %s done in %.1f s", name, seconds[name])
        del model
    summary = summarize(cfg, runs, seconds, {n: str(a) if a else None for n, a in candidate_adapters(cfg).items()})
    # the table as markdown rows, kept in summary.json for its readers; report.md renders it from `models` itself
    summary["table"] = benchmark_rows(summary)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    write_json(out / "summary.json", summary)
    return BenchmarkResult(summary, out)


# ------------------------------------------------------------------------------------------------- tasks


def write_local_pubmedqa(cfg: Config, folder: Path) -> Path:
    """lm-eval's `pubmedqa` YAML, included unchanged, with the data pointed at a local JSON-lines file of the chosen
    questions in PubMedQA's own field names (QUESTION, CONTEXTS, final_decision), so its doc_to_text applies."""
    import lm_eval.tasks

    source = cfg.evaluate.pubmedqa_file or DEFAULT_PUBMEDQA
    items = load_pubmedqa(source)
    check_no_dev_overlap(items, source)  # the dev questions chose the adapter: never a reported figure
    if cfg.evaluate.benchmark_questions:  # the questions evaluate.pubmedqa_questions would pick (a prefix is all "yes")
        items = pubmedqa_subset(items, cfg.evaluate.benchmark_questions, cfg.seed)
    folder.mkdir(parents=True, exist_ok=True)
    docs = folder / "pubmedqa_local.jsonl"
    docs.write_text(
        "".join(
            json.dumps(
                {
                    "id": str(x.get("id", i)),
                    "QUESTION": x["question"],
                    "CONTEXTS": x["contexts"],
                    "final_decision": x["answer"],
                }
            )
            + "\n"
            for i, x in enumerate(items)
        ),
        encoding="utf-8",
    )
    upstream = Path(lm_eval.tasks.__file__).parent / "pubmedqa" / "pubmedqa.yaml"
    (folder / "pubmedqa_local.yaml").write_text(
        f"# Written by medqa benchmark: lm-eval's pubmedqa task on {len(items)} local questions.\n"
        f"include: {json.dumps(str(upstream))}\n"
        f"task: {LOCAL_PUBMEDQA}\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(docs.resolve()))}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\n",
        encoding="utf-8",
    )
    return folder


def build_task_manager(cfg: Config, folder: Path):
    """lm-eval's task index with the local task folder on its include path; lm-eval's own tasks are indexed only
    when a name needs them (indexing its ~14,000 YAML files takes ~20 s on one CPU core)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MedqaError(
            "`medqa benchmark` needs lm-evaluation-harness: pip install 'lm-eval==0.4.13' (or "
            "pip install -e '.[benchmarks]'; `make setup` installs it)."
        ) from None

    builtin = any(name != LOCAL_PUBMEDQA for name in cfg.evaluate.benchmarks)
    return TaskManager(include_path=str(write_local_pubmedqa(cfg, folder)), include_defaults=builtin)


def check_tasks(names: list[str], task_manager) -> None:
    """Stop with one paragraph when a name is not an lm-eval task, or its data cannot be loaded (offline and not
    in the datasets cache), before any model is loaded. Loading here also fills the cache the runs then read."""
    from lm_eval.tasks import get_task_dict

    unknown = [n for n in names if n not in task_manager.all_tasks]
    if unknown:
        import difflib

        near = difflib.get_close_matches(unknown[0], task_manager.all_tasks, n=3)
        raise BenchmarkDataError(
            f"evaluate.benchmarks: {unknown[0]!r} is not an lm-evaluation-harness task or group"
            f"{f' (did you mean {near}?)' if near else ''}. `lm-eval ls tasks` lists them; "
            f"{LOCAL_PUBMEDQA} is the shipped PubMedQA test split, offline."
        )
    for name in names:
        try:
            get_task_dict([name], task_manager)
        except Exception as exc:  # datasets/huggingface_hub raise many types for "no network and no cache"
            raise BenchmarkDataError(
                f"evaluate.benchmarks: the data of lm-eval task {name!r} could not be loaded "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Offline "
                "(HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1, as make sets them) a Hub task runs only when its data "
                "set is already in the datasets cache (HF_HOME): run it once with network (HF_DATASETS_OFFLINE=0 "
                f"HF_HUB_OFFLINE=0 medqa benchmark ...), or use {LOCAL_PUBMEDQA}, which needs none."
            ) from None


# ------------------------------------------------------------------------------------------------- runs


def run_tasks(cfg: Config, model, tokenizer, names: list[str], task_manager) -> dict:
    """lm-eval's simple_evaluate on an already-loaded model: per-question samples logged, log-softmax in fp32
    (as medqa's token_nll), batches sized by `request_batch_size` (lm-eval sorts them longest first)."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    window = getattr(model.config, "max_position_embeddings", None)
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=request_batch_size(cfg, model, window),
        max_length=window,
        softmax_dtype=torch.float32,
    )
    limit = cfg.evaluate.benchmark_questions or None
    per_task_limit = {n: None if n == LOCAL_PUBMEDQA else limit for n in names}  # local: already the subset
    results = {}
    for name in names:  # one call per task: the local task is already cut to its questions, the others by limit
        out = simple_evaluate(
            model=lm,
            tasks=[name],
            task_manager=task_manager,
            limit=per_task_limit[name],
            log_samples=True,
            bootstrap_iters=cfg.scoring.bootstrap_samples,
            random_seed=cfg.seed,
            numpy_random_seed=cfg.seed,
            torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed,
        )
        for key in ("results", "groups", "higher_is_better", "n-samples", "versions", "samples", "configs"):
            results.setdefault(key, {}).update(out.get(key) or {})
    results["dtype"] = scoring_dtype(cfg)
    return results


def request_batch_size(cfg: Config, model, window: int | None) -> int:
    """Requests per lm-eval batch: as many as the scoring token budget holds at the longest a request can be (the
    model's window), so a GPU batches as `medqa.metrics` scoring does (e.g. 131k tokens / 1,024 = 128 requests);
    scoring.batch_size where there is no budget (CPU) or when that is larger."""
    budget = eval_tokens_per_batch(cfg.scoring.tokens_per_batch, model)
    return max(cfg.scoring.batch_size, budget // window if budget and window else 0)


def slug(name: str) -> str:
    """A folder name for a model name: "tuned (best trial)" -> "tuned-best-trial"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_run(folder: Path, run: dict) -> None:
    """`results.json` and one `samples_<task>.jsonl` per task (lm-eval's per-question log), atomically."""
    from lm_eval.utils import handle_non_serializable

    with atomic_dir(folder) as tmp:
        rest = {k: v for k, v in run.items() if k != "samples"}
        (tmp / "results.json").write_text(
            json.dumps(rest, indent=2, default=handle_non_serializable) + "\n", encoding="utf-8"
        )
        for task, samples in run["samples"].items():
            (tmp / f"samples_{task}.jsonl").write_text(
                "".join(json.dumps(s, default=handle_non_serializable) + "\n" for s in samples), encoding="utf-8"
            )


# ------------------------------------------------------------------------------------------------- summary


def task_metrics(run: dict) -> dict[str, dict]:
    """task -> {metric: {"value", "stderr"}} from lm-eval's results ("acc,none" and "acc_stderr,none" keys)."""
    table = {}
    for task, row in run["results"].items():
        for key, value in row.items():
            metric, _, filt = key.partition(",")
            if metric in NOT_METRICS or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = row.get(f"{metric}_stderr,{filt}")
            table.setdefault(task, {})[metric if filt in ("", "none") else key] = {
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            }
    return table


def per_question(run: dict, task: str, metric: str) -> dict:
    """doc_id -> the metric's per-question value from the logged samples (those that log one: acc, acc_norm, ...)."""
    return {
        s["doc_id"]: float(s[metric])
        for s in run.get("samples", {}).get(task, [])
        if isinstance(s.get(metric), (int, float))
    }


def summarize(cfg: Config, runs: dict, seconds: dict, adapters: dict) -> dict:
    """Scores per model, and per fine-tuned model the change against the base: delta = model - base on the same
    questions, its 95% paired-bootstrap interval and p_lost, the share of resamples in which the model is not worse
    (small p: fine-tuning cost that score). Group rows (aggregates) get the change without a test."""
    models = {
        name: {
            "adapter": adapters.get(name),
            "dir": slug(name),
            "seconds": seconds.get(name),
            "tasks": task_metrics(run),
            "questions": {t: int(n.get("effective", 0)) for t, n in run.get("n-samples", {}).items()},
        }
        for name, run in runs.items()
    }
    base = runs.get("base")
    for name, run in runs.items():
        if name == "base" or base is None:
            continue
        vs = {}
        for task, metrics in models[name]["tasks"].items():
            higher = run.get("higher_is_better", {}).get(task, {})
            for metric, score in metrics.items():
                b_score = models["base"]["tasks"].get(task, {}).get(metric)
                if b_score is None:
                    continue
                a, b = per_question(base, task, metric), per_question(run, task, metric)
                common = sorted(set(a) & set(b))
                entry = {"delta": score["value"] - b_score["value"], "delta_ci95": None, "p_lost": None}
                if common and len(common) == len(a) == len(b):
                    sign = 1.0 if higher.get(metric, True) else -1.0  # loss-like metrics: a rise is the loss
                    x = sign * np.array([a[i] for i in common])
                    y = sign * np.array([b[i] for i in common])
                    test = paired_bootstrap(x, y, np.ones(len(common)), cfg.scoring.bootstrap_samples, cfg.seed)
                    ci = test["loss_delta_ci95"]
                    entry.update(
                        delta=sign * test["loss_delta"],
                        delta_ci95=sorted([sign * ci[0], sign * ci[1]]) if ci else None,
                        p_lost=test["p_value"],
                    )
                vs.setdefault(task, {})[metric] = entry
        models[name]["vs_base"] = vs
    import lm_eval

    return {
        "tasks": list(cfg.evaluate.benchmarks),
        "lm_eval": lm_eval.__version__,
        "model": model_path(cfg),
        "dtype": scoring_dtype(cfg),
        "bootstrap_samples": cfg.scoring.bootstrap_samples,
        "models": models,
    }
