"""bench/peer.py's smoke test (the real model runs on demand, `make bench-peer`): on the demo config's tiny model,
both sides train, each run is timed and scored, and the JSON and the documents it writes hold every field."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytest.importorskip("trl")
sys.path.insert(0, str(REPO / "bench"))
import peer  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    work = tmp_path_factory.mktemp("peer")
    out = work / "peer.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "peer.py"),
            "--config",
            "configs/demo.yaml",
            "--steps",
            "2",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--workdir",
            str(work / "w"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_both_sides_train_and_the_json_has_every_field(smoke):
    """Slow (bench/peer.py trains both sides in a subprocess): the only run of the peer benchmark."""
    assert [r["side"] for r in smoke["runs"]] == ["medqa", "trl", "medqa_all_logits"]
    for run in smoke["runs"]:
        assert set(peer.RUN_FIELDS) <= set(run), run["side"]
        assert run["steps"] == 2 and run["train_seconds"] > 0 and run["threads"] == 1
        assert 0 < run["answer_tokens"] < run["real_tokens"] <= run["computed_tokens"]
        assert run["real_tokens_per_s"] == pytest.approx(run["real_tokens"] / run["train_seconds"], rel=1e-2)
        assert run["peak_memory_mib"] > 0 and run["final_train_loss"] > 0
    medqa, trl, all_logits = smoke["runs"]
    # the medqa arms train through the fast step (logits at labelled positions; every position in the other arm)
    assert medqa["settings"]["fast_step"] and all_logits["settings"]["fast_step"]
    assert not trl["settings"]["bf16"] and not trl["settings"]["gradient_checkpointing"]
    assert trl["settings"]["completion_only_loss"]
    # one scorer, one test split: the same answer tokens counted for both adapters
    assert medqa["test"]["answer_tokens"] == trl["test"]["answer_tokens"] > 0
    assert medqa["test"]["answer_loss"] > 0 and trl["test"]["answer_loss"] > 0
    for side in ("medqa", "trl", "medqa_all_logits"):
        assert smoke["sides"][side]["runs"] == 1
    assert "test_answer_loss" in smoke["sides"]["trl"] and "test_answer_loss" not in smoke["sides"]["medqa_all_logits"]
    assert set(smoke["ratios"]) == {"medqa_over_trl", "logits_only_saving"}
    ratio = smoke["ratios"]["medqa_over_trl"]["real_tokens_per_s"]["median"]
    assert ratio == pytest.approx(medqa["real_tokens_per_s"] / trl["real_tokens_per_s"], rel=1e-3)
    meta = smoke["meta"]
    assert meta["load_average_at_start"] and meta["load_average_at_end"] and meta["versions"]["trl"]
    assert {"truncation", "pad_token", "batching"} <= set(smoke["not_aligned"])
    assert smoke["aligned"]["steps"] == 2 and smoke["aligned"]["lora"]["r"] == 8


@pytest.mark.slow
def test_documents_are_written_between_the_markers_only(smoke, tmp_path):
    """Slow (needs the peer benchmark's JSON): the only test of peer.py's --from-json writing BENCHMARKS.md and
    README.md."""
    results = tmp_path / "peer.json"
    results.write_text(json.dumps(smoke))
    bench, readme = tmp_path / "BENCHMARKS.md", tmp_path / "README.md"
    bench.write_text(f"# Benchmarks\n\nbefore\n\n{peer.MARK_START}\nold\n{peer.MARK_END}\n\nafter\n")
    readme.write_text("## Performance\n\n- a line\n")
    for _ in range(2):  # writing twice changes nothing more
        assert peer.main(["--from-json", str(results), "--markdown", str(bench), "--readme", str(readme)]) == 0
    text = bench.read_text()
    assert text.startswith("# Benchmarks\n\nbefore\n\n") and text.endswith("\nafter\n") and "\nold\n" not in text
    assert text.count(peer.MARK_START) == 1 and "| TRL `SFTTrainer`, prompt-completion | 1 |" in text
    line = readme.read_text()
    assert line.startswith("## Performance\n\n- a line\n") and line.count(peer.MARK_START) == 1
    assert f"{smoke['ratios']['medqa_over_trl']['real_tokens_per_s']['median']:.2f}x" in line


def test_runs_alternate_and_each_side_goes_first_as_often():
    assert peer.order(2, 2) == ["medqa", "trl", "medqa_all_logits", "medqa_all_logits", "trl", "medqa"]
    assert peer.order(2, 1) == ["medqa", "trl", "medqa_all_logits", "trl", "medqa"]
    assert peer.order(3, 0) == ["medqa", "trl", "trl", "medqa", "medqa", "trl"]
