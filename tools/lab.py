"""`make lab`: JupyterLab on this checkout's Python, serving notebooks/, on 127.0.0.1 only.

    python tools/lab.py                 # http://127.0.0.1:8888/lab?token=... (the next free port if 8888 is taken)
    python tools/lab.py --port 9000     # that port, or an error if it is taken
    python tools/lab.py --root .        # the whole checkout in the file browser

What it sets up before starting `jupyter lab`:
- the kernel `medqa` ("Python (medqa)"), this Python with this checkout's src/ first on PYTHONPATH, registered in
  Jupyter's data folder and the server's default for new notebooks (the stage notebooks name `python3`, which on
  this server is the same Python);
- jupytext's contents manager, so each notebooks/<name>.py opens as a notebook (double-click: the default viewer
  for Python files is set to "Jupytext Notebook" in the lab settings kept here) and saving writes the pair
  <name>.py and <name>.ipynb (notebooks/jupytext.toml);
- every Jupyter and IPython folder (config, data, runtime, lab settings, workspaces) under the checkout's ignored
  .cache/ unless set in the environment, as the Makefile does, so nothing is written to the home folder; offline
  Hugging Face; no update checks, no extension search;
- a fresh token, printed with the URL. Ctrl-C stops the server.

Arguments it does not know go to `jupyter lab` as they are (e.g. --LabApp.expose_app_in_browser=True).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL, KERNEL_DISPLAY = "medqa", "Python (medqa)"
CACHE = ROOT / ".cache"
ENVIRONMENT = {  # as the Makefile exports them
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HOME": str(CACHE / "huggingface"),
    "MPLCONFIGDIR": str(CACHE / "matplotlib"),
    "JUPYTER_CONFIG_DIR": str(CACHE / "jupyter" / "config"),
    "JUPYTER_DATA_DIR": str(CACHE / "jupyter" / "data"),
    "JUPYTER_RUNTIME_DIR": str(CACHE / "jupyter" / "runtime"),
    "JUPYTERLAB_SETTINGS_DIR": str(CACHE / "jupyter" / "lab" / "user-settings"),
    "JUPYTERLAB_WORKSPACES_DIR": str(CACHE / "jupyter" / "lab" / "workspaces"),
    "IPYTHONDIR": str(CACHE / "ipython"),
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "GRADIO_ANALYTICS_ENABLED": "False",
}
# The lab setting that opens a Python file with jupytext's notebook view (right-click, Open With, Editor still works)
VIEWERS = ("@jupyterlab/docmanager-extension", "plugin", {"defaultViewers": {"python": "Jupytext Notebook"}})


def environment() -> None:
    """The folders and switches above, where the environment does not set them; this checkout's src/ first."""
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    src = str(ROOT / "src")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))


def register_kernel() -> Path:
    """Register this Python as the kernel `medqa` in Jupyter's data folder (JUPYTER_DATA_DIR/kernels/medqa)."""
    from ipykernel.kernelspec import install

    return Path(
        install(
            user=True,
            kernel_name=KERNEL,
            display_name=KERNEL_DISPLAY,
            env={"PYTHONPATH": os.environ["PYTHONPATH"]},
        )
    )


def default_viewers() -> Path:
    """Python files open as notebooks: the lab setting, written once (a later change in the lab's settings stays)."""
    package, plugin, settings = VIEWERS
    path = Path(os.environ["JUPYTERLAB_SETTINGS_DIR"]) / package / f"{plugin}.jupyterlab-settings"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return path


def free_port(first: int, tries: int = 50) -> int:
    """`first`, or the next port on 127.0.0.1 that nothing listens on."""
    for port in range(first, first + tries):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise SystemExit(f"No free port on 127.0.0.1 from {first} to {first + tries - 1}: give one with --port.")


def command(root: Path, port: int, token: str, extra: list[str]) -> list[str]:
    """The `jupyter lab` command line: this Python, 127.0.0.1 only, jupytext's contents manager, the medqa kernel."""
    return [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root}",
        f"--IdentityProvider.token={token}",
        "--ServerApp.contents_manager_class=jupytext.AsyncTextFileContentsManager",
        f"--MappingKernelManager.default_kernel_name={KERNEL}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",  # no extension search on PyPI from the page
        *(["--ServerApp.allow_root=True"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),  # containers
        *extra,
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, help="port on 127.0.0.1 (default: 8888, or the next free one)")
    ap.add_argument("--root", type=Path, default=ROOT / "notebooks", help="folder to serve (default: notebooks/)")
    args, extra = ap.parse_known_args(argv)
    environment()
    register_kernel()
    default_viewers()
    port = args.port or free_port(8888)
    token = secrets.token_hex(24)
    print(f"JupyterLab on {args.root.resolve()} (kernel {KERNEL!r}): http://127.0.0.1:{port}/lab?token={token}")
    print("Open a notebook (.py or .ipynb: saving writes both); Ctrl-C here stops the server.", flush=True)
    cmd = command(args.root.resolve(), port, token, extra)
    os.execv(cmd[0], cmd)  # the server replaces this process: Ctrl-C and signals go straight to it
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
