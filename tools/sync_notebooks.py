"""Keep each notebooks/<name>.ipynb in step with its source notebooks/<name>.py (jupytext percent format).

    python tools/sync_notebooks.py            # rewrite each .ipynb from its .py, keeping a cell's outputs where
                                              # its source is unchanged (like `jupytext --update`, but an edited
                                              # cell loses its now stale outputs)
    python tools/sync_notebooks.py --check    # exit 1 when a .ipynb and its .py disagree (what the tests check)
    python tools/sync_notebooks.py --execute configs/smollm2-offline.yaml [KEY=VALUE ...]
                                              # run the notebooks in order (nbclient) on that config and write
                                              # their outputs into the .ipynb files

--execute sets CONFIG, OVERRIDES (the KEY=VALUE arguments), SMOKE (--smoke) and each --param NAME=VALUE the cell
defines (e.g. --param REUSE_SEARCH=True) at the end of each parameters cell, runs from the repository root, and
writes the parameters cell back unchanged. Outputs are made small before they are written: progress bars and
widgets dropped, ANSI colours removed, long logs cut to their head and tail, PNGs over MAX_PNG_BYTES re-encoded,
and local paths (this checkout, the home, temporary and Python folders) replaced by short placeholders. A failing
cell stops the run and leaves that notebook's file untouched.
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import io
import os
import re
import sys
import tempfile
from pathlib import Path

import jupytext
import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_raw_cell

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
ORDER = [
    "data_preparation",
    "model_selection_and_setup",
    "peft_finetuning_and_logging",
    "raytune-peft-finetune-final",
]  # --execute runs them in this order: each reads what the previous wrote
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}

MAX_PNG_BYTES = 100_000
MAX_STREAM_LINES = 60  # a longer stream output keeps its first HEAD_LINES and last TAIL_LINES lines
HEAD_LINES, TAIL_LINES = 20, 30
WIDGET_MIMES = ("application/vnd.jupyter.widget-view+json", "application/vnd.jupyter.widget-state+json")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PROGRESS = re.compile(r"\d+%\|.*\||\|\s*\d+/\d+\s*\[|\d+(\.\d+)?(it|s)/(s|it)\]")  # tqdm bars


# ---- sources and sync ---------------------------------------------------------------------------------------


def pairs(folder: Path = NOTEBOOKS, only: list[str] | None = None) -> list[tuple[Path, Path]]:
    """(source .py, notebook .ipynb) per notebook in `folder`, in ORDER, then the rest by name."""
    stems = sorted(p.stem for p in folder.glob("*.py"))
    stems = [s for s in ORDER if s in stems] + [s for s in stems if s not in ORDER]
    if only:
        wanted = {Path(n).stem for n in only}
        unknown = wanted - set(stems)
        if unknown:
            raise SystemExit(f"no notebook source {', '.join(sorted(unknown))} in {folder}; have {', '.join(stems)}")
        stems = [s for s in stems if s in wanted]
    return [(folder / f"{s}.py", folder / f"{s}.ipynb") for s in stems]


def cell_sources(nb) -> list[tuple[str, str]]:
    """What a notebook and its source must agree on: each cell's type and text, in order."""
    return [(c.cell_type, c.source) for c in nb.cells]


def _cell_id(stem: str, cell_type: str, source: str, taken: set[str]) -> str:
    digest = hashlib.sha1((cell_type + "\n" + source).encode()).hexdigest()[:8]
    base = f"{stem[:20]}-{digest}"
    cid, n = base, 1
    while cid in taken:
        n += 1
        cid = f"{base}-{n}"
    taken.add(cid)
    return cid


