"""`medqa chat` in a real browser: the CLI serves the page on the tiny demo models (127.0.0.1, a free port), headless
Chromium (Debian's, driven by Selenium through Debian's chromedriver) asks, both answers stream and equal
`medqa ask`'s, a rating lands in outputs/chat/feedback.jsonl; a bad request gets a message and the server goes on.
The blind page (the default; the labelled one is `--show-names`): the answers are A and B in the recorded order,
a rating of A is recorded against the model that was A, and the names show only after it.
Also, without a browser: streaming ends on generate_answers' text (static-cache fallback included), and concurrent
ratings never interleave."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE, copy_trained, demo_config

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# generation kept short for time; the page starts with the config's settings, so `medqa ask` uses the same ones
CHAT = ["generate.max_new_tokens=24"]
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1100",
]


@pytest.fixture(scope="module")
def workdir(trained_demo, tmp_path_factory) -> Path:
    """Prepared data and a briefly trained adapter (outputs/finetune) on the tiny demo model."""
    return copy_trained(trained_demo, tmp_path_factory.mktemp("chat") / "w")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(workdir, tmp_path_factory):
    """`medqa chat --show-names` (the labelled page), stopped when the module's tests end."""
    yield from _serve(workdir, tmp_path_factory, "--show-names")


@pytest.fixture(scope="module")
def blind_server(workdir, tmp_path_factory):
    """`medqa chat` as it starts by default: blind."""
    yield from _serve(workdir, tmp_path_factory)


