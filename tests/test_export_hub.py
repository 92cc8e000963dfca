"""`medqa export --push-to-hub`: the model card from report.json and the Hub calls (the Hub itself is mocked:
no network here), plus the clear messages offline and without a token."""

from __future__ import annotations

import json
from unittest import mock

import pytest
from conftest import REPO, demo_config

from medqa.errors import MedqaError


@pytest.fixture()
def run_dir(tmp_path):
    adapter = tmp_path / "outputs" / "finetune"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "config.yaml").write_text("workdir: /home/someone/private")  # run files stay home
    (adapter / "per_example.jsonl").write_text("{}")
    report = {
        "test_examples": 41,
        "dtype": "bfloat16",
        "models": {
            "base": {
                "test": {"answer_perplexity": 46.16, "answer_perplexity_ci95": [40.2, 54.2]},
                "generation": {"rougeL": 0.106, "bleu": 0.46},
            },
            "fine-tuned": {
                "test": {"answer_perplexity": 28.52, "answer_perplexity_ci95": [24.6, 33.8]},
                "generation": {"rougeL": 0.116, "bleu": 1.32},
                "pubmedqa": {"acc": 0.512},
            },
        },
    }
    (tmp_path / "outputs" / "report.json").write_text(json.dumps(report))
    return tmp_path


def test_push_uploads_the_adapter_with_a_model_card(run_dir, monkeypatch):
    from medqa import export

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    api = mock.MagicMock()
    api.create_repo.return_value = "https://huggingface.co/me/medqa-test"
    uploaded = {}

    def upload_folder(repo_id, folder_path, commit_message):  # what the one commit holds, read at call time
        from pathlib import Path

        uploaded.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()})

    api.upload_folder.side_effect = upload_folder
    with mock.patch("huggingface_hub.HfApi", return_value=api) as cls:
        url = export.push_to_hub(demo_config(run_dir), "me/medqa-test")
    assert url == "https://huggingface.co/me/medqa-test"
    assert cls.call_args.kwargs["token"] == "hf_test_token"  # from the environment
    api.create_repo.assert_called_once_with("me/medqa-test", private=True, exist_ok=True)
    assert set(uploaded) == {"adapter_model.safetensors", "adapter_config.json", "README.md"}
    assert uploaded["adapter_model.safetensors"] == b"weights"
    card = uploaded["README.md"].decode()
    for expected in (
        "library_name: peft",
        "academic research only",
        "28.52",
        "24.60–33.80",
        "0.512",
        "bfloat16",
        "Not medical advice",
        "Intended use",
        "LoRA adapter for",
    ):
        assert expected in card, expected
    assert "base_model:" not in card  # the demo's base is a local folder, not a Hub id


def test_card_for_a_merged_model_on_a_hub_base(run_dir):
    from medqa.modelcard import model_card

    cfg = demo_config(run_dir, "model.name_or_path=microsoft/biogpt")
    card = model_card(cfg, None, merged=True)
    assert "base_model: microsoft/biogpt" in card and "library_name: peft" not in card
    assert card.count("Merged model") == 1 and "Intended use" in card


def test_push_refuses_offline_and_without_token(run_dir, monkeypatch):
    from medqa.export import push_to_hub

    cfg = demo_config(run_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MedqaError, match=r"offline mode is on .*outputs/finetune"):
        push_to_hub(cfg, "me/x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(MedqaError, match="HF_TOKEN"):
        push_to_hub(cfg, "me/x")
    with pytest.raises(MedqaError, match="nothing to upload"):
        push_to_hub(cfg, "me/x", folder=run_dir / "empty")


def test_cli_export_push_reaches_the_hub_api(run_dir, monkeypatch, capsys):
    from medqa.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    api = mock.MagicMock()
    api.create_repo.return_value = "https://huggingface.co/me/y"
    with mock.patch("huggingface_hub.HfApi", return_value=api):
        rc = main(
            ["export", "--config", str(REPO / "configs" / "demo.yaml"), f"workdir={run_dir}", "--push-to-hub", "me/y"]
        )
    assert rc == 0 and "pushed https://huggingface.co/me/y" in capsys.readouterr().out
