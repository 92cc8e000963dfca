"""Config: every YAML loads, overrides work, and mistakes get one clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from medqa.cli import COMMANDS, main
from medqa.config import Config, describe_fields, load_config
from medqa.errors import ConfigError

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "biogpt.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_yaml_loads_and_starts_with_its_command(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert "medqa " in path.read_text().split("\n\n")[0] or "make " in path.read_text().split("\n\n")[0]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_configs_hold_only_what_differs(path: Path):
    """Defaults live once, in the dataclasses: every value a config file sets differs from the default."""
    import yaml

    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    defaults = dict(leaves(Config().to_dict()))
    loaded = dict(leaves(load_config(path).to_dict()))
    for key, _ in leaves(yaml.safe_load(path.read_text())):
        assert key in defaults, f"{path.name}: {key} is not a config field"
        assert loaded[key] != defaults[key], f"{path.name}: {key} repeats its default; drop it"


def test_print_config_shows_the_resolved_whole(tmp_path, capsys):
    assert main(["train", "--config", str(REPO / "configs" / "demo.yaml"), "--print-config", "lora.r=4"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "resolved.yaml").write_text(printed)
    assert load_config(tmp_path / "resolved.yaml") == load_config(REPO / "configs" / "demo.yaml", ["lora.r=4"])
    assert len(printed.splitlines()) > 100  # every field, not only the differences
    assert "scoring:" in printed and "\neval:" not in printed


def test_renamed_section_still_loads_with_a_warning(tmp_path, caplog):
    old = tmp_path / "old.yaml"
    old.write_text("eval:\n  batch_size: 3\n")
    assert load_config(old).scoring.batch_size == 3
    assert load_config(None, ["eval.max_examples=5"]).scoring.max_examples == 5
    assert "now called `scoring`" in caplog.text
    both = tmp_path / "both.yaml"
    both.write_text("eval:\n  batch_size: 3\nscoring:\n  batch_size: 4\n")
    with pytest.raises(ConfigError, match="Keep only `scoring`"):
        load_config(both)


def test_biogpt_config_is_the_real_thing():
    cfg = load_config(REPO / "configs" / "biogpt.yaml")
    assert cfg.model.name_or_path == "microsoft/biogpt"
    assert cfg.data.source == "lavita/ChatDoctor-HealthCareMagic-100k"
    assert cfg.data.question_field == "input" and not cfg.model.trust_remote_code


def test_overrides_are_typed():
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [
            "data.seed=7",
            "data.train_fraction=0.6",
            "data.val_fraction=0.2",
            "data.test_fraction=0.2",
            "workdir=/tmp/x",
            "model.tiny.hidden_size=32",
        ],
    )
    assert cfg.data.seed == 7 and cfg.data.train_fraction == 0.6 and cfg.workdir == "/tmp/x"
    assert cfg.model.tiny.hidden_size == 32
    assert cfg.resolve(cfg.model.name_or_path) == "/tmp/x/models/tiny-biogpt"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.sed=3"], "Did you mean `data.seed`"),
        (["modle.dtype=float32"], "Did you mean `model`"),
        (["data.seed=abc"], "`data.seed` must be of type int"),
        (["data.train_fraction=0.9"], "must sum to 1"),
        (["data.max_length=0"], "data.max_length must be >= 1"),
        (["model.dtype=float8"], "model.dtype must be"),
        (["prompt.template=no placeholder"], "{question}"),
        (["data"], "key=value"),
    ],
)
def test_bad_config_messages(overrides, message):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(REPO / "configs" / "demo.yaml", overrides)
    assert message in str(info.value)


def test_missing_and_malformed_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    out = capsys.readouterr().out
    for key, _default, help_text in describe_fields(Config()):
        assert key in out and help_text.split()[0] in out


def test_cli_table_complete():
    """Every subcommand in the table has a parser entry and a callable."""
    from medqa.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)
    assert all(callable(entry) for entry, _ in COMMANDS.values())


def test_cli_error_is_one_paragraph_without_traceback(capsys):
    assert main(["prepare", "--config", str(REPO / "configs" / "demo.yaml"), "data.sed=1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "data.seed" in err and err.count("\n") == 1


def test_an_unquoted_no_is_the_choice_no(tmp_path):
    """YAML 1.1 reads `mixed_precision: no` as false: where `no` is one of the field's choices it means "no"; a
    false where a free text is expected stays an error."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    assert load_config(REPO / "configs" / "demo.yaml", ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="prompt.template"):
        load_config(REPO / "configs" / "demo.yaml", ["prompt.template=no"])


def test_the_real_config_gives_the_pubmedqa_verdict_on_all_500_test_questions():
    """The committed real-model run's verdict (README, notebook 4): medqa's scorer on all 500 PubMedQA test
    questions and lm-eval's own task beside it."""
    cfg = load_config(REPO / "configs" / "smollm2-offline.yaml")
    assert cfg.evaluate.pubmedqa_questions == 500
    assert cfg.evaluate.benchmarks == ["pubmedqa_local"] and cfg.evaluate.benchmark_questions > 0
