"""Several sources in one run (`data.sources`): every record accounted for per source, a question in two sources
kept once, weights shaping each epoch, metrics per source equal to scoring each source alone, and a one-source
config whose artifacts are byte for byte what they were before data.sources existed."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE, demo_config

REAL = REPO / "data" / "real" / "healthcaremagic_500.json"
FAST = ["train.max_steps=10", "train.eval_steps=10", "scoring.bootstrap_samples=50", "train.report_to=[]"]


def _sources(*entries: str) -> str:
    return "data.sources=" + json.dumps([json.loads(e) for e in entries])


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Two sources: the shipped synthetic sample, and a clinic file holding 60 real records, one of them carrying
    a question that is also in the sample (with another answer) and one malformed record."""
    from medqa.prepare import prepare

    root = tmp_path_factory.mktemp("mix")
    sample = json.loads(SAMPLE.read_text())
    real = json.loads(REAL.read_text())[:60]
    clinic = [{"q": r["input"], "a": r["output"]} for r in real]
    clinic[5] = {"q": sample[0]["input"], "a": "A different doctor's answer, long enough to pass the cleaning filter."}
    clinic.append({"q": 42, "a": "not a question"})
    (root / "clinic.json").write_text(json.dumps(clinic))
    sources = _sources(
        json.dumps({"name": "sample", "source": str(SAMPLE)}),
        json.dumps(
            {
                "name": "clinic",
                "source": str(root / "clinic.json"),
                "question_field": "q",
                "answer_field": "a",
                "weight": 2,
            }
        ),
    )
    cfg = demo_config(root / "w", sources, *FAST)
    result = prepare(cfg)
    return cfg, result, clinic


def test_the_report_adds_up_per_source_and_overall(mixed):
    cfg, result, clinic = mixed
    report = result.report
    per = report["sources"]
    assert per["clinic"]["read"] == len(clinic) and per["sample"]["read"] == len(json.loads(SAMPLE.read_text()))
    assert report["read"] == sum(p["read"] for p in per.values())
    for split in ("train", "val", "test"):
        assert report["kept"][split] == sum(p["kept"][split] for p in per.values())
    assert Counter(report["rejected"]) == sum((Counter(p["rejected"]) for p in per.values()), Counter())
    assert report["truncated"] == sum(p["truncated"] for p in per.values())
    # notebook 1's table: one row per source, and a total row equal to the overall report
    from medqa.analysis import per_source_table

    table = per_source_table(report)
    assert list(table.index) == ["sample", "clinic", "total"]
    total = table.loc["total"]
    assert total["read"] == report["read"] and total["truncated"] == report["truncated"]
    assert all(total[f"kept: {s}"] == n for s, n in report["kept"].items())
    assert all(total[f"rejected: {r}"] == n for r, n in report["rejected"].items())
    # the files agree: every kept record and every reject names its source and its index within it
    kept = [
        r for s in ("train", "val", "test") for r in json.loads(Path(cfg.workdir, "data", f"{s}_data.json").read_text())
    ]
    rejects = [json.loads(x) for x in Path(cfg.workdir, "data", "rejected.jsonl").read_text().splitlines()]
    for name, p in per.items():
        seen = sorted(
            [r["index"] for r in kept if r["source"] == name] + [r["index"] for r in rejects if r["source"] == name]
        )
        assert seen == list(range(p["read"]))  # each record of the source exactly once, kept or rejected
    assert {"source": "clinic", "index": len(clinic) - 1, "reason": "question_not_a_string"}.items() <= next(
        r for r in rejects if r["source"] == "clinic" and r["reason"] == "question_not_a_string"
    ).items()


def test_a_question_in_both_sources_is_kept_once_from_the_first(mixed):
    cfg, result, clinic = mixed
    kept = [
        r for s in ("train", "val", "test") for r in json.loads(Path(cfg.workdir, "data", f"{s}_data.json").read_text())
    ]
    rejects = [json.loads(x) for x in Path(cfg.workdir, "data", "rejected.jsonl").read_text().splitlines()]
    twin = [r for r in kept if r["question"].startswith(clinic[5]["q"][:40])]
    assert len(twin) == 1 and twin[0]["source"] == "sample"
    dup = next(r for r in rejects if r["source"] == "clinic" and r["index"] == 5)
    assert dup["reason"] == "duplicate_question" and dup["detail"].endswith("of source sample")
    assert result.report["sources"]["clinic"]["rejected"]["duplicate_question"] >= 1


