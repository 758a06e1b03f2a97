"""Prefect servers: a local one that stays up (detached, its log in a file, no telemetry), and the
temporary one a flow run starts when no API is configured (`Temporary`).

    python -m pipeline.server start   # unless one answers at PREFECT_API_URL; waits until it is healthy
    python -m pipeline.server stop

`prefect server start --background` (Prefect 3.8) hands the server pipes for its output that nobody
reads: on a machine without internet its first log line (a failed telemetry call) kills it within
seconds, and a longer-lived one would block once a pipe fills. This runs the foreground command in a
session of its own with analytics off and its output in `.prefect/server.log`, the pid beside it.
Host and port come from PREFECT_API_URL (default http://127.0.0.1:4200/api).

Both start on a migrated database: a server on a new PREFECT_HOME runs Prefect's 114 schema
migrations first (~6 s of its 11-12 s start on 2 cores), so the first one to migrate leaves an
empty copy (`template()`, one per Prefect version) that servers on new homes start from (`seed`).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

DEFAULT_URL = "http://127.0.0.1:4200/api"


def template() -> Path:
    """An empty database of this Prefect version's schema, migrated by an earlier server."""
    import prefect

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tactic" / f"prefect-{prefect.__version__}.db"


def _database() -> Optional[Path]:
    """The server's SQLite file (PREFECT_HOME/prefect.db unless configured); None for another database."""
    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url.get_secret_value()
    prefix = "sqlite+aiosqlite:///"
    return Path(url[len(prefix):]) if url.startswith(prefix) and ":memory:" not in url else None


def seed() -> Optional[Path]:
    """Give a server about to start on a new SQLite database the template's copy; returns the
    database to `keep` once the server has migrated it where there was no template (or an unusable
    one: the server then migrates as it would have anyway)."""
    db = _database()
    if db is None or db.exists():
        return None
    if template().is_file():
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
            _copy(template(), db)
            return None
        except (OSError, sqlite3.Error) as err:
            print(f"Prefect database template {template()} not used ({err}); the server migrates a new one", file=sys.stderr)
            db.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                template().unlink()  # its replacement is kept once this server has migrated
    return db


def keep(db: Optional[Path]) -> None:
    """Keep a freshly migrated database as the template (before any run is recorded in it). Only
    a speed-up: where the cache cannot be written, the next new home migrates again."""
    if db is not None and db.is_file() and not template().is_file():
        try:
            template().parent.mkdir(parents=True, exist_ok=True)
            _copy(db, template())
        except (OSError, sqlite3.Error) as err:
            print(f"Prefect database template not kept at {template()} ({err})", file=sys.stderr)


def _copy(src: Path, dest: Path) -> None:
    """SQLite's online backup (consistent while a server has the source open), then a rename."""
    part = dest.with_name(f".{dest.name}.{os.getpid()}")
    try:
        with contextlib.closing(sqlite3.connect(src)) as a, contextlib.closing(sqlite3.connect(part)) as b:
            a.backup(b)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


def healthy(url: str, timeout: float = 3) -> bool:
    try:
        return urllib.request.urlopen(f"{url}/health", timeout=timeout).status == 200
    except OSError:
        return False


def start(home: Path, url: str, wait: float = 120.0) -> int:
    if healthy(url):
        print(f"Prefect server already answering at {url}")
        return 0
    parsed = urlparse(url)
    home.mkdir(parents=True, exist_ok=True)
    log = home / "server.log"
    fresh = seed()
    prefect = Path(sys.executable).parent / "prefect"
    with open(log, "ab") as out:
        proc = subprocess.Popen([prefect, "server", "start", "--host", parsed.hostname, "--port", str(parsed.port or 80)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    (home / "server.pid").write_text(str(proc.pid))
    deadline = time.time() + wait
    while time.time() < deadline:
        if healthy(url):
            keep(fresh)
            print(f"Prefect server {proc.pid} at {url} (UI: {url.removesuffix('/api')}; log {log})")
            return 0
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-2000:]
    print(f"Prefect server did not come up at {url} (exit {proc.poll()}); the end of {log}:\n{tail}", file=sys.stderr)
    return 1


class Temporary:
    """A Prefect API for one flow run, started as Prefect's own client starts one when no API is
    configured (`SubprocessASGIServer`'s command: uvicorn on the server's app factory, UI off, marked
    ephemeral; analytics off here, as above), but without importing Prefect's server modules into
    the flow's process (3.6 s on 2 cores) and without waiting: its boot (~8 s) runs while the flow
    process gets on with its own start (`ready` waits for it)."""

    def __init__(self):
        import socket

        import prefect
        from prefect.settings import get_current_settings

        with socket.socket() as sock:  # a free port; Prefect's server exits 3 if it was taken meanwhile
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/api"
        self.started = time.perf_counter()
        self.fresh = seed()
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               **get_current_settings().to_environment_variables(exclude_unset=True)}
        self.proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
                                      "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                                      "--port", str(port), "--log-level", "error", "--lifespan", "on"],
                                     stdin=subprocess.DEVNULL, env=env)
        # At exit, as Prefect stops its own: registered before Prefect's clients register theirs, so
        # it runs after them (atexit runs last in, first out), once they have flushed their logs to it.
        atexit.register(self.stop)

    def ready(self, wait: float = 120.0) -> float:
        """Wait until it answers; the seconds since it was started."""
        deadline = time.perf_counter() + wait
        while not healthy(self.url, timeout=1):
            if self.proc.poll() is not None or time.perf_counter() > deadline:
                self.stop()
                raise RuntimeError(f"the temporary Prefect server did not come up at {self.url} "
                                   f"(exit {self.proc.returncode}; its output is above)")
            time.sleep(0.1)
        keep(self.fresh)
        return time.perf_counter() - self.started

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


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
