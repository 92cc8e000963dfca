"""The fast path for BioGPT's tokenizer gives BioGptTokenizer's ids exactly: on every shipped real record, on the
5,452 synthetic ones when ../shared is there, on adversarial text, in worker processes and through `prepare`."""

from __future__ import annotations

import json
import pickle
import re

import pytest
from conftest import BIOGPT_TOKENIZER, REAL_500, SYNTHETIC_5K, demo_config

from medqa.fasttok import GUARDS, fast_encoder

ADVERSARIAL = [
    "",
    " ",
    "\t\n",
    ".",
    "...",
    "?!",
    "''",
    '"quoted"',
    "a",
    "A.",
    "x" * 300,
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "Take 5mg/kg twice daily, i.e. 10-15 mg; BP 120/80 mmHg; temp 37.5°C (99.5°F); 1,000.5 ml; 2.5x; 10%.",
    "Dr. Smith, M.D., saw Mr. J. R. R. Tolkien at 3 p.m. on Jan. 5th, e.g. No. 5 vs. no. 6, U.S.A. & U.K.",
    "I'm 23, can't sleep; it's my kids' school's fault. 'Tis rock'n'roll. O'Neil's rock 'n' roll isn't.",
    "HTML leftovers: &amp; &lt;b&gt; <br> <p>text</p> &nbsp; &#39; [1] | pipe | {braces} <unk> left",
    "Special tokens in text: </s> and <s> and <pad> and <unk> should not vanish.",
    "Unicode: café naïve Ångström Straße İstanbul ǅ ﬁ ½ ² µg Ω ≥ ≤ → ✓ 😀 👩‍⚕️ 中文 العربية עברית हिन्दी ไทย",
    "Combining: e\u0301 n\u0303 a\u0308 ",
    "Dashes — en – minus − hyphen-ated non-breaking‑hyphen em—dash --double --- triple",
    "Ellipsis… and dots.... and .5 and 5. and 5.5.5 and a.b.c. and .NET and node.js",
    "Quotes “curly” ‘single’ «guillemets» „low“ ‚low‘ `backtick´",
    "Numbers: 1st 2nd 3rd 4th, 10,000 vs 10.000, 1e-5, -5, +5, 5-10, 5–10, 1/2, 3:30, 24h, #5, 50$, $50, €5, 5€",
    "Mixed CASE and ALLCAPS SENTENCE. another sentence starts lower. Final.",
    "Tabs\tand\nnewlines\r\nand\u00a0non-breaking\u2009thin\u3000ideographic spaces",
    "url-like www.example.com and e-mail a.b@c.de and path C:\\dir\\file and ~/home/x_y-z",
    "Repeated!!!! punctuation???? ,,,, ;;;; :::: ---- ____ ==== ++++ ****",
]


@pytest.fixture(scope="module")
def tokenizers():
    from transformers import BioGptTokenizer

    slow = BioGptTokenizer.from_pretrained(str(BIOGPT_TOKENIZER))
    fast = fast_encoder(BioGptTokenizer.from_pretrained(str(BIOGPT_TOKENIZER)))  # caches of its own
    assert fast is not None
    return slow, fast


def _texts(path) -> list[str]:
    return [
        r[k]
        for r in json.loads(path.read_text())
        if isinstance(r, dict)
        for k in ("instruction", "input", "output")
        if isinstance(r.get(k), str)
    ]


def _same(slow, fast, texts):
    for special in (False, True):
        expected = [slow(t, add_special_tokens=special)["input_ids"] for t in texts]
        got = [fast(t, add_special_tokens=special)["input_ids"] for t in texts]
        diff = [texts[i][:80] for i, (a, b) in enumerate(zip(expected, got)) if a != b]
        assert not diff, diff[:3]


def test_identical_ids_on_every_shipped_real_record(tokenizers):
    texts = _texts(REAL_500)
    assert len(texts) == 1500
    _same(*tokenizers, texts)


@pytest.mark.slow
def test_identical_ids_on_every_synthetic_record(tokenizers, synthetic_5k):
    """Slow (5,452 records through both tokenizers): the only check on the whole synthetic set; the fast set
    compares the shipped sample and adversarial text."""
    _same(*tokenizers, _texts(synthetic_5k))


def test_identical_ids_on_adversarial_text(tokenizers):
    slow, fast = tokenizers
    _same(slow, fast, ADVERSARIAL)
    # and after medqa's cleaning, as prepare feeds it
    from medqa.cleaning import clean_text

    _same(slow, fast, [clean_text(t) for t in ADVERSARIAL])


