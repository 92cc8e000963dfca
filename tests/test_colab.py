"""The Colab helpers pick settings by GPU; outside Colab the notebooks' first cell does nothing (the notebook
tests execute it)."""

from conftest import REPO

from medqa.colab import gpu_overrides
from medqa.config import load_config


def test_gpu_overrides_by_card():
    assert "train.mixed_precision=fp16" in gpu_overrides("Tesla T4")
    assert "train.mixed_precision=bf16" in gpu_overrides("NVIDIA A100-SXM4-40GB")
    assert "train.mixed_precision=bf16" in gpu_overrides("NVIDIA H100 80GB HBM3")
    assert gpu_overrides(None) == []
    for card in ("Tesla T4", "NVIDIA L4", "Unknown GPU"):
        load_config(REPO / "configs" / "biogpt.yaml", gpu_overrides(card))  # every suggestion is a valid override
