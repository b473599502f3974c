"""Reading and running the course in JupyterLab, as `make lab` opens it: a real server, a real browser, a real kernel."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SHOTS = ROOT / "_runs" / "screenshots"  # git-ignored test artefacts
NOTEBOOK = "00_core.ipynb"
TOKEN = "loyaltylens-lab-test"  # a known token: the server still refuses anyone without it
START_TIMEOUT_S = 90  # JupyterLab's first start on a busy 2-core machine
MAX_CELLS_RUN = 15  # Shift+Enter presses from the top before a cell must have shown a result
IDLE = ("() => ![...document.querySelectorAll('.jp-NotebookPanel .jp-InputArea-prompt')].some(e => e.textContent.includes('*'))"
        " && document.querySelector('.jp-Notebook-ExecutionIndicator')?.dataset.status === 'idle'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    "A JupyterLab server on nbs/ (autosave off and checkpoints elsewhere: nbs/ is left as it was); yields its base URL."
    port = free_port()
    settings = tmp_path / "settings" / "@jupyterlab" / "docmanager-extension"
    settings.mkdir(parents=True)
    (settings / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    news = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))  # no news toast
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    cmd = [str(Path(sys.executable).with_name("jupyter")), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={TOKEN}",
           f"--ServerApp.root_dir={ROOT / 'nbs'}", f"--LabApp.user_settings_dir={tmp_path / 'settings'}",
           f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
           f"--FileCheckpoints.checkpoint_dir={tmp_path / 'checkpoints'}",  # no .ipynb_checkpoints/ left in nbs/
           ] + (["--allow-root"] if os.geteuid() == 0 else [])
    log = (tmp_path / "lab.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"jupyter lab exited: {(tmp_path / 'lab.log').read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=2): break
            except OSError:
                assert time.monotonic() < deadline, f"jupyter lab not up after {START_TIMEOUT_S}s"
                time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try: proc.wait(timeout=20)
        except subprocess.TimeoutExpired: proc.kill()
        log.close()


@pytest.mark.timeout(300)
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no system chromium at {CHROMIUM} (Debian package `chromium`)")
def test_lab_opens_the_first_notebook_and_runs_a_cell(lab):
    from playwright.sync_api import sync_playwright
    SHOTS.mkdir(parents=True, exist_ok=True)
    had_checkpoints = (ROOT / "nbs" / ".ipynb_checkpoints").exists()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        try:
            page.goto(f"{lab}/lab/tree/{NOTEBOOK}?token={TOKEN}", timeout=60_000)
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
            page.wait_for_selector(".jp-NotebookPanel-toolbar .jp-Notebook-ExecutionIndicator[data-status='idle']",
                                   timeout=90_000)  # the project's kernel has started
            page.locator(".jp-NotebookPanel .jp-Cell").first.click()
            page.keyboard.press("Escape")  # command mode: Shift+Enter runs the selected cell and selects the next
            result = page.locator(".jp-NotebookPanel .jp-OutputArea-executeResult")
            for _ in range(MAX_CELLS_RUN):  # from the top, as a learner does, until a cell shows a value
                page.keyboard.press("Shift+Enter")
                page.wait_for_timeout(300)
                page.wait_for_function(IDLE, timeout=60_000)
                if result.count(): break
            result.first.wait_for(timeout=30_000)
            page.screenshot(path=str(SHOTS / "lab-00_core.png"))
            assert result.count() >= 1, "no cell showed a result"
            text = result.first.inner_text().strip()
            assert text, "the result is empty"
            errors = page.locator(".jp-NotebookPanel .jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            assert not any("Traceback" in errors.nth(i).inner_text() for i in range(errors.count())), "a cell raised"
        finally:
            browser.close()
    assert had_checkpoints or not (ROOT / "nbs" / ".ipynb_checkpoints").exists(), "JupyterLab left checkpoints in nbs/"
    saved = json.loads((ROOT / "nbs" / NOTEBOOK).read_text())  # committed without outputs; autosave is off
    assert not any(c.get("outputs") for c in saved["cells"]), "JupyterLab saved outputs into the notebook"
