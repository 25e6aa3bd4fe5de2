"""Screenshots for the README, of the real servers, taken with headless Chromium.

Trains `digits_cnn` (short) with `tracking.mlflow` and `train.profile_steps`, then takes
`docs/mlflow_run.png` (the MLflow UI's page of that run, its metrics charts) and
`docs/tensorboard_profile.png` (TensorBoard's Profile tab over the run's trace). The MLflow
server and TensorBoard are started by this script and stopped by their pids.

Needs Debian's Chromium (`apt-get install chromium`), Playwright's Python package
(`pip install playwright`, which drives that Chromium; it downloads no browser) and the
test extra (mlflow, xprof, tensorboard). Run:

    python scripts/screenshots.py            # about 2 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from playwright.sync_api import sync_playwright  # noqa: E402

from tests.servers import MlflowServer, TensorBoardServer  # noqa: E402


def browser(playwright):
    """Debian's Chromium, headless, driven by Playwright (no browser download)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("Chromium is not installed: apt-get install chromium")
    return playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])


def mlflow_page(page, url: str, path: Path) -> None:
    """The MLflow run's metrics charts, once drawn."""
    page.goto(url)
    page.locator(".js-plotly-plot").first.wait_for(timeout=60000)
    header = page.get_by_text("MLflow Assistant")
    if header.count():  # its side panel, open by default, hides a third of the charts:
        box = header.first.bounding_box()  # its close button ends the panel's title row
        page.mouse.click(page.viewport_size["width"] - 36, box["y"] + box["height"] / 2)
    page.wait_for_timeout(3000)
    page.screenshot(path=str(path))
    print(f"wrote {path} from {url}")


def profile_page(page, url: str, path: Path) -> None:
    """TensorBoard's Profile tab on the run's trace: xprof's overview of the steps."""
    page.goto(url)
    deadline = time.monotonic() + 90
    while not any(frame.get_by_text("Average Step Time").count() for frame in page.frames):
        if time.monotonic() > deadline:
            sys.exit(f"the Profile tab at {url} showed no step time within 90 s")
        page.wait_for_timeout(500)
    page.wait_for_timeout(3000)
    page.screenshot(path=str(path))
    print(f"wrote {path} from {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    args.out.mkdir(exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="jaxdist-screenshots-"))
    workdir = scratch / "digits"
    with MlflowServer(scratch / "mlflow") as mlflow:
        subprocess.run([sys.executable, "-m", "jaxdist.run", "digits_cnn", "--cpu-devices",
                        "8", "--workdir", str(workdir), "train.steps=300",
                        "train.log_every=10", "train.eval_every=50",
                        "train.profile_steps=100:5", f"tracking.mlflow={mlflow.uri}"],
                       cwd=ROOT, check=True, timeout=600)
        run_id = json.loads((workdir / "tracking" / "mlflow.json").read_text())["run_id"]
        from mlflow.tracking import MlflowClient

        experiment = MlflowClient(mlflow.uri).get_run(run_id).info.experiment_id
        with sync_playwright() as playwright:
            chromium = browser(playwright)
            page = chromium.new_page(viewport={"width": 1400, "height": 900})
            mlflow_page(page, f"{mlflow.uri}/#/experiments/{experiment}/runs/{run_id}/"
                        f"model-metrics", args.out / "mlflow_run.png")
            chromium.close()
    with TensorBoardServer(workdir / "profile", scratch / "tensorboard") as board:
        with sync_playwright() as playwright:
            chromium = browser(playwright)
            page = chromium.new_page(viewport={"width": 1400, "height": 900})
            profile_page(page, f"{board.uri}/#profile", args.out / "tensorboard_profile.png")
            chromium.close()
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
