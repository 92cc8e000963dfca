"""A tiny BioGPT-architecture model, built offline in seconds, for the demo and the tests.

The tokenizer is a real `BioGptTokenizer`: either the real BioGPT vocab.json/merges.txt (when
`model.tiny.tokenizer_files` names them) or files in the same format learned from the training split: Moses
pre-tokenisation exactly as BioGptTokenizer does it, then BPE with `</w>` word ends (the `tokenizers` library's
trainer, whose merges are in the same "a b" format). Special ids follow BioGPT: <s>=0, <pad>=1, </s>=2, <unk>=3.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from medqa.artifacts import atomic_dir
from medqa.config import TinyModelConfig

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as in microsoft/biogpt


def learn_biogpt_vocab(texts: Iterable[str], vocab_size: int, out_dir: Path) -> None:
    """Write BioGPT-format vocab.json and merges.txt learned from `texts`."""
    from sacremoses import MosesTokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    moses = MosesTokenizer(lang="en")
    # Same call as BioGptTokenizer.moses_tokenize, so the learned pieces match what it will look up.
    words = (" ".join(moses.tokenize(t, aggressive_dash_splits=True, return_str=False, escape=True)) for t in texts)
    tok = Tokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  end_of_word_suffix="</w>", show_progress=False)
    tok.train_from_iterator(words, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    (out_dir / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")


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
        tokenizer = BioGptTokenizer(vocab_file=str(files / "vocab.json"), merges_file=str(files / "merges.txt"),
                                    model_max_length=cfg.max_positions)
        shutil.rmtree(files)
        config = BioGptConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.max_positions, initializer_range=cfg.initializer_range,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
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
