"""Helpers for the `browser` tests: install/locate headless Chromium (Debian's `chromium` package),
start and stop `mlflow ui`, talk to its REST API, take screenshots and read the rendered DOM.

Imported by tests/test_browser.py (the fixtures are pulled in from there); nothing here runs on import.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional

import pytest

CHROMIUM = "/usr/bin/chromium"
# Known to work headless as root in a container, with nothing reachable outside.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--mute-audio",
]
VIRTUAL_TIME_MS = 15000  # lets the MLflow React app fetch and render before the DOM/screenshot is taken
INSTALL_TIMEOUT_S = 900


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _apt_install() -> Optional[str]:
    """`apt-get install chromium`; None when it worked, else the reason (last lines of apt's output)."""
    if shutil.which("apt-get") is None:
        return "apt-get not found (not a Debian/Ubuntu system)"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return "not root: cannot apt-get install chromium (install Debian's `chromium` package yourself)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    out = None
    for attempt in range(2):  # second try after refreshing the package lists
        if attempt:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        try:
            out = subprocess.run(install, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(install)}` took more than {INSTALL_TIMEOUT_S} s"
        if out.returncode == 0 and Path(CHROMIUM).is_file():
            return None
    tail = (out.stdout + out.stderr).strip().splitlines()[-8:] if out is not None else []
    return f"`{' '.join(install)}` failed (rc {out.returncode if out else '?'}):\n" + "\n".join(tail)


def locate_or_install_chromium() -> tuple:
    """(path or None, reason when None, seconds spent installing)."""
    found = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
    if found:
        return found, "", 0.0
    t0 = time.monotonic()
    reason = _apt_install()
    return (None if reason else CHROMIUM), reason or "", time.monotonic() - t0


@pytest.fixture(scope="session")
def chromium():
    """Path of a headless-capable Chromium; installs Debian's package when missing.
    If that fails: the test FAILS with the reason under CI (env CI set), else it is skipped."""
    path, reason, seconds = locate_or_install_chromium()
    if path is None:
        message = f"headless Chromium unavailable: {reason}"
        if _in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message + " (set CI=1 to make this a failure)")
    if seconds:
        print(f"\ninstalled chromium in {seconds:.0f} s", file=sys.stderr)
    return path


def _chromium_run(chromium: str, args: List[str], timeout: float = 180) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="genzoo-chromium-") as profile:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"chromium failed (rc {out.returncode}): {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return out


def screenshot(chromium: str, url: str, png: Path, window=(1400, 900)) -> Path:
    png = Path(png)
    png.unlink(missing_ok=True)
    _chromium_run(chromium, [f"--screenshot={png}", f"--window-size={window[0]},{window[1]}",
                             f"--virtual-time-budget={VIRTUAL_TIME_MS}", url])
    assert png.is_file() and png.stat().st_size > 0, f"chromium wrote no screenshot of {url}"
    return png


def dump_dom(chromium: str, url: str, window=None) -> str:
    """The DOM after the page's scripts ran (serialised HTML); `window` (width, height): a wide one renders the
    columns that a table draws only when they are in view (MLflow's runs table)."""
    size = [f"--window-size={window[0]},{window[1]}"] if window else []
    return _chromium_run(chromium, ["--dump-dom", *size, f"--virtual-time-budget={VIRTUAL_TIME_MS}", url]).stdout


def visible_text(dom: str) -> str:
    """The DOM's text, without scripts, styles and SVG, whitespace collapsed."""
    text = re.sub(r"<(script|style|svg)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    text = re.sub(r"<[^>]+>", " ", text)
    return re.sub(r"\s+", " ", html.unescape(text)).strip()


def load_pixels(png: Path):
    """The image as a float array in [0, 1] (H, W, C): PIL when installed, else matplotlib."""
    import numpy as np

    try:
        from PIL import Image

        with Image.open(png) as im:
            return np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0
    except ImportError:
        import matplotlib.image as mpimg

        return np.asarray(mpimg.imread(str(png)), dtype=np.float64)[..., :3]


def assert_not_blank(png: Path, min_std: float = 0.02, min_non_white: float = 0.005) -> None:
    """A rendered page, not an empty canvas: pixel values vary and some pixels are not white."""
    import numpy as np

    px = load_pixels(png)
    std = float(px.std())
    non_white = float((px.min(axis=-1) < 0.95).mean())
    assert std > min_std, f"{png.name} looks blank: pixel std {std:.4f}"
    assert non_white > min_non_white, f"{png.name} is (almost) all white: {non_white:.2%} non-white pixels"
    assert float(np.ptp(px)) > 0.5, f"{png.name} has no contrast"


def shrink_png(src: Path, dst: Path, colors: int = 64) -> Path:
    """A palette-quantised copy (screenshots of text and plots stay legible at 64 colours)."""
    from PIL import Image

    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowUI:
    """`mlflow ui` on 127.0.0.1:<free port> over a store, in its own process group (stopped as a whole)."""

    def __init__(self, backend_store_uri: str, cwd: Path, log: Path):
        self.uri, self.cwd, self.log_path = backend_store_uri, Path(cwd), Path(log)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 180) -> "MlflowUI":
        mlflow = Path(sys.executable).with_name("mlflow")
        exe = [str(mlflow)] if mlflow.is_file() else [sys.executable, "-m", "mlflow"]
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            exe + ["ui", "--backend-store-uri", self.uri, "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=self.cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mlflow ui exited (rc {self.proc.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"mlflow ui did not answer /health within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.is_file() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            pgid = os.getpgid(self.proc.pid)
        except ProcessLookupError:
            return
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        self._log.close()

    def api(self, path: str, body: Optional[dict] = None) -> dict:
        """POST JSON to /api/2.0/mlflow/<path> (GET when body is None)."""
        url = f"{self.base}/api/2.0/mlflow/{path}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{url}: HTTP {e.code}: {e.read()[:1000]!r}") from None

    def runs_table_url(self, experiment_id: str, share_key: Optional[str] = None) -> str:
        query = f"?viewStateShareKey={share_key}" if share_key else ""
        return f"{self.base}/#/experiments/{experiment_id}/runs{query}"

    def compare_url(self, experiment_id: str, run_ids: List[str]) -> str:
        # MLflow's own route: Routes.getCompareRunPageRoute(runUuids, experimentIds)
        runs = urllib.request.quote(json.dumps(sorted(run_ids), separators=(",", ":")))
        exps = urllib.request.quote(json.dumps([experiment_id], separators=(",", ":")))
        return f"{self.base}/#/compare-runs?runs={runs}&experiments={exps}"
