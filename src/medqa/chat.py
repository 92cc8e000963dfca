"""`medqa chat`: a Gradio page that answers a question with the base and the fine-tuned model side by side.

Both answers stream token by token through `generate.stream_answer`, the code path of `medqa ask` and `evaluate`
(the same prompt template and generation settings; the settings can be changed in the page within the config's
bounds). Example questions come from the test split, and the doctor's answer is shown once both models have
answered. The page is blind by default: the answers are "A" and "B" in an order drawn per question (seeded and
recorded), and the names show once an answer is rated, since a rating given knowing which model wrote an answer
is biased by it (why arena-style comparisons hide the names); `--show-names` labels the columns instead. A rating
(better / worse / about the same / both bad, and an optional comment) is appended to `outputs/chat/feedback.jsonl`
with the question, both answers, the settings, which model was A, and both models' labels and fingerprints
(`medqa.ratings`), under a file lock, so two tabs or two servers on one workdir never interleave lines;
`medqa feedback` summarises it.

The server listens on 127.0.0.1 unless told otherwise, sends no analytics and loads nothing from the network.
One question is answered at a time (a second tab waits in Gradio's queue): both models run at once, each in its
own thread, and that already uses every core of a small machine.
"""

from __future__ import annotations

import dataclasses
import itertools
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
from medqa.modelcard import DATA_LICENCE
from medqa.modeling import load_adapter_model, load_model, load_tokenizer
from medqa.prompts import multi_turn
from medqa.ratings import (
    BASE,
    POSITIONS,
    RATINGS,
    TUNED,
    Rating,
    draw_order,
    model_identity,
    record_feedback,
    workdir_relative,
)
from medqa.schema import Config
from medqa.workdir import candidate_adapters, load_records, paths

log = logging.getLogger(__name__)

NOTICE = (
    "**Not medical advice.** These are research models' answers: they can be wrong or unsafe while sounding "
    "sure. See a doctor about your health; in an emergency call your local emergency number."
)
MAX_QUESTION_CHARS = 4000  # the longest cleaned training questions are ~2,500 characters; the prompt keeps the end
N_EXAMPLES = 6
SETTINGS = ("max_new_tokens", "do_sample", "temperature", "top_p", "repetition_penalty", "no_repeat_ngram_size")


