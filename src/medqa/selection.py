"""Which adapter to keep: one rule, by its gain and by what it keeps (`tune.objective`).

The same rule picks the best checkpoint of a training run (the Trainer's `metric_for_best_model` is
`eval_objective`, which `AnswerLossTrainer.evaluate` computes with `objective_value`), the checkpoint Ray keeps per
trial, what ASHA prunes on (each trial reports `val_objective`), and the best trial of a search (`choose`).

Lower is better, in nats per answer token (val answer_loss), with `knowledge_change` = PubMedQA dev accuracy of
the adapter minus the base model's on the same questions (negative: forgotten):

- answer_loss:                  answer_loss
- answer_loss_within_knowledge: answer_loss, plus INELIGIBLE when knowledge_change < -tune.max_knowledge_drop.
  Every eligible candidate therefore ranks before every ineligible one, and among ineligible ones the order is
  plain answer_loss: with none eligible the rule falls back to lowest answer_loss (`choose` warns).
- weighted:                     answer_loss - tune.knowledge_weight * knowledge_change
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

from medqa.schema import Config

log = logging.getLogger(__name__)

# Added to an ineligible candidate's answer_loss: more than any spread of answer losses (uniform guessing over a
# 250k-token vocabulary is 12.4 nats; an untrained tiny model's loss stays below 100), so ranks never mix.
INELIGIBLE = 10_000.0
# Accuracies are k / n: a drop equal to the limit must count as within it despite float rounding.
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Rule:
    """tune.objective with its parameters."""

    objective: str = "answer_loss"
    max_knowledge_drop: float = 0.02
    knowledge_weight: float = 1.0

    @classmethod
    def of(cls, cfg: Config) -> Rule:
        t = cfg.tune
        return cls(t.objective, t.max_knowledge_drop, t.knowledge_weight)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def uses_knowledge(self) -> bool:
        return self.objective != "answer_loss"

    @property
    def drop_limit(self) -> float | None:
        """The largest allowed accuracy drop, where the rule has one (for plots)."""
        return self.max_knowledge_drop if self.objective == "answer_loss_within_knowledge" else None

    def eligible(self, knowledge_change: float | None) -> bool:
        """Within the allowed drop (always true for the rules without a limit)."""
        if self.objective != "answer_loss_within_knowledge":
            return True
        return _known(knowledge_change) and knowledge_change >= -self.max_knowledge_drop - _TOLERANCE

    def value(self, answer_loss: float, knowledge_change: float | None = None) -> float:
        """The objective of one candidate (lower is better)."""
        if self.objective == "answer_loss":
            return float(answer_loss)
        if not _known(knowledge_change):
            raise ValueError(
                f"tune.objective={self.objective} needs the PubMedQA dev accuracy change "
                "(scoring.knowledge_questions > 0)."
            )
        if self.objective == "weighted":
            return float(answer_loss) - self.knowledge_weight * float(knowledge_change)
        return float(answer_loss) + (0.0 if self.eligible(knowledge_change) else INELIGIBLE)

    def describe(self) -> str:
        if self.objective == "answer_loss_within_knowledge":
            return (
                f"lowest val answer_loss among adapters whose PubMedQA dev accuracy fell by at most "
                f"{self.max_knowledge_drop:g} against the base model"
            )
        if self.objective == "weighted":
            return f"lowest val answer_loss - {self.knowledge_weight:g} x PubMedQA dev accuracy change"
        return "lowest val answer_loss"


@dataclass
class Choice:
    index: int  # into the candidates
    eligible: bool  # False: no candidate was eligible, chosen by answer_loss alone
    message: str


def choose(candidates: list[dict], rule: Rule, what: str = "trial") -> Choice:
    """The best of `candidates` (dicts with `answer_loss` and, for the knowledge rules, `knowledge_change`): the
    lowest `rule.value`, the first of equals. With no candidate eligible, says so and falls back to lowest
    answer_loss (which the value's ordering already gives)."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    values = [rule.value(c["answer_loss"], c.get("knowledge_change")) for c in candidates]
    best = min(range(len(values)), key=values.__getitem__)
    eligible = any(rule.eligible(c.get("knowledge_change")) for c in candidates)
    if eligible:
        return Choice(best, True, f"{what} chosen by {rule.describe()}")
    drops = [-c["knowledge_change"] for c in candidates if _known(c.get("knowledge_change"))]
    found = (
        f"kept PubMedQA dev accuracy within {rule.max_knowledge_drop:g} of the base model (the smallest drop "
        f"was {min(drops):.3f})"
        if drops
        else "has a PubMedQA dev score"
    )
    message = (
        f"No {what} {found}: chose the {what} with the lowest val answer_loss instead (as "
        "tune.objective=answer_loss would). Allow more with tune.max_knowledge_drop, or search gentler "
        "settings (lower learning rate, fewer steps, smaller lora.r)."
    )
    log.warning(message)
    return Choice(best, False, message)


def _known(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))
