"""The stage notebooks: each .ipynb agrees with its jupytext source (.py), stays thin, small and free of local
paths; the shared setup function; the sync tool's output cleaning; and each notebook runs top to bottom (nbclient,
smoke mode, on the demo; executed in memory, never written back)."""

from __future__ import annotations

import base64
import io
import re
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import REPO, SAMPLE

from medqa.notebook import SMOKE_DATA

sys.path.insert(0, str(REPO / "tools"))
import sync_notebooks  # noqa: E402

NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
SOURCES = sorted(NOTEBOOK_DIR.glob("*.py"))
MAX_NOTEBOOK_BYTES = 1_000_000
MAX_PNG_BYTES = sync_notebooks.MAX_PNG_BYTES
# An absolute path on a developer's machine: /work/..., /tmp/..., a home folder (not after a name or a URL's host).
LOCAL_PATH = re.compile(r"(?<![\w.~<>-])(/work|/tmp|/home|/root|/Users|/private|/var/folders|/mnt)(?=/|\b)")


def local_paths_in(text: str) -> list[str]:
    hits = [m.group(0) + text[m.end() : m.end() + 40] for m in LOCAL_PATH.finditer(text)]
    hits += [p for p in {str(REPO), str(Path.home())} if len(p) > 1 and p in text]
    return hits


# ---- the notebooks as committed -----------------------------------------------------------------------------


def test_every_notebook_has_its_source_and_pairing():
    assert NOTEBOOKS and [p.stem for p in NOTEBOOKS] == [p.stem for p in SOURCES]
    assert 'formats = "ipynb,py:percent"' in (NOTEBOOK_DIR / "jupytext.toml").read_text()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_agrees_with_its_source(path: Path):
    import jupytext

    source = jupytext.read(path.with_suffix(".py"), fmt="py:percent")
    nb = nbformat.read(path, as_version=4)
    want, have = sync_notebooks.cell_sources(source), sync_notebooks.cell_sources(nb)
    first = next((i for i, (w, h) in enumerate(zip(want, have)) if w != h), min(len(want), len(have)))
    assert have == want, (
        f"{path.name} disagrees with {path.stem}.py from cell {first} "
        f"({len(have)} cells vs {len(want)}): run python tools/sync_notebooks.py"
    )
    for cell, src in zip(nb.cells, source.cells):
        assert cell.metadata.get("tags", []) == src.metadata.get("tags", []), f"{path.name}: tags differ"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_source_is_python(path: Path):
    compile(path.read_text(encoding="utf-8"), str(path), "exec")  # what `python -m py_compile` checks


