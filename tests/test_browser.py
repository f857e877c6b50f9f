"""JupyterLab and Notebook 7 in a real browser: a notebook runs, its plotly figures and widgets
render, and moving a slider redraws a figure (the kernel -> widget -> plotly round trip that nbclient
cannot see).

Starts ``jupyter lab`` on a free localhost port with a throw-away root directory, settings and
workspaces, drives headless Chromium through playwright, and writes screenshots to ``artifacts/``.
The same server also serves the Notebook 7 UI (``/notebooks/<path>``) when the ``notebook`` package
(>= 7) is installed: its server extension is loaded by ``jupyter lab`` too, and both UIs are
JupyterLab applications, so the same page functions drive both. Skipped when playwright or a
Chromium binary is missing; the Notebook 7 cases are skipped when ``notebook>=7`` is missing.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    pytest.skip("playwright is not installed (pip install -e '.[test]')", allow_module_level=True)


def _find_chromium() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _notebook7() -> bool:
    """The Notebook 7 UI (a JupyterLab application, unlike the classic notebook < 7) is installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version("notebook").split(".")[0]) >= 7
    except (PackageNotFoundError, ValueError):
        return False


NOTEBOOK7 = _notebook7()

CHROMIUM = _find_chromium()
if CHROMIUM is None:  # pragma: no cover - depends on the machine
    pytest.skip(
        "no Chromium at /usr/bin/chromium or on PATH (Debian: apt-get install chromium); "
        "playwright's own browser download is not used",
        allow_module_level=True,
    )

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
TOUR = ROOT / "notebooks" / "00_tour.ipynb"

SERVER_START_S = 120  # JupyterLab answers /api/status (cold start on a loaded 2-core machine)
KERNEL_START_MS = 120_000  # the notebook is open and its kernel idle
RUN_ALL_MS = 600_000  # every cell has run (the tour trains and probes the toy world's models)
RENDER_MS = 60_000  # figures and widgets are in the page after the kernel went idle
SLIDER_MS = 60_000  # a figure shows the slider's new value

# JupyterLab settings for a deterministic page: every cell attached to the DOM (no windowing, so
# off-screen figures render and can be counted), no autosave into the copy under test, no news.
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}

SMALL_NOTEBOOK = [
    "import numpy as np\n"
    "import pandas as pd\n"
    "import rmlab.plots\n\n"
    "rmlab.plots.setup_notebook()",
    "rng = np.random.default_rng(0)\n"
    "frame = pd.DataFrame({'margin': np.concatenate([rng.normal(0.5, 1.0, 60), rng.normal(1.5, 1.0, 60)]),\n"
    "                      'beta': [0.1] * 60 + [0.5] * 60})\n"
    "rmlab.plots.reward_margins(frame, by='beta')",
    "import ipywidgets as widgets\n"
    "import plotly.graph_objects as go\n\n"
    "xs = list(range(-5, 6))\n"
    "power = widgets.IntSlider(value=1, min=1, max=5, description='power')\n"
    "figure = go.FigureWidget(go.Scatter(x=xs, y=[x ** power.value for x in xs], mode='lines+markers'))\n"
    "figure.update_layout(title='y = x^1', height=360)\n\n"
    "def redraw(change):\n"
    "    with figure.batch_update():\n"
    "        figure.data[0].y = [x ** change['new'] for x in xs]\n"
    "        figure.layout.title.text = f\"y = x^{change['new']}\"\n\n"
    "power.observe(redraw, names='value')\n"
    "widgets.VBox([power, figure])",
]