def _serve(workdir, tmp_path_factory, *flags: str):
    """`medqa chat` in its own process group, stopped (the whole group) when the module's tests end."""
    port = _free_port()
    log = tmp_path_factory.mktemp("chat-server") / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "medqa",
        "chat",
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        f"workdir={workdir}",
        f"data.source={SAMPLE}",
        *CHAT,
        "--port",
        str(port),
        *flags,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"medqa chat exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"medqa chat did not serve {url} within 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "proc": proc, "log": log}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(
            "needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver): "
            "apt-get install -y chromium chromium-driver (.ci/run installs them)"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install -e '.[chat]'")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    # Debian's chromedriver given by path: Selenium Manager would otherwise try to download one
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


# ------------------------------------------------------------------------------------------- page helpers


def _wait(predicate, timeout: float = 60, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _open(driver, url: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#question textarea"), what="the question box")


def _text(driver, elem_id: str) -> str:
    """A component's text, without Gradio's progress overlay ("processing | 0.3s")."""
    return driver.execute_script(
        "const e = document.getElementById(arguments[0]); if (!e) return '';"
        "const c = e.cloneNode(true); c.querySelectorAll('[data-testid=status-tracker]').forEach(x => x.remove());"
        "return c.textContent.trim();",
        elem_id,
    )


def _set_question(driver, text: str) -> None:
    """Fill the question box as typing would (an `input` event), at once even for 20,000 characters."""
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.CSS_SELECTOR, "#question textarea")
    driver.execute_script(
        "arguments[0].value = arguments[1];arguments[0].dispatchEvent(new Event('input', {bubbles: true}));", box, text
    )


def _answers(driver, columns=(("base", "answer-base"), ("fine-tuned", "answer-fine-tuned"))) -> dict[str, str]:
    """The latest answer in each column, as the page holds it."""
    from selenium.webdriver.common.by import By

    out = {}
    for name, elem in columns:
        bots = driver.find_elements(By.CSS_SELECTOR, f"#{elem} [data-testid='bot'] .message-content")
        out[name] = bots[-1].get_attribute("textContent") if bots else None
    return out


# Records every text the latest answer in each column shows, as the page changes (window.seenAnswers).
_WATCH = """
window.seenAnswers = {};
for (const [name, id] of [["base", "answer-base"], ["fine-tuned", "answer-fine-tuned"]]) {
  const root = document.getElementById(id), seen = window.seenAnswers[name] = [];
  new MutationObserver(() => {
    const bots = root.querySelectorAll("[data-testid='bot'] .message-content");
    const text = bots.length ? bots[bots.length - 1].textContent : null;
    if (text !== null && seen[seen.length - 1] !== text) seen.push(text);
  }).observe(root, {subtree: true, childList: true, characterData: true});
}
"""


def _ask_and_wait(driver, previous_status: str = "") -> str:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "ask").click()
    return _wait(
        lambda: (s := _text(driver, "status")) != previous_status and ("answered" in s or "⚠" in s) and s,
        what="both answers to finish",
    )


# -------------------------------------------------------------------------------------------------- tests


def test_page_answers_like_ask_streams_and_records_a_rating(server, browser, workdir, tmp_path):
    from selenium.webdriver.common.by import By

    from medqa.ask import DISCLAIMER, ask
    from medqa.manifest import fingerprint_model
    from medqa.workdir import load_records, paths

    cfg = demo_config(workdir, *CHAT)
    _open(browser, server["url"])
    page = browser.find_element(By.TAG_NAME, "body").text
    assert "Not medical advice" in page and "Data licence" in page and "academic research only" in page
    assert "Single-turn" in page  # the demo's prompt.template holds one question
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and not [u for u in loaded if not u.startswith((server["url"], "data:", "blob:"))]  # offline

    # an example from the test split: clicking it fills the box; the doctor's answer shows once both answered
    test = load_records(cfg, "test")
    example = next(
        b
        for b in browser.find_elements(By.CSS_SELECTOR, "button.gallery-item")
        if b.text.strip() and test[0]["question"].startswith(b.text.strip().rstrip(".…").strip())
    )
    example.click()
    _wait(
        lambda: (
            browser.find_element(By.CSS_SELECTOR, "#question textarea").get_attribute("value") == test[0]["question"]
        ),
        what="the example in the question box",
    )
    assert not _text(browser, "reference")
    browser.execute_script(_WATCH)
    status = _ask_and_wait(browser)
    assert status.startswith("Both answered"), status
    shown = _answers(browser)
    expected = {
        name: a.removesuffix("\n" + DISCLAIMER)
        for name, a in (
            ("base", ask(cfg, [test[0]["question"]])[0]),
            ("fine-tuned", ask(cfg, [test[0]["question"]], paths(cfg).finetune)[0]),
        )
    }
    assert shown == expected
    assert test[0]["answer"][:60] in _text(browser, "reference")
    # streamed: the page showed each answer growing before it was whole
    seen = browser.execute_script("return window.seenAnswers")
    grew = {name: [t for t in texts if t and t != shown[name]] for name, texts in seen.items()}
    assert max(len(g) for g in grew.values()) >= 2, seen
    assert all(shown[name].startswith(t) for name, g in grew.items() for t in g), grew
    browser.save_screenshot(str(tmp_path / "chat.png"))
    assert (tmp_path / "chat.png").stat().st_size > 10_000

    # a rating of the fine-tuned answer, with a comment
    browser.find_element(By.CSS_SELECTOR, "#comment textarea").send_keys("clearer")
    browser.find_element(By.ID, "rate-fine-tuned-better").click()
    _wait(lambda: "Saved your rating" in _text(browser, "status"), what="the rating to be saved")
    lines = paths(cfg).chat_feedback.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["question"] == test[0]["question"] and entry["answers"] == expected
    assert (entry["rated"], entry["rating"], entry["preferred"], entry["comment"]) == (
        "fine-tuned",
        "better",
        "fine-tuned",
        "clearer",
    )
    assert entry["reference"] == test[0]["answer"]
    assert entry["settings"]["max_new_tokens"] == 24 and entry["settings"]["do_sample"] is False
    assert entry["blind"] is False and entry["order"] == {"A": "base", "B": "fine-tuned"}
    assert str(workdir) not in lines[0]  # models named relative to the workdir, never by an absolute path
    assert entry["models"]["base"]["label"] == "models/tiny-biogpt"
    assert entry["models"]["fine-tuned"]["label"] == "outputs/finetune (step 4)"
    assert "fine-tuned: outputs/finetune (step 4)" in _text(browser, "answer-fine-tuned")
    assert entry["models"]["base"]["fingerprint"] == fingerprint_model(str(workdir / "models" / "tiny-biogpt"))
    assert entry["models"]["fine-tuned"]["fingerprint"] == fingerprint_model(str(paths(cfg).finetune))
    assert entry["models"]["base"]["fingerprint"] != entry["models"]["fine-tuned"]["fingerprint"]


BLIND = (("A", "answer-a"), ("B", "answer-b"))
NAMES = ("models/tiny-biogpt", "outputs/finetune", "base", "fine-tuned")  # what the blind columns must not say


def test_blind_page_records_the_rating_against_the_model_that_was_a(blind_server, browser, workdir):
    """Two questions: the answers show as A and B with no name in the columns, each column holds the answer of the
    model the line records at that position (as `medqa ask` gives it), in the order drawn from the recorded seed
    and draw; a rating of A is recorded against the model that was A, and only then do the names show."""
    from selenium.webdriver.common.by import By

    from medqa.ask import DISCLAIMER, ask
    from medqa.ratings import draw_order
    from medqa.workdir import paths

    cfg = demo_config(workdir, *CHAT)
    feedback = paths(cfg).chat_feedback
    before = feedback.read_text(encoding="utf-8").splitlines() if feedback.exists() else []
    _open(browser, blind_server["url"])
    assert not browser.find_elements(By.ID, "answer-base") and "Blind" in _text(browser, "mode")
    questions = ["My knee hurts when I climb stairs. What should I do?", "I have had a dry cough for three days."]
    status, entries = "", []
    for i, (question, rating) in enumerate(zip(questions, ("better", "worse"))):
        _set_question(browser, question)
        status = _ask_and_wait(browser, status)
        assert status.startswith("Both answered"), status
        shown = _answers(browser, BLIND)
        columns = {p: _text(browser, f"answer-{p.lower()}").replace(shown[p] or "", "") for p in "AB"}
        assert not [n for n in NAMES for text in columns.values() if n in text], columns  # labels say A and B only
        assert not _text(browser, "names")

        browser.find_element(By.ID, f"rate-a-{rating}").click()
        status = _wait(lambda: (s := _text(browser, "status")).startswith("Saved your rating") and s, what="saving")
        lines = feedback.read_text(encoding="utf-8").splitlines()
        assert len(lines) == len(before) + i + 1
        entry = json.loads(lines[-1])
        entries.append(entry)
        a, b = entry["order"]["A"], entry["order"]["B"]
        assert entry["blind"] is True and sorted((a, b)) == ["base", "fine-tuned"]
        assert [a, b] == draw_order(entry["order_seed"], entry["order_draw"]) and entry["order_seed"] == cfg.seed
        expected = {
            name: answer.removesuffix("\n" + DISCLAIMER)
            for name, answer in (
                ("base", ask(cfg, [question])[0]),
                ("fine-tuned", ask(cfg, [question], paths(cfg).finetune)[0]),
            )
        }
        assert shown == {"A": expected[a] or "(no answer)", "B": expected[b] or "(no answer)"}
        assert entry["answers"] == expected
        assert (entry["rated"], entry["rated_side"], entry["rating"]) == (a, "A", rating)
        assert entry["preferred"] == (a if rating == "better" else b)
        # now the names: in the page, and the rating buttons off (one blind rating per question)
        revealed = _text(browser, "names")
        assert f"A was {a}" in revealed and f"B was {b}" in revealed and "outputs/finetune (step 4)" in revealed
        assert _text(browser, "answer-a").startswith(f"A: {a}")
        assert not browser.find_element(By.ID, "rate-b-better").is_enabled()
    assert [e["order_draw"] for e in entries] == [entries[0]["order_draw"], entries[0]["order_draw"] + 1]
    assert str(workdir) not in "".join(feedback.read_text(encoding="utf-8").splitlines()[len(before) :])


def test_the_order_is_drawn_per_question_and_reproducible():
    from medqa.ratings import draw_order

    orders = [tuple(draw_order(42, draw)) for draw in range(40)]
    assert orders == [tuple(draw_order(42, draw)) for draw in range(40)]
    assert 10 <= orders.count(("base", "fine-tuned")) <= 30  # both orders, about as often
    assert orders != [tuple(draw_order(43, draw)) for draw in range(40)]


def test_bad_requests_get_a_message_and_the_server_goes_on(server, browser):
    _open(browser, server["url"])
    _set_question(browser, "   ")
    status = _ask_and_wait(browser)
    assert "Type a question first" in status
    _set_question(browser, "my head hurts " * 1430)  # 20,020 characters
    status = _ask_and_wait(browser, status)
    assert "20,020 characters" in status and "at most 4,000" in status
    assert _answers(browser) == {"base": None, "fine-tuned": None}  # nothing was generated
    assert server["proc"].poll() is None
    _set_question(browser, "I have had a dry cough for three days, what should I do?")
    assert _ask_and_wait(browser, status).startswith("Both answered")
    assert all(_answers(browser).values())  # an answer, or "(no answer)" when a model says nothing


# ------------------------------------------------------------------------------------ without a browser


def test_streamed_answer_grows_and_ends_as_generate_answers(workdir, monkeypatch, caplog):
    """stream_answer yields growing text ending on generate_answers' answer; when the static cache fails part-way
    (injected), the dynamic cache answers again from the start: the same final text, one recorded fallback."""
    from transformers import GenerationMixin

    from medqa.fallbacks import Fallbacks
    from medqa.generate import generate_answers, stream_answer
    from medqa.modeling import load_model, load_tokenizer

    question = "My knee hurts when I climb stairs. What should I do?"
    cfg = demo_config(workdir, *CHAT, "generate.static_cache=false")
    model, tokenizer = load_model(cfg), load_tokenizer(cfg)
    expected = generate_answers(model, tokenizer, cfg, [question])[0]
    parts = list(stream_answer(model, tokenizer, cfg, question))
    assert len(parts) > 3 and parts[-1] == expected
    assert len(parts[len(parts) // 2]) < len(parts[-1])

    real = GenerationMixin.generate

    class Unended:  # passes tokens on; a generation that fails never ends its stream
        def __init__(self, streamer):
            self.put, self.end = streamer.put, lambda: None

    def generate(self, *args, cache_implementation=None, streamer=None, **kwargs):
        if cache_implementation == "static":  # stream a few tokens, then fail as a compile error would
            real(self, *args, streamer=Unended(streamer), **{**kwargs, "max_new_tokens": 3})
            raise RuntimeError("injected: static cache failed part-way")
        return real(self, *args, cache_implementation=cache_implementation, streamer=streamer, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", generate)
    fallbacks = Fallbacks()
    static = demo_config(workdir, *CHAT, "generate.static_cache=true")
    parts = list(stream_answer(model, tokenizer, static, question, fallbacks=fallbacks))
    assert parts[-1] == expected and [r["optimisation"] for r in fallbacks.records] == ["static_cache"]


def _append(workdir: str, who: int, n: int) -> None:
    from medqa.ratings import record_feedback

    cfg = demo_config(Path(workdir))
    for i in range(n):
        record_feedback(cfg, {"who": who, "i": i, "answer": f"{who}" * 200_000})


def test_concurrent_ratings_never_interleave(tmp_path):
    """Two processes (two tabs' servers) append large ratings at once: every line is one whole JSON object."""
    from medqa.workdir import paths

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append, args=(str(tmp_path), who, 15)) for who in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    rows = [json.loads(line) for line in paths(demo_config(tmp_path)).chat_feedback.read_text().splitlines()]
    assert sorted((r["who"], r["i"]) for r in rows) == [(w, i) for w in (1, 2) for i in range(15)]
    assert all(r["answer"] == str(r["who"]) * 200_000 for r in rows)


def test_settings_outside_the_configs_bounds_are_refused(tmp_path):
    from medqa.chat import check_question, with_settings
    from medqa.errors import ConfigError

    cfg = demo_config(tmp_path)
    assert with_settings(cfg, temperature=1.3, max_new_tokens=40.0).generate.max_new_tokens == 40
    with pytest.raises(ConfigError, match="top_p"):
        with_settings(cfg, top_p=1.5)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        with_settings(cfg, max_new_tokens=cfg.data.max_length)
    with pytest.raises(ValueError, match="Type a question"):
        check_question(" \n ")


def test_multi_turn_only_with_a_chat_template_and_oldest_turns_go_first(workdir):
    """A chat template holds earlier turns (oldest first, each model its own answers); what does not fit in the
    prompt's room is dropped oldest first. prompt.template holds one question: single-turn, history refused."""
    from test_real_model_support import CHAT
    from transformers import AutoTokenizer

    from medqa.errors import ConfigError
    from medqa.prompts import multi_turn, prompt_ids

    plain = demo_config(workdir)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "models" / "tiny-biogpt")
    assert not multi_turn(tokenizer, plain.prompt)
    with pytest.raises(ConfigError, match="use_chat_template"):
        prompt_ids(tokenizer, plain.prompt, "and now?", history=[("first question", "first answer")])

    tokenizer.chat_template = CHAT
    cfg = demo_config(workdir, "prompt.use_chat_template=true")
    assert multi_turn(tokenizer, cfg.prompt)
    history = [("my knee hurts", "rest it"), ("my back hurts too", "see a doctor")]
    text = tokenizer.decode(prompt_ids(tokenizer, cfg.prompt, "and my neck?", history=history))
    assert text.index("knee") < text.index("rest") < text.index("back") < text.index("doctor") < text.index("neck")
    alone = prompt_ids(tokenizer, cfg.prompt, "and my neck?")
    newest = prompt_ids(tokenizer, cfg.prompt, "and my neck?", history=history[1:])
    cut = prompt_ids(tokenizer, cfg.prompt, "and my neck?", max_length=len(newest), history=history)
    assert cut == newest and len(alone) < len(newest)
