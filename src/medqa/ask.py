"""`medqa ask`: answer questions with the prompt template and the generation settings."""

from __future__ import annotations

from pathlib import Path

from medqa.cleaning import clean_text
from medqa.errors import DataError
from medqa.generate import generate_answers
from medqa.modeling import load_adapter_model, load_model, load_tokenizer
from medqa.schema import Config

DISCLAIMER = "(Not medical advice: a research model's answer. See a doctor about your health.)"


def read_questions(path: str | Path) -> list[str]:
    """One question per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Questions file {path} not found. Give a text file with one question per line.")
    questions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not questions:
        raise DataError(f"{path} holds no questions. Put one question per line.")
    return questions


def ask(cfg: Config, questions: list[str], adapter: str | Path | None = None) -> list[str]:
    """Answers (each ending with the not-medical-advice line), cleaned like the training questions."""
    tokenizer = load_tokenizer(cfg)
    model = load_adapter_model(cfg, adapter) if adapter else load_model(cfg)
    answers = generate_answers(model, tokenizer, cfg, [clean_text(q) for q in questions])
    return [f"{a or '(no answer)'}\n{DISCLAIMER}" for a in answers]