def merge(source, existing, stem: str):
    """The notebook of `source`'s cells; a cell whose type and text are unchanged in `existing` keeps its outputs,
    execution count, id and metadata (tags come from the source). New or edited cells start empty, with an id
    derived from their text so that regenerating is reproducible."""
    old = list(existing.cells) if existing is not None else []
    used: set[int] = set()
    taken = {c.get("id") for c in old if c.get("id")}
    cells, last = [], -1
    for cell in source.cells:
        same = [
            j for j, o in enumerate(old) if j not in used and o.cell_type == cell.cell_type and o.source == cell.source
        ]
        j = next((j for j in same if j > last), same[0] if same else None)
        if j is not None:
            used.add(j)
            last = j
            new = copy.deepcopy(old[j])
            meta = {k: v for k, v in new.get("metadata", {}).items() if k != "tags"}
            new["metadata"] = {**meta, **cell.get("metadata", {})}
        else:
            make = {"code": new_code_cell, "markdown": new_markdown_cell, "raw": new_raw_cell}[cell.cell_type]
            new = make(cell.source, metadata=dict(cell.get("metadata", {})))
            new["id"] = _cell_id(stem, cell.cell_type, cell.source, taken)
        cells.append(new)
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata = copy.deepcopy(existing.metadata) if existing is not None else {}
    nb.metadata.pop("jupytext", None)  # the pairing lives in notebooks/jupytext.toml
    nb.metadata.setdefault("kernelspec", dict(KERNELSPEC))
    return nb


def synced(py: Path, ipynb: Path):
    """`ipynb` (if any) brought in step with `py`."""
    source = jupytext.read(py, fmt="py:percent")
    existing = nbformat.read(ipynb, as_version=4) if ipynb.exists() else None
    return merge(source, existing, py.stem)


def write(nb, path: Path) -> bool:
    """Write `nb` to `path` (validated, Jupyter's own layout); False when the file already holds exactly that."""
    nbformat.validate(nb)
    text = nbformat.writes(nb) + "\n"
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    path.write_text(text, encoding="utf-8")
    return True


# ---- execution and output cleaning --------------------------------------------------------------------------


def parameters_cell(nb):
    cell = next((c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])), None)
    if cell is None:
        raise SystemExit("the notebook has no cell tagged 'parameters'")
    return cell


def execute(
    nb,
    config: str,
    overrides: list[str],
    smoke: bool = False,
    timeout: int = 7200,
    params: dict[str, str] | None = None,
):
    """Run `nb` top to bottom in a fresh kernel started at the repository root; the parameters cell gets CONFIG,
    OVERRIDES and SMOKE appended while it runs (and each of `params`, NAME -> Python literal, that the cell
    defines), and its text back afterwards."""
    from nbclient import NotebookClient

    cell = parameters_cell(nb)
    original = cell.source
    extra = "".join(
        f"{name} = {value}\n" for name, value in (params or {}).items() if re.search(rf"^{name}\b", original, re.M)
    )
    cell.source = original + f"\nCONFIG = {config!r}\nOVERRIDES = {list(overrides)!r}\nSMOKE = {smoke!r}\n{extra}"
    try:
        NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            record_timing=False,
            coalesce_streams=True,
            resources={"metadata": {"path": str(ROOT)}},
        ).execute()
    finally:
        cell.source = original
    return nb


def local_paths() -> list[tuple[str, str]]:
    """(local folder, placeholder), longest first, for the folders outputs may name."""
    found = {
        str(ROOT): ".",
        sys.prefix: "<python>",
        sys.base_prefix: "<python>",
        str(Path.home()): "~",
        tempfile.gettempdir(): "<tmp>",
        os.path.realpath(tempfile.gettempdir()): "<tmp>",
    }
    return sorted(((p, r) for p, r in found.items() if len(p) > 1), key=lambda pr: -len(pr[0]))


def scrub(text: str, paths: list[tuple[str, str]]) -> str:
    text = ANSI.sub("", text)
    for path, placeholder in paths:
        text = re.sub(re.escape(path) + r"(?![\w.-])", placeholder, text)
    return text


def clean_stream(text: str) -> str:
    """What a terminal would show (the text after each line's last carriage return), without progress bars,
    cut to its head and tail when long."""
    lines = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    lines = [line for line in lines if not PROGRESS.search(line)]
    if len(lines) > MAX_STREAM_LINES:
        cut = len(lines) - HEAD_LINES - TAIL_LINES
        lines = lines[:HEAD_LINES] + [f"[... {cut} lines cut by tools/sync_notebooks.py ...]"] + lines[-TAIL_LINES:]
    return "\n".join(lines)


