"""`medqa chat`: a Gradio page that answers a question with the base and the fine-tuned model side by side.

Both answers stream token by token through `generate.stream_answer`, the code path of `medqa ask` and `evaluate`
(the same prompt template and generation settings; the settings can be changed in the page within the config's
bounds). Example questions come from the test split, and the doctor's answer is shown once both models have
answered. A rating of an answer (better / worse / both bad, and an optional comment) is appended to
`outputs/chat/feedback.jsonl` with the question, both answers, the settings and both models' fingerprints, under a
file lock (`chat_feedback_lock`), so two browser tabs, or two servers on one workdir, never interleave lines.

The server listens on 127.0.0.1 unless told otherwise, sends no analytics and loads nothing from the network.
One question is answered at a time (a second tab waits in Gradio's queue): both models run at once, each in its
own thread, and that already uses every core of a small machine.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from medqa.cleaning import clean_text
from medqa.errors import ConfigError, MedqaError, ModelError
from medqa.generate import stream_answer
from medqa.manifest import fingerprint_model
from medqa.modelcard import DATA_LICENCE
from medqa.modeling import load_adapter_model, load_model, load_tokenizer, model_path
from medqa.prompts import multi_turn
from medqa.schema import Config
from medqa.workdir import candidate_adapters, load_records, paths

log = logging.getLogger(__name__)

NOTICE = (
    "**Not medical advice.** These are research models' answers: they can be wrong or unsafe while sounding "
    "sure. See a doctor about your health; in an emergency call your local emergency number."
)
MAX_QUESTION_CHARS = 4000  # the longest cleaned training questions are ~2,500 characters; the prompt keeps the end
N_EXAMPLES = 6
RATINGS = {"better": "this one is better", "worse": "this one is worse", "both bad": "both are bad"}
SETTINGS = ("max_new_tokens", "do_sample", "temperature", "top_p", "repetition_penalty", "no_repeat_ngram_size")


@dataclass
class Side:
    """One model of the comparison: its name on the page, the model and tokenizer, and what identifies it."""

    name: str
    model: object
    tokenizer: object
    identity: dict  # {"path", "fingerprint"} (and "adapter" for the fine-tuned side)


def load_sides(cfg: Config, adapter: str | Path | None = None) -> list[Side]:
    """The base model and the adapter model (`adapter`, else outputs/finetune, else outputs/best)."""
    if adapter is None:
        found = candidate_adapters(cfg)
        adapter = found.get("fine-tuned") or found.get("tuned (best trial)")
        if adapter is None:
            raise ModelError(
                f"No adapter to compare with under {paths(cfg).outputs}: run `medqa train --config "
                "<your config>` first (it writes outputs/finetune), or give one with --adapter DIR."
            )
    base_path = model_path(cfg)
    base = {"path": base_path, "fingerprint": fingerprint_model(base_path, cfg.model.revision)}
    tuned = {"path": base_path, "adapter": str(adapter), "fingerprint": fingerprint_model(str(adapter))}
    # a tokenizer each: the two models generate in two threads at once
    return [
        Side("base", load_model(cfg), load_tokenizer(cfg), base),
        Side("fine-tuned", load_adapter_model(cfg, adapter), load_tokenizer(cfg), tuned),
    ]


def with_settings(cfg: Config, **settings) -> Config:
    """`cfg` with generation settings from the page, checked by the config's own rules (ConfigError)."""
    generate = dataclasses.replace(cfg.generate, **{k: type(getattr(cfg.generate, k))(v) for k, v in settings.items()})
    generate.validate()
    limit = cfg.data.max_length - cfg.prompt.min_question_tokens
    if generate.max_new_tokens > limit:
        raise ConfigError(
            f"max_new_tokens={generate.max_new_tokens} leaves no room for the question in "
            f"data.max_length={cfg.data.max_length}; use at most {limit}."
        )
    return dataclasses.replace(cfg, generate=generate)


def check_question(text: str) -> str:
    """The cleaned question, or ValueError with what to do (shown in the page)."""
    if len(text) > MAX_QUESTION_CHARS:
        raise ValueError(
            f"Your question is {len(text):,} characters; this page takes at most "
            f"{MAX_QUESTION_CHARS:,} (the model reads only the end of a long one). Shorten it and ask again."
        )
    question = clean_text(text or "")
    if not question:
        raise ValueError("Type a question first, or pick one of the examples below.")
    return question


