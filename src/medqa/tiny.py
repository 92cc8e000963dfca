"""A tiny BioGPT-architecture model, built offline in seconds, for the demo and the tests.

The tokenizer is a real `BioGptTokenizer`: either the real BioGPT vocab.json/merges.txt (when
`model.tiny.tokenizer_files` names them) or files in the same format learned from the training split: Moses
pre-tokenisation exactly as BioGptTokenizer does it, then BPE with `</w>` word ends (`learn_bpe`, deterministic:
the same texts give byte-identical files on every run). Special ids follow BioGPT: <s>=0, <pad>=1, </s>=2, <unk>=3.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from medqa.artifacts import atomic_dir
from medqa.schema import TinyModelConfig

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as in microsoft/biogpt


def learn_bpe(word_counts: dict[str, int], vocab_size: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Byte-pair encoding learned from word counts, deterministically: (vocabulary, merges).

    Words are split into characters with `</w>` on the last one (BioGPT's format); the vocabulary is the special
    tokens, the sorted alphabet, then one token per merge, until `vocab_size`. Each step merges the most frequent
    adjacent pair; ties go to the smallest pair in string order. (The `tokenizers` library's trainer breaks ties
    by hash-map order, which differs between processes: two identical runs learned different vocabularies.)"""
    import heapq
    from collections import defaultdict

    words = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in sorted(word_counts) if w]
    counts = [word_counts[w] for w in sorted(word_counts) if w]
    alphabet = sorted({sym for w in words for sym in w})
    vocab = SPECIAL_TOKENS + [a for a in alphabet if a not in SPECIAL_TOKENS]
    pair_count: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_count[pair] += counts[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg:  # stale entry: the count changed since it was pushed
            continue
        if -neg < 1:
            break
        a, b = pair
        merged = a + b
        merges.append(pair)
        vocab.append(merged)
        changed: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair, ())):
            w, n = words[i], counts[i]
            for old in zip(w, w[1:]):
                pair_count[old] -= n
                changed.add(old)
            out, k = [], 0
            while k < len(w):
                if k + 1 < len(w) and w[k] == a and w[k + 1] == b:
                    out.append(merged)
                    k += 2
                else:
                    out.append(w[k])
                    k += 1
            words[i] = w = tuple(out)
            for new in zip(w, w[1:]):
                pair_count[new] += n
                where[new].add(i)
                changed.add(new)
        pair_count.pop(pair, None)
        for p in changed:
            c = pair_count.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                pair_count.pop(p, None)
    return vocab, merges


def learn_biogpt_vocab(texts: Iterable[str], vocab_size: int, out_dir: Path) -> None:
    """Write BioGPT-format vocab.json and merges.txt learned from `texts` (byte-identical on every run)."""
    from collections import Counter

    from sacremoses import MosesTokenizer

    moses = MosesTokenizer(lang="en")
    # Same call as BioGptTokenizer.moses_tokenize, so the learned pieces match what it will look up.
    word_counts = Counter(
        w for t in texts for w in moses.tokenize(t, aggressive_dash_splits=True, return_str=False, escape=True)
    )
    tokens, merges = learn_bpe(word_counts, vocab_size)
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    (out_dir / "merges.txt").write_text("\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")


def build_tiny_model(texts: list[str], cfg: TinyModelConfig, out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tokenizer and a randomly initialised BioGptForCausalLM; save both with save_pretrained."""
    import torch
    from transformers import BioGptConfig, BioGptForCausalLM, BioGptTokenizer

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        files = tmp / "_bpe"
        if cfg.tokenizer_files:
            src = Path(cfg.tokenizer_files)
            files.mkdir()
            for name in ("vocab.json", "merges.txt"):
                shutil.copyfile(src / name, files / name)
        else:
            learn_biogpt_vocab(texts, cfg.vocab_size, files)
        tokenizer = BioGptTokenizer(
            vocab_file=str(files / "vocab.json"),
            merges_file=str(files / "merges.txt"),
            model_max_length=cfg.max_positions,
        )
        shutil.rmtree(files)
        config = BioGptConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.max_positions,
            initializer_range=cfg.initializer_range,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(seed)
        model = BioGptForCausalLM(config)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("Built tiny BioGPT at %s: %d tokens, %d parameters.", out_dir, len(tokenizer), n_params)
    return out_dir
