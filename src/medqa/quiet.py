"""Notebooks that show results, not library chatter: `quiet_libraries()`, one line in each notebook's setup cell.

A notebook shows what a run found and medqa's own progress (its INFO lines, tqdm bars). The libraries under it
print lines a reader can do nothing about: Ray's "Experiment state snapshotting has been triggered multiple
times" (six times a search: a snapshot is forced after every checkpoint because medqa keeps one per trial,
`CheckpointConfig(num_to_keep=1)`, on purpose), lm-eval's per-task INFO lines and its warning that `pretrained`
is not a string (medqa passes a loaded model on purpose), absl's "Using default tokenizer." from rouge-score,
httpx's request lines from Gradio, transformers' "Token indices sequence length is longer than the specified
maximum" (a whole PubMedQA context tokenized before it is cut to the model's length, as it then is). Those are
silenced here: a library's INFO lines by its logger's level, the named warnings by a filter on the logger that
emits them. Every other warning stays (a model that does not fit, lm-eval truncating a context from the left, a
deprecation the project must act on), and medqa's loggers are left as they are. Ray Tune's own status table
comes from `tune.tune`'s `RunConfig(verbose=1)`: the trials and their metrics.
"""

from __future__ import annotations

import logging
import os

# logger -> level: INFO lines from these are the library talking to itself.
LEVELS: dict[str, int] = {
    "ray": logging.WARNING,  # "Missing packages: ['ipywidgets']", "Started a local Ray instance"
    "lm_eval": logging.WARNING,  # "Selected tasks", "Building contexts", "Setting random seed" per model
    "absl": logging.WARNING,  # rouge-score: "Using default tokenizer." per scoring call
    "httpx": logging.WARNING,  # Gradio's requests to its own server
    "datasets": logging.WARNING,
    "transformers": logging.WARNING,
    "matplotlib": logging.WARNING,  # "generated new fontManager", once per machine
}
# logger -> messages (a part of each) that it warns about and that no reader can act on here.
DROPPED: dict[str, tuple[str, ...]] = {
    "lm_eval.models.huggingface": (
        "`pretrained` model kwarg is not of type `str`",  # medqa hands lm-eval the model it already loaded
        "Passed an already-initialized model through `pretrained`",
    ),
    "ray.tune.execution.experiment_state": ("Experiment state snapshotting has been triggered",),
    # a whole PubMedQA context tokenized before lm-eval (or medqa) cuts it to the model's length, as it then does
    "transformers.tokenization_utils_base": ("Token indices sequence length is longer than the specified maximum",),
}
# Environment read by the libraries at run time (set only where the user has not set them).
ENVIRONMENT = {
    # Ray's own switch for the snapshot warning above (0 = off), read by the driver when the search starts
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_DEDUP_LOGS": "1",  # a line repeated by each trial's worker shown once
}


class _Drop(logging.Filter):
    """Drops records whose message contains one of `parts`."""

    def __init__(self, parts: tuple[str, ...]):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in self.parts)


def quiet_libraries() -> None:
    """Set the libraries' log levels, drop their known unactionable warnings and set Ray's environment, so that a
    notebook shows medqa's progress and results. Calling it again changes nothing."""
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    # Importing ray sets its logger to INFO (once, in ray._private.log): import it first so the level below holds.
    import ray  # noqa: F401

    for name, level in LEVELS.items():
        logging.getLogger(name).setLevel(level)
    for name, parts in DROPPED.items():
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _Drop)]:
            logger.removeFilter(old)
        logger.addFilter(_Drop(parts))