def stream_both(
    sides: list[Side], cfg: Config, question: str, history: dict[str, list[tuple[str, str]]] | None = None
) -> Iterator[dict[str, str]]:
    """Both models' answers so far, {side name: text}, as either grows; both are generated at once (a thread
    each), and the last dict holds the whole answers."""
    events: queue.Queue = queue.Queue()
    latest = {s.name: "" for s in sides}

    def pump(side: Side) -> None:
        try:
            for text in stream_answer(side.model, side.tokenizer, cfg, question, (history or {}).get(side.name, ())):
                events.put((side.name, text, None))
            events.put((side.name, None, None))
        except Exception as exc:  # noqa: BLE001 - raised again below, in the page's thread
            events.put((side.name, None, exc))

    for side in sides:
        threading.Thread(target=pump, args=(side,), name=f"medqa-chat-{side.name}", daemon=True).start()
    running = len(sides)
    while running:
        name, text, error = events.get()
        if error is not None:
            raise error
        if text is None:
            running -= 1
            continue
        latest[name] = text
        yield dict(latest)


def record_feedback(cfg: Config, entry: dict) -> Path:
    """Append one rating to outputs/chat/feedback.jsonl (one JSON object a line), holding its file lock so
    concurrent writers (two tabs, two servers on one workdir) never interleave a line."""
    from filelock import FileLock

    path, lock = paths(cfg).chat_feedback, paths(cfg).chat_feedback_lock
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **entry}, ensure_ascii=False) + "\n"
    with FileLock(lock, timeout=30), open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def example_questions(cfg: Config) -> dict[str, str]:
    """Example questions from the test split (never train), each with the doctor's answer: question -> answer."""
    records = load_records(cfg, "test")
    return {r["question"]: r["answer"] for r in records[:N_EXAMPLES]}


