"""The schema: every field declares what it affects, and the lists other modules need are derived from that and equal
the lists those modules kept by hand before (git 8b5094a), so behaviour stayed the same."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from types import SimpleNamespace

import pytest
from conftest import REPO

from medqa import schema
from medqa.config import load_config
from medqa.errors import ConfigError
from medqa.schema import AFFECTS, FIELDS, Config, Section


def _leaf_fields(cls, prefix=""):
    """Every field that is not a section, found without `schema.FIELDS` (a plain dataclass counts as a leaf)."""
    for f in dataclasses.fields(cls):
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            yield from _leaf_fields(f.default_factory, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def test_every_field_declares_what_it_affects():
    missing = [key for key, f in _leaf_fields(Config) if f.metadata.get("affects") not in AFFECTS]
    assert not missing, f"declare affects= ({', '.join(AFFECTS)}) on these fields in schema.py: {missing}"
    assert set(FIELDS) == {key for key, _ in _leaf_fields(Config)}
    for key, f in _leaf_fields(Config):
        assert f.metadata.get("help"), f"{key} has no help text"


def test_every_section_is_a_section():
    """A nested dataclass that is not a `Section` would be neither validated nor walked."""
    for f in dataclasses.fields(Config):
        if dataclasses.is_dataclass(f.default_factory):
            assert issubclass(f.default_factory, Section), f.name


def test_help_names_every_choice():
    for key, f in FIELDS.items():
        for choice in f.metadata["choices"]:
            assert schema._show(choice) in f.metadata["help"], f"{key}: help does not name {choice!r}"


# ---------------------------------------------------------------------------- the lists, as they were kept by hand

OLD_NOT_DETERMINING = {  # manifest._NOT_DETERMINING; "evaluate" and "generate" stood for their whole sections
    "workdir",
    "force",
    "evaluate",
    "generate",
    "scoring.batch_size",
    "scoring.bootstrap_samples",
    "scoring.tokens_per_batch",
    "data.source",
    "data.num_proc",
    "data.fast_tokenizer",
    "model.name_or_path",
    "model.tokenizer",
    "model.gguf_file",
    "model.dtype",
    "model.tiny.path",
    "model.tiny.tokenizer_files",
    "train.resume",
    "train.compile",
    "train.compile_mode",
    "train.logging_steps",
    "train.report_to",
    "train.save_total_limit",
    "train.gradient_checkpointing",
    "train.loss_chunk_tokens",
    "train.ddp_timeout",
    "tune.resume",
    "tune.address",
    "tune.max_concurrent",
    "tune.max_failures",
    "tune.cpus_per_trial",
    "tune.gpus_per_trial",
}
OLD_SEARCHED = {
    "train.learning_rate": "learning_rate",
    "train.weight_decay": "weight_decay",
    "lora.r": "lora_r",
    "lora.alpha": "lora_alpha",
    "lora.dropout": "lora_dropout",
    "lora.targets": "lora_targets",
}
OLD_TUNE_PATHS = {
    "data.source",
    "model.name_or_path",
    "model.tokenizer",
    "model.gguf_file",
    "model.tiny.tokenizer_files",
}


def _old_prepare_settings(cfg, tokenizer):
    """workdir.prepared_inputs' settings list at 8b5094a, by hand."""
    from medqa.prompts import ENCODE_VERSION

    d = cfg.data
    return [
        ENCODE_VERSION,
        cfg.prompt.template,
        cfg.prompt.use_chat_template,
        cfg.prompt.system,
        getattr(tokenizer, "chat_template", None) if cfg.prompt.use_chat_template else None,
        cfg.prompt.min_question_tokens,
        d.max_length,
        d.question_field,
        d.answer_field,
        d.seed,
        d.train_fraction,
        d.val_fraction,
        d.hub_split,
        d.max_records,
        d.min_question_chars,
        d.min_answer_chars,
        d.max_question_tokens,
        d.max_answer_tokens,
    ]


def _expand(keys):
    """Section names to the dotted keys of their fields."""
    return {k for k in FIELDS if k in keys or k.split(".")[0] in keys}


# Declared since, affecting nothing a run or a search learns: left out of the fingerprints too.
NEW_NOT_DETERMINING = {"tune.final_knowledge_questions", "tune.final_knowledge_checks"}


def test_run_fingerprint_leaves_out_what_it_left_out_before():
    from medqa.manifest import _NOT_DETERMINING

    assert _NOT_DETERMINING == _expand(OLD_NOT_DETERMINING) | NEW_NOT_DETERMINING


def test_what_determines_a_training_run_is_what_train_py_names():
    """train.py's RUN_SECTIONS and SELECTION (what a training run's fingerprint holds) agree with the declarations:
    a section holds a field that affects the prepared data or training, a `tune` field is in SELECTION, exactly when
    it is declared so."""
    from medqa.runrecord import RUN_SECTIONS, SELECTION

    determining = schema.keys(("prepare", "train"), path=False)
    assert set(SELECTION) == {k for k in determining if k.startswith("tune.")}
    assert set(RUN_SECTIONS) == {k.split(".")[0] for k in determining if "." in k and not k.startswith("tune.")}
    assert set(schema.keys("search")) <= {k for k in FIELDS if k.startswith("tune.")}


# Declared since: searched after the old ones, so a seeded search over the old fields samples as before.
NEW_SEARCHED = {"train.max_steps": "max_steps"}


