"""When a speed-up cannot run here, the run goes on without it: one warning, and a record in the metrics.

Each GPU optimisation (torch.compile of the training step, CUDA graphs, FlexAttention, the memory-sized token
budget, fused AdamW, static-cache generation) has a plain path that computes the same numbers more slowly. A
failure of the optimised path switches to the plain one; a failure of the plain path is a real error and is
raised as it is. The records end up in `metrics.json` (`training.fallbacks`) and `report.json` (`fallbacks`), so
a slow run says why it was slow.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class Fallbacks:
    """The optimisations that fell back in one run: [{"optimisation", "reason", "instead"}], one per optimisation."""

    def __init__(self):
        self.records: list[dict] = []

    def record(self, optimisation: str, error: BaseException | str, instead: str) -> None:
        """Note that `optimisation` failed with `error` and `instead` runs; warn once per optimisation."""
        if any(r["optimisation"] == optimisation for r in self.records):
            return
        reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        reason = " ".join(reason.split())[:500]  # one line: a compiler error can be pages long
        self.records.append({"optimisation": optimisation, "reason": reason, "instead": instead})
        log.warning(
            '%s failed (%s); running %s instead: slower, the same numbers. Recorded under "fallbacks" in the metrics.',
            optimisation,
            reason,
            instead,
        )