def _write_small_notebook(path: Path) -> None:
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    notebook = new_notebook(
        cells=[new_code_cell(source) for source in SMALL_NOTEBOOK],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    )
    nbformat.write(notebook, path)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the server's process (Linux): get SIGTERM when the test process dies, so that a killed
    test run (CI timeout, Ctrl-C twice) leaves no server behind; the server then stops its kernels."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class JupyterLab:
    """A JupyterLab server in its own process group, with its own config, settings and workspaces;
    with ``notebook>=7`` installed it serves the Notebook 7 UI as well, with the same settings."""

    def __init__(self, base: Path):
        self.root = base / "root"
        self.token = secrets.token_hex(16)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "jupyterlab.log"
        settings = base / "user-settings"
        for name, values in SETTINGS.items():
            (settings / name).parent.mkdir(parents=True, exist_ok=True)
            (settings / name).write_text(json.dumps(values))
        for sub in ("root", "workspaces", "config", "runtime"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, JUPYTER_CONFIG_DIR=str(base / "config"), JUPYTER_RUNTIME_DIR=str(base / "runtime"))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        self.command = [
            sys.executable, "-m", "jupyter", "lab", "--no-browser",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.root_dir={self.root}",
            "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: run commands as the menus do
            f"--LabApp.user_settings_dir={settings}",
            f"--LabApp.workspaces_dir={base / 'workspaces'}",
            "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
        ]
        if NOTEBOOK7:  # the notebook server extension reads its own traits; both UIs share one settings API
            self.command += [
                "--JupyterNotebookApp.expose_app_in_browser=True",
                f"--JupyterNotebookApp.user_settings_dir={settings}",
                f"--JupyterNotebookApp.workspaces_dir={base / 'workspaces'}",
            ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI containers run as root
            self.command.append("--allow-root")
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.command, cwd=self.root, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_S
        request = urllib.request.Request(f"{self.url}/api/status", headers={"Authorization": f"token {self.token}"})
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)  # polling a socket: there is no event to wait for
        raise RuntimeError(f"jupyter lab did not answer on {self.url} within {SERVER_START_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM (the server shuts its kernels down), then SIGKILL the process group if needed."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # kernels left behind by a killed server
        except (ProcessLookupError, PermissionError):
            pass
        if self.process.poll() is None:
            self.process.wait(timeout=10)
        self._log.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    server = JupyterLab(tmp_path_factory.mktemp("jupyterlab"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield chromium
        finally:
            chromium.close()


# --- what the page is asked ---------------------------------------------------------------------

# Every function below takes the notebook's path and works on that notebook's panel only (found by
# path, not as "the current widget": JupyterLab may restore or focus other documents).
_PANEL = """const panelFor = (path) => {
  const app = window.jupyterapp;
  if (!app) return null;
  for (const widget of app.shell.widgets('main')) {
    if (widget.context && widget.context.path === path && widget.content && widget.content.model) return widget;
  }
  return null;
};
const kernelOf = (panel) => panel && panel.sessionContext.session && panel.sessionContext.session.kernel;
"""


def _js(body: str) -> str:
    """A page function ``(arg) => ...`` with ``panelFor`` and ``kernelOf`` in scope."""
    return f"(arg) => {{ {_PANEL} {body} }}"


_KERNEL_IDLE = _js("const kernel = kernelOf(panelFor(arg)); return !!(kernel && kernel.status === 'idle');")

_RUN_ALL = _js("""
  const panel = panelFor(arg), commands = window.jupyterapp.commands;
  window.jupyterapp.shell.activateById(panel.id);
  return (async () => {
    await commands.execute('notebook:clear-all-cell-outputs');
    // what Run > Run All Cells does; not awaited: completion is waited for from outside
    commands.execute(commands.hasCommand('runmenu:run-all') ? 'runmenu:run-all' : 'notebook:run-all-cells');
  })();""")

# The run is over: the kernel is idle and every code cell has an execution count, or a cell failed
# (Run All stops at the first error, so later cells never get one).
_RUN_FINISHED = _js("""
  const panel = panelFor(arg), kernel = kernelOf(panel);
  if (!kernel || kernel.status !== 'idle') return false;
  let pending = false;
  for (const cell of panel.content.model.cells) {
    if (cell.type !== 'code') continue;
    if (cell.outputs.toJSON().some(output => output.output_type === 'error')) return true;
    if (cell.executionCount === null || cell.executionCount === undefined) pending = true;
  }
  return !pending;""")

_ERRORS = _js("""
  const errors = [];
  for (const cell of panelFor(arg).content.model.cells) {
    if (cell.type !== 'code') continue;
    for (const output of cell.outputs.toJSON()) {
      if (output.output_type === 'error') errors.push(output.ename + ': ' + output.evalue);
    }
  }
  return errors;""")

_PANEL_ID = _js("return panelFor(arg).id;")

_SHUTDOWN = _js("const panel = panelFor(arg); return panel ? panel.sessionContext.shutdown() : null;")

# The data of every rendered plotly figure in the notebook, as JSON (typed arrays as plain arrays).
_FIGURE_DATA_BODY = """
  return Array.from(panelFor(arg).node.querySelectorAll('.js-plotly-plot')).map(el =>
    JSON.stringify(el.data || [], (key, value) => ArrayBuffer.isView(value) ? Array.from(value) : value));"""
_FIGURE_DATA = _js(_FIGURE_DATA_BODY)
_FIGURES_CHANGED = _js(
    "const [path, before] = arg; const now = ((arg) => { " + _FIGURE_DATA_BODY + " })(path);"
    " return JSON.stringify(now) !== JSON.stringify(before);"
)

# At least arg[1] figures drawn: an svg inside and data behind it.
_RENDERED_FIGURES = _js("""
  let drawn = 0;
  for (const el of panelFor(arg[0]).node.querySelectorAll('.js-plotly-plot')) {
    if (el.querySelector('svg.main-svg') && (el.data || []).length) drawn++;
  }
  return drawn >= arg[1];""")

# Scroll the notebook to its top and return the page height that shows all of it: the bottom of its
# last cell (the notebook scrolls inside a fixed-size page) plus the status bar.
_CONTENT_HEIGHT = _js("""
  const node = panelFor(arg).node;
  const scroller = node.querySelector('.jp-WindowedPanel-outer');
  const cells = node.querySelectorAll('.jp-Cell');
  if (!scroller || !cells.length) return window.innerHeight;
  scroller.scrollTop = 0;  // the screenshot starts at the first cell
  const bottom = cells[cells.length - 1].getBoundingClientRect().bottom;
  const status = document.querySelector('#jp-main-statusbar');
  return Math.ceil(bottom + (status ? status.getBoundingClientRect().height : 0) + 48);""")

_NEXT_FRAMES = "() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))"


def _screenshot(page, notebook: str, name: str) -> Path:
    """A full-page screenshot of the whole notebook: the viewport is grown to the notebook's height
    (JupyterLab scrolls inside a fixed-size page, so ``full_page`` alone would cut it)."""
    ARTIFACTS.mkdir(exist_ok=True)
    width = page.viewport_size["width"]
    height = max(900, min(int(page.evaluate(_CONTENT_HEIGHT, notebook)), 16_000))
    page.set_viewport_size({"width": width, "height": height})
    page.evaluate(_NEXT_FRAMES)  # the resized page has been laid out and painted
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def _move_slider(page, slider, ui: str) -> None:
    """Move an ipywidgets slider as a user would.

    JupyterLab: focus the handle and press the right arrow. Notebook 7 handles shortcuts in the
    capture phase (JupyterLab in the bubbling phase, after the widget), so there the arrow keys on a
    focused slider run notebook commands (ArrowRight: ``notebook:move-cursor-heading-below-or-expand``)
    and the slider never sees them: drag the handle with the mouse instead, a quarter of the track
    towards the side with more room.
    """
    handle = slider.locator(".noUi-handle").first
    handle.scroll_into_view_if_needed()
    if ui == "lab":
        handle.focus()
        handle.press("ArrowRight")
        return
    track = slider.locator(".noUi-target").first.bounding_box()
    knob = handle.bounding_box()
    x, y = knob["x"] + knob["width"] / 2, knob["y"] + knob["height"] / 2
    room_right = track["x"] + track["width"] - x
    step = track["width"] / 4 if room_right >= x - track["x"] else -track["width"] / 4
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + step, y, steps=8)
    page.mouse.up()


# --- cases --------------------------------------------------------------------------------------


@dataclass
class Case:
    """A notebook to run in the browser and what it must show."""

    name: str  # file name inside the server's root directory
    figures: int  # at least this many plotly figures drawn
    slider: int = 0  # which slider (in page order) redraws a figure when moved
    tab: str | None = None  # a widget tab to open first (sliders in hidden tabs cannot be moved)


def _small(root: Path) -> Case:
    _write_small_notebook(root / "browser_small.ipynb")
    return Case("browser_small.ipynb", figures=2)  # reward_margins + the FigureWidget


def _tour(root: Path) -> Case:
    shutil.copy(TOUR, root / TOUR.name)  # a copy: running in the browser never touches the repository
    # the dashboard's entanglement tab: its learning-rate slider re-predicts the scatter plot
    return Case(TOUR.name, figures=6, tab="entanglement")  # six static figures above the dashboard


CASES = {"small": _small, "tour": _tour}

# The UIs a notebook is opened in: JupyterLab and Notebook 7 (the ``notebook`` package >= 7, served by
# the same server). Each UI gets its own copy of the notebook (Notebook 7's in a subdirectory), so
# that the UIs never share a notebook's session or kernel.
UIS = ("lab", "notebook7")


def _params():
    for ui in UIS:
        for case in CASES:
            marks = []
            if ui == "notebook7" and not NOTEBOOK7:
                marks.append(pytest.mark.skip(reason="Notebook 7 is not installed (pip install 'notebook>=7')"))
            if case == "tour" and not TOUR.exists():
                marks.append(pytest.mark.skip(reason="notebooks/00_tour.ipynb does not exist yet"))
            yield pytest.param(ui, case, marks=marks, id=f"{ui}-{case}")


def _open_url(server: JupyterLab, ui: str, case: str, path: str) -> str:
    if ui == "lab":  # a workspace of its own per case: only this notebook is open
        return f"{server.url}/lab/workspaces/{case}/tree/{path}?token={server.token}"
    return f"{server.url}/notebooks/{path}?token={server.token}"  # Notebook 7: one notebook per page


@pytest.mark.parametrize(("ui", "case"), list(_params()))
def test_notebook_in_browser(ui, case, lab, browser):
    directory = lab.root if ui == "lab" else lab.root / ui
    directory.mkdir(exist_ok=True)
    spec = CASES[case](directory)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(RENDER_MS)
    console_errors: list[str] = []
    page.on("console", lambda message: console_errors.append(message.text) if message.type == "error" else None)
    stem = f"browser-{case}" if ui == "lab" else f"browser-{ui}-{case}"
    name = (directory / spec.name).relative_to(lab.root).as_posix()  # the notebook's path on the server
    try:
        page.goto(_open_url(lab, ui, case, name), wait_until="domcontentloaded")
        page.wait_for_function(_KERNEL_IDLE, arg=name, timeout=KERNEL_START_MS)
        if ui == "notebook7":  # the Notebook 7 page itself, not JupyterLab behind a redirect
            assert page.evaluate("() => window.jupyterapp.name") == "Jupyter Notebook"
        notebook = page.locator(f"[id='{page.evaluate(_PANEL_ID, name)}']")

        page.evaluate(_RUN_ALL, name)
        page.wait_for_function(_RUN_FINISHED, arg=name, timeout=RUN_ALL_MS, polling=500)
        errors = page.evaluate(_ERRORS, name)
        assert not errors, f"cells raised in the browser kernel: {errors}"

        # plotly figures drawn (an svg inside each), widgets rendered (a slider)
        page.wait_for_function(_RENDERED_FIGURES, arg=[name, spec.figures], timeout=RENDER_MS)
        if spec.tab:
            notebook.locator(".widget-tab .lm-TabBar-tab", has_text=spec.tab).first.click()
        slider = notebook.locator(".jupyter-widgets.widget-slider:visible").nth(spec.slider)
        slider.wait_for(state="visible")
        readout = slider.locator(".widget-readout")
        before_value = readout.inner_text()
        before = page.evaluate(_FIGURE_DATA, name)
        _screenshot(page, name, f"{stem}-executed")

        _move_slider(page, slider, ui)
        page.wait_for_function(
            "([el, before]) => el.textContent.trim() !== before.trim()",
            arg=[readout.element_handle(), before_value],
            timeout=SLIDER_MS,
        )
        page.wait_for_function(_FIGURES_CHANGED, arg=[name, before], timeout=SLIDER_MS)
        after = page.evaluate(_FIGURE_DATA, name)
        changed = [k for k, (a, b) in enumerate(zip(before, after)) if a != b]
        assert changed, "no figure changed after the slider moved"
        page.wait_for_function(_KERNEL_IDLE, arg=name, timeout=SLIDER_MS)  # the callback's messages are handled
        print(f"slider {before_value!r} -> {readout.inner_text()!r}; figures changed: {changed} of {len(after)}")
        _screenshot(page, name, f"{stem}-slider-moved")
    except Exception:
        try:
            _screenshot(page, name, f"{stem}-failure")
        except Exception:  # pragma: no cover - the page itself may be gone
            pass
        print(f"jupyter server log (tail):\n{lab.log_tail()}")
        print("browser console errors:\n" + "\n".join(console_errors[-20:]))
        raise
    finally:
        try:
            page.evaluate(_SHUTDOWN, name)  # free the kernel now, not when the server stops
        except Exception:  # pragma: no cover - best effort
            pass
        context.close()
