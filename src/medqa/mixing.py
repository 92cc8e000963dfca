"""Several sources in one run (`data.sources`): how often each source's examples appear in a training epoch, and
every metric per source beside the overall one.

`prepare` writes each kept record's source name into `data/{split}_data.json`; this module reads it back by example
id, so the tokenized splits stay as they are and a one-source run is unchanged.

Weights (LLaMA-Factory's interleave probabilities and axolotl's per-dataset options are the references; here a
weight is a per-example rate, which keeps a small source from being drowned or repeated by accident): a source of
n train examples with weight w contributes floor(w) copies of every example plus a seeded sample of
round((w - floor(w)) x n) of them, without replacement, to each epoch. weight 1 = each example once, 2 = twice,
0.5 = a seeded half. The epoch holds sum over sources of that count, logged and written to metrics.json.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np

from medqa.metrics import ExampleScores, paired_bootstrap, summarize
from medqa.schema import Config
from medqa.sources import source_specs
from medqa.workdir import load_records

log = logging.getLogger(__name__)


def sources_of(cfg: Config, split: str) -> dict[str, str]:
    """Example id -> source name for a split (empty with data.source alone)."""
    if not cfg.data.sources:
        return {}
    return {r["id"]: r["source"] for r in load_records(cfg, split)}


def weighted_epoch(sources: list[str], weights: dict[str, float], seed: int) -> list[int]:
    """Indices into the rows (whose sources are `sources`) making up one epoch, each source at its weight (see the
    module docstring). Deterministic for a seed; sorted, since the Trainer's sampler shuffles."""
    rng = np.random.default_rng(seed)
    picked: list[int] = []
    for name, weight in weights.items():
        rows = [i for i, s in enumerate(sources) if s == name]
        whole, part = math.floor(weight), weight - math.floor(weight)
        picked += rows * whole
        extra = round(part * len(rows))
        if extra:
            picked += sorted(rng.choice(rows, size=extra, replace=False).tolist())
    return sorted(picked)


def epoch_composition(cfg: Config, train_ds) -> tuple[object, dict]:
    """The train split as one epoch sees it under data.sources' weights, and what it holds per source ({} and the
    split unchanged with data.source alone or every weight 1)."""
    specs = source_specs(cfg.data)
    if not cfg.data.sources or all(s.weight == 1 for s in specs):
        return train_ds, {}
    of = sources_of(cfg, "train")
    sources = [of[i] for i in train_ds["id"]]
    idx = weighted_epoch(sources, {s.name: s.weight for s in specs}, cfg.seed)
    composition = {
        s.name: {
            "examples": sources.count(s.name),
            "weight": s.weight,
            "per_epoch": sum(1 for i in idx if sources[i] == s.name),
        }
        for s in specs
    }
    log.info(
        "data.sources weights: an epoch holds %d examples (%s)",
        len(idx),
        ", ".join(f"{n}: {c['per_epoch']} of {c['examples']} x {c['weight']:g}" for n, c in composition.items()),
    )
    return train_ds.select(idx), composition


def subset(scores: ExampleScores, keep: list[bool]) -> ExampleScores:
    mask = np.asarray(keep, dtype=bool)
    return ExampleScores(
        [i for i, k in zip(scores.ids, keep) if k],
        scores.answer_nll[mask],
        scores.answer_tokens[mask],
        scores.sequence_nll[mask],
        scores.sequence_tokens[mask],
    )


def source_names(cfg: Config) -> tuple[str, ...]:
    """data.sources' names in order; () with data.source alone (no per-source figures)."""
    return tuple(spec.name for spec in source_specs(cfg.data)) if cfg.data.sources else ()


def source_metrics(
    of: Mapping[str, str], names: Sequence[str], scores: ExampleScores, samples: int, seed: int
) -> dict[str, dict]:
    """The split's metrics (`metrics.summarize`, the one definition) over each source's examples alone; `of`: the
    split's example id -> source name (`sources_of`)."""
    out = {}
    for name in names if of else []:
        part = subset(scores, [of.get(i) == name for i in scores.ids])
        if part.answer_tokens.sum():
            out[name] = summarize(part, samples, seed)
    return out


def paired_source_metrics(
    of: Mapping[str, str], names: Sequence[str], base: ExampleScores, tuned: ExampleScores, samples: int, seed: int
) -> dict[str, dict]:
    """The paired bootstrap of tuned vs base answer loss within each source's examples."""
    out = {}
    for name in names if of else []:
        keep = np.asarray([of.get(i) == name for i in base.ids], dtype=bool)
        if base.answer_tokens[keep].sum():
            out[name] = paired_bootstrap(
                base.answer_nll[keep], tuned.answer_nll[keep], base.answer_tokens[keep], samples, seed
            )
    return out