def test_weights_set_each_epochs_composition(mixed):
    from medqa.mixing import epoch_composition, weighted_epoch
    from medqa.workdir import load_split

    assert weighted_epoch(["a", "b", "a", "b", "b"], {"a": 1.0, "b": 2.0}, 0) == [0, 1, 1, 2, 3, 3, 4, 4]
    half = weighted_epoch(["a"] * 10, {"a": 0.5}, 3)
    assert len(half) == 5 and len(set(half)) == 5 and half == weighted_epoch(["a"] * 10, {"a": 0.5}, 3)
    assert half != weighted_epoch(["a"] * 10, {"a": 0.5}, 4)  # another seed, another half
    cfg, _, _ = mixed
    train_ds = load_split(cfg, "train")
    epoch, composition = epoch_composition(cfg, train_ds)
    assert composition["clinic"]["per_epoch"] == 2 * composition["clinic"]["examples"]
    assert composition["sample"]["per_epoch"] == composition["sample"]["examples"]
    assert (
        len(epoch)
        == sum(c["per_epoch"] for c in composition.values())
        == len(train_ds) + composition["clinic"]["examples"]
    )


def test_train_and_evaluate_report_each_source_as_scoring_it_alone(mixed):
    import numpy as np

    from medqa.baseline import baseline
    from medqa.metrics import evaluate_answer_loss
    from medqa.modeling import load_model, load_tokenizer
    from medqa.runplan import planned_steps
    from medqa.train import train
    from medqa.workdir import load_records, load_split

    cfg, _, _ = mixed
    base = baseline(cfg)
    tokenizer = load_tokenizer(cfg)
    test = load_split(cfg, "test")
    of = {r["id"]: r["source"] for r in load_records(cfg, "test")}
    model = load_model(cfg)
    for name in ("sample", "clinic"):
        alone = test.select([i for i, x in enumerate(test["id"]) if of[x] == name])
        want, _ = evaluate_answer_loss(model, alone, tokenizer.pad_token_id, 3, 50, cfg.seed)
        got = base.metrics["by_source"]["test"][name]
        assert got["answer_loss"] == pytest.approx(want["answer_loss"], abs=1e-6)  # other batches: fp32 sums
        assert got["answer_tokens"] == want["answer_tokens"] and got["examples"] == len(alone)
    assert (
        sum(m["answer_tokens"] for m in base.metrics["by_source"]["test"].values())
        == base.metrics["test"]["answer_tokens"]
    )
    run = train(cfg)
    assert set(run.metrics["by_source"]["val"]) == {"sample", "clinic"}
    assert run.metrics["training"]["epoch_examples"] > len(load_split(cfg, "train"))
    assert np.isfinite(run.metrics["by_source"]["test"]["clinic"]["answer_perplexity"])
    # planned_steps (ASHA's max_t, the disk check) counts the weighted epoch too
    from dataclasses import replace

    unweighted = [replace(e, weight=1) for e in cfg.data.sources]
    plain = replace(cfg, data=replace(cfg.data, sources=unweighted), train=replace(cfg.train, max_steps=0))
    assert planned_steps(replace(cfg, train=replace(cfg.train, max_steps=0)), load_split(cfg, "train")) > planned_steps(
        plain, load_split(cfg, "train")
    )


def test_evaluate_reports_per_source_with_the_paired_change(mixed, tmp_path):
    from medqa.evaluate import evaluate

    cfg, _, _ = mixed
    if not Path(cfg.workdir, "outputs", "finetune").exists():
        pytest.skip("needs the trained adapter of the test before")
    report = evaluate(cfg).report
    tuned = report["models"]["fine-tuned"]
    assert set(tuned["test"]["by_source"]) == set(tuned["vs_base_by_source"]) == {"sample", "clinic"}
    md = Path(cfg.workdir, "outputs", "report.md").read_text()
    assert "## Per source (test split)" in md and "| fine-tuned | clinic |" in md
    # notebook 4's table: the report's per-source figures, the base model without a paired change
    from medqa.report import by_source_frame

    frame = by_source_frame(report)
    row = frame.loc[("clinic", "fine-tuned")]
    assert row["answer_perplexity"] == tuned["test"]["by_source"]["clinic"]["answer_perplexity"]
    assert row["p"] == tuned["vs_base_by_source"]["clinic"]["p_value"]
    assert (
        frame.loc[("clinic", "base")]["p"] is None
        or frame.loc[("clinic", "base")]["p"] != frame.loc[("clinic", "base")]["p"]
    )


