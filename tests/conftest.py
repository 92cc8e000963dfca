"""Shared fixtures: offline environment, the shipped real records and BioGPT tokenizer, a tiny model; the synthetic
records from ../shared when it is there (CI has it; users do not)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDQA_SHARED", REPO.parent / "shared"))
REAL_500 = REPO / "data" / "real" / "healthcaremagic_500.json"  # shipped
SYNTHETIC_5K = SHARED / "data" / "genmedgpt5k_SYNTHETIC_chatdoctor5k.json"
BIOGPT_TOKENIZER = REPO / "assets" / "biogpt-tokenizer"  # shipped
SAMPLE = REPO / "data" / "sample" / "healthcaremagic_sample.json"

# Tests never touch the network, and every cache goes to the repo's ignored .cache/.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", str(REPO / ".cache" / "huggingface"))
os.environ.setdefault("MPLCONFIGDIR", str(REPO / ".cache" / "matplotlib"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO / ".cache" / "torchinductor"))  # torch.compile's cache
sys.path.insert(0, str(REPO / "src"))
# Subprocesses (notebook kernels, CLI runs, Ray workers) import medqa from here too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
for var, sub in (
    ("JUPYTER_RUNTIME_DIR", "jupyter/runtime"),
    ("JUPYTER_DATA_DIR", "jupyter/data"),
    ("IPYTHONDIR", "ipython"),
):
    os.environ.setdefault(var, str(REPO / ".cache" / sub))
    Path(os.environ[var]).mkdir(parents=True, exist_ok=True)

from medqa.config import Config, load_config  # noqa: E402


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(
            f"needs {path} (the shared read-only data folder beside the repo, ../shared); "
            "set MEDQA_SHARED to its location"
        )
    return path


@pytest.fixture(scope="session")
def real_500() -> Path:
    return _need(REAL_500)


@pytest.fixture(scope="session")
def synthetic_5k() -> Path:
    return _need(SYNTHETIC_5K)


@pytest.fixture(scope="session")
def biogpt_tokenizer_dir() -> Path:
    return _need(BIOGPT_TOKENIZER)


def demo_config(workdir: Path, *overrides: str) -> Config:
    """The demo config, writing under `workdir`, reading the shipped sample by absolute path."""
    return load_config(REPO / "configs" / "demo.yaml", [f"workdir={workdir}", f"data.source={SAMPLE}", *overrides])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny BioGPT whose tokenizer is learned from the sample's train split, built once per session as prepare
    builds it."""
    from medqa.prepare import make_tiny_model

    return make_tiny_model(demo_config(tmp_path_factory.mktemp("tiny")))


def prepare_demo(workdir: Path, *overrides: str) -> Path:
    """Run prepare and baseline on the demo config in `workdir` (for module fixtures)."""
    from medqa.baseline import baseline
    from medqa.prepare import prepare

    cfg = demo_config(workdir, *overrides)
    prepare(cfg)
    baseline(cfg)
    return workdir


# The shared trained adapter's settings: a few steps, no knowledge scoring; later stages may add their own.
TRAINED = [
    "train.max_steps=4",
    "train.eval_steps=2",
    "train.logging_steps=2",
    "scoring.bootstrap_samples=20",
    "scoring.knowledge_questions=0",
    "train.report_to=[]",
]


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory) -> Path:
    """One workdir where prepare, baseline and a short training (TRAINED) have run, shared by the modules that
    need an adapter but not a training of their own: take a copy (`copy_trained`) before writing into it."""
    from medqa.train import train

    work = prepare_demo(tmp_path_factory.mktemp("trained"), *TRAINED)
    train(demo_config(work, *TRAINED))
    return work


def copy_trained(src: Path, dst: Path) -> Path:
    """A copy of a whole workdir (`trained_demo`'s), its model links kept as links."""
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


def copy_workdir(src: Path, dst: Path) -> Path:
    """A new workdir with `src`'s prepared data, tiny model and baseline, and none of its later runs."""
    import shutil

    for sub in ("data", "tokenized", "models", "outputs/baseline"):
        if (src / sub).exists():
            shutil.copytree(src / sub, dst / sub, dirs_exist_ok=True)
    return dst
