"""The shape of `outputs/chat/feedback.jsonl`: one rating a line, written by the chat page (`record_feedback`) and
read by `medqa feedback` (`read_feedback`); how a blind page orders its two answers; how a model is named.

A line holds the question, each model's earlier turns and answer, the generation settings (and which of them the
page changed from the config's), the doctor's answer when the question came from the test split, which model was
shown as "A" and which as "B" (`order`, drawn from `order_seed` and `order_draw`, and `blind`: whether the names
were hidden until the rating), the rating (`rated`: the model rated, `rated_side`: "A" or "B", `rating`,
`preferred`: the model preferred, None for a tie or "both bad") and the models (`models`: name -> label, folder
relative to the workdir, training step and fingerprint; never an absolute path).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from medqa.manifest import fingerprint_model
from medqa.modeling import model_path
from medqa.schema import Config
from medqa.workdir import paths, read_metrics

BASE, TUNED = "base", "fine-tuned"  # the two models the page compares, by these names in every line
POSITIONS = ("A", "B")
# rating -> the button's text; "tie" and "both bad" prefer neither answer
RATINGS = {
    "better": "this one is better",
    "worse": "this one is worse",
    "tie": "about the same",
    "both bad": "both bad",
}


def model_identity(cfg: Config, adapter: str | Path | None = None) -> dict:
    """What names a model in the page and in feedback.jsonl: {"label", "model", "fingerprint"}, with "adapter" and
    "step" for an adapter. Folders are given relative to the workdir (or by their own name when outside it), never
    as absolute paths: a rating file may be shared."""
    model = workdir_relative(cfg, model_path(cfg))
    if adapter is None:
        return {"label": model, "model": model, "fingerprint": fingerprint_model(model_path(cfg), cfg.model.revision)}
    folder = workdir_relative(cfg, str(adapter))
    step = (read_metrics(Path(adapter)) or {}).get("steps")
    return {
        "label": f"{folder} (step {step})" if step is not None else folder,
        "model": model,
        "adapter": folder,
        "step": step,
        "fingerprint": fingerprint_model(str(adapter)),
    }


def workdir_relative(cfg: Config, name: str | Path) -> str:
    """A folder or file as the page, the feedback file and the summary name it: relative to the workdir, or by its
    own name when outside it (a Hub id, or a path the config gives relatively, as it is)."""
    name = str(name)
    path = Path(name).expanduser()
    if not path.is_absolute():
        return name  # a Hub id or a path as the config gives it
    root = paths(cfg).root.resolve()
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return path.name


def draw_order(seed: int, draw: int, names: tuple[str, str] = (BASE, TUNED)) -> list[str]:
    """The models shown as A and B for the `draw`-th question of a page started with `seed`: the same seed and draw
    give the same order, so a recorded rating can be checked against the order it was shown in."""
    return random.Random(f"{seed}:{draw}").sample(list(names), 2)


@dataclass
class Rating:
    """One rating of a shown question: the turn (question, answers, settings, order), which side was rated, how."""

    turn: dict
    side: str  # "A" or "B"
    rating: str  # a key of RATINGS
    comment: str = ""

    def entry(self, models: dict[str, dict]) -> dict:
        """The line for feedback.jsonl (without its time)."""
        if self.rating not in RATINGS:
            raise ValueError(f"Unknown rating {self.rating!r}: use one of {', '.join(RATINGS)}.")
        order = self.turn["order"]
        rated = order[self.side]
        other = next(name for name in order.values() if name != rated)
        return {
            **self.turn,
            "rated": rated,
            "rated_side": self.side,
            "rating": self.rating,
            "preferred": {"better": rated, "worse": other}.get(self.rating),
            "comment": self.comment.strip(),
            "models": models,
        }


def record_feedback(cfg: Config, entry: dict) -> Path:
    """Append one rating to outputs/chat/feedback.jsonl (one JSON object a line), holding its file lock so
    concurrent writers (two tabs, two servers on one workdir) never interleave a line. A write the OS refuses
    midway (disk full, I/O error) cuts the file back to its earlier ratings before the error goes on: a partial line
    left there would swallow the next rating, appended onto it."""
    from filelock import FileLock

    path, lock = paths(cfg).chat_feedback, paths(cfg).chat_feedback_lock
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **entry}, ensure_ascii=False) + "\n"
    data = line.encode("utf-8")
    # unbuffered: every byte is in the file or the error is raised here, none left in a buffer that closing flushes
    with FileLock(lock, timeout=30), open(path, "a+b", buffering=0) as fh:
        start = fh.seek(0, os.SEEK_END)
        if start and os.pread(fh.fileno(), 1, start - 1) != b"\n":
            data = b"\n" + data  # a line cut by a kill -9 stays one damaged line (reported, skipped), not two
        try:
            written = 0
            while written < len(data):
                written += fh.write(data[written:])
            os.fsync(fh.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                fh.truncate(start)
            raise
    return path


REQUIRED = ("question", "answers", "rating", "models")


def read_feedback(path: Path) -> tuple[list[dict], list[tuple[int, str]]]:
    """The ratings in `path`, and (line number, paragraph) per line that is not a whole rating (a write cut off by
    a crash, a hand edit): the paragraph names the file, the line and the fix, and the line is skipped."""
    ratings, problems = [], []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                missing = [k for k in REQUIRED if k not in row] if isinstance(row, dict) else list(REQUIRED)
                if not missing and (row["rating"] not in RATINGS or not isinstance(row["answers"], dict)):
                    missing = ["a known rating and an answer per model"]
            except json.JSONDecodeError as exc:
                reason = f"is not a whole JSON object ({exc.msg.removesuffix(' at')} at column {exc.colno})"
            else:
                if not missing:
                    ratings.append(row)
                    continue
                reason = f"is not a rating (it lacks {', '.join(missing)})"
            problems.append(
                (
                    number,
                    f"{path}, line {number} {reason}: skipped. A rating cut off while it was written, or an edit by "
                    "hand, looks like this; delete or repair that line (each line is one JSON object written by the "
                    "chat page).",
                )
            )
    return ratings, problems