def chat(cfg: Config, adapter: str | Path | None = None, sides: list[Side] | None = None):
    """The page (a gr.Blocks): question box, both answers side by side, settings, examples, ratings."""
    gr = _gradio()
    sides = sides or load_sides(cfg, adapter)
    examples = example_questions(cfg)
    turns = multi_turn(sides[0].tokenizer, cfg.prompt)
    g = cfg.generate
    mode = (
        "**Multi-turn**: the chat template holds the conversation, so follow-up questions see the earlier "
        "turns (each model its own answers). *New conversation* starts over."
        if turns
        else "**Single-turn**: the prompt template holds one question, so every question is answered on its own "
        "(no memory of earlier ones)."
    )

    def ask(text, history, *values):
        settings = dict(zip(SETTINGS, values))
        idle = gr.update(interactive=False)
        try:
            question = check_question(text)
            run_cfg = with_settings(cfg, **settings)
        except (ValueError, ConfigError) as exc:
            yield (gr.skip(), gr.skip(), f"⚠️ {exc}", gr.skip(), gr.skip(), gr.skip(), *[gr.skip()] * 6)
            return
        past = history if turns else {s.name: [] for s in sides}
        shown = {s.name: _messages(past[s.name]) for s in sides}
        start = time.monotonic()
        answers = {s.name: "" for s in sides}
        yield (
            *[shown[s.name] + _turn(question, "") for s in sides],
            "Answering…",
            "",
            gr.skip(),
            gr.skip(),
            *[idle] * 6,
        )
        try:
            for answers in stream_both(sides, run_cfg, question, past):
                yield (
                    *[shown[s.name] + _turn(question, answers[s.name]) for s in sides],
                    "Answering…",
                    "",
                    gr.skip(),
                    gr.skip(),
                    *[gr.skip()] * 6,
                )
        except Exception as exc:  # noqa: BLE001 - said in the page; the server goes on serving
            log.exception("generation failed")
            yield (gr.skip(), gr.skip(), f"⚠️ Generation failed: {exc}", "", gr.skip(), gr.skip(), *[gr.skip()] * 6)
            return
        new_history = {s.name: past[s.name] + [(question, answers[s.name])] for s in sides}
        reference = examples.get(question)
        turn = {
            "question": question,
            "history": {s.name: past[s.name] for s in sides},
            "answers": answers,
            "settings": dataclasses.asdict(run_cfg.generate),
            "reference": reference,
        }
        done = f"Both answered in {time.monotonic() - start:.1f} s. Rate an answer below it."
        yield (
            *[shown[s.name] + _turn(question, answers[s.name] or "(no answer)") for s in sides],
            done,
            f"**The doctor's answer** (test split):\n\n{reference}" if reference else "",
            new_history,
            turn,
            *[gr.update(interactive=True)] * 6,
        )

    def rate(side_name, rating, turn, comment):
        if not turn:
            return "⚠️ Ask a question first; then rate an answer."
        other = next(s.name for s in sides if s.name != side_name)
        preferred = {"better": side_name, "worse": other}.get(rating)
        entry = {
            **turn,
            "rated": side_name,
            "rating": rating,
            "preferred": preferred,
            "comment": comment.strip(),
            "models": {s.name: s.identity for s in sides},
        }
        path = record_feedback(cfg, entry)
        return f"Saved your rating ({side_name}: {rating}) to {path}. Thank you."

    with gr.Blocks(title="medqa chat", analytics_enabled=False) as page:
        gr.Markdown(f"# medqa chat: base and fine-tuned side by side\n{NOTICE}", elem_id="notice")
        gr.Markdown(
            f"**Data licence:** {DATA_LICENCE} Examples below are from the test split of `{cfg.data.source}`.",
            elem_id="licence",
        )
        gr.Markdown(mode, elem_id="mode")
        history = gr.State({s.name: [] for s in sides})
        turn = gr.State(None)
        boxes, buttons = [], []
        with gr.Row():
            for s in sides:
                with gr.Column():
                    label = f"{s.name}: {s.identity.get('adapter', s.identity['path'])}"
                    boxes.append(
                        gr.Chatbot(
                            label=label,
                            elem_id=f"answer-{_slug(s.name)}",
                            height=360,
                            render_markdown=False,
                            feedback_options=None,
                            buttons=["copy"],
                        )
                    )
                    with gr.Row():
                        for rating in RATINGS:
                            buttons.append(
                                (
                                    s.name,
                                    rating,
                                    gr.Button(
                                        RATINGS[rating],
                                        size="sm",
                                        interactive=False,
                                        elem_id=f"rate-{_slug(s.name)}-{_slug(rating)}",
                                    ),
                                )
                            )
        question = gr.Textbox(
            label="Your question",
            lines=3,
            elem_id="question",
            placeholder="Describe the problem as you would to a doctor on a forum.",
        )
        with gr.Row():
            send = gr.Button("Ask both", variant="primary", elem_id="ask")
            new = gr.Button("New conversation", elem_id="new")
        status = gr.Markdown("", elem_id="status")
        reference = gr.Markdown("", elem_id="reference")
        comment = gr.Textbox(label="Comment on your rating (optional)", lines=1, elem_id="comment")
        gr.Examples([[q] for q in examples], inputs=[question], label="Questions from the test split")
        with gr.Accordion("Generation settings (the config's, as `medqa ask` uses them)", open=False):
            limit = cfg.data.max_length - cfg.prompt.min_question_tokens
            controls = [
                gr.Slider(1, max(limit, g.max_new_tokens), value=g.max_new_tokens, step=1, label="max_new_tokens"),
                gr.Checkbox(value=g.do_sample, label="do_sample (sample instead of greedy)"),
                gr.Slider(0.05, max(2.0, g.temperature), value=g.temperature, label="temperature (with do_sample)"),
                gr.Slider(0.05, 1.0, value=g.top_p, label="top_p (with do_sample)"),
                gr.Slider(
                    min(1.0, g.repetition_penalty),
                    max(2.0, g.repetition_penalty),
                    value=g.repetition_penalty,
                    label="repetition_penalty",
                ),
                gr.Slider(
                    0,
                    max(10, g.no_repeat_ngram_size),
                    value=g.no_repeat_ngram_size,
                    step=1,
                    label="no_repeat_ngram_size (0 = off)",
                ),
            ]
        outputs = [*boxes, status, reference, history, turn, *[b for _, _, b in buttons]]
        gr.on([send.click, question.submit], ask, [question, history, *controls], outputs, concurrency_limit=1)
        for name, rating, button in buttons:
            button.click(lambda t, c, n=name, r=rating: rate(n, r, t, c), [turn, comment], [status])
        new.click(
            lambda: ({s.name: [] for s in sides}, None, *[[] for _ in sides], "", ""),
            None,
            [history, turn, *boxes, status, reference],
        )
    return page


def launch(
    cfg: Config,
    adapter: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    **kwargs,
):
    """Build the page and serve it (blocks until Ctrl-C; in a notebook it shows inline and returns)."""
    if share:
        log.warning(
            "--share: a public Gradio link. Questions typed in the page, and the answers, then travel "
            "through Gradio's share servers outside this machine; do not type anything private."
        )
    page = chat(cfg, adapter)
    if "ipykernel" in sys.modules:  # a notebook: show the page inline and give the kernel back
        kwargs.setdefault("prevent_thread_lock", True)
    try:
        return page.queue(default_concurrency_limit=1).launch(
            server_name=host, server_port=port, share=share, footer_links=[], **kwargs
        )
    except OSError as exc:
        raise MedqaError(
            f"Cannot serve the chat page on {host}:{port or 7860}: {str(exc).rstrip('.')}. Give another "
            "--port (or stop what listens there)."
        ) from None


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError:
        raise MedqaError(
            "medqa chat needs Gradio, the `chat` extra: pip install -e '.[chat]' (make setup installs it)."
        ) from None
    return gradio


def _turn(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _messages(history: list[tuple[str, str]]) -> list[dict]:
    return [m for q, a in history for m in _turn(q, a)]


def _slug(name: str) -> str:
    return name.replace(" ", "-")
