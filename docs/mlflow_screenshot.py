"""Screenshot of the MLflow UI as the README opens it: the runs of the experiment in tactic's saved view.

    .venv/bin/python docs/mlflow_screenshot.py [--db mlflow.db] [--out docs/mlflow_runs.png]

Starts `mlflow ui` on the tracking database (default: the repo's mlflow.db) on a free loopback port,
waits until it answers, and has headless Chromium (Debian: `apt-get install chromium`) open the two
URLs of the README: the runs table (columns mode, beta, quality, seed, bpp, top-1) and its chart
view (bpp against top-1, a point a run). Each gets its own new browser profile, so they show what a
new user sees. The two screenshots are stacked, table above chart, in `--out`. The server is stopped
afterwards. A database from before the saved views gets the view (the experiment tag that
`tactic.tracking.setup()` writes at every stage start when missing); nothing else is written to it.

The database needs runs: `make run`, or a quick one in a copy of the repo: `tactic profile smoke`,
seeds [0, 1] in params.yaml, `dvc repro`, then `--db <copy>/mlflow.db`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(db: Path, task: str | None) -> tuple[str, str, list[str]]:
    """The experiment's id, the task (default: that of its latest run with a test rate) after making
    sure the experiment has the task's saved view, and what the view shows."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    import mlflow

    from tactic import mlflow_view, tracking

    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    if experiment is None:
        raise SystemExit(f"{db}: no experiment {tracking.EXPERIMENT!r}: run the pipeline first")
    latest = client.search_runs([experiment.experiment_id], "metrics.bpp >= 0", max_results=1)
    if not latest:
        raise SystemExit(f"{db}: no run with test metrics (bpp): run the pipeline first")
    task = task or latest[0].data.params.get("task", "classification")
    key = mlflow_view.view_tag_key(task)
    if key not in experiment.tags:  # a database from before the saved views: add it, as setup() does
        client.set_experiment_tag(experiment.experiment_id, *mlflow_view.view_tag(task))
    runs = client.search_runs([experiment.experiment_id], mlflow_view.search_filter(task), max_results=5000)
    modes = Counter(r.data.params.get("mode") for r in runs)
    accuracy = mlflow_view.accuracy_metric(task)
    scored = sum(accuracy in r.data.metrics for r in runs)
    lines = [f"{len(runs)} {task} runs in the view ({', '.join(f'{m} {n}' for m, n in sorted(modes.items()))}), "
             f"{scored} with {accuracy}"]
    if not {"aware", "agnostic"} <= set(modes) or scored < len(runs):
        lines.append(f"warning: the view lacks aware or agnostic runs, or {accuracy} in some runs")
    return experiment.experiment_id, task, lines


def tail(log) -> str:
    log.flush()
    return Path(log.name).read_text(errors="replace")[-2000:]


def start_server(db: Path, port: int, log) -> subprocess.Popen:
    cmd = [str(BIN / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{db}", "--host", "127.0.0.1", "--port", str(port)]
    # A session of its own: `mlflow ui` starts uvicorn and a job runner, stopped with it as one group.
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"mlflow ui exited ({server.returncode}):\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(1)
    stop_server(server)
    raise SystemExit(f"mlflow ui did not answer on port {port} within 180 s:\n{tail(log)}")


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def screenshot(chromium: str, url: str, out: Path, size: tuple[int, int], budget_ms: int) -> None:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
               f"--window-size={size[0]},{size[1]}", f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=budget_ms / 1000 + 120)
    if done.returncode != 0 or not out.exists() or out.stat().st_size < 10_000:
        raise SystemExit(f"chromium failed on {url} (exit {done.returncode}):\n{done.stderr[-2000:]}")


def stack(images: list[Path], out: Path) -> None:
    from PIL import Image

    frames = [Image.open(p).convert("RGB") for p in images]
    sheet = Image.new("RGB", (max(f.width for f in frames), sum(f.height for f in frames)), "white")
    y = 0
    for f in frames:
        sheet.paste(f, (0, y))
        y += f.height
    sheet.save(out, optimize=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, default=REPO / "mlflow.db", help="tracking database (default: the repo's mlflow.db)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "mlflow_runs.png")
    parser.add_argument("--port", type=int, default=None, help="port for mlflow ui (default: a free one)")
    parser.add_argument("--size", default="1920,1080", help="browser window, WIDTH,HEIGHT (default 1920,1080)")
    parser.add_argument("--budget", type=int, default=40000, help="ms of page time before each shot (default 40000)")
    parser.add_argument("--task", default=None, help="classification or segmentation (default: the latest run's)")
    parser.add_argument("--chromium", default=None, help="browser binary (default: chromium on PATH)")
    args = parser.parse_args(argv)

    db = args.db.resolve()
    if not db.is_file():
        raise SystemExit(f"{db}: no such database")
    chromium = args.chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("no chromium on PATH: apt-get install -y chromium")
    size = tuple(int(v) for v in args.size.split(","))
    experiment_id, task, summary = prepare(db, args.task)
    print("\n".join(summary))

    from tactic import mlflow_view

    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    urls = [mlflow_view.url(experiment_id, base, task), mlflow_view.url(experiment_id, base, task, chart=True)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mlflow-shot-") as tmp, open(Path(tmp) / "mlflow-ui.log", "w") as log:
        server = start_server(db, port, log)
        try:
            shots = []
            for i, url in enumerate(urls):
                print(f"opening {url}")
                shots.append(Path(tmp) / f"shot{i}.png")
                screenshot(chromium, url, shots[-1], size, args.budget)
        finally:
            stop_server(server)
        stack(shots, args.out)
    print(f"wrote {args.out} ({time.monotonic() - started:.0f} s): the runs table above, its chart view below")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
