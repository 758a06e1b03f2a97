"""A local Prefect server that stays up: detached, its log in a file, no telemetry.

    python -m pipeline.server start   # unless one answers at PREFECT_API_URL; waits until it is healthy
    python -m pipeline.server stop

`prefect server start --background` (Prefect 3.8) hands the server pipes for its output that nobody
reads: on a machine without internet its first log line (a failed telemetry call) kills it within
seconds, and a longer-lived one would block once a pipe fills. This runs the foreground command in a
session of its own with analytics off and its output in `.prefect/server.log`, the pid beside it.
Host and port come from PREFECT_API_URL (default http://127.0.0.1:4200/api).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_URL = "http://127.0.0.1:4200/api"


def healthy(url: str) -> bool:
    try:
        return urllib.request.urlopen(f"{url}/health", timeout=3).status == 200
    except OSError:
        return False


def start(home: Path, url: str, wait: float = 120.0) -> int:
    if healthy(url):
        print(f"Prefect server already answering at {url}")
        return 0
    parsed = urlparse(url)
    home.mkdir(parents=True, exist_ok=True)
    log = home / "server.log"
    prefect = Path(sys.executable).parent / "prefect"
    with open(log, "ab") as out:
        proc = subprocess.Popen([prefect, "server", "start", "--host", parsed.hostname, "--port", str(parsed.port or 80)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    (home / "server.pid").write_text(str(proc.pid))
    deadline = time.time() + wait
    while time.time() < deadline:
        if healthy(url):
            print(f"Prefect server {proc.pid} at {url} (UI: {url.removesuffix('/api')}; log {log})")
            return 0
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-2000:]
    print(f"Prefect server did not come up at {url} (exit {proc.poll()}); the end of {log}:\n{tail}", file=sys.stderr)
    return 1


def stop(home: Path) -> int:
    pid_file = home / "server.pid"
    if not pid_file.is_file():
        print("no Prefect server started here")
        return 0
    pid = int(pid_file.read_text())
    try:
        os.killpg(pid, signal.SIGTERM)  # its own session: uvicorn and its workers go together
        print(f"Prefect server {pid} stopping")
    except ProcessLookupError:
        print(f"Prefect server {pid} was not running")
    pid_file.unlink()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.server", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("start", "stop"))
    ap.add_argument("--home", type=Path, default=Path(".prefect"), help="folder for server.log and server.pid")
    args = ap.parse_args(argv)
    url = os.environ.get("PREFECT_API_URL", DEFAULT_URL).rstrip("/")
    return start(args.home, url) if args.command == "start" else stop(args.home)


if __name__ == "__main__":
    sys.exit(main())
