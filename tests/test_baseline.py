"""Stage 2: model loading, the tiny model, and `medqa baseline` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import REAL_500, REPO, demo_config

from medqa.cli import main
from medqa.errors import ModelError
from medqa.workdir import paths


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from medqa.baseline import baseline
    from medqa.prepare import prepare

    workdir = tmp_path_factory.mktemp("demo")
    cfg = demo_config(workdir, "scoring.bootstrap_samples=300")
    prepare(cfg)
    return cfg, baseline(cfg)


def test_metrics_json_shape(demo_run):
    cfg, result = demo_run
    metrics = json.loads((result.out_dir / "metrics.json").read_text())
    assert set(metrics) >= {"val", "test", "model", "tokenizer", "config"}
    for split in ("val", "test"):
        m = metrics[split]
        assert m["answer_perplexity"] == pytest.approx(math.exp(m["answer_loss"]))
        assert m["examples"] == len(json.loads((result.out_dir.parents[1] / "data" / f"{split}_data.json").read_text()))
        lo, hi = m["answer_perplexity_ci95"]
        assert lo < m["answer_perplexity"] < hi
        assert m["sequence_tokens"] > m["answer_tokens"]
    rows = [json.loads(x) for x in (result.out_dir / "per_example.jsonl").read_text().splitlines()]
    test_rows = [r for r in rows if r["split"] == "test"]
    assert sum(r["answer_nll"] for r in test_rows) / sum(r["answer_tokens"] for r in test_rows) == pytest.approx(
        metrics["test"]["answer_loss"], rel=1e-9
    )


def test_fresh_tiny_model_scores_near_uniform(demo_run):
    """A random model's loss is ln(V) plus half the variance of its logits (for Gaussian logits):
    E[logsumexp(z)] ~ ln V + s^2/2 while the target logit averages 0. Checked against the logits' own spread."""
    import datasets
    import torch

    from medqa.modeling import load_model, load_tokenizer

    cfg, result = demo_run
    vocab = len(load_tokenizer(cfg))
    loss = result.metrics["test"]["answer_loss"]
    assert abs(loss - math.log(vocab)) < 0.25 * math.log(vocab)
    model = load_model(cfg)
    ds = datasets.load_from_disk(str(result.out_dir.parents[1] / "tokenized" / "tokenized_test"))
    with torch.no_grad():
        logits = torch.cat([model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in ds.select(range(8))])
    s2 = logits.var(dim=-1).mean().item()
    assert loss == pytest.approx(math.log(vocab) + s2 / 2, rel=0.05)


def test_tiny_tokenizer_round_trips_and_reloads(demo_run):
    from transformers import AutoTokenizer, BioGptTokenizer

    cfg, _ = demo_run
    tok = AutoTokenizer.from_pretrained(cfg.resolve(cfg.model.name_or_path))
    assert isinstance(tok, BioGptTokenizer)
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    text = "Hello, I have had a headache and fever since two days. What should I do?"
    ids = tok(text)["input_ids"]
    assert ids[0] == 2 and tok.unk_token_id not in ids  # BioGPT starts with </s>
    assert tok.decode(ids, skip_special_tokens=True) == text
    vocab = json.loads((Path(cfg.resolve(cfg.model.tiny.path)) / "vocab.json").read_text())
    assert any(k.endswith("</w>") for k in vocab) and [vocab[t] for t in ("<s>", "<pad>", "</s>", "<unk>")] == [
        0,
        1,
        2,
        3,
    ]


def test_tiny_model_with_real_biogpt_tokenizer_scores_real_records(tmp_path, real_500, biogpt_tokenizer_dir):
    from medqa.baseline import baseline
    from medqa.prepare import prepare

    cfg = demo_config(
        tmp_path,
        f"data.source={REAL_500}",
        f"model.tiny.tokenizer_files={biogpt_tokenizer_dir}",
        "scoring.bootstrap_samples=100",
        "scoring.max_examples=16",
        "data.max_length=128",
    )
    prepare(cfg)
    metrics = baseline(cfg).metrics
    assert metrics["tokenizer"]["vocab_size"] == 42384
    assert abs(metrics["test"]["answer_loss"] - math.log(42384)) < 0.25 * math.log(42384)


def test_tokenized_with_another_tokenizer_is_refused(demo_run, tmp_path, biogpt_tokenizer_dir):
    from medqa.baseline import baseline
    from medqa.modeling import load_tokenizer

    cfg, _ = demo_run
    other = demo_config(paths(cfg).root, f"model.tokenizer={biogpt_tokenizer_dir}")
    assert len(load_tokenizer(other)) == 42384
    from medqa.manifest import StaleArtifactError

    with pytest.raises(StaleArtifactError, match="its tokenizer differs.*`medqa prepare"):
        baseline(other)


def test_missing_folder_and_unreachable_hub(tmp_path, capsys):
    from medqa.modeling import load_model, load_tokenizer

    cfg = demo_config(tmp_path, f"model.name_or_path={tmp_path / 'nope'}")
    with pytest.raises(ModelError, match="not found"):
        load_tokenizer(cfg)
    with pytest.raises(ModelError, match="Model folder .* not found"):
        load_model(cfg)
    cfg = demo_config(tmp_path, "model.name_or_path=microsoft/biogpt")
    with pytest.raises(ModelError, match=r"(?s)offline mode is on.*local folder.*configs/demo.yaml"):
        load_tokenizer(cfg)
    with pytest.raises(ModelError, match=r"(?s)microsoft/biogpt.*offline"):
        load_model(cfg)
    rc = main(
        [
            "baseline",
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            f"workdir={tmp_path}",
            "model.name_or_path=microsoft/biogpt",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "offline" in err


def test_lora_presets_resolve_for_biogpt(demo_run):
    from medqa.lora_targets import lora_parameter_count, resolve_lora_targets
    from medqa.modeling import load_model

    cfg, _ = demo_run
    model = load_model(cfg)
    assert resolve_lora_targets(model, "qv") == ["q_proj", "v_proj"]
    assert resolve_lora_targets(model, "attention") == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert resolve_lora_targets(model, "all-linear") == ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    h, f, layers, r = cfg.model.tiny.hidden_size, cfg.model.tiny.intermediate_size, cfg.model.tiny.num_layers, 4
    assert lora_parameter_count(model, ["q_proj", "v_proj"], r) == layers * 2 * r * (h + h)
    assert lora_parameter_count(model, ["fc1", "fc2"], r) == layers * 2 * r * (h + f)
    with pytest.raises(ModelError, match="match no linear layer"):
        resolve_lora_targets(model, ["o_proj"])
    with pytest.raises(ModelError, match="No LoRA preset"):
        resolve_lora_targets(model, "everything")