def test_the_colab_cell_is_the_same_in_every_notebook():
    """It installs medqa, so it cannot be a package function: each source carries a copy, kept identical here."""
    cells = {
        p.name: next(c for c in nbformat.read(p, as_version=4).cells if c.cell_type == "code").source for p in NOTEBOOKS
    }
    assert len(set(cells.values())) == 1, "edit the Colab cell in all four notebooks/*.py alike"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_thin_and_reads_as_a_document(path: Path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "Open In Colab" in nb.cells[0].source and f"notebooks/{path.name}" in nb.cells[0].source
    title = nb.cells[1]
    assert title.cell_type == "markdown" and title.source.startswith("# ")
    # one paragraph saying what it does and shows, then at most what it needs and writes: not the point twice
    assert len(title.source.split("\n\n")) <= 3 and "Command line" in title.source.split("\n\n")[1].replace("\n", " ")
    assert '"google.colab" in sys.modules' in code[0].source  # the Colab cell comes first and guards itself
    assert code[1].metadata.get("tags") == ["parameters"]
    assert "from medqa.notebook import setup" in code[2].source and "smoke=SMOKE" in code[2].source
    assert "\nquiet_libraries()\n" in code[2].source  # results, not library chatter (medqa.quiet)
    assert nb.cells[-1].cell_type == "markdown" and nb.cells[-1].source.startswith("## Next")
    # it ends with what its run found, written by medqa.findings from the run's own numbers
    found = next(i for i, c in enumerate(nb.cells) if c.source.startswith("## What this run found"))
    assert "from medqa.findings import" in nb.cells[found + 1].source
    for cell in code:
        assert not any(line.lstrip().startswith(("def ", "class ")) for line in cell.source.splitlines()), (
            f"{path.name}: put functions in the package, not the notebook"
        )
        assert "medqa.data import" not in cell.source, f"{path.name}: medqa.data is now medqa.prepare"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_small_and_names_no_local_path(path: Path):
    text = path.read_text(encoding="utf-8")
    assert len(text.encode()) <= MAX_NOTEBOOK_BYTES, f"{path.name} is over {MAX_NOTEBOOK_BYTES:,} bytes"
    assert not local_paths_in(text), f"{path.name} names local paths: {local_paths_in(text)[:3]}"
    nb = nbformat.reads(text, as_version=4)
    assert "widgets" not in nb.metadata
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            assert not any(m in data for m in sync_notebooks.WIDGET_MIMES), f"{path.name}: widget output"
            if "image/png" in data:
                assert len(base64.b64decode(data["image/png"])) <= MAX_PNG_BYTES, f"{path.name}: PNG too big"
            if out.get("output_type") == "stream":
                assert not any(sync_notebooks.PROGRESS.search(line) for line in out.text.splitlines()), (
                    f"{path.name}: progress bars in the output"
                )


# ---- the setup function -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_shows_a_real_run(path: Path):
    """GitHub shows what a run printed: the committed outputs come from the real pretrained model on the real
    records (make notebooks-real), every code cell after the parameters ran, and none ended in an error."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    after_params = code[next(i for i, c in enumerate(code) if c.metadata.get("tags") == ["parameters"]) + 1 :]
    assert all(c.execution_count for c in after_params), f"{path.name}: run make notebooks-real before committing"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"], f"{path.name}: a cell failed"
    printed = "".join(o.get("text", "") for c in after_params for o in c.outputs)
    assert "configs/smollm2-offline.yaml" in printed and "(smoke run)" not in printed, path.name


@pytest.fixture
def restore_rc(monkeypatch):
    import matplotlib

    monkeypatch.setitem(matplotlib.rcParams, "figure.dpi", matplotlib.rcParams["figure.dpi"])


def test_setup_loads_the_config_with_overrides_in_order(tmp_path, restore_rc, capsys):
    import matplotlib

    from medqa.notebook import FIGURE_DPI, setup

    cfg = setup(
        REPO / "configs" / "demo.yaml",
        [f"workdir={tmp_path}", "scoring.bootstrap_samples=300"],
        stage="baseline",
        colab_overrides=["scoring.bootstrap_samples=100", "train.epochs=3"],
    )
    assert cfg.workdir == str(tmp_path) and cfg.scoring.bootstrap_samples == 300 and cfg.train.epochs == 3
    assert matplotlib.rcParams["figure.dpi"] == FIGURE_DPI
    assert "demo.yaml" in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["prepare", "baseline", "train", "tune"])
def test_setup_smoke_adds_the_stage_quick_run_last(stage, tmp_path, restore_rc):
    from medqa.config import load_config
    from medqa.notebook import SMOKE_OVERRIDES, setup

    demo, own = REPO / "configs" / "demo.yaml", [f"workdir={tmp_path}", "scoring.bootstrap_samples=999"]
    assert setup(demo, own, stage=stage).to_dict() == load_config(demo, own).to_dict()
    smoke = setup(demo, own, stage=stage, smoke=True)
    assert smoke.to_dict() == load_config(demo, [*own, *SMOKE_OVERRIDES[stage]]).to_dict()
    assert smoke.to_dict() != load_config(demo, own).to_dict()


def test_setup_moves_from_notebooks_to_the_repo_root(monkeypatch, tmp_path, restore_rc):
    from medqa.notebook import setup

    monkeypatch.chdir(NOTEBOOK_DIR)
    setup("configs/demo.yaml", [f"workdir={tmp_path}"], stage="prepare")
    assert Path.cwd() == REPO
    elsewhere = tmp_path / "notebooks"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a folder called notebooks outside a checkout: stay
    setup(REPO / "configs" / "demo.yaml", [f"workdir={tmp_path}"], stage="prepare")
    assert Path.cwd() == elsewhere


def test_setup_names_the_stages():
    from medqa.notebook import setup

    with pytest.raises(ValueError, match="prepare, baseline, train, tune"):
        setup(REPO / "configs" / "demo.yaml", stage="evaluate")


# ---- the sync tool ------------------------------------------------------------------------------------------


def test_sync_keeps_outputs_of_unchanged_cells_only():
    import jupytext

    source = jupytext.reads("# %% [markdown]\n# Title\n\n# %%\nx = 1\n\n# %%\ny = 2\n", fmt="py:percent")
    old = sync_notebooks.merge(source, None, "nb")
    for cell, out in zip(old.cells[1:], ("1", "2")):
        cell.outputs = [nbformat.v4.new_output("execute_result", {"text/plain": out}, execution_count=1)]
    edited = jupytext.reads("# %% [markdown]\n# Title\n\n# %%\nx = 1\n\n# %%\ny = 3\n", fmt="py:percent")
    new = sync_notebooks.merge(edited, old, "nb")
    assert [c.get("outputs") for c in new.cells[1:]] == [old.cells[1].outputs, []]
    assert new.cells[1].id == old.cells[1].id and new.cells[2].id != old.cells[2].id
    assert sync_notebooks.merge(edited, None, "nb").cells[2].id == new.cells[2].id  # ids are reproducible


def test_execute_sets_the_parameters_a_notebook_defines(monkeypatch):
    """--execute appends CONFIG, OVERRIDES, SMOKE and each --param the parameters cell defines (not the others),
    and writes the cell back unchanged."""
    import jupytext
    import nbclient

    seen = []

    class Client:
        def __init__(self, nb, **kwargs):
            self.nb = nb

        def execute(self):
            seen.append(sync_notebooks.parameters_cell(self.nb).source)

    monkeypatch.setattr(nbclient, "NotebookClient", Client)
    nb = jupytext.reads('# %% tags=["parameters"]\nCONFIG = "x"\nREUSE_SEARCH = False\n', fmt="py:percent")
    original = sync_notebooks.parameters_cell(nb).source
    sync_notebooks.execute(nb, "c.yaml", ["a=1"], params={"REUSE_SEARCH": "True", "OTHER": "1"})
    assert seen[0].endswith("CONFIG = 'c.yaml'\nOVERRIDES = ['a=1']\nSMOKE = False\nREUSE_SEARCH = True\n")
    assert "OTHER" not in seen[0]
    assert sync_notebooks.parameters_cell(nb).source == original


def test_clean_outputs_drops_noise_and_local_paths(tmp_path):
    import numpy as np
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(png, "PNG")
    assert png.tell() > MAX_PNG_BYTES
    bar = "\r 50%|#####     | 1/2 [00:01<00:01, 1.00it/s]\r100%|##########| 2/2 [00:02<00:00, 1.00it/s]\n"
    log = "".join(f"INFO medqa.train: step {i}\n" for i in range(200))
    cell = nbformat.v4.new_code_cell(
        "x",
        outputs=[
            nbformat.v4.new_output(
                "stream", name="stderr", text=f"INFO medqa: wrote {REPO}/outputs/a and {tmp_path}\n"
            ),
            nbformat.v4.new_output("stream", name="stderr", text=bar + "\x1b[32mgreen\x1b[0m\n"),
            nbformat.v4.new_output("stream", name="stdout", text=log),
            nbformat.v4.new_output(
                "display_data", {"application/vnd.jupyter.widget-view+json": {"model_id": "x"}, "text/plain": "HBox()"}
            ),
            nbformat.v4.new_output("display_data", {"image/png": base64.b64encode(png.getvalue()).decode()}),
        ],
    )
    nb = sync_notebooks.clean_outputs(nbformat.v4.new_notebook(cells=[cell], metadata={"widgets": {}}))
    err, out, image = nb.cells[0].outputs
    assert err.text.startswith("INFO medqa: wrote ./outputs/a and <tmp>/") and err.text.endswith("\ngreen\n")
    assert str(tmp_path) not in err.text and "%|" not in err.text
    assert "step 0\n" in out.text and "step 199" in out.text and "lines cut" in out.text
    assert len(out.text.splitlines()) <= sync_notebooks.MAX_STREAM_LINES
    assert len(base64.b64decode(image.data["image/png"])) <= MAX_PNG_BYTES
    assert "widgets" not in nb.metadata and not local_paths_in(nbformat.writes(nb))


# ---- library chatter ----------------------------------------------------------------------------------------

# Lines from Ray, lm-eval, transformers and the libraries under them that a reader of a notebook can do nothing
# about (medqa.quiet silences them). Each was seen in a committed notebook; a new one found in a run goes here.
CHATTER = (
    re.compile(r"\t(INFO|DEBUG) \S+\.py:\d+ -- "),  # Ray's own log format, e.g. "Missing packages: ['ipywidgets']"
    re.compile(r"^(INFO|DEBUG) (ray|lm_eval|transformers|datasets|absl|httpx|matplotlib)[\w.]*: "),  # INFO lines
    re.compile(r"Experiment state snapshotting has been triggered"),  # Ray Tune, once per checkpoint
    re.compile(r"`pretrained` model kwarg is not of type `str`"),  # lm-eval, given the loaded model on purpose
    re.compile(r"Passed an already-initialized model through `pretrained`"),
    re.compile(r"Missing packages: \['ipywidgets'\]"),
    re.compile(r"Using default tokenizer\."),  # absl, from rouge-score
    re.compile(r"HTTP Request: (GET|HEAD|POST) "),  # httpx, from Gradio
    re.compile(r"Token indices sequence length is longer than the specified maximum"),  # transformers, then cut
)


def library_chatter(nb) -> list[str]:
    """The lines of `nb`'s text outputs that match CHATTER."""
    lines = [
        line
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream"
        for line in out.get("text", "").splitlines()
    ]
    return [line for line in lines if any(p.search(line) for p in CHATTER)]


def test_chatter_is_caught_and_medqas_own_lines_are_not():
    """The lines the committed notebook 4 carried before medqa.quiet are caught; medqa's progress is not."""
    seen = (
        "2026-12-01 11:38:28,224\tINFO util.py:155 -- Missing packages: ['ipywidgets']. Run `pip install -U "
        "ipywidgets`, then restart the notebook server for rich notebook output.\n"
        "Experiment state snapshotting has been triggered multiple times in the last 5.0 seconds and may become a "
        "bottleneck.\n"
        "INFO lm_eval.tasks: Selected tasks:\n"
        "WARNING lm_eval.models.huggingface: `pretrained` model kwarg is not of type `str`. Many other model "
        "arguments may be ignored.\n"
        "INFO absl: Using default tokenizer.\n"
        'INFO httpx: HTTP Request: GET http://127.0.0.1:7860/gradio_api/startup-events "HTTP/1.1 200 OK"\n'
        "[transformers] Token indices sequence length is longer than the specified maximum sequence length for "
        "this model (1101 > 1024). Running this sequence through the model will result in indexing errors\n"
        "INFO matplotlib.font_manager: generated new fontManager\n"
    )
    own = (
        "INFO medqa.benchmark: benchmark: base done in 197.8 s\nWARNING medqa.modeling: no pad token\n"
        "WARNING lm_eval.models.huggingface: Combined length of context (1099) and continuation (4) exceeds "
        "model's maximum length (1024). Truncating 80 tokens from the left.\n"
    )
    out = nbformat.v4.new_output("stream", name="stderr", text=seen + own)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x", outputs=[out])])
    assert library_chatter(nb) == seen.splitlines()


def test_quiet_libraries_keeps_warnings_that_matter(capsys):
    """After quiet_libraries: the libraries' INFO lines and the listed warnings are dropped; another warning from
    the same logger, and medqa's INFO lines, still reach the notebook."""
    import logging

    from medqa.quiet import DROPPED, quiet_libraries

    quiet_libraries()
    quiet_libraries()  # twice changes nothing
    handler = logging.StreamHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    old = root.level
    root.setLevel(logging.INFO)
    try:
        logging.getLogger("lm_eval.tasks").info("Selected tasks:")
        hf = logging.getLogger("lm_eval.models.huggingface")
        for message in DROPPED["lm_eval.models.huggingface"]:
            hf.warning(message + " (as lm-eval says it)")
        hf.warning("Context length 2048 exceeded: the prompt was truncated")
        logging.getLogger("ray.tune.execution.experiment_state").warning(
            "Experiment state snapshotting has been triggered multiple times"
        )
        logging.getLogger("medqa.tune").info("tune: 2 trials")
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
    err = capsys.readouterr().err
    assert err.splitlines() == ["Context length 2048 exceeded: the prompt was truncated", "tune: 2 trials"]
    assert len(logging.getLogger("lm_eval.models.huggingface").filters) == 1


# ---- execution (smoke mode on the demo, in memory) ----------------------------------------------------------


def run_notebook(name: str, workdir: Path, overrides: list[str]) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    params = next(c for c in nb.cells if c.metadata.get("tags") == ["parameters"])
    original = params.source
    params.source += f"\nOVERRIDES = {overrides!r}\nSMOKE = True\n"
    NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}
    ).execute()
    params.source = original
    return nb


