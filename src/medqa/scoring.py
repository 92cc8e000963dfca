"""The one scoring step of baseline, train and evaluate: a tokenized split's answer loss overall (`medqa.metrics`,
the one definition) and, with data.sources, over each source's examples alone (`medqa.mixing`).

What the step needs from the config and the prepared data is derived once per stage (`Scoring.of`: the scoring
settings, and each split's example id -> source map, read from data/{split}_data.json once, or taken from the
records the stage already holds) and passed down, so scoring three models reads no file again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from medqa.metrics import ExampleScores, evaluate_answer_loss, summarize
from medqa.mixing import paired_source_metrics, source_metrics, source_names
from medqa.schema import Config
from medqa.workdir import load_records, per_example_rows


@dataclass
class Scored:
    """One split's scores: its metrics, per source (None with one source), and the per-example figures the paired
    comparisons need."""

    metrics: dict
    by_source: dict[str, dict] | None
    scores: ExampleScores


@dataclass(frozen=True)
class Scoring:
    """How a stage scores: scoring.batch_size, the bootstrap, the seed, and each split's id -> source map."""

    batch_size: int
    bootstrap_samples: int
    seed: int
    source_names: tuple[str, ...] = ()  # data.sources' names in order; () with data.source alone
    sources: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # split -> example id -> source

    @classmethod
    def of(cls, cfg: Config, splits: Iterable[str], records: Mapping[str, list[dict]] | None = None) -> Scoring:
        """The stage's scoring for `splits`; `records`: splits' records the stage has already read (by split)."""
        names = source_names(cfg)
        held = records or {}
        sources = {
            split: {r["id"]: r["source"] for r in (held[split] if split in held else load_records(cfg, split))}
            for split in (splits if names else ())
        }
        return cls(cfg.scoring.batch_size, cfg.scoring.bootstrap_samples, cfg.seed, names, sources)

    def score(self, model, dataset, pad_id: int, tokens_per_batch: int, split: str | None = None) -> Scored:
        """Score a tokenized set with a progress bar; per source too when it is the split `split` of a run with
        several sources (None: a set outside the prepared splits, e.g. evaluate.external_test)."""
        metrics, scores = evaluate_answer_loss(
            model,
            dataset,
            pad_id,
            self.batch_size,
            self.bootstrap_samples,
            self.seed,
            progress=True,
            tokens_per_batch=tokens_per_batch,
        )
        return Scored(metrics, self.per_source(split, scores), scores)

    def summarize(self, scores: ExampleScores, split: str) -> Scored:
        """Scores already computed (train gathers them across processes), summarized as `score` does."""
        return Scored(summarize(scores, self.bootstrap_samples, self.seed), self.per_source(split, scores), scores)

    def per_source(self, split: str | None, scores: ExampleScores) -> dict[str, dict] | None:
        if split is None or not self.source_names:
            return None
        return source_metrics(self.sources[split], self.source_names, scores, self.bootstrap_samples, self.seed)

    def paired_per_source(self, split: str, base: ExampleScores, tuned: ExampleScores) -> dict[str, dict] | None:
        """The paired bootstrap of tuned vs base answer loss within each source's examples (None: one source)."""
        if not self.source_names:
            return None
        of = self.sources[split]
        return paired_source_metrics(of, self.source_names, base, tuned, self.bootstrap_samples, self.seed)


def split_results(scored: Mapping[str, Scored]) -> tuple[dict, list[dict]]:
    """metrics.json's scores (each split's metrics, and `by_source` per split with several sources) and the
    per-example rows of per_example.jsonl, from each split's `Scored`."""
    results: dict = {}
    rows: list[dict] = []
    for split, s in scored.items():
        results[split] = s.metrics
        rows += per_example_rows(split, s.scores)
        if s.by_source is not None:
            results.setdefault("by_source", {})[split] = s.by_source
    return results, rows
