"""Manifests: what each artifact was made from, so no stage silently reads another stage's stale output.

Every stage writes `manifest.json` beside its output: the resolved config, a fingerprint of each input (source
data, tokenizer, base model), package versions, the git commit and the time. A later stage compares the
fingerprints it would use now with those in the manifest of what it reads, and stops with a message that names
the command that rebuilds the artifact. `force=true` proceeds anyway, with a warning.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import subprocess
import time
from importlib import metadata
from pathlib import Path

from medqa.config import RENAMED
from medqa.errors import MedqaError
from medqa.schema import Config, not_determining

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PACKAGES = ("medqa", "torch", "transformers", "peft", "datasets", "accelerate", "ray", "tokenizers")


class StaleArtifactError(MedqaError):
    """An artifact was made from other inputs than the current config names."""


def _sha_file(path: Path, h) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def fingerprint_source(source: str) -> str:
    """sha256 of a data file (or of a folder's files); a Hub id stands for itself. A source is read once per process
    while none of its files changes (`_identity`; a stage checks the prepared data and an adapter against the same
    source: one read, not one per check)."""
    path = Path(source).expanduser()
    if not path.exists():
        return f"hub:{source}"
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return _hash_files(tuple((str(f.resolve()), f.name, _identity(f.stat())) for f in files))


def _identity(st) -> tuple[int, ...]:
    """What changes whenever a file's content may have: its inode (a replace by rename), size, and modification and
    change times (ctime cannot be set back, as `cp -p` or `os.utime` set mtime back)."""
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


@functools.lru_cache(maxsize=64)
def _hash_files(files: tuple[tuple[str, str, tuple[int, ...]], ...]) -> str:
    h = hashlib.sha256()
    for path, name, _ in files:
        h.update(name.encode())
        _sha_file(Path(path), h)
    return h.hexdigest()


def fingerprint_model(name: str, revision: str = "main") -> str:
    """A local model folder: its config.json and the size and first MiB of each weight file (fast, and it changes
    whenever the weights are rebuilt). A Hub id: the id and revision."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return f"hub:{name}@{revision}"
    h = hashlib.sha256()
    config = path / "config.json"
    if config.exists():
        h.update(config.read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_manifest(folder: Path, stage: str, cfg: Config, inputs: dict[str, str]) -> dict:
    manifest = {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": inputs,
        "versions": _versions(),
        "git_commit": _git_commit(),
        "config": cfg.to_dict(),
    }
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {"inputs": {}, "corrupt": True}  # treated as stale: every input then differs


# What each input means, and the command that rebuilds an artifact made from another one.
_EXPLAIN = {
    "source": ("the data it was prepared from", "the config's data.source"),
    "tokenizer": ("its tokenizer", "the config's model tokenizer"),
    "base_model": ("its base model", "the config's model.name_or_path"),
    "prompt_and_split": ("its prompt, length and split settings", "the config's prompt.* and data.* settings"),
}


def check_inputs(cfg: Config, folder: Path, current: dict[str, str], rebuild: str) -> None:
    """Stop when `folder`'s manifest names other inputs than `current`; `force=true` only warns."""
    manifest = read_manifest(folder)
    if manifest is None:
        problems = [f"{folder} has no {MANIFEST}, so what it was made from is unknown"]
    else:
        problems = [
            f"{_EXPLAIN.get(k, (k, k))[0]} differs from {_EXPLAIN.get(k, (k, k))[1]} "
            f"({str(manifest['inputs'].get(k))[:24]}... vs {str(v)[:24]}...)"
            for k, v in current.items()
            if manifest["inputs"].get(k) != v
        ]
    if not problems:
        return
    message = (
        f"{folder} is stale: {'; '.join(problems)}. Rebuild it with `{rebuild}` (same config as this "
        "stage), or pass force=true to use it anyway."
    )
    if cfg.force:
        log.warning("force=true: %s", message)
        return
    raise StaleArtifactError(message)


# ------------------------------------------------------------------------------------------ resumable runs

RUN_RECORD = "run.json"
# Settings a resumed run may change: those declared affects="nothing" in `medqa.schema` (how fast a run goes, where
# its files are, how it is reported, never what it learns) and paths (what they point at is fingerprinted in the
# inputs: data content, tokenizer vocabulary, model files). Everything else (data, model, prompt, LoRA, optimisation,
# seeds, and scoring.max_examples, which sets the validation examples that pick the best checkpoint) must match.
_NOT_DETERMINING = not_determining()


def determining_config(cfg: Config, sections: tuple[str, ...], also: tuple[str, ...] = ()) -> dict:
    """The part of the config that determines a run's result, flattened to dotted keys (`sections`: the top-level
    sections that matter for this kind of run, e.g. no `tune` for a plain training run; `also`: single dotted keys
    of other sections, e.g. tune.objective, which picks a training run's best checkpoint)."""
    flat: dict = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if name in _NOT_DETERMINING:
                continue
            if isinstance(value, dict):
                walk(value, name + ".")
            else:
                flat[name] = value

    walk({k: v for k, v in cfg.to_dict().items() if k in sections or not isinstance(v, dict)}, "")
    for key in also:
        section, _, name = key.partition(".")
        flat[key] = getattr(getattr(cfg, section), name)
    return flat


def _fingerprint(determining: dict, inputs: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps([determining, inputs], sort_keys=True, default=str).encode()).hexdigest()


def run_record(cfg: Config, sections: tuple[str, ...], inputs: dict[str, str], also: tuple[str, ...] = ()) -> dict:
    determining = determining_config(cfg, sections, also)
    return {
        "fingerprint": _fingerprint(determining, inputs),
        "config": determining,
        "inputs": inputs,
        "finished": False,
    }


def _current_names(config: dict) -> dict:
    """A stored run's settings under today's section names (`config.RENAMED`: eval.* is scoring.* now)."""
    out = {}
    for key, value in config.items():
        section, dot, rest = key.partition(".")
        out[f"{RENAMED.get(section, section)}{dot}{rest}"] = value
    return out


def write_run_record(folder: Path, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (RUN_RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(folder / RUN_RECORD)


def read_run_record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / RUN_RECORD).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def check_resumable(folder: Path, record: dict, what: str, fresh: str, ignore: tuple[str, ...] = ()) -> dict | None:
    """Stop unless `folder` holds a run with the same fingerprint as `record`: resuming another run's checkpoints
    would report its result under this config's name. `ignore`: config keys that may differ (settings applied
    after the run, e.g. a search's selection rule under a frontier). Returns the stored record (None when there is
    none)."""
    stored = read_run_record(folder)
    if stored is None:
        raise StaleArtifactError(
            f"{folder} holds {what} but no {RUN_RECORD}, so the settings it was made with are unknown and resuming "
            f"it could report another run's result under this config. Start fresh with {fresh} (its checkpoints are "
            "then replaced)."
        )
    if stored.get("fingerprint") == record["fingerprint"]:
        return stored
    old, new = _current_names(stored.get("config", {})), record["config"]
    if _fingerprint(old, stored.get("inputs", {})) == record["fingerprint"]:
        return stored  # the same run, recorded before a section was renamed
    changed = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k) and k not in ignore
    ]
    changed += [
        f"input {k} differs"
        for k in sorted(set(stored.get("inputs", {})) | set(record["inputs"]))
        if stored.get("inputs", {}).get(k) != record["inputs"].get(k)
    ]
    if not changed:
        return stored  # only settings applied after the run differ
    state = "finished" if stored.get("finished") else "interrupted"
    raise StaleArtifactError(
        f"Cannot resume: {folder} holds an {state} {what} made with other settings ({'; '.join(changed[:8])}"
        f"{'; ...' if len(changed) > 8 else ''}). Resuming would label its result with this config. Either restore "
        f"those settings to continue it, or start fresh with {fresh}."
    )
