"""End to end in a real headless Chromium: `mlflow ui` over a tiny run's store, walked the way a new
user would (issue 16). Screenshots of every step land in ``test-artifacts/browser/`` (git-ignored;
``EEBENCH_TEST_ARTIFACTS`` moves it).

The browser: ``EEBENCH_CHROMIUM`` or a ``chromium`` on PATH; else the test installs one itself
(Debian's ``chromium`` with apt-get when running as root, else the npm package
``@sparticuz/chromium``, which ships a compressed Chromium) and skips, saying why, only when no
browser can be had. Playwright (a test extra) drives it; ``--lang=en-US`` because MLflow's
experiment page crashes on the ``en-US@posix`` locale.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from eebench.cli import main
from tests.test_cli import _free_port, _run_args

REPO = Path(__file__).resolve().parents[1]
SHOTS = Path(os.environ.get("EEBENCH_TEST_ARTIFACTS", REPO / "test-artifacts")) / "browser"
NPM_CHROMIUM = "@sparticuz/chromium@147.0.0"
pytestmark = pytest.mark.slow


def _on_path() -> str | None:
    env = os.environ.get("EEBENCH_CHROMIUM")
    if env and Path(env).exists():
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return None


def _install_chromium() -> tuple[str | None, list[str]]:
    """Find or install a Chromium; returns (path, what failed)."""
    if found := _on_path():
        return found, []
    failed = []
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        r = subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium",
                           shell=True, capture_output=True, text=True, timeout=1200)
        if found := _on_path():
            return found, []
        failed.append(f"apt-get install chromium: exit {r.returncode} {r.stderr.strip()[-200:]}")
    else:
        failed.append("apt-get: not available or not root")
    if shutil.which("npm") and shutil.which("node"):
        prefix = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "eebench" / "npm-chromium"
        prefix.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(prefix), NPM_CHROMIUM],
                           capture_output=True, text=True, timeout=900)
        if r.returncode == 0:
            js = "const c=require('@sparticuz/chromium');(c.default||c).executablePath().then(p=>console.log(p))"
            r = subprocess.run(["node", "-e", js], cwd=prefix, capture_output=True, text=True, timeout=300)
            path = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
            if r.returncode == 0 and path and Path(path).exists():
                return path, []
        failed.append(f"npm {NPM_CHROMIUM}: exit {r.returncode} {r.stderr.strip()[-200:]}")
    else:
        failed.append("npm/node: not installed")
    return None, failed


@pytest.fixture(scope="module")
def chromium() -> str:
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    path, failed = _install_chromium()
    if path is None:
        pytest.skip("no Chromium could be found or installed: " + "; ".join(failed))
    return path


@pytest.fixture(scope="module")
def ui_store(tmp_path_factory, tiny_backbone_dir):
    """A tiny two-method run (two epochs, so metrics have steps) and `mlflow ui` serving its store."""
    from tests.conftest import write_toy_task

    task = write_toy_task(tmp_path_factory.mktemp("toy"))
    out = tmp_path_factory.mktemp("ui") / "runs"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(_run_args(task, tiny_backbone_dir, out, "--methods", "vanilla,cosee", "--signals", "energy",
                            "--seeds", "1", "--epochs", "2"))
    assert rc == 0, buf.getvalue()[-2000:]
    printed = buf.getvalue()
    port = _free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{out / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(base + "/health", timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow ui did not start")
        yield base, out, printed
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_mlflow_ui_in_a_real_browser(chromium, ui_store):
    import mlflow
    from playwright.sync_api import sync_playwright

    base, out, printed = ui_store
    client = mlflow.tracking.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("eebench-toy").experiment_id
    runs = client.search_runs([exp])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["method"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"vanilla", "cosee"}
    # `eebench run` printed the links it promises, with this store's ids (on port 5000).
    runs_link = f"/#/experiments/{exp}/runs?workflowType=machine_learning"
    assert f"/#/experiments/{exp}/runs/{parent.info.run_id}" in printed and runs_link in printed

    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    T = 90_000  # ms: the first page load of the UI is slow on a loaded 2-core machine

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--lang=en-US", "--no-sandbox"])
        page = browser.new_page(locale="en-US", viewport={"width": 1400, "height": 900})

        def shot(name: str) -> None:
            page.mouse.move(5, 890)  # no hover tooltip over the content
            page.wait_for_timeout(1500)  # let charts and images finish drawing
            page.screenshot(path=str(SHOTS / f"{name}.png"))

        # 1. The experiment list shows the task's experiment.
        page.goto(base + "/#/experiments")
        page.get_by_text("eebench-toy").first.wait_for(timeout=T)
        shot("01-experiments")

        # 2. "Model training" view, then the experiment: the runs table with the parent run.
        page.get_by_text("Model training").first.click()
        page.get_by_text("eebench-toy").first.click()
        page.get_by_text(parent.info.run_name).first.wait_for(timeout=T)
        assert "workflowType=machine_learning" in page.url
        shot("02-runs-table")
        # ... and the link `eebench run` printed lands on the same table.
        page.goto(base + runs_link)
        page.get_by_text(parent.info.run_name).first.wait_for(timeout=T)

        # 3. The parent expands to its children (cells).
        row = page.locator("div[role=row]", has_text=parent.info.run_name).first
        row.locator("button[data-component-id*='runnamecellrenderer']").first.click()
        for child in children.values():
            page.get_by_text(child.info.run_name, exact=True).first.wait_for(timeout=T)
        shot("03-parent-with-children")

        # 4. A child's page: its params (one name per meaning: pooling is what was used).
        cosee = children["cosee"]
        page.goto(f"{base}/#/experiments/{exp}/runs/{cosee.info.run_id}")
        page.get_by_text(cosee.info.run_name).first.wait_for(timeout=T)
        params = page.get_by_text("Parameters", exact=False).first
        params.wait_for(timeout=T)
        params.scroll_into_view_if_needed()
        page.get_by_text("dev_fingerprint").first.wait_for(timeout=T)
        page.get_by_placeholder("Search parameters").fill("pooling")
        page.get_by_text("final_pooling").first.wait_for(timeout=T)
        assert page.get_by_text("pooling_used").count() == 0
        shot("04-child-params")

        # 5. A stepped metric: one point per epoch (steps 1 and 2).
        page.goto(f"{base}/#/experiments/{exp}/runs/{cosee.info.run_id}/model-metrics")
        page.get_by_text("dev_layer1_accuracy").first.wait_for(timeout=T)
        page.get_by_text("Step").first.wait_for(timeout=T)
        shot("05-stepped-metric")
        assert [m.step for m in client.get_metric_history(cosee.info.run_id, "dev_layer1_accuracy")] == [1, 2]

        # 6. The Pareto PNG artefact renders (a decoded image, not a broken one).
        page.goto(f"{base}/#/experiments/{exp}/runs/{cosee.info.run_id}/artifacts")
        page.get_by_text("pareto_energy.png").first.click()
        # The plot is 864 x 576 pixels; nothing else on the page is an image that large.
        page.wait_for_function("() => [...document.images].some(i => i.complete && i.naturalWidth >= 800)", timeout=T)
        shot("06-pareto-artifact")

        # 7. Compare of the two children.
        ids = [c.info.run_id for c in children.values()]
        page.goto(f"{base}/#/compare-runs?runs={json.dumps(ids)}&experiments={json.dumps([exp])}")
        page.get_by_text("Comparing 2 Runs").first.wait_for(timeout=T)
        for child in children.values():
            page.get_by_text(child.info.run_name).first.wait_for(timeout=T)
        shot("07-compare")
        browser.close()
    assert len(list(SHOTS.glob("*.png"))) == 7
