"""The prompt template and the one function that turns (question, answer) into training tokens.

Training, evaluation and generation all build the prompt with `prompt_ids`, so the model sees exactly the same
prompt tokens when it is scored as when it answers. Labels are `IGNORE_INDEX` on every prompt token: the loss is
on the answer and its EOS only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from medqa.errors import ConfigError
from medqa.schema import PromptConfig

IGNORE_INDEX = -100  # the label value that torch's cross-entropy skips
# Version of what `encode_example` produces, part of the prepared data's fingerprint: a change in how examples are
# encoded (2: no EOS target after a cut answer) makes tokenized data of the old rule stale, cache included.
ENCODE_VERSION = 2


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    question_tokens: int  # before truncation
    answer_tokens: int  # before truncation, without EOS
    truncated: bool


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    if not text:
        return list(tokenizer(text, add_special_tokens=True)["input_ids"]) if special else []
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"Tokenizer {tokenizer.name_or_path} has no EOS token; answers need one to end on.")
    return int(tokenizer.eos_token_id)


_SLOT = "\u2063QUESTION\u2063"  # stands for the question while the chat template is rendered


def multi_turn(tokenizer, prompt: PromptConfig) -> bool:
    """Whether the prompt can hold earlier turns: only a chat template has a place for them (`prompt.template`
    has one question slot, and training saw single questions either way)."""
    return bool(prompt.use_chat_template and getattr(tokenizer, "chat_template", None))


def template_text(tokenizer, prompt: PromptConfig, history: Sequence[tuple[str, str]] = ()) -> tuple[str, str, bool]:
    """(text before the question, text after it, whether `before` needs the tokenizer's special start tokens).

    With `use_chat_template`, the tokenizer's chat template is rendered around a placeholder user message (with the
    assistant header after it), after the earlier (question, answer) turns of `history`; its text already holds
    the special tokens, so none are added. `history` needs a chat template (`multi_turn`)."""
    if not prompt.use_chat_template:
        if history:
            raise ConfigError("Earlier turns need prompt.use_chat_template=true: prompt.template holds one question.")
        before, after = prompt.template.split("{question}")
        return before, after, True
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"prompt.use_chat_template=true but tokenizer {tokenizer.name_or_path} has no chat template. "
            "Set prompt.use_chat_template=false to use prompt.template."
        )
    turns = [m for q, a in history for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    messages = (
        ([{"role": "system", "content": prompt.system}] if prompt.system else [])
        + turns
        + [{"role": "user", "content": _SLOT}]
    )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, after = text.split(_SLOT)
    return before, after, False


def prompt_parts(
    tokenizer, prompt: PromptConfig, question: str, history: Sequence[tuple[str, str]] = ()
) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the text before the question (with the tokenizer's special start tokens, e.g. BioGPT's
    `</s>`, unless a chat template already wrote them), of the question, and of the text after it. The three
    are tokenized apart so the question can be cut in tokens without touching the template."""
    before, after, special = template_text(tokenizer, prompt, history)
    return _ids(tokenizer, before, special), _ids(tokenizer, question, False), _ids(tokenizer, after, False)


def prompt_ids(
    tokenizer,
    prompt: PromptConfig,
    question: str,
    max_length: int | None = None,
    history: Sequence[tuple[str, str]] = (),
) -> list[int]:
    """The prompt as the model sees it at generation time; the question is cut from its start if needed. Earlier
    turns (`history`, oldest first) that do not fit in `max_length` are left out, oldest first."""
    before, q, after = prompt_parts(tokenizer, prompt, question, history)
    while (
        history
        and max_length is not None
        and len(before) + len(after) + min(len(q), prompt.min_question_tokens) > max_length
    ):
        history = history[1:]
        before, q, after = prompt_parts(tokenizer, prompt, question, history)
    if max_length is not None:
        room = max(max_length - len(before) - len(after), prompt.min_question_tokens)
        q = q[-room:] if len(q) > room else q
    return before + q + after


def encode_example(tokenizer, prompt: PromptConfig, question: str, answer: str, max_length: int) -> Encoded:
    """Prompt + answer + EOS, with prompt labels masked.

    Over `max_length`, the question is cut first (from its start, keeping at least `min_question_tokens` of its
    end, which usually holds the actual question), then the answer's tail; EOS always ends the sequence, and is
    labelled (trained) only when the answer is whole.
    """
    before, q, after = prompt_parts(tokenizer, prompt, question)
    a = _ids(tokenizer, answer, False)
    n_q, n_a = len(q), len(a)
    fixed = len(before) + len(after) + 1  # + EOS
    if fixed + min(n_q, prompt.min_question_tokens) + 1 > max_length:
        raise ConfigError(
            f"data.max_length={max_length} leaves no room for an answer after the prompt template "
            f"({fixed - 1} tokens). Raise data.max_length or shorten prompt.template."
        )
    excess = fixed + n_q + n_a - max_length
    if excess > 0:
        cut_q = min(excess, max(n_q - prompt.min_question_tokens, 0))
        q = q[cut_q:]
        excess -= cut_q
    if excess > 0:
        a = a[: n_a - excess]
    prompt_tokens = before + q + after
    answer_tokens = a + [eos_id(tokenizer)]
    # EOS is trained only after a whole answer: after a cut one it would teach the model to stop mid-sentence.
    answer_labels = a + ([eos_id(tokenizer)] if len(a) == n_a else [IGNORE_INDEX])
    return Encoded(
        input_ids=prompt_tokens + answer_tokens,
        labels=[IGNORE_INDEX] * len(prompt_tokens) + answer_labels,
        question_tokens=n_q,
        answer_tokens=n_a,
        truncated=len(q) < n_q or len(a) < n_a,
    )