def test_identical_training_examples(tokenizers):
    """encode_example (prompt, question cut, answer, EOS) through either path."""
    from medqa.config import PromptConfig
    from medqa.prompts import encode_example

    slow, fast = tokenizers
    records = json.loads(REAL_500.read_text())[:150]
    for length in (512, 96):
        for r in records:
            a = encode_example(slow, PromptConfig(), r["input"], r["output"], length)
            b = encode_example(fast, PromptConfig(), r["input"], r["output"], length)
            assert (a.input_ids, a.labels, a.truncated) == (b.input_ids, b.labels, b.truncated)


def test_workers_get_a_small_state_and_the_same_ids(tokenizers):
    slow, fast = tokenizers
    assert set(fast.__getstate__()) == {"vocab", "merges", "specials", "name_or_path"}  # no caches, no Moses tables
    state = pickle.dumps(fast)
    assert len(state) < 3_000_000
    copy = pickle.loads(state)
    _same(slow, copy, ADVERSARIAL[:12])
    assert copy.eos_token_id == slow.eos_token_id and copy.pad_token_id == slow.pad_token_id


def test_guarded_patterns_require_their_character():
    """Each guarded sacremoses pattern can only match where its character is: the guard skips a no-op."""
    from sacremoses import MosesTokenizer

    moses = MosesTokenizer(lang="en")

    def skeleton(pattern: str) -> str:
        return re.sub(r"\[\^?[^\]]{20,}\]", "[CLASS]", pattern)

    expected = {
        "'": {"([CLASS])[']([CLASS])", "([CLASS])[']([s])"},
        ",": {"([CLASS])[,]", "[,]([CLASS])", "([CLASS])[,]$"},
        "-": {"([CLASS])\\-(?=[CLASS])"},
    }
    for name, needed in GUARDS.items():
        value = getattr(moses, name)
        patterns = [value[0].pattern] if isinstance(value, tuple) else [r.pattern for r, _ in value]
        for pattern in patterns:
            assert skeleton(pattern) in expected[needed], (name, skeleton(pattern))
    assert all(len(re.sub(r"\\", "", r.pattern)) == 1 for r, _ in moses.MOSES_ESCAPE_XML_REGEXES)


def test_other_tokenizers_take_the_slow_path(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BioGptTokenizer, PreTrainedTokenizerFast

    word = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    assert fast_encoder(PreTrainedTokenizerFast(tokenizer_object=word)) is None

    class MyBioGpt(BioGptTokenizer):
        pass

    assert fast_encoder(MyBioGpt.from_pretrained(str(BIOGPT_TOKENIZER))) is None
    # tokens added to BioGPT's tokenizer (with their strip rules) are not the fast path's business
    from transformers import AddedToken

    added = BioGptTokenizer.from_pretrained(str(BIOGPT_TOKENIZER))
    added.add_tokens([AddedToken("covid19", lstrip=True, rstrip=True)])
    assert fast_encoder(added) is None


def test_prepare_says_which_path_ran_and_both_give_the_same_data(tmp_path):
    """The real records through prepare: fast (num_proc 2: worker processes) and slow give identical tokenized
    splits; the report names the path."""
    import datasets

    from medqa.prepare import prepare

    outputs = {}
    for path, extra in (
        ("fast", ["data.fast_tokenizer=true", "data.num_proc=2"]),
        ("slow", ["data.fast_tokenizer=false"]),
    ):
        cfg = demo_config(
            tmp_path / path,
            f"data.source={REAL_500}",
            f"model.tokenizer={BIOGPT_TOKENIZER}",
            "model.tiny.vocab_size=64",
            f"model.tiny.tokenizer_files={BIOGPT_TOKENIZER}",
            *extra,
        )
        report = prepare(cfg).report
        assert report["tokenizer_path"] == path
        outputs[path] = {
            s: datasets.load_from_disk(str(tmp_path / path / "tokenized" / f"tokenized_{s}"))[:]
            for s in ("train", "val", "test")
        }
    assert outputs["fast"] == outputs["slow"]


def test_real_demo_config_reads_only_files_in_the_repository():
    from conftest import REPO

    from medqa.config import load_config

    cfg = load_config(REPO / "configs" / "smollm2-offline.yaml")
    assert (REPO / cfg.data.source).resolve().is_relative_to(REPO) and (REPO / cfg.data.source).is_file()
    assert ".." not in cfg.data.source and "shared" not in json.dumps(cfg.to_dict())
    assert SYNTHETIC_5K.name not in json.dumps(cfg.to_dict())


def test_real_data_fixtures_come_from_the_repository():
    """A clone without ../shared runs the real-record and real-tokenizer tests: their files are shipped."""
    from conftest import REPO

    for path in (
        REAL_500,
        BIOGPT_TOKENIZER / "vocab.json",
        BIOGPT_TOKENIZER / "merges.txt",
        BIOGPT_TOKENIZER / "LICENSE",
        REAL_500.parent / "README.md",
    ):
        assert path.is_file() and path.resolve().is_relative_to(REPO.resolve()), path
    assert "research" in (REAL_500.parent / "README.md").read_text()