def shrink_png(data: str, limit: int = MAX_PNG_BYTES) -> str:
    """A base64 PNG under `limit` bytes: re-encoded with a 256-colour palette, then scaled down if still too big."""
    raw = base64.b64decode(data)
    if len(raw) <= limit:
        return data
    from PIL import Image

    img = Image.open(io.BytesIO(raw))
    img.load()
    scale = 1.0
    while True:
        size = (max(1, int(img.width * scale)), max(1, int(img.height * scale)))
        out = io.BytesIO()
        img.resize(size, Image.LANCZOS).convert("RGBA").quantize(256, method=Image.Quantize.FASTOCTREE).save(
            out, format="PNG", optimize=True
        )
        if out.tell() <= limit or scale < 0.2:
            return base64.b64encode(out.getvalue()).decode()
        scale *= 0.8


def clean_outputs(nb):
    """Make the executed notebook small and free of local paths (see the module docstring)."""
    paths = local_paths()
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        outputs = []
        for out in cell.outputs:  # consecutive writes to one stream as one output
            if (
                out.output_type == "stream"
                and outputs
                and outputs[-1].output_type == "stream"
                and outputs[-1].name == out.name
            ):
                outputs[-1].text += out.text
            else:
                outputs.append(out)
        kept = []
        for out in outputs:
            if out.output_type == "stream":
                out.text = clean_stream(scrub(out.text, paths))
                if out.text.strip():
                    kept.append(out)
                continue
            if out.output_type in ("display_data", "execute_result"):
                data = out.get("data", {})
                if any(m in data for m in WIDGET_MIMES) or "<progress" in str(data.get("text/html", "")):
                    continue  # a progress widget (tqdm, transformers' notebook callback): noise once finished
                for mime, value in list(data.items()):
                    if mime == "image/png":
                        data[mime] = shrink_png(value)
                    elif isinstance(value, str):
                        data[mime] = scrub(value, paths)
            elif out.output_type == "error":
                out.traceback = [scrub(line, paths) for line in out.traceback]
                out.evalue = scrub(out.evalue, paths)
            kept.append(out)
        cell.outputs = kept
    return nb


# ---- command line -------------------------------------------------------------------------------------------


def _show(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="with --execute: config overrides")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="only report notebooks out of step with their source")
    mode.add_argument("--execute", metavar="CONFIG", help="run the notebooks on this config, outputs written back")
    ap.add_argument("--smoke", action="store_true", help="with --execute: SMOKE = True (each stage's quick run)")
    ap.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="with --execute: set this parameter (a Python literal) in the notebooks whose parameters cell has it",
    )
    ap.add_argument("--only", action="append", metavar="NAME", help="this notebook only (repeatable)")
    ap.add_argument("--dir", type=Path, default=NOTEBOOKS, help="folder of the notebook pairs (default notebooks/)")
    ap.add_argument("--timeout", type=int, default=7200, help="with --execute: seconds allowed per cell")
    args = ap.parse_args(argv)
    if (args.overrides or args.param) and not args.execute:
        ap.error("KEY=VALUE overrides and --param go with --execute")
    params = dict(p.split("=", 1) for p in args.param if "=" in p)

    stale = []
    for py, ipynb in pairs(args.dir, args.only):
        nb = synced(py, ipynb)
        if args.check:
            current = nbformat.read(ipynb, as_version=4) if ipynb.exists() else None
            if current is None or cell_sources(current) != cell_sources(nb):
                stale.append(ipynb)
            continue
        if args.execute:
            # The kernel imports medqa from this checkout, whatever is installed.
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
            print(f"executing {_show(ipynb)} on {args.execute} ...", flush=True)
            nb = clean_outputs(execute(nb, args.execute, args.overrides, args.smoke, args.timeout, params))
        print(("wrote " if write(nb, ipynb) else "unchanged ") + _show(ipynb))
    if stale:
        print(
            "out of step with their .py source (run python tools/sync_notebooks.py):",
            *[_show(p) for p in stale],
            sep="\n  ",
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