def test_search_space_is_the_declared_one():
    assert {key: name for name, (key, _) in schema.searched().items()} == {**OLD_SEARCHED, **NEW_SEARCHED}
    # the order Ray samples them in, for the seed
    assert list(schema.searched()) == list(OLD_SEARCHED.values()) + list(NEW_SEARCHED.values())


def test_tune_makes_the_same_paths_absolute_and_the_other_declared_ones():
    assert set(schema.keys(path=True)) == OLD_TUNE_PATHS | {
        "workdir",  # always made absolute, apart
        "model.tiny.path",
        "evaluate.external_test",
        "evaluate.bertscore_model",
        "evaluate.pubmedqa_file",
    }


def test_prepared_data_hashes_what_it_hashed_before():
    """The fields whose value is hashed into the prepared data's fingerprint: the old list, and data.test_fraction,
    which the other two fractions fix (it enters only when set away from its default, see below)."""
    old = {f"prompt.{f}" for f in ("template", "use_chat_template", "system", "min_question_tokens")} | {
        f"data.{f}"
        for f in (
            "max_length",
            "question_field",
            "answer_field",
            "seed",
            "train_fraction",
            "val_fraction",
            "hub_split",
            "max_records",
            "min_question_chars",
            "min_answer_chars",
            "max_question_tokens",
            "max_answer_tokens",
        )
    }
    # data.sources is fingerprinted per source (content and how it is read, not its weight)
    assert set(schema.keys("prepare", path=False)) - {"data.sources"} == old | {"data.test_fraction"}


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["prompt.use_chat_template=true", "prompt.system=Be brief."],
        ["data.max_length=256", "data.seed=7", "data.max_records=40", "data.hub_split=validation"],
        ["data.num_proc=2", "data.fast_tokenizer=false", "data.source=/elsewhere.json"],  # in no fingerprint
    ],
)
def test_prepared_data_fingerprint_is_the_same_bytes_as_before(overrides):
    """Data prepared and adapters trained before the schema declared the fields stay fresh."""
    from unittest import mock

    from medqa import workdir

    cfg = load_config(REPO / "configs" / "demo.yaml", overrides)
    tokenizer = SimpleNamespace(chat_template="{{ messages }}")
    with mock.patch.object(workdir, "tokenizer_info", return_value={"vocab_sha256": "v"}):
        now = workdir.prepared_inputs(cfg, tokenizer)["prompt_and_split"]
    assert now == hashlib.sha256(json.dumps(_old_prepare_settings(cfg, tokenizer)).encode()).hexdigest()


def test_a_field_declared_since_enters_the_fingerprint_when_set():
    """data.test_fraction was never hashed (the other two fractions fix it); set away from its default, as a new
    prepare field would be, it enters by name."""
    from medqa import workdir

    cfg = load_config(REPO / "configs" / "demo.yaml", ["data.train_fraction=0.7", "data.test_fraction=0.2"])
    assert workdir.prepare_settings(cfg, None)[-1] == {"data.test_fraction": 0.2}
    assert not isinstance(workdir.prepare_settings(load_config(REPO / "configs" / "demo.yaml"), None)[-1], dict)


# ------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.scheduler=step", "train.scheduler must be one of cosine, linear, constant_with_warmup, constant"),
        ("scoring.tokens_per_batch=-1", "scoring.tokens_per_batch must be >= 0; got -1"),
        ("scoring.knowledge_questions=501", "scoring.knowledge_questions must be between 0 and 500"),
        ("lora.dropout=1.0", "lora.dropout must be >= 0 and < 1; got 1.0"),
        ("generate.static_cache=1", "generate.static_cache must be one of auto, true, false"),
        ("model.tiny.vocab_size=10", "model.tiny.vocab_size must be >= 64"),
        ("tune.reduction_factor=1", "tune.reduction_factor must be >= 2"),
        ("data.train_fraction=-0.1", "data.train_fraction must be >= 0"),
    ],
)
def test_declared_choices_and_bounds_are_checked(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs" / "demo.yaml", [override])
    assert message in str(info.value)


def test_every_declared_choice_loads():
    for key, f in FIELDS.items():
        for choice in f.metadata["choices"]:
            extra = ["train.packing=true"] if key == "train.compile" else []
            extra += ["scoring.knowledge_questions=10"] if key == "tune.objective" else []
            # json: "no" quoted, or YAML reads it as false
            assert schema.get(load_config(None, [f"{key}={json.dumps(choice)}", *extra]), key) == choice


def test_a_section_validated_alone_names_its_keys():
    with pytest.raises(ConfigError, match=r"generate\.top_p must be > 0 and <= 1"):
        schema.GenerateConfig(top_p=1.5).validate()
    with pytest.raises(ConfigError, match=r"model\.tiny\.num_heads must be >= 1"):
        schema.TinyModelConfig(num_heads=0).validate()


def test_tune_makes_each_mixed_source_absolute(tmp_path, monkeypatch):
    """A relative `source` inside data.sources resolves from where the search started, not from a trial's folder;
    names, fields and weights stay as they are."""
    from medqa.tune import _with_absolute_paths

    (tmp_path / "a.json").write_text("[]")
    monkeypatch.chdir(tmp_path)
    sources = '[{"name": "a", "source": "a.json", "weight": 2}, {"name": "hub", "source": "org/not-a-local-path"}]'
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"data.sources={sources}", "workdir=w"])
    out = _with_absolute_paths(cfg).data.sources
    assert out[0] == dataclasses.replace(cfg.data.sources[0], source=str(tmp_path / "a.json"))
    assert out[1] == cfg.data.sources[1]
