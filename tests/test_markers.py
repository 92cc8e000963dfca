"""The test suite's own shape: every slow test says in its docstring why it is slow and what it checks that no fast
test does (`make test` runs the fast set; CI runs it, then the slow set)."""

from __future__ import annotations

import ast

from conftest import REPO


def _slow_without_reason() -> list[str]:
    missing = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        marked_module = any(
            isinstance(node, ast.Assign)
            and any(getattr(t, "id", "") == "pytestmark" for t in node.targets)
            and "slow" in ast.get_source_segment(source, node)
            for node in tree.body
        )
        if marked_module and "slow" not in (ast.get_docstring(tree) or "").lower():
            missing.append(path.name)
        for node in tree.body:
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test")):
                continue
            decorators = " ".join(ast.get_source_segment(source, d) for d in node.decorator_list)
            if "mark.slow" in decorators and "slow" not in (ast.get_docstring(node) or "").lower():
                missing.append(f"{path.name}::{node.name}")
    return missing


def test_every_slow_test_says_what_only_it_checks():
    assert _slow_without_reason() == []


def test_the_check_finds_a_slow_test_without_a_reason(tmp_path, monkeypatch):
    import test_markers

    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        'import pytest\n\n\n@pytest.mark.slow\ndef test_a():\n    """Checks a."""\n\n\n'
        '@pytest.mark.slow\ndef test_b():\n    """Slow: the only check of b."""\n'
    )
    monkeypatch.setattr(test_markers, "REPO", tmp_path)
    assert _slow_without_reason() == ["test_x.py::test_a"]
