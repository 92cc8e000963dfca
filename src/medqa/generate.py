"""Answering questions: the same prompt as training (`prompts.prompt_ids`), batched with left padding; on CUDA
with a static KV cache (`generate.static_cache`), which transformers compiles. If static-cache decoding fails,
the batch is decoded again with the ordinary dynamic cache, and so are the rest (one warning, recorded).

`generate_answers` answers a list at once (ask, evaluate, the notebooks); `stream_answer` answers one question
as it is generated (`medqa chat`). Both build the batch with `_batch`, the settings with `_settings` and decode
with `_decode`, so a streamed answer ends as exactly the text `generate_answers` returns for the same question."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

from medqa.batching import eval_tokens_per_batch, length_budget_batches
from medqa.fallbacks import Fallbacks
from medqa.prompts import eos_id, prompt_ids
from medqa.schema import Config


def generate_answers(
    model,
    tokenizer,
    cfg: Config,
    questions: list[str],
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    fallbacks: Fallbacks | None = None,
    progress: bool = False,
) -> list[str]:
    """Greedy (by default) answers, in the order of `questions`. Prompts are grouped by length and padded on
    the left, so every row's answer starts right after its own prompt. A static-cache failure is recorded in
    `fallbacks` (evaluate's report). `progress`: a progress bar over the batches, as test scoring shows."""
    from tqdm.auto import tqdm

    g = cfg.generate
    max_new = max_new_tokens or g.max_new_tokens
    room = max(cfg.data.max_length - max_new, 16)
    prompts = [prompt_ids(tokenizer, cfg.prompt, q, room) for q in questions]
    static = _static(cfg, model)
    answers: list[str] = [""] * len(questions)
    was_training = model.training
    model.eval()
    # At most generate.batch_size prompts, and no more than fit the scoring token budget (prompt + new tokens per
    # row): a small GPU gets smaller batches instead of running out of memory.
    budget = eval_tokens_per_batch(cfg.scoring.tokens_per_batch, model)
    batches = _capped(
        length_budget_batches([len(p) + max_new for p in prompts], batch_size or g.batch_size, budget),
        batch_size or g.batch_size,
    )
    for idx in tqdm(batches, desc="generate", disable=not progress, leave=False):
        ids, mask, width = _batch(tokenizer, [prompts[i] for i in idx], static)
        out, static = _decode(model, _settings(cfg, tokenizer, model, ids, mask, max_new), static, fallbacks)
        for row, i in enumerate(idx):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    model.train(was_training)
    return answers


def stream_answer(
    model,
    tokenizer,
    cfg: Config,
    question: str,
    history: Sequence[tuple[str, str]] = (),
    fallbacks: Fallbacks | None = None,
) -> Iterator[str]:
    """The answer to one question so far, as it is generated (transformers' TextIteratorStreamer, generation in
    a thread); the last text yielded is the whole answer, decoded as `generate_answers` decodes it. `history`:
    earlier (question, answer) turns, for a chat template (`prompts.multi_turn`). Beam search cannot stream: with
    generate.num_beams > 1 the answer comes at once."""
    g = cfg.generate
    room = max(cfg.data.max_length - g.max_new_tokens, 16)
    static = _static(cfg, model)
    ids, mask, width = _batch(tokenizer, [prompt_ids(tokenizer, cfg.prompt, question, room, history)], static)
    settings = _settings(cfg, tokenizer, model, ids, mask, g.max_new_tokens)
    streamer = _streamer(tokenizer) if g.num_beams == 1 else None  # transformers streams no beam search
    if streamer is not None:
        settings["streamer"] = streamer
    result: dict = {}

    def run() -> None:
        was_training = model.training
        model.eval()
        try:
            result["out"] = _decode(model, settings, static, fallbacks)[0]
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread below
            result["error"] = exc
            if streamer is not None:
                streamer.end()  # the caller stops waiting for text
        finally:
            model.train(was_training)

    thread = threading.Thread(target=run, name="medqa-stream", daemon=True)
    thread.start()
    text = ""
    for piece in streamer or ():
        text = "" if piece is RESTART else text + piece
        yield text.strip()
    thread.join()
    if "error" in result:
        raise result["error"]
    yield tokenizer.decode(result["out"][0, width:], skip_special_tokens=True).strip()


RESTART = object()  # streamed in place of text: drop the text so far, the answer starts over


def _streamer(tokenizer):
    """A TextIteratorStreamer (answer tokens only) that can start over: when static-cache decoding fails part-way,
    the dynamic cache generates the answer again from its prompt and the text streamed so far is dropped."""
    from transformers import TextIteratorStreamer

    class Streamer(TextIteratorStreamer):
        def restart(self) -> None:
            self.token_cache, self.print_len, self.next_tokens_are_prompt = [], 0, True
            self.text_queue.put(RESTART, timeout=self.timeout)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _static(cfg: Config, model) -> bool:
    g = cfg.generate
    device = next(model.parameters()).device
    return g.static_cache is True or (g.static_cache == "auto" and device.type == "cuda")


def _batch(tokenizer, prompts: list[list[int]], static: bool):
    """Left-padded input ids and attention mask, and their width. A static KV cache has one shape per (batch,
    prompt width) pair, which transformers compiles on CUDA; prompt widths rounded up to a multiple of 64 (more
    left padding, masked) keep the number of compiled shapes small."""
    import torch

    round_to = 64 if static else 1
    width = -(-max(len(p) for p in prompts) // round_to) * round_to
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask, width


def _settings(cfg: Config, tokenizer, model, ids, mask, max_new: int) -> dict:
    """model.generate's arguments from the generate section."""
    g = cfg.generate
    device = next(model.parameters()).device
    return dict(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new,
        do_sample=g.do_sample,
        temperature=g.temperature if g.do_sample else None,
        top_p=g.top_p if g.do_sample else None,
        num_beams=g.num_beams,
        repetition_penalty=g.repetition_penalty,
        no_repeat_ngram_size=g.no_repeat_ngram_size,
        eos_token_id=eos_id(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )


def _decode(model, settings: dict, static: bool, fallbacks: Fallbacks | None):
    """model.generate with the static cache when `static`, else (or when that fails) the dynamic one. Returns
    the output ids and whether the static cache is still in use (False after a fallback: later batches too)."""
    import torch

    with torch.inference_mode():
        out = None
        try:
            out = model.generate(**settings, cache_implementation="static" if static else None)
        except Exception as exc:  # noqa: BLE001 - only the static cache falls back; a dynamic failure raises
            if not static:
                raise
            static = False  # this batch again, and every later one, with the dynamic cache (the same answers)
            (fallbacks if fallbacks is not None else Fallbacks()).record(
                "static_cache", exc, "generation with the dynamic KV cache"
            )
        if out is None:  # retried outside the except block, so the failed attempt's memory is released
            if settings.get("streamer") is not None:
                settings["streamer"].restart()
            out = model.generate(**settings)
    return out, static


def _capped(batches: list[list[int]], size: int) -> list[list[int]]:
    """Token-budget batches split further so none holds more than `size` prompts."""
    return [b[i : i + size] for b in batches for i in range(0, len(b), size)]
