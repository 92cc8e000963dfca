"""`make lab` in a real browser: tools/lab.py (what the Makefile runs) serves a copy of notebooks/ on a free port of
127.0.0.1 only, with its own Jupyter folders; the kernel `medqa` is registered and the default; jupytext's contents
manager serves notebooks/data_preparation.py as a notebook; headless Chromium (Debian's, through Debian's
chromedriver, as tests/test_chat.py) opens that .py, which shows as a notebook, runs its cells from the first one
(the Colab cell, then the parameters, then the setup cell) and sees the setup cell's output; saving writes the
paired .ipynb. The server is shut down through its API (and its process group killed if it does not stop)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import REPO
from test_chat import _free_port, _wait, browser  # noqa: F401  (browser: the shared Chromium fixture)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """tools/lab.py on a copy of notebooks/ and configs/ (saving in the page must not touch the checkout), every
    Jupyter folder under a temporary one; yields {url, token, root, proc, home}."""
    home = tmp_path_factory.mktemp("lab")
    root = home / "checkout"
    shutil.copytree(REPO / "notebooks", root / "notebooks")
    shutil.copytree(REPO / "configs", root / "configs")
    ipynb = root / "notebooks" / "data_preparation.ipynb"  # newer than its .py, as after a `git pull` of a new run
    os.utime(ipynb, (time.time() + 60, time.time() + 60))
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(home / "jupyter" / "config"),
        "JUPYTER_DATA_DIR": str(home / "jupyter" / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "jupyter" / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(home / "jupyter" / "lab-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "jupyter" / "lab-workspaces"),
        "IPYTHONDIR": str(home / "ipython"),
    }
    port = _free_port()
    log = home / "lab.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "tools" / "lab.py"), "--port", str(port), "--root", str(root / "notebooks")],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    try:
        url = _wait(lambda: re.search(r"http://127\.0\.0\.1:\d+/lab\?token=\w+", log.read_text()), 60, "the URL")
        url = url.group(0)
        assert url.startswith(f"http://127.0.0.1:{port}/lab?token="), url
        token = url.split("token=")[1]
        _wait(lambda: _get(port, token, "/api/status") is not None or proc.poll() is not None, 180, "the server")
        if proc.poll() is not None:
            pytest.fail(f"tools/lab.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        yield {"port": port, "token": token, "root": root, "proc": proc, "home": home, "log": log}
    finally:
        _stop(proc, port, locals().get("token"))


def _get(port: int, token: str, path: str):
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"token {token}"})
        with urllib.request.urlopen(req, timeout=60) as response:
            return json.loads(response.read())
    except OSError:
        return None


def _stop(proc: subprocess.Popen, port: int, token: str | None) -> None:
    """Shut the server down as a user would (its API), else stop its process group."""
    if token and proc.poll() is None:
        try:
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/api/shutdown", method="POST", headers={"Authorization": f"token {token}"}
            )
            urllib.request.urlopen(req, timeout=10).close()
            proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def test_lab_serves_the_project_kernel_and_the_py_sources_as_notebooks(lab):
    specs = _get(lab["port"], lab["token"], "/api/kernelspecs")
    assert specs["default"] == "medqa" and specs["kernelspecs"]["medqa"]["spec"]["display_name"] == "Python (medqa)"
    kernel = json.loads((lab["home"] / "jupyter" / "data" / "kernels" / "medqa" / "kernel.json").read_text())
    assert kernel["argv"][0] == sys.executable and kernel["env"]["PYTHONPATH"].startswith(str(REPO / "src"))
    nb = _get(lab["port"], lab["token"], "/api/contents/data_preparation.py?type=notebook&content=1")
    assert nb["type"] == "notebook" and nb["content"]["cells"][1]["source"].startswith("# 1. Data preparation")
    assert _get(lab["port"], "wrong-token", "/api/contents") is None  # the token is needed
    # 127.0.0.1 only: the server's listening sockets, as the kernel lists them (psutil comes with accelerate)
    import psutil

    listening = {
        c.laddr.ip
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == lab["port"]
    }
    assert listening == {"127.0.0.1"}, listening


def test_the_py_source_opens_as_a_notebook_runs_and_stays_paired(lab, browser):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    ipynb = lab["root"] / "notebooks" / "data_preparation.ipynb"
    assert "config configs/demo.yaml:" not in ipynb.read_text()  # the committed output names another config
    browser.get(f"http://127.0.0.1:{lab['port']}/lab/tree/data_preparation.py?token={lab['token']}")
    # the .py opens with the notebook view (cells), not the text editor
    _wait(lambda: browser.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-CodeCell"), 120, "the cells")
    tab = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, ".lm-TabBar-tab.jp-mod-current"), 30, "the tab")
    assert "data_preparation.py" in tab[0].text
    assert not browser.find_elements(By.CSS_SELECTOR, ".jp-FileEditor")
    _wait(lambda: "| Idle" in browser.find_element(By.ID, "jp-main-statusbar").text, 120, "the kernel to start")

    # from the top, as a reader does: Shift+Enter runs the selected cell (the first, the Colab badge) and selects the
    # next: two markdown cells, the Colab cell (no output outside Colab; it defines COLAB_OVERRIDES), the parameters
    # and the setup cell, which prints the config it loaded (the committed output names another config)
    browser.execute_script("document.querySelector('.jp-NotebookPanel-notebook').focus();")
    for _ in range(5):
        ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
        time.sleep(0.3)
    printed = _wait(lambda: "configs/demo.yaml:" in (t := _output(browser, 2)) and t, 180, "the setup cell's output")
    assert "config configs/demo.yaml: model" in printed and "Traceback" not in printed

    # saving writes the pair: the .ipynb gets the new output, the .py keeps its cells
    py = lab["root"] / "notebooks" / "data_preparation.py"
    before = py.read_text()
    ActionChains(browser).key_down(Keys.CONTROL).send_keys("s").key_up(Keys.CONTROL).perform()
    _wait(lambda: "configs/demo.yaml:" in ipynb.read_text(), 30, "the paired .ipynb to be written")
    assert py.read_text() == before


def _output(driver, n: int) -> str:
    """The text of the n-th code cell's outputs ("" while the page re-renders it)."""
    return driver.execute_script(
        "const c = document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell')[arguments[0]];"
        "const o = c && c.querySelector('.jp-Cell-outputWrapper'); return o ? o.textContent : '';",
        n,
    )