@pytest.mark.notebook
def test_data_preparation_notebook_runs(tmp_path):
    nb = run_notebook("data_preparation.ipynb", tmp_path, [f"workdir={tmp_path}", f"data.source={SAMPLE}"])
    assert (tmp_path / "data" / "prepare_report.json").exists()
    assert (tmp_path / "tokenized" / "tokenized_train").is_dir()
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {}))
    assert images >= 3  # rejected reasons, length histograms, keyword views
    cleaned = nbformat.writes(sync_notebooks.clean_outputs(nb))  # what --execute would commit
    assert not local_paths_in(cleaned) and len(cleaned.encode()) <= MAX_NOTEBOOK_BYTES


@pytest.mark.notebook
def test_model_selection_notebook_runs(tmp_path):
    from conftest import demo_config

    from medqa.prepare import prepare

    prepare(demo_config(tmp_path, *SMOKE_DATA))  # what notebook 1's smoke run writes
    nb = run_notebook("model_selection_and_setup.ipynb", tmp_path, [f"workdir={tmp_path}", f"data.source={SAMPLE}"])
    assert (tmp_path / "outputs" / "baseline" / "metrics.json").exists()
    text = "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    assert "answer_loss" in text and "all-linear" in text


@pytest.mark.notebook
def test_finetuning_notebook_runs(tmp_path):
    from conftest import demo_config

    from medqa.prepare import prepare

    prepare(demo_config(tmp_path, *SMOKE_DATA))  # what notebook 1's smoke run writes
    nb = run_notebook("peft_finetuning_and_logging.ipynb", tmp_path, [f"workdir={tmp_path}", f"data.source={SAMPLE}"])
    assert (tmp_path / "outputs" / "finetune" / "adapter_model.safetensors").exists()
    assert (tmp_path / "outputs" / "baseline" / "metrics.json").exists()
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {}))
    assert images >= 1


@pytest.mark.slow
@pytest.mark.notebook
def test_raytune_final_notebook_runs(tmp_path):
    """Slow (a search inside a kernel): the only run of notebook 4 top to bottom (smoke mode); its functions are
    tested fast on their own (tests/test_tune_evaluate.py, test_frontier.py, test_report.py)."""
    from conftest import demo_config

    from medqa.prepare import prepare

    prepare(demo_config(tmp_path, *SMOKE_DATA))  # what notebook 1's smoke run writes
    nb = run_notebook("raytune-peft-finetune-final.ipynb", tmp_path, [f"workdir={tmp_path}", f"data.source={SAMPLE}"])
    assert not library_chatter(nb), "library chatter in notebook 4 (see medqa.quiet):\n" + "\n".join(
        library_chatter(nb)
    )
    assert (tmp_path / "outputs" / "best" / "adapter_model.safetensors").exists()
    assert (tmp_path / "outputs" / "report.md").exists()
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {}))
    assert images >= 2