@dataclass
class Side:
    """One model of the comparison: its name on the page, the model and tokenizer, and what identifies it."""

    name: str
    model: object
    tokenizer: object
    identity: dict  # medqa.ratings.model_identity: label, folders relative to the workdir, step, fingerprint


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
    # a tokenizer each: the two models generate in two threads at once
    return [
        Side(BASE, load_model(cfg), load_tokenizer(cfg), model_identity(cfg)),
        Side(TUNED, load_adapter_model(cfg, adapter), load_tokenizer(cfg), model_identity(cfg, adapter)),
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


def example_questions(cfg: Config) -> dict[str, str]:
    """Example questions from the test split (never train), each with the doctor's answer: question -> answer."""
    records = load_records(cfg, "test")
    return {r["question"]: r["answer"] for r in records[:N_EXAMPLES]}


@dataclass
class Page:
    """The page's components that the handlers read and update, by name: a handler returns {component: new value}
    (gradio's dict of updates), never a tuple in the order of an outputs list."""

    boxes: dict  # position ("A", "B") -> the gr.Chatbot of that column
    buttons: dict  # gr.Button -> (position, rating): one per side and rating, len(POSITIONS) x len(RATINGS)
    names: object  # who was A and who was B, shown once a blind answer is rated
    status: object
    reference: object  # the doctor's answer to an example question
    question: object
    send: object
    new: object
    comment: object
    controls: list  # the generation settings, in the order of SETTINGS
    state: object  # each model's conversation so far: {side name: [(question, answer), ...]}
    turn: object  # the last answered turn, what a rating records (None before the first answer)

    @property
    def outputs(self) -> list:
        """Every component a handler may update."""
        return [*self.boxes.values(), self.status, self.reference, self.names, self.state, self.turn, *self.buttons]

    def rating_buttons(self, interactive: bool) -> dict:
        """Every rating button on or off."""
        return {b: _update(interactive=interactive) for b in self.buttons}

    def columns(self, order: list[str], past: dict, question: str, answers: dict[str, str]) -> dict:
        """Each column's conversation: the model shown at that position, its earlier turns and this answer."""
        return {
            box: _messages(past[name]) + _turn(question, answers[name]) for box, name in zip(self.boxes.values(), order)
        }


def chat(cfg: Config, adapter: str | Path | None = None, sides: list[Side] | None = None, show_names: bool = False):
    """The page (a gr.Blocks): question box, both answers side by side, settings, examples, ratings.

    Blind by default: the answers are "A" and "B", in an order drawn per question (`draw_order`, from `cfg.seed`
    and the question's number on this server), and the names show once the answer is rated (once per question).
    `show_names` labels each column with its model, base on the left, as the page did before it was blind."""
    gr = _gradio()
    sides = sides or load_sides(cfg, adapter)
    examples = example_questions(cfg)
    turns = multi_turn(sides[0].tokenizer, cfg.prompt)
    with gr.Blocks(title="medqa chat", analytics_enabled=False) as blocks:
        page = _layout(gr, cfg, sides, examples, _mode(turns, show_names), show_names)
        handlers = Handlers(cfg, sides, examples, page, show_names, turns)
        gr.on(
            [page.send.click, page.question.submit],
            handlers.ask,
            [page.question, page.state, *page.controls],
            page.outputs,
            concurrency_limit=1,
        )
        for button, (position, rating) in page.buttons.items():
            button.click(
                lambda t, c, p=position, r=rating: handlers.rate(p, r, t, c), [page.turn, page.comment], page.outputs
            )
        page.new.click(
            handlers.new, None, [page.state, page.turn, *page.boxes.values(), page.status, page.reference, page.names]
        )
    return blocks


def _layout(gr, cfg: Config, sides: list[Side], examples: dict[str, str], mode: str, show_names: bool) -> Page:
    """The page's components, top to bottom, inside the caller's gr.Blocks."""
    gr.Markdown(f"# medqa chat: base and fine-tuned side by side\n{NOTICE}", elem_id="notice")
    gr.Markdown(
        f"**Data licence:** {DATA_LICENCE} Examples below are from the test split of `{cfg.data.source}`.",
        elem_id="licence",
    )
    gr.Markdown(mode, elem_id="mode")
    state = gr.State({s.name: [] for s in sides})
    turn = gr.State(None)
    boxes, buttons = {}, {}
    with gr.Row():
        for position, s in zip(POSITIONS, sides):
            boxes[position] = _column(gr, position, s, show_names, buttons)
    names = gr.Markdown("", elem_id="names")
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
        controls = _settings(gr, cfg)
    return Page(boxes, buttons, names, status, reference, question, send, new, comment, controls, state, turn)


def _column(gr, position: str, side: Side, show_names: bool, buttons: dict):
    """One side's column: its answers (returned) and a row of rating buttons (added to `buttons`)."""
    slug = _slug(side.name) if show_names else position.lower()
    with gr.Column():
        box = gr.Chatbot(
            label=f"{side.name}: {side.identity['label']}" if show_names else position,
            elem_id=f"answer-{slug}",
            height=360,
            render_markdown=False,
            feedback_options=None,
            buttons=["copy"],
        )
        with gr.Row():
            for rating, text in RATINGS.items():
                button = gr.Button(text, size="sm", interactive=False, elem_id=f"rate-{slug}-{_slug(rating)}")
                buttons[button] = (position, rating)
    return box


@dataclass
class Handlers:
    """What the page does when asked, rated or cleared; each returns (or yields) {component: new value}."""

    cfg: Config
    sides: list[Side]
    examples: dict[str, str]  # question -> the doctor's answer
    page: Page
    show_names: bool
    turns: bool  # multi-turn: each model sees its earlier turns
    draws: Iterator[int] = dataclasses.field(default_factory=itertools.count)  # the question's number on this server

    def ask(self, text: str, history: dict, *values) -> Iterator[dict]:
        """Both answers streamed into the columns, then the turn a rating records and the rating buttons on."""
        cfg, sides, page = self.cfg, self.sides, self.page
        try:
            question = check_question(text)
            run_cfg = with_settings(cfg, **dict(zip(SETTINGS, values)))
        except (ValueError, ConfigError) as exc:
            yield {page.status: f"⚠️ {exc}"}
            return
        draw = next(self.draws)
        names = tuple(s.name for s in sides)
        order = list(names) if self.show_names else draw_order(cfg.seed, draw, names)
        past = history if self.turns else {s.name: [] for s in sides}
        start = time.monotonic()
        answers = {s.name: "" for s in sides}
        shown = page.columns(order, past, question, answers)
        labels = {} if self.show_names else {b: _update(value=shown[b], label=p) for p, b in page.boxes.items()}
        yield {
            **shown,
            **labels,
            **page.rating_buttons(False),
            page.status: "Answering…",
            page.reference: "",
            page.names: "",
        }
        try:
            for answers in stream_both(sides, run_cfg, question, past):
                yield page.columns(order, past, question, answers)
        except Exception as exc:  # noqa: BLE001 - said in the page; the server goes on serving
            log.exception("generation failed")
            yield {page.status: f"⚠️ Generation failed: {exc}", page.reference: ""}
            return
        answer = self.examples.get(question)
        yield {
            **page.columns(order, past, question, {k: v or "(no answer)" for k, v in answers.items()}),
            page.status: f"Both answered in {time.monotonic() - start:.1f} s. Rate an answer below it.",
            page.reference: f"**The doctor's answer** (test split):\n\n{answer}" if answer else "",
            page.state: {s.name: past[s.name] + [(question, answers[s.name])] for s in sides},
            page.turn: self._record(question, past, answers, run_cfg, answer, order, draw),
            **page.rating_buttons(True),
        }

    def _record(self, question, past, answers, run_cfg: Config, answer, order, draw) -> dict:
        """The answered turn as a rating records it (`medqa.ratings.Rating`)."""
        settings = dataclasses.asdict(run_cfg.generate)
        return {
            "question": question,
            "history": {s.name: past[s.name] for s in self.sides},
            "answers": answers,
            "settings": settings,
            "settings_changed": [k for k, v in settings.items() if getattr(self.cfg.generate, k) != v],
            "reference": answer,
            "blind": not self.show_names,
            "order": dict(zip(POSITIONS, order)),
            "order_seed": self.cfg.seed,
            "order_draw": draw,
        }

    def rate(self, side: str, rating: str, shown: dict | None, comment: str) -> dict:
        """The rating of the answer at `side` appended to feedback.jsonl; on a blind page, the names shown."""
        page, identities = self.page, {s.name: s.identity for s in self.sides}
        if not shown:
            return {page.status: "⚠️ Ask a question first; then rate an answer."}
        entry = Rating(shown, side, rating, comment).entry(identities)
        try:
            path = record_feedback(self.cfg, entry)
        except OSError as exc:  # disk full, read-only, I/O error: the page stays up and says so
            where = workdir_relative(self.cfg, paths(self.cfg).chat_feedback)
            return {
                page.status: f"⚠️ Your rating was not saved: writing {where} failed ({exc.strerror or exc}). The "
                "ratings saved before are intact. Free some space or fix the folder's permissions (or serve the page "
                "with workdir= elsewhere), then rate again."
            }
        saved = workdir_relative(self.cfg, path)
        said = f"Saved your rating of {side} ({entry['rated']}: {rating}) to {saved}. Thank you."
        if self.show_names:
            return {page.status: said}
        order = shown["order"]
        return {
            page.status: said,
            page.names: " · ".join(f"**{p}** was {order[p]}: {identities[order[p]]['label']}" for p in POSITIONS),
            **{b: _update(label=f"{p}: {order[p]} ({identities[order[p]]['label']})") for p, b in page.boxes.items()},
            **page.rating_buttons(False),  # one blind rating per question
        }

    def new(self) -> dict:
        """A new conversation: no earlier turns, nothing to rate, empty columns and messages."""
        page = self.page
        return {
            page.state: {s.name: [] for s in self.sides},
            page.turn: None,
            **{box: [] for box in page.boxes.values()},
            page.status: "",
            page.reference: "",
            page.names: "",
        }


def _mode(turns: bool, show_names: bool) -> str:
    memory = (
        "**Multi-turn**: the chat template holds the conversation, so follow-up questions see the earlier turns "
        "(each model its own answers). *New conversation* starts over."
        if turns
        else "**Single-turn**: the prompt template holds one question, so every question is answered on its own "
        "(no memory of earlier ones)."
    )
    if show_names:
        return memory
    return (
        f"{memory}\n\n**Blind**: the two models answer as A and B, in an order drawn anew for each question; "
        "their names show after your rating (one rating per question)."
    )


def _settings(gr, cfg: Config) -> list:
    """The generation settings' controls, starting at the config's values, within its bounds."""
    g = cfg.generate
    limit = cfg.data.max_length - cfg.prompt.min_question_tokens
    return [
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


def launch(
    cfg: Config,
    adapter: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    show_names: bool = False,
    **kwargs,
):
    """Build the page and serve it (blocks until Ctrl-C; in a notebook it shows inline and returns). Blind ratings
    unless `show_names`."""
    if share:
        log.warning(
            "--share: a public Gradio link. Questions typed in the page, and the answers, then travel "
            "through Gradio's share servers outside this machine; do not type anything private."
        )
    page = chat(cfg, adapter, show_names=show_names)
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


def _update(**props) -> dict:
    """gr.update(**props): new properties of a component (gradio is imported by the time a handler runs)."""
    return _gradio().update(**props)


def _turn(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _messages(history: list[tuple[str, str]]) -> list[dict]:
    return [m for q, a in history for m in _turn(q, a)]


def _slug(name: str) -> str:
    return name.replace(" ", "-")