# The demo prepare before data.sources existed (commit c66afdd, same code path for data.source alone): sha256 of
# each artifact, the workdir's and the checkout's paths replaced (the report names the source file by its path).
# A one-source config must keep giving exactly these bytes.
BEFORE = {
    "prepare_report.json": "8422795539e2f38e1855403f3b9fe301e9b1ed4c4d2a013df9032204bcdd519f",
    "rejected.jsonl": "8b8ebfe6ea10e95a99b6aabe54834c2536ebf8ef10e38cd360d434781c9b3eaa",
    "test_data.json": "95e130cf2fadaa8e17872e7c6303e946c64ddd46ea9db84d2888c92038cfa364",
    "train_data.json": "a51000d70ee19cf401e5b0b62a395afc40fefbfc853607746ef52b7fa118d154",
    "val_data.json": "3d91df668ed08e372ae991a4424eae5e3928d28030cc28af891b2b352a928373",
    "tokenized/tokenized_test/data-00000-of-00001.arrow": (
        "62d5abcc2125aa70380f2646ae1f30d49546348590e23a4108f437f2272da1d8"
    ),
    "tokenized/tokenized_train/data-00000-of-00001.arrow": (
        "374b8e8519447525335c9a664cfdbf796a60282df4c8ff51bba5ae1f7323e347"
    ),
    "tokenized/tokenized_val/data-00000-of-00001.arrow": (
        "daf26eb69e554471ebba83079703baf5b6d19e2725d370092709cee99ec83492"
    ),
}


def test_a_one_source_config_gives_the_same_bytes_as_before(tmp_path):
    from medqa.prepare import prepare

    workdir = tmp_path / "w"
    prepare(demo_config(workdir))
    got = {}
    for f in sorted((workdir / "data").glob("*")):
        if f.is_file() and f.name != "manifest.json":  # the manifest records the time and the commit
            data = f.read_bytes().replace(str(workdir).encode(), b"<workdir>").replace(str(REPO).encode(), b"<repo>")
            got[f.name] = hashlib.sha256(data).hexdigest()
    for f in sorted((workdir / "tokenized").rglob("*.arrow")):
        got[str(f.relative_to(workdir))] = hashlib.sha256(f.read_bytes()).hexdigest()
    assert got == BEFORE


def test_bad_sources_are_one_clear_error():
    from medqa.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.sources\[0\] must be a mapping with a `name` and a `source`"):
        demo_config(Path("/tmp/x"), 'data.sources=[{"source": "a.json"}]')
    with pytest.raises(ConfigError, match="weight must be a number > 0"):
        demo_config(Path("/tmp/x"), 'data.sources=[{"name": "a", "source": "a.json", "weight": 0}]')
    with pytest.raises(ConfigError, match="names must be unique"):
        demo_config(Path("/tmp/x"), 'data.sources=[{"name": "a", "source": "a.json"}, {"name": "a", "source": "b"}]')


def test_a_source_entry_is_typed_and_written_back_as_given():
    """data.sources entries load as `SourceConfig` (unknown keys and wrong types named by their index) and are
    written back as given (`Config.to_dict`): the run fingerprint of a mix is what it was with untyped entries."""
    from medqa.config import config_from_dict, load_config
    from medqa.errors import ConfigError
    from medqa.schema import SourceConfig

    given = [
        {"name": "a", "source": "a.json", "weight": 2},
        {"name": "b", "source": "b.json", "question_field": "q", "max_records": 0, "weight": 0.5},
    ]
    cfg = load_config(None, ["data.sources=" + json.dumps(given)])
    assert all(isinstance(e, SourceConfig) for e in cfg.data.sources)
    assert cfg.data.sources[1].answer_field is None  # left out: data.answer_field's
    assert json.dumps(cfg.to_dict()["data"]["sources"], sort_keys=True) == json.dumps(given, sort_keys=True)
    assert config_from_dict(cfg.to_dict()).data.sources == cfg.data.sources
    typo = r"Unknown config key `data.sources\[1\].wieght`. Did you mean `data.sources\[1\].weight`\?"
    with pytest.raises(ConfigError, match=typo):
        load_config(None, ['data.sources=[{"name": "a", "source": "a"}, {"name": "b", "source": "b", "wieght": 2}]'])
    with pytest.raises(ConfigError, match=r"`data.sources\[0\].max_records` must be of type int"):
        load_config(None, ['data.sources=[{"name": "a", "source": "a.json", "max_records": "all"}]'])
    with pytest.raises(ConfigError, match=r"data.sources\[0\] must be a mapping with a `name` and a `source`"):
        load_config(None, ["data.sources=[a.json]"])


def test_each_source_field_defaults_to_the_data_sections():
    """What data.sources' help promises: a source without question_field, answer_field, hub_split or max_records
    takes data.*'s (a smoke run's data.max_records limits every source), its own value wins, weight defaults to 1."""
    from medqa.config import load_config
    from medqa.sources import source_specs

    cfg = load_config(
        None,
        [
            "data.max_records=120",
            "data.question_field=q",
            _sources('{"name": "a", "source": "a.json"}', '{"name": "b", "source": "b.json", "max_records": 7}'),
        ],
    )
    a, b = source_specs(cfg.data)
    assert (a.max_records, b.max_records) == (120, 7)
    assert a.question_field == b.question_field == "q" and a.hub_split == cfg.data.hub_split
    assert a.weight == b.weight == 1.0
