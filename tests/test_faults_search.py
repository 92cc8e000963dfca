"""Fault injection for `medqa tune` (tests/test_faults.py's checks, on a search): a write the OS refuses while the
search writes its summary (results.csv, outputs/frontier/, outputs/best/), and a Ray experiment found damaged on
`tune.resume=true`.

One real search runs, once per module (the only Ray start here). Each test then resumes that finished search through
the real CLI without starting Ray: the restored Tuner's `fit` returns the results the experiment already holds (no
trial is left to run), so everything after it, medqa's own writes, runs as in a real resume."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import demo_config, prepare_demo
from test_faults import (
    FAST,
    assert_failed_well,
    assert_kept,
    garbage,
    no_leftovers,
    refuse_renames,
    run,
    truncate,
)
from test_faults import snapshot as snapshot_all

SEARCH = [*FAST, "tune.num_samples=1"]  # `run` adds FAST itself
RESUME = "tune.resume=true"


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> Path:
    """A workdir with a finished search (one trial): its experiment folder, results.csv, outputs/frontier/ and
    outputs/best/."""
    from medqa.tune import tune

    work = prepare_demo(tmp_path_factory.mktemp("search"), *SEARCH)
    tune(demo_config(work, *SEARCH))
    return work


@pytest.fixture
def work(searched, tmp_path) -> Path:
    shutil.copytree(searched, tmp_path / "w", symlinks=True)
    return tmp_path / "w"


def without_ray(monkeypatch) -> None:
    """Resume without starting Ray: the restored Tuner's fit returns the finished experiment's results."""
    from ray import tune as rt

    import medqa.tune

    monkeypatch.setattr(medqa.tune, "_init_ray", lambda cfg: False)
    monkeypatch.setattr(rt.Tuner, "fit", rt.Tuner.get_results)


def experiment(work: Path) -> Path:
    return next((work / "outputs").glob("ray_*"))


def snapshot(work: Path) -> dict[str, bytes]:
    # Ray's own bookkeeping, rewritten on every restore, is not an artifact of medqa's
    return {k: v for k, v in snapshot_all(work).items() if not Path(k).name.startswith((".validate", "tuner.pkl"))}


# ------------------------------------------------------------------------------------------ writes refused by the OS


def refuse_rename(monkeypatch, code: int, target: Path) -> list:
    """The first rename that puts `target` in place fails with `code` (putting the previous one back succeeds)."""
    return refuse_renames(monkeypatch, code, lambda dst: dst == target, once=True)


@pytest.mark.parametrize(
    "where, code",
    [("frontier", errno.ENOSPC), ("best", errno.ENOSPC), ("frontier", errno.EIO), ("best", errno.EIO)],
    ids=lambda v: errno.errorcode[v] if isinstance(v, int) else v,
)
def test_search_summary_write_refused_keeps_the_previous_front_and_best(capsys, monkeypatch, work, where, code):
    """outputs/frontier/ and outputs/best/ (medqa's atomic folders) refused by the OS at their rename: one paragraph
    naming the folder and `tune.resume=true`, the previous ones byte-identical, nothing half-written left."""
    before = snapshot(work)
    without_ray(monkeypatch)
    calls = refuse_rename(monkeypatch, code, work / "outputs" / where)
    rc, err = run(capsys, work, "tune", "tune.num_samples=1", RESUME)
    assert calls, f"tune did not write outputs/{where}"
    assert_failed_well(rc, err, work / "outputs" / where)
    assert errno.errorcode[code] in err and RESUME in err
    assert_kept(before, work)
    no_leftovers(work)
    monkeypatch.undo()
    without_ray(monkeypatch)
    rc, err = run(capsys, work, "tune", "tune.num_samples=1", RESUME)
    assert rc == 0, err[-3000:]


def refuse_text(monkeypatch, code: int, name: str) -> list:
    """A text file called `name` (written through its temporary sibling, `medqa.artifacts.write_text_atomic`)
    gets half its text, then the OS refuses the rest (a full disk)."""
    real, calls = Path.write_text, []

    def write_text(self, text, *a, **kw):
        if not self.name.startswith(f".{name}.tmp"):
            return real(self, text, *a, **kw)
        calls.append(self)
        real(self, text[: len(text) // 2], *a, **kw)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(Path, "write_text", write_text)
    return calls


def test_results_csv_of_a_resumed_search_is_kept_whole_when_the_disk_fills(capsys, monkeypatch, work):
    """A full disk while a resumed search rewrites results.csv: one paragraph naming it, the previous results.csv
    byte-identical, no temporary file left, and a plain re-run succeeds."""
    from medqa.tune import load_search

    results = experiment(work) / "results.csv"
    before = results.read_bytes()
    without_ray(monkeypatch)
    calls = refuse_text(monkeypatch, errno.ENOSPC, "results.csv")
    rc, err = run(capsys, work, "tune", "tune.num_samples=1", RESUME)
    assert calls and rc != 0
    assert_failed_well(rc, err, results)
    assert "ENOSPC" in err
    assert results.read_bytes() == before  # (outputs/best, written first, holds the same search's choice)
    no_leftovers(work)
    monkeypatch.undo()
    without_ray(monkeypatch)
    rc, err = run(capsys, work, "tune", "tune.num_samples=1", RESUME)
    assert rc == 0, err[-3000:]
    assert len(load_search(demo_config(work, *SEARCH)).results) == 1


def test_a_results_csv_cut_short_is_never_read_as_whole(work):
    """results.csv cut short (by hand, or a copy that stopped): `load_search` (what notebooks read a finished
    search through) refuses it, naming it and the command that writes it again, instead of taking its rows as the
    search's."""
    from medqa.faults import DamagedArtifact
    from medqa.tune import load_search

    results = Path(json.loads((work / "outputs" / "best" / "trial.json").read_text())["experiment"]) / "results.csv"
    whole = results.read_bytes()
    try:
        results.write_bytes(whole[: len(whole) // 2])
        with pytest.raises(DamagedArtifact) as info:
            load_search(demo_config(work, *SEARCH))
        assert str(results) in str(info.value) and RESUME in str(info.value)
    finally:
        results.write_bytes(whole)


# ------------------------------------------------------------------------------------------ a damaged experiment


def _newest(pattern: str):
    return lambda work: max(experiment(work).glob(pattern))


# (the file damaged, how)
DAMAGED = [
    (lambda work: experiment(work) / "tuner.pkl", truncate, "tuner.pkl"),
    (_newest("experiment_state-*.json"), truncate, "experiment_state"),
    (_newest("experiment_state-*.json"), garbage, "experiment_state"),
    (_newest("basic-variant-state-*.json"), garbage, "basic-variant-state"),
]


@pytest.mark.parametrize("target, damage, name", DAMAGED, ids=[f"{d[2]}-{d[1].__name__}" for d in DAMAGED])
def test_damaged_experiment_on_resume_is_named_with_resume_false(capsys, monkeypatch, work, target, damage, name):
    """A Ray experiment's state file cut short or overwritten (a full disk or a kill while Ray wrote it): on
    `tune.resume=true`, one paragraph naming that file and `tune.resume=false`, before Ray starts; nothing changed.
    Before: a traceback from cloudpickle or json inside Ray's restore."""
    path = target(work)
    original = path.read_bytes()
    damage(path)
    before = snapshot(work)
    without_ray(monkeypatch)
    rc, err = run(capsys, work, "tune", "tune.num_samples=1", RESUME)
    assert_failed_well(rc, err, path)
    assert "tune.resume=false" in err
    assert_kept(before, work)
    no_leftovers(work)
    path.write_bytes(original)
    rc, err = run(capsys, work, "tune", "tune.num_samples=1", RESUME)
    assert rc == 0, err[-3000:]
