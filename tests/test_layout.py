"""The package's shape: stages side by side (none imports another, tune running train excepted), every path under
workdir spelled in one module, and no hidden in-function imports of medqa's own modules."""

from __future__ import annotations

import ast
import re

from conftest import REPO

PACKAGE = REPO / "src" / "medqa"
STAGES = {"prepare", "baseline", "train", "tune", "evaluate", "benchmark", "ask", "chat", "export", "feedback"}
ALLOWED = {("tune", "train")}  # a Ray trial runs the training function
MAX_FUNCTION_LINES, MAX_MODULE_LINES = 60, 500
LONG_MODULES = {"schema"}  # every config field declared once, with its help, bounds and role: one table
LONG_FUNCTIONS: set[str] = set()  # none today


def _imports(path) -> list[tuple[str, bool]]:
    """(imported medqa module, imported inside a function) for every import of medqa's own modules."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("medqa"):
                names = [child.module] if child.module != "medqa" else [f"medqa.{a.name}" for a in child.names]
                found.extend([(n.split(".")[1], in_function) for n in names if "." in n])
            elif isinstance(child, ast.Import):
                found.extend((a.name.split(".")[1], in_function) for a in child.names if a.name.startswith("medqa."))
            visit(child, inner)

    visit(tree, False)
    return found


def test_stages_import_no_other_stage():
    for stage in STAGES:
        imported = {m for m, _ in _imports(PACKAGE / f"{stage}.py")}
        others = {m for m in imported & STAGES if (stage, m) not in ALLOWED}
        assert not others, f"medqa.{stage} imports the stage(s) {sorted(others)}; share through medqa.workdir instead"
    # ... nor does anything a stage builds on, except the CLI that dispatches to them
    for path in PACKAGE.glob("*.py"):
        if path.stem not in STAGES | {"cli"}:
            staged = {m for m, _ in _imports(path)} & STAGES
            assert not staged, f"medqa.{path.stem} (a library module) imports the stage(s) {sorted(staged)}"


def test_no_function_level_imports_of_medqa_modules():
    for path in PACKAGE.glob("*.py"):
        late = sorted({m for m, inside in _imports(path) if inside})
        assert not late, f"medqa.{path.stem} imports {late} inside a function; import at the top"


def test_paths_under_workdir_are_spelled_in_one_module():
    spelled = re.compile(
        r"Path\(cfg\.workdir\)|cfg\.workdir\) /|\"outputs\" /|/ \"outputs\"|/ \"tokenized\"|"
        r"\"finetune\"|\"finetune_checkpoints\"|/ \"best\""
    )
    for path in PACKAGE.glob("*.py"):
        if path.stem != "workdir":
            hits = [line.strip() for line in path.read_text().splitlines() if spelled.search(line)]
            assert not hits, f"medqa.{path.stem} builds workdir paths itself ({hits[0]}); use medqa.workdir.paths"


def test_the_contract_names_a_writer_and_readers_for_each_artifact():
    import importlib

    from medqa import workdir

    doc = workdir.__doc__
    for artifact in (
        "data/{split}",
        "tokenized/",
        "outputs/baseline/",
        "outputs/finetune/",
        "outputs/best/",
        "outputs/report.",
        "outputs/finetune_checkpoints/",
        "outputs/merged/",
    ):
        line = next(x for x in doc.splitlines() if x.strip().startswith(artifact))
        named = [w.strip(",()") for w in line.split() if re.fullmatch(r"[a-z_]+\.[a-z_]+", w.strip(",()"))]
        assert named, line
        for dotted in named:  # every function the contract names exists
            module, name = dotted.split(".")
            assert hasattr(importlib.import_module(f"medqa.{module}"), name), dotted


def test_each_stage_reads_as_its_steps():
    """A stage's entry function names its steps (the shape of a torchtune recipe); the steps hold the work."""
    import importlib
    import inspect

    for stage in ("prepare", "baseline", "train", "tune", "evaluate", "benchmark", "ask", "export", "feedback"):
        entry = getattr(importlib.import_module(f"medqa.{stage}"), stage)
        lines = len(inspect.getsource(entry).splitlines())
        assert lines < 40, f"medqa.{stage}.{stage} is {lines} lines; move its work into named steps"


def test_functions_and_modules_stay_short():
    """No function over 60 lines and no module over 500 (`LONG_MODULES`, `LONG_FUNCTIONS` excepted), so that each
    reads in one screen and one sitting; split a long one into named steps or move a concern to its own module."""
    long = []
    for path in sorted(PACKAGE.glob("*.py")):
        source = path.read_text()
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES and path.stem not in LONG_MODULES:
            long.append(f"medqa.{path.stem} has {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and f"{path.stem}.{node.name}" not in LONG_FUNCTIONS:
                    long.append(f"medqa.{path.stem}.{node.name} has {length} lines")
    assert not long, f"over {MAX_FUNCTION_LINES} lines a function or {MAX_MODULE_LINES} a module: {long}"
