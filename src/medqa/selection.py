"""Which adapter to keep: one rule, by its gain and by what it keeps (`tune.objective`).

The same rule picks the best checkpoint of a training run (the Trainer's `metric_for_best_model` is
`eval_objective`, which `AnswerLossTrainer.evaluate` computes with `Rule.value`), the checkpoint Ray keeps per
trial, what ASHA prunes on (each trial reports `val_objective`), the best trial of a search and the point of the
frontier (`choose`).

A candidate is a dict: `answer_loss` (val, nats per answer token) and, where measured on the PubMedQA dev
questions against the base model on the same questions, `knowledge_change` (accuracy, adapter minus base),
`abstract_change` (abstract loss, adapter / base - 1: > 0 forgot) and `abstract_delta` (the same in nats per
token). `tune.knowledge_measure` says which of them "knowledge kept" means: abstract_loss (default: a paired,
continuous measure whose interval is a fraction of a percent on 100 abstracts, where 100 questions' accuracy moves
by about 4 points from noise alone), pubmedqa, or both. Lower values are better:

- answer_loss:                  answer_loss
- answer_loss_within_knowledge: answer_loss for a candidate within the limits (accuracy drop at most
  tune.max_knowledge_drop, abstract loss rise at most tune.max_abstract_loss_rise); an ineligible one gets
  INELIGIBLE + MISS_SCALE x its miss (how far beyond the limits) on top, so every eligible candidate ranks before
  every ineligible one, near misses before far ones, and equal misses by answer_loss. With none eligible the
  choice is the nearest miss (`choose` warns), never the most forgetful.
- weighted:                     answer_loss + tune.knowledge_weight x abstract_change (relative) - tune.accuracy_weight
  x knowledge_change, each term where the measure uses it. The defaults make each limit cost what fine-tuning gains
  on the real demo (about 0.5 nats per answer token): 25 x a 2% abstract-loss rise, 10 x a 5-point accuracy drop.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

from medqa.schema import Config, TuneConfig

log = logging.getLogger(__name__)

# Added to an ineligible candidate's answer_loss: more than any spread of answer losses (uniform guessing over a
# 250k-token vocabulary is 12.4 nats; an untrained tiny model's loss stays below 100), so ranks never mix.
INELIGIBLE = 10_000.0
# Per unit of miss (a fraction: 0.01 = one accuracy point, or 1% of abstract loss, beyond the limit): a miss of
# 0.0001 outweighs any spread of answer losses, so misses rank first and answer_loss only breaks ties.
MISS_SCALE = 1_000_000.0
# Accuracies are k / n: a drop equal to the limit must count as within it despite float rounding.
_TOLERANCE = 1e-9


_DEFAULT = TuneConfig()  # the defaults live in medqa.schema only


@dataclass(frozen=True)
class Rule:
    """tune.objective with its parameters; each default is the config's (`Rule()`: lowest answer loss)."""

    objective: str = _DEFAULT.objective
    knowledge_measure: str = _DEFAULT.knowledge_measure
    max_knowledge_drop: float = _DEFAULT.max_knowledge_drop
    max_abstract_loss_rise: float = _DEFAULT.max_abstract_loss_rise
    knowledge_weight: float = _DEFAULT.knowledge_weight
    accuracy_weight: float = _DEFAULT.accuracy_weight

    @classmethod
    def of(cls, cfg: Config) -> Rule:
        t = cfg.tune
        return cls(
            t.objective,
            t.knowledge_measure,
            t.max_knowledge_drop,
            t.max_abstract_loss_rise,
            t.knowledge_weight,
            t.accuracy_weight,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def uses_knowledge(self) -> bool:
        return self.objective != "answer_loss"

    @property
    def uses_accuracy(self) -> bool:
        return self.uses_knowledge and self.knowledge_measure in ("pubmedqa", "both")

    @property
    def uses_abstract(self) -> bool:
        return self.uses_knowledge and self.knowledge_measure in ("abstract_loss", "both")

    @property
    def drop_limit(self) -> float | None:
        """The largest allowed accuracy drop, where the rule has one (for plots)."""
        return (
            self.max_knowledge_drop if self.objective == "answer_loss_within_knowledge" and self.uses_accuracy else None
        )

    def miss(self, candidate: dict) -> float:
        """How far beyond the limits a candidate is (0: within them): the accuracy drop beyond
        tune.max_knowledge_drop plus the relative abstract-loss rise beyond tune.max_abstract_loss_rise, for the
        measures the rule uses."""
        total = 0.0
        if self.uses_accuracy:
            change = _need(candidate, "knowledge_change", self)
            total += max(0.0, -change - self.max_knowledge_drop - _TOLERANCE)
        if self.uses_abstract:
            change = _need(candidate, "abstract_change", self)
            total += max(0.0, change - self.max_abstract_loss_rise - _TOLERANCE)
        return total

    def eligible(self, candidate: dict) -> bool:
        """Within the limits (always true for the rules without limits)."""
        if self.objective != "answer_loss_within_knowledge":
            return True
        if not all(_known(candidate.get(k)) for k in self._needed()):
            return False
        return self.miss(candidate) == 0.0

    def value(self, candidate: dict) -> float:
        """The objective of one candidate (lower is better)."""
        loss = float(candidate["answer_loss"])
        if self.objective == "answer_loss":
            return loss
        if self.objective == "weighted":
            if self.uses_abstract:
                loss += self.knowledge_weight * _need(candidate, "abstract_change", self)
            if self.uses_accuracy:
                loss -= self.accuracy_weight * _need(candidate, "knowledge_change", self)
            return loss
        miss = self.miss(candidate)
        return loss + (INELIGIBLE + MISS_SCALE * miss if miss > 0 else 0.0)

    def _needed(self) -> list[str]:
        return (["knowledge_change"] if self.uses_accuracy else []) + (
            ["abstract_change", "abstract_delta"] if self.uses_abstract else []
        )

    def describe(self) -> str:
        limits = " and ".join(
            ([f"PubMedQA dev accuracy fell by at most {self.max_knowledge_drop:g}"] if self.uses_accuracy else [])
            + ([f"abstract loss rose by at most {self.max_abstract_loss_rise:.0%}"] if self.uses_abstract else [])
        )
        if self.objective == "answer_loss_within_knowledge":
            return f"lowest val answer_loss among adapters whose {limits} against the base model"
        if self.objective == "weighted":
            terms = ([f"{self.knowledge_weight:g} x relative abstract loss change"] if self.uses_abstract else []) + (
                [f"{self.accuracy_weight:g} x PubMedQA dev accuracy drop"] if self.uses_accuracy else []
            )
            return "lowest val answer_loss + " + " + ".join(terms)
        return "lowest val answer_loss"


# What a candidate may carry about knowledge (see the module docstring).
KNOWLEDGE_KEYS = ("knowledge_change", "abstract_change", "abstract_delta")


def candidate(row: dict, answer_loss_key: str = "answer_loss", prefix: str = "") -> dict:
    """A logged row as the rule compares it: a Trainer evaluation (prefix "eval_"), a trial's row
    (answer_loss_key "best_val_answer_loss") or a frontier point ("val_answer_loss"); unmeasured fields left out."""
    out = {"answer_loss": row.get(prefix + answer_loss_key)}
    out.update({k: row[prefix + k] for k in KNOWLEDGE_KEYS if row.get(prefix + k) is not None})
    return out


@dataclass
class Choice:
    index: int  # into the candidates
    eligible: bool  # False: no candidate was within the limits; the nearest miss was chosen
    message: str


def choose(candidates: list[dict], rule: Rule, what: str = "trial") -> Choice:
    """The best of `candidates` (dicts as in the module docstring): the lowest `rule.value`, the first of equals.
    With no candidate eligible, says so: the value's ordering already gives the nearest miss."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    values = [rule.value(c) for c in candidates]
    best = min(range(len(values)), key=values.__getitem__)
    if any(rule.eligible(c) for c in candidates):
        return Choice(best, True, f"{what} chosen by {rule.describe()}")
    message = (
        f"No {what} kept its knowledge within the limits ({rule.describe().split('whose ', 1)[-1]}): chose the "
        f"nearest miss (beyond the limits by {rule.miss(candidates[best]):.4f}; accuracy change "
        f"{_show(candidates[best].get('knowledge_change'), '+.3f')}, abstract loss change "
        f"{_show(candidates[best].get('abstract_change'), '+.2%')}). Allow more with tune.max_knowledge_drop / "
        "tune.max_abstract_loss_rise, or search gentler settings (lower learning rate, fewer steps, smaller "
        "lora.r), or let the frontier scale the adapters back (tune.frontier_alphas)."
    )
    log.warning(message)
    return Choice(best, False, message)


def _need(candidate: dict, key: str, rule: Rule) -> float:
    value = candidate.get(key)
    if not _known(value):
        raise ValueError(
            f"tune.objective={rule.objective} with tune.knowledge_measure={rule.knowledge_measure} needs {key} "
            "from the PubMedQA dev questions (scoring.knowledge_questions > 0)."
        )
    return float(value)


def _known(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def _show(x, spec: str) -> str:
    return format(x, spec) if _known(x) else "-"
