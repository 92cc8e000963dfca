"""Knowledge kept: an adapter's PubMedQA dev scores beside the base model's on the same questions.

`Probe.measure` gives what `medqa.selection` compares (`knowledge_change`: accuracy, adapter minus base;
`abstract_delta` and `abstract_change`: the abstract loss, in nats per token and relative) from one
`medqa.pubmedqa.score_knowledge` pass of the adapter. The base model's scores are computed once per workdir and
kept in `.cache/knowledge/` (JSON, never pickles), keyed by the base model's files, the questions, the window and
the precision they were scored in: every evaluation of every trial, and the frontier, read the same numbers
instead of scoring the base again. A file lock lets concurrent trials share the one computation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medqa.artifacts import write_json
from medqa.pubmedqa import PubMedQAScores, abstract_loss, accuracy, dev_questions, score_knowledge
from medqa.schema import Config
from medqa.workdir import Workdir, adapter_inputs

log = logging.getLogger(__name__)


def choice_loss(scores: PubMedQAScores) -> float:
    """Mean over questions of -log p(gold | the three choices): the cross-entropy of the labelled answer among
    " yes", " no" and " maybe" (their log-likelihoods renormalised), a continuous, paired companion of accuracy."""
    ll = scores.loglik
    logz = np.logaddexp.reduce(ll, axis=1)
    return float(np.mean(logz - ll[np.arange(len(ll)), scores.gold]))


def compare(now: PubMedQAScores, base: PubMedQAScores) -> dict:
    """The knowledge fields of a candidate (`medqa.selection`) and of metrics.jsonl's evaluations."""
    a, b = accuracy(now), accuracy(base)
    out = {
        "knowledge_acc": a["acc"],
        "knowledge_acc_norm": a["acc_norm"],
        "knowledge_base_acc": b["acc"],
        "knowledge_base_acc_norm": b["acc_norm"],
        "knowledge_change": a["acc"] - b["acc"],
        "choice_loss": choice_loss(now),
        "choice_delta": choice_loss(now) - choice_loss(base),
    }
    if now.ids != base.ids:
        raise ValueError("knowledge scores of different questions cannot be compared")
    if now.text_nll is not None and base.text_nll is not None:
        if not np.array_equal(now.text_tokens, base.text_tokens):
            raise ValueError("abstract losses over different tokens cannot be compared (another tokenizer?)")
        loss, base_loss = abstract_loss(now), abstract_loss(base)
        out.update(
            abstract_loss=loss,
            abstract_base_loss=base_loss,
            abstract_delta=loss - base_loss,
            abstract_change=loss / base_loss - 1.0,
        )
    return out


@dataclass
class Probe:
    """The knowledge dev questions, how to score them, and where the base model's scores are kept.

    `key`: what identifies the base model's scores beyond the questions (its files' fingerprint and the precision
    path); with `cache_dir` None nothing is kept on disk (scored once per Probe)."""

    items: list[dict]
    batch_size: int = 8
    cache_dir: Path | None = None
    key: dict | None = None
    max_length: int | None = None
    _base: PubMedQAScores | None = None

    def cache_file(self) -> Path | None:
        if self.cache_dir is None:
            return None
        ident = {
            **(self.key or {}),
            "ids": [str(x.get("id")) for x in self.items],
            "max_length": self.max_length,
            "scorer": "score_knowledge-1",
        }
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
        return Path(self.cache_dir) / f"base-{digest}.json"

    def base(self, model, tokenizer) -> PubMedQAScores:
        """The base model's scores: from memory, from the workdir's cache, or computed now with the adapter
        disabled (a peft model) or from `model` itself (a plain base model)."""
        if self._base is not None:
            return self._base
        path = self.cache_file()
        lock = contextlib.nullcontext()
        if path is not None:
            from filelock import FileLock

            path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(path) + ".lock")
        with lock:
            cached = _read(path) if path is not None else None
            if cached is not None and cached.ids == [str(x.get("id", i)) for i, x in enumerate(self.items)]:
                self._base = cached
                return cached
            disabled = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
            with disabled:
                self._base = score_knowledge(model, tokenizer, self.items, self.batch_size, self.max_length)
            if path is not None:
                _write(path, self._base)
                log.info("knowledge: the base model's scores on %d dev questions kept in %s", len(self.items), path)
        return self._base

    def scores(self, model, tokenizer) -> PubMedQAScores:
        return score_knowledge(model, tokenizer, self.items, self.batch_size, self.max_length)

    def measure(self, model, tokenizer) -> dict:
        """The model's knowledge fields against the base model's (see `compare`)."""
        return compare(self.scores(model, tokenizer), self.base(model, tokenizer))


def knowledge_probe(cfg: Config, tokenizer, precision: str, questions: int | None = None) -> Probe | None:
    """The knowledge dev questions (scoring.knowledge_questions, or `questions`) with the workdir's cache of the
    base model's scores on them; None when there are none. `precision`: the dtype the base is scored in."""
    n = cfg.scoring.knowledge_questions if questions is None else questions
    if not n:
        return None
    return Probe(
        dev_questions(n, cfg.seed),
        cfg.scoring.batch_size,
        Workdir.of(cfg).knowledge_cache,
        # the model files, the tokenizer (and data), and the precision path the base is held in
        {**adapter_inputs(cfg, tokenizer), "precision": precision, "qlora": cfg.train.qlora},
    )


def _write(path: Path, s: PubMedQAScores) -> None:
    write_json(
        path,
        {
            "ids": s.ids,
            "gold": s.gold.tolist(),
            "loglik": s.loglik.tolist(),
            "choice_chars": s.choice_chars.tolist(),
            "choice_bytes": s.choice_bytes.tolist(),
            "text_nll": s.text_nll.tolist(),
            "text_tokens": s.text_tokens.tolist(),
        },
    )


def _read(path: Path) -> PubMedQAScores | None:
    """The cached scores, or None when missing or unreadable (then they are computed again and rewritten)."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return PubMedQAScores(
            [str(x) for x in d["ids"]],
            np.array(d["gold"], dtype=int),
            np.array(d["loglik"], dtype=float),
            np.array(d["choice_chars"], dtype=float),
            np.array(d["choice_bytes"], dtype=float),
            np.array(d["text_nll"], dtype=float),
            np.array(d["text_tokens"], dtype=np.int64),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
