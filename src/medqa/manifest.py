"""Manifests: what each artifact was made from, so no stage silently reads another stage's stale output.

Every stage writes `manifest.json` beside its output: the resolved config, a fingerprint of each input (source
data, tokenizer, base model), package versions, the git commit and the time. A later stage compares the
fingerprints it would use now with those in the manifest of what it reads, and stops with a message that names
the command that rebuilds the artifact. `force=true` proceeds anyway, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
from importlib import metadata
from pathlib import Path

from medqa.config import Config
from medqa.errors import MedqaError

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
    """sha256 of a data file (or of a folder's files); a Hub id stands for itself."""
    path = Path(source).expanduser()
    if not path.exists():
        return f"hub:{source}"
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.name.encode())
        _sha_file(f, h)
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
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
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
    manifest = {"stage": stage, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "inputs": inputs,
                "versions": _versions(), "git_commit": _git_commit(), "config": cfg.to_dict()}
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
        problems = [f"{_EXPLAIN.get(k, (k, k))[0]} differs from {_EXPLAIN.get(k, (k, k))[1]} "
                    f"({str(manifest['inputs'].get(k))[:24]}... vs {str(v)[:24]}...)"
                    for k, v in current.items() if manifest["inputs"].get(k) != v]
    if not problems:
        return
    message = (f"{folder} is stale: {'; '.join(problems)}. Rebuild it with `{rebuild}` (same config as this "
               "stage), or pass force=true to use it anyway.")
    if cfg.force:
        log.warning("force=true: %s", message)
        return
    raise StaleArtifactError(message)
