"""A fast path for BioGPT's tokenizer in `medqa prepare`: the same token ids as `BioGptTokenizer`, about 5x sooner.

`BioGptTokenizer` (transformers) is slow-only: Moses pre-tokenisation (sacremoses) then BPE, in Python, at about
335 HealthCareMagic records/s on one core. Profiling shows where the time goes, and none of it is the algorithm:

- sacremoses' `islower()` / `isanyalpha()` rebuild a set of every lower-case (or alphabetic) Unicode character on
  each call, once per token that ends in a period: half of the run. Here the sets are built once (same test).
- transformers splits the text on its added tokens with a trie and converts every BPE piece to an id through two
  dictionaries and a few method calls. Here a text that holds no added token (`<s>`, `</s>`, `<pad>`, `<unk>`)
  goes straight to Moses, and each word's ids are cached; a text that holds one takes the slow path.

The algorithm is BioGptTokenizer's own: its `bpe()` (with its cache), its vocabulary, its Moses settings, its
special tokens. `tests/test_fasttok.py` checks identical ids on every real and synthetic record and on adversarial
text. Any other tokenizer class (or a subclass) is not known here: `fast_encoder` returns None and prepare uses
the tokenizer as it is, and says which path ran.

Worker processes (`data.num_proc`) receive the encoder as a few bytes (the tokenizer's folder) and load it once per
process, instead of unpickling a tokenizer with its caches.
"""

from __future__ import annotations

import json
import logging
import re
from functools import lru_cache

log = logging.getLogger(__name__)


def fast_encoder(tokenizer) -> FastBioGptEncoder | None:
    """The fast encoder for `tokenizer` when it is exactly transformers' BioGptTokenizer, else None."""
    if type(tokenizer).__name__ != "BioGptTokenizer" or type(tokenizer).__module__.split(".")[0] != "transformers":
        return None
    if getattr(tokenizer, "do_lower_case", False) or tokenizer.init_kwargs.get("do_lower_case"):
        return None  # not BioGPT's setting; the generic path handles it
    if set(tokenizer.added_tokens_encoder) != set(_BIOGPT_SPECIALS.values()) or getattr(
        tokenizer, "split_special_tokens", False
    ):
        return None  # tokens added to it (with their strip rules) are the generic path's business
    if any(str(getattr(tokenizer, name)) != token for name, token in _BIOGPT_SPECIALS.items()):
        return None
    return FastBioGptEncoder(tokenizer)


