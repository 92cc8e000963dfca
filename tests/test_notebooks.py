"""The stage notebooks: committed without outputs, and each runs top to bottom (nbclient) on the demo."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from conftest import REPO, SAMPLE

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_stripped_and_thin(path: Path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "Open In Colab" in nb.cells[0].source and f"notebooks/{path.name}" in nb.cells[0].source
    assert '"google.colab" in sys.modules' in code[0].source  # the Colab cell comes first and guards itself
    assert code[1].metadata.get("tags") == ["parameters"]
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs before commit"
        assert not any(line.lstrip().startswith(("def ", "class ")) for line in cell.source.splitlines()), \
            f"{path.name}: put functions in the package, not the notebook"


def run_notebook(name: str, workdir: Path, overrides: list[str]) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    params = next(c for c in nb.cells if c.metadata.get("tags") == ["parameters"])
    params.source += f"\nOVERRIDES = {overrides!r}\nSMOKE = True\n"
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    return nb


@pytest.mark.notebook
def test_data_preparation_notebook_runs(tmp_path):
    nb = run_notebook("data_preparation.ipynb", tmp_path, [f"workdir={tmp_path}", f"data.source={SAMPLE}"])
    assert (tmp_path / "data" / "prepare_report.json").exists()
    assert (tmp_path / "tokenized" / "tokenized_train").is_dir()
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
                 if "image/png" in o.get("data", {}))
    assert images >= 3  # rejected reasons, length histograms, keyword views


@pytest.mark.notebook
def test_model_selection_notebook_runs(tmp_path):
    from medqa.prepare import prepare
    from conftest import demo_config

    prepare(demo_config(tmp_path))
    nb = run_notebook("model_selection_and_setup.ipynb", tmp_path, [f"workdir={tmp_path}", f"data.source={SAMPLE}"])
    assert (tmp_path / "outputs" / "baseline" / "metrics.json").exists()
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                   for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "answer_loss" in text and "all-linear" in text


@pytest.mark.notebook
def test_finetuning_notebook_runs(tmp_path):
    from conftest import demo_config
    from medqa.prepare import prepare

    prepare(demo_config(tmp_path))
    nb = run_notebook("peft_finetuning_and_logging.ipynb", tmp_path, [f"workdir={tmp_path}", f"data.source={SAMPLE}"])
    assert (tmp_path / "outputs" / "finetune" / "adapter_model.safetensors").exists()
    assert (tmp_path / "outputs" / "baseline" / "metrics.json").exists()
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {}))
    assert images >= 1


@pytest.mark.notebook
def test_raytune_final_notebook_runs(tmp_path):
    from conftest import demo_config
    from medqa.prepare import prepare

    prepare(demo_config(tmp_path))
    nb = run_notebook("raytune-peft-finetune-final.ipynb", tmp_path, [f"workdir={tmp_path}", f"data.source={SAMPLE}"])
    assert (tmp_path / "outputs" / "best" / "adapter_model.safetensors").exists()
    assert (tmp_path / "outputs" / "report.md").exists()
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {}))
    assert images >= 2
