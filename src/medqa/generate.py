"""Answering questions: the same prompt as training (`prompts.prompt_ids`), batched with left padding; on CUDA
with a static KV cache (`generate.static_cache`), which transformers compiles. If static-cache decoding fails,
the batch is decoded again with the ordinary dynamic cache, and so are the rest (one warning, recorded)."""

from __future__ import annotations

from medqa.batching import eval_tokens_per_batch
from medqa.fallbacks import Fallbacks
from medqa.schema import Config
from medqa.metrics import length_batches
from medqa.prompts import eos_id, prompt_ids


def generate_answers(model, tokenizer, cfg: Config, questions: list[str], max_new_tokens: int | None = None,
                     batch_size: int | None = None, fallbacks: Fallbacks | None = None) -> list[str]:
    """Greedy (by default) answers, in the order of `questions`. Prompts are grouped by length and padded on
    the left, so every row's answer starts right after its own prompt. A static-cache failure is recorded in
    `fallbacks` (evaluate's report)."""
    import torch

    g = cfg.generate
    max_new = max_new_tokens or g.max_new_tokens
    room = max(cfg.data.max_length - max_new, 16)
    prompts = [prompt_ids(tokenizer, cfg.prompt, q, room) for q in questions]
    device = next(model.parameters()).device
    # A static KV cache has one shape per (batch, prompt width) pair, which transformers compiles on CUDA; prompt
    # widths rounded up to a multiple of 64 (more left padding, masked) keep the number of compiled shapes small.
    static = g.static_cache is True or (g.static_cache == "auto" and device.type == "cuda")
    round_to = 64 if static else 1
    answers: list[str] = [""] * len(questions)
    was_training = model.training
    model.eval()
    # At most generate.batch_size prompts, and no more than fit the scoring token budget (prompt + new tokens per
    # row): a small GPU gets smaller batches instead of running out of memory.
    budget = eval_tokens_per_batch(cfg.scoring.tokens_per_batch, model)
    for idx in _capped(length_batches([len(p) + max_new for p in prompts], batch_size or g.batch_size, budget),
                       batch_size or g.batch_size):
        width = -(-max(len(prompts[i]) for i in idx) // round_to) * round_to
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(prompts[i])) + prompts[i] for i in idx])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
        settings = dict(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
                        do_sample=g.do_sample, temperature=g.temperature if g.do_sample else None,
                        top_p=g.top_p if g.do_sample else None, num_beams=g.num_beams,
                        repetition_penalty=g.repetition_penalty, no_repeat_ngram_size=g.no_repeat_ngram_size,
                        eos_token_id=eos_id(tokenizer), pad_token_id=tokenizer.pad_token_id)
        with torch.inference_mode():
            out = None
            try:
                out = model.generate(**settings, cache_implementation="static" if static else None)
            except Exception as exc:  # noqa: BLE001 - only the static cache falls back; a dynamic failure raises
                if not static:
                    raise
                static = False  # this batch again, and every later one, with the dynamic cache (the same answers)
                (fallbacks if fallbacks is not None else Fallbacks()).record(
                    "static_cache", exc, "generation with the dynamic KV cache")
            if out is None:  # retried outside the except block, so the failed attempt's memory is released
                out = model.generate(**settings)
        for row, i in enumerate(idx):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    model.train(was_training)
    return answers


def _capped(batches: list[list[int]], size: int) -> list[list[int]]:
    """Token-budget batches split further so none holds more than `size` prompts."""
    return [b[i:i + size] for b in batches for i in range(0, len(b), size)]

