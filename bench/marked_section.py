"""The one writer of a generated section into a markdown file (BENCHMARKS.md, README.md), used by bench.py,
knowledge.py and peer.py, each with its own pair of markers (`<!-- bench:start -->`, `<!-- knowledge-bench:start -->`,
`<!-- peer:start -->` and their `:end` twins).

A script replaces only the text between its markers, so the prose a person writes around a section survives every
run, and writing the same section twice changes nothing.
"""

from __future__ import annotations

from pathlib import Path


def write_marked_section(path: Path, section: str, start: str, end: str, intro: str | None = None) -> None:
    """Write `section` (its text from the marker `start` to the marker `end`, both included) into the markdown file
    `path`: in place of the text from `start` to `end` when the file has both markers, else appended after a blank
    line. Everything outside the markers is kept as it is. `intro`: the text of a file that does not exist yet
    (None: the file must exist)."""
    text = intro if intro is not None and not path.exists() else path.read_text(encoding="utf-8")
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")