class FastBioGptEncoder:
    """`encoder(text, add_special_tokens=...)["input_ids"]` as `tokenizer(text, ...)["input_ids"]` gives it."""

    path = "fast"

    def __init__(self, tokenizer):
        self._setup(tokenizer)

    def _setup(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        moses = tokenizer.sm.MosesTokenizer(lang=tokenizer.lang)
        lower, alpha = frozenset(moses.IsLower), frozenset(moses.IsAlpha)
        # The same predicates as sacremoses' own, with the character sets built once instead of per call.
        moses.islower = lambda text: not set(text).difference(lower)
        moses.isanyalpha = lambda text: any(set(text).intersection(alpha))
        moses.handles_nonbreaking_prefixes = _nonbreaking_prefixes(moses)
        _guard_literal_regexes(moses)
        self.moses = moses
        added = list(tokenizer.added_tokens_encoder)
        self._added = (
            re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True))) if added else None
        )
        self._added_ids = dict(tokenizer.added_tokens_encoder)
        self._vocab = tokenizer.encoder
        self._unk = tokenizer.encoder.get(tokenizer.unk_token)
        self._word_ids: dict[str, list[int]] = {}

    # Worker processes get the vocabulary and merges (once per process, as datasets.map sends its arguments),
    # never the tokenizer object with its caches and Moses tables; each process builds its own once.
    def __getstate__(self) -> dict:
        tok = self.tokenizer
        merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
        specials = {k: str(getattr(tok, k)) for k in ("bos_token", "eos_token", "sep_token", "unk_token", "pad_token")}
        return {
            "vocab": json.dumps(tok.encoder, ensure_ascii=False),
            "merges": "\n".join(f"{a} {b}" for a, b in merges) + "\n",
            "specials": json.dumps(specials),
            "name_or_path": str(tok.name_or_path),
        }

    def __setstate__(self, state: dict) -> None:
        self._setup(_rebuild_biogpt(state["vocab"], state["merges"], state["specials"], state["name_or_path"]))

    def __getattr__(self, name):  # eos_token_id, chat_template, ...: the tokenizer's own
        if name == "tokenizer":
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def _piece_id(self, piece: str) -> int:
        found = self._added_ids.get(piece)
        return found if found is not None else self._vocab.get(piece, self._unk)

    def ids(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens."""
        if not text or (self._added is not None and self._added.search(text)):
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]  # added tokens: the slow path
        out: list[int] = []
        cache = self._word_ids
        for word in self.moses.tokenize(text, aggressive_dash_splits=True, return_str=False, escape=True):
            if not word:
                continue
            ids = cache.get(word)
            if ids is None:
                ids = cache[word] = [self._piece_id(p) for p in self.tokenizer.bpe(word).split(" ")]
            out.extend(ids)
        return out

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = self.ids(text)
        if add_special_tokens:
            ids = self.tokenizer.build_inputs_with_special_tokens(ids)
        return {"input_ids": ids}


def _nonbreaking_prefixes(moses):
    """sacremoses' `handles_nonbreaking_prefixes`, step for step, with its two per-token regular expressions
    (`^(\\S+)\\.$` and `^[0-9]+`) written as string tests: the tokens come from `str.split()`, so they hold no
    white space, and `\\S+\\.$` is "at least one character, then a final period"."""
    prefixes, numeric_only = moses.NONBREAKING_PREFIXES, moses.NUMERIC_ONLY_PREFIXES
    isanyalpha, islower = moses.isanyalpha, moses.islower

    def handles_nonbreaking_prefixes(text):
        tokens = text.split()
        num_tokens = len(tokens)
        for i, token in enumerate(tokens):
            if len(token) < 2 or token[-1] != ".":
                continue
            prefix = token[:-1]
            if (
                ("." in prefix and isanyalpha(prefix))
                or (prefix in prefixes and prefix not in numeric_only)
                or (i != num_tokens - 1 and tokens[i + 1] and islower(tokens[i + 1][0]))
            ):
                pass
            elif prefix in numeric_only and (i + 1) < num_tokens and tokens[i + 1][:1] in _DIGITS:
                pass
            else:
                tokens[i] = prefix + " ."
        return " ".join(tokens)

    return handles_nonbreaking_prefixes


_DIGITS = frozenset("0123456789")
# BioGPT's special tokens: the only added tokens the fast path knows (and rebuilds in worker processes).
_BIOGPT_SPECIALS = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}


class _Guarded:
    """A compiled pattern that can only match where `needed` occurs: `sub` returns the text unchanged, without
    running the pattern, when `needed` is not in it (the result the pattern would give)."""

    def __init__(self, regex, needed: str):
        self.regex, self.needed, self.pattern = regex, needed, regex.pattern

    def sub(self, repl, text):
        return self.regex.sub(repl, text) if self.needed in text else text


def _guard_literal_regexes(moses) -> None:
    """The apostrophe, comma, dash and XML-escape rules each need one literal character ("'", ",", "-", or the
    escaped character itself) to match; most texts lack most of them. Checked against sacremoses' patterns
    (`tests/test_fasttok.py` asserts each pattern contains its character as a required literal)."""
    for name, needed in GUARDS.items():
        value = getattr(moses, name)
        if isinstance(value, tuple):
            setattr(moses, name, (_Guarded(value[0], needed), value[1]))
        else:
            setattr(moses, name, [(_Guarded(r, needed), sub) for r, sub in value])
    moses.MOSES_ESCAPE_XML_REGEXES = [
        (_Guarded(r, _ESCAPED[r.pattern]), sub) for r, sub in moses.MOSES_ESCAPE_XML_REGEXES
    ]


# sacremoses attribute -> the literal character every one of its patterns requires
GUARDS = {
    "ENGLISH_SPECIFIC_APOSTROPHE": "'",
    "COMMA_SEPARATE_1": ",",
    "COMMA_SEPARATE_2": ",",
    "COMMA_SEPARATE_3": ",",
    "AGGRESSIVE_HYPHEN_SPLIT": "-",
}
_ESCAPED = {"&": "&", r"\|": "|", "<": "<", ">": ">", r"\'": "'", r"\"": '"', r"\[": "[", "]": "]"}


@lru_cache(maxsize=4)
def _rebuild_biogpt(vocab: str, merges: str, specials: str, name_or_path: str):
    """A BioGptTokenizer from its vocabulary and merges, once per process (cached on their content)."""
    import tempfile
    from pathlib import Path

    from transformers import BioGptTokenizer

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(vocab, encoding="utf-8")
        (Path(d) / "merges.txt").write_text(merges, encoding="utf-8")
        tok = BioGptTokenizer(
            vocab_file=str(Path(d) / "vocab.json"), merges_file=str(Path(d) / "merges.txt"), **json.loads(specials)
        )
    tok.name_or_path = name_or_path
    return tok
