"""The stage server: stage processes that start in milliseconds instead of ~10 seconds.

    python -m stages.server start      # preload torch, torchvision, CompressAI, MLflow; serve in the background
    python -m stages.server status     # is one running for this venv, and what has it served
    python -m stages.server stop

Every stage process pays for the same imports (torch, torchvision, CompressAI with SciPy, MLflow with
SQLAlchemy and Alembic, torch._dynamo at the first optimiser step) before any work: about 10 s, more
than most stages of the embedded default spend training. In the manner of Python's forkserver and the
build daemons (Gradle's, Bazel's), a server process of this venv imports those third-party libraries
once and forks a child per stage command. `python -m stages.<name>`, run by DVC, calls `handoff()`
before its own imports: when a server of this venv answers, the command (argv, working directory,
environment, sys.path, and its stdin/stdout/stderr, passed as file descriptors) runs in a fresh fork,
and the command exits with the child's status (or dies by its signal); otherwise it simply goes on
as a normal process. Nothing else changes: same code, same output, same exit status. DVC itself is
served the same way where it runs one stage per process (`python -m pipeline.repro -s <stage>`, the
command of `--jobs`, the Prefect flow's tasks and KFP's), and the stage it runs then hands off in
turn (a skipped stage of the default profile's 61: 0.78 s as a process of its own, 0.47 s served).

What keeps a fork honest:
- the server imports no module of this project: `tactic`, `stages` and `pipeline` are imported
  fresh in every child, from the command's own sys.path, so an edit or another checkout is never stale;
- it initialises no CUDA context, no OpenMP thread pool and no database connection before forking
  (imports only), so each child sets up its own threads, device and MLflow store; a CUDA driver
  initialised by an import (which a forked child cannot use) stops the server, naming the import;
- SIGINT/SIGTERM/SIGHUP sent to the command are forwarded to the child's process group; if the
  command is killed outright (SIGKILL), the child notices the closed connection and kills its group;
- the socket's name carries a fingerprint of the venv's site-packages, so after an install changes
  them a stale server is never used (it exits when idle, by default after 10 minutes);
- `TACTIC_STAGE_SERVER=0` turns the hand-off off for a command.

This module is imported by every stage before anything heavy: it uses the standard library only.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import sys
import time

PROJECT_PACKAGES = ("tactic", "stages", "pipeline")
# Third-party modules every stage (or most) needs; imported once by the server, never used before forking.
PRELOAD = (
    "numpy", "yaml", "pydantic", "tqdm", "PIL.Image",
    "torch", "torch.nn", "torch.optim", "torch._dynamo", "torchvision", "torchvision.models",
    "torchvision.models.segmentation",
    "compressai", "compressai.entropy_models", "compressai.models", "compressai.ops", "compressai.zoo",
    "compressai.zoo.pretrained", "compressai.models.utils",
    "mlflow", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store", "sqlalchemy", "alembic",
    "matplotlib", "matplotlib.pyplot",
    # DVC, for `python -m pipeline.repro -s <stage>`: the flow's, KFP's and `--jobs`' command per stage
    "dvc.cli", "dvc.cli.parser", "dvc.commands.repro", "dvc.repo", "dvc.repo.index", "dvc.repo.reproduce",
    "dvc.dvcfile", "dvc.stage", "dvc.scm", "dvc_data.index", "scmrepo.git", "ruamel.yaml",
)
DISABLE = "TACTIC_STAGE_SERVER"  # "0": never hand off
ANOTHER = 75  # `serve`'s exit status when another server of this venv holds the lock (EX_TEMPFAIL)
# The pid of a served child, in its environment: that process does not hand off again (runpy runs the
# module, whose first line is `handoff`), but the commands it starts (DVC's stages) do.
_IN_CHILD = "_TACTIC_STAGE_SERVER_CHILD"


def _fingerprint() -> str:
    """This venv and the state of its installed packages: a server of another install is never used."""
    import sysconfig

    site = sysconfig.get_paths()["purelib"]
    try:
        stamp = os.stat(site).st_mtime_ns
    except OSError:
        stamp = 0
    return hashlib.sha1(f"{os.path.realpath(sys.prefix)}|{site}|{stamp}|{sys.version}".encode()).hexdigest()[:12]


def socket_path() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(base, f"tactic-stage-server-{os.getuid()}-{_fingerprint()}.sock")


# -- wire format: one JSON object per message, length-prefixed -------------------------------------

def _send(sock: socket.socket, obj: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(obj).encode()
    payload = len(data).to_bytes(4, "big") + data
    if fds:
        socket.send_fds(sock, [payload], fds)
    else:
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return buf


def _recv(sock: socket.socket) -> dict:
    return json.loads(_recv_exact(sock, int.from_bytes(_recv_exact(sock, 4), "big")))


def _recv_with_fds(sock: socket.socket, maxfds: int = 3) -> tuple[dict, list[int]]:
    first, fds, _, _ = socket.recv_fds(sock, 1 << 20, maxfds)
    if len(first) < 4:
        first += _recv_exact(sock, 4 - len(first))
    size = int.from_bytes(first[:4], "big")
    body = first[4:]
    if len(body) < size:
        body += _recv_exact(sock, size - len(body))
    return json.loads(body), list(fds)


# -- the client side: called at the top of every stage module ---------------------------------------

def handoff(module: str) -> None:
    """Run this stage command in the stage server when one answers, and exit as its child did.

    Returns (and the command goes on as a normal process) when not run as a script, when turned off,
    inside a served child, or when no server of this venv answers."""
    if module != "__main__" or os.environ.get(DISABLE) == "0" or os.environ.get(_IN_CHILD) == str(os.getpid()):
        return
    spec = sys.modules["__main__"].__spec__
    if spec is None:  # run as a file path, not with -m: nothing to name the module by
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path())
        request = {"cmd": "run", "module": spec.name, "argv": sys.argv[1:], "cwd": os.getcwd(),
                   "env": dict(os.environ), "path": sys.path}
        _send(sock, request, [0, 1, 2])
        started = _recv(sock)
    except (OSError, EOFError, ValueError):
        sock.close()
        return  # no server, or it could not start the child: nothing ran, so run here
    sys.exit(_wait(sock, started["pid"]))


def _wait(sock: socket.socket, pid: int) -> int:
    """Forward signals to the served child until it ends; its exit code, or die by its signal. They go
    to the child's process group, as a terminal's or the stage guard's reach a normal process and
    what it started (`pipeline.repro` served: DVC and the stage command it runs)."""
    forwarded = []

    def forward(signum, _frame):
        forwarded.append(signum)
        try:
            os.killpg(pid, signum)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        done = _recv(sock)
    except (OSError, EOFError, ValueError):
        print(f"stage server: lost the connection to the child {pid} running this stage", file=sys.stderr)
        return 1
    if forwarded:  # stopped: what the child started (the stage under a served DVC) ends before this does,
        _wait_group(pid, 30.0)  # as those in a normal process's group do before whoever stops them goes on
    if done.get("signal"):
        signal.signal(done["signal"], signal.SIG_DFL)
        os.kill(os.getpid(), done["signal"])
    return done.get("code", 1)


def _wait_group(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)  # signal 0 only asks whether any process is left in the group
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


# -- the server side -------------------------------------------------------------------------------

def _run_child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked child: become the stage command, run it, and never return."""
    code = 1
    try:
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.set_wakeup_fd(-1)
        os.setpgid(0, 0)  # its own process group: the server's group is not the command's
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
            os.close(fd)
        # The same Python objects (loggers made at import hold them) now write to the command's streams.
        unbuffered = bool(request["env"].get("PYTHONUNBUFFERED"))
        sys.stdout.reconfigure(line_buffering=unbuffered or os.isatty(1), write_through=unbuffered)
        sys.stderr.reconfigure(line_buffering=True)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ[_IN_CHILD] = str(os.getpid())
        sys.path[:] = request["path"]
        for name in [m for m in sys.modules if m.split(".")[0] in PROJECT_PACKAGES]:
            del sys.modules[name]
        import random

        random.seed()
        _watch_client(conn)
        code = _run_module(request["module"], request["argv"])
    except BaseException:  # noqa: BLE001  (the child must never return into the server's loop)
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _watch_client(conn: socket.socket) -> None:
    """Kill this child, and what it started in its process group, when the command it serves is gone
    (SIGKILL cannot be forwarded)."""
    import threading

    def watch():
        try:
            while conn.recv(1):
                pass
        except OSError:
            pass
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="stage-server-watch").start()


def _run_module(module: str, argv: list[str]) -> int:
    """`python -m module argv...` in this process: the exit code a normal run would have."""
    import atexit
    import runpy
    import traceback

    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if stop.code is not None and not isinstance(stop.code, int):
            print(stop.code, file=sys.stderr)
    except KeyboardInterrupt:
        traceback.print_exc()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        # As CPython does on an uncaught KeyboardInterrupt: die by SIGINT, so the caller sees it.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    return code


def cuda_driver_initialised() -> bool:
    """Whether this process has initialised the CUDA driver, asked without initialising it: until
    cuInit has run, every driver call answers CUDA_ERROR_NOT_INITIALIZED (3). Asked only where the
    driver's library is loaded already (the CUDA runtime loads it on first use): loading it here would
    put it in every fork."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            if "/libcuda.so" not in maps.read():
                return False
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int()
    return driver.cuDeviceGetCount(ctypes.byref(count)) != 3


class Server:
    def __init__(self, path: str, idle: float):
        self.path, self.idle = path, idle
        self.children: dict[int, socket.socket] = {}
        self.served, self.started = 0, time.time()
        self.claim: int | None = None  # `_claim`'s lock, closed in every child
        self.last = time.time()

    def preload(self) -> None:
        import importlib
        import warnings

        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
        import matplotlib
        import torch

        matplotlib.use("Agg")  # headless, as the report stage sets it
        # CompressAI imports torch_geometric, whose import reads torch's build report for one flag
        # (torch.__config__.show(), for USE_MKL); that report asks the CUDA runtime for devices, which
        # initialises the driver (seen on an H200: every served child's first CUDA call then failed with
        # "initialization error"). While preloading, the report is the flag alone.
        show = torch.__config__.show
        torch.__config__.show = lambda: f"USE_MKL={'ON' if torch.backends.mkl.is_available() else 'OFF'}"
        try:
            for name in PRELOAD:
                try:
                    importlib.import_module(name)
                except ImportError as err:  # an optional library missing only costs its children the import
                    print(f"stage server: not preloaded: {name} ({err})", file=sys.stderr)
                if cuda_driver_initialised():
                    raise RuntimeError(f"stage server: importing {name} initialised the CUDA driver, which a forked "
                                       "child cannot use; not serving (stages run as normal processes)")
        finally:
            torch.__config__.show = show
        leaked = [m for m in sys.modules if m.split(".")[0] in PROJECT_PACKAGES and m != "stages" and m != __name__]
        if leaked:
            raise RuntimeError(f"stage server: project modules imported before forking: {leaked}")

    def serve(self) -> None:
        import selectors

        if os.path.exists(self.path):
            os.unlink(self.path)  # stale: a live server would have answered `start`
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        os.chmod(self.path, 0o600)
        listener.listen(64)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        stopping = []
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ, "accept")
        sel.register(wake_r, selectors.EVENT_READ, "signal")
        print(f"stage server {os.getpid()} listening on {self.path}", file=sys.stderr, flush=True)
        try:
            while not stopping:
                for key, _ in sel.select(timeout=5.0):
                    if key.data == "accept":
                        conn, _ = listener.accept()
                        if self._accept(conn, listener) == "stop":
                            stopping.append(True)
                    else:
                        os.read(wake_r, 512)
                self._reap()
                if not self.children and time.time() - self.last > self.idle:
                    print(f"stage server {os.getpid()}: idle for {self.idle:.0f} s, exiting", file=sys.stderr, flush=True)
                    break
        finally:
            if os.path.exists(self.path):
                os.unlink(self.path)
            if self.claim is not None:  # a server started now need not wait for this one's exit
                os.close(self.claim)
                self.claim = None

    def _accept(self, conn: socket.socket, listener: socket.socket):
        self.last = time.time()
        try:
            request, fds = _recv_with_fds(conn)
        except (OSError, EOFError, ValueError) as err:
            print(f"stage server: bad request ({err})", file=sys.stderr, flush=True)
            conn.close()
            return None
        if request.get("cmd") != "run":
            for fd in fds:
                os.close(fd)
            _send(conn, {"pid": os.getpid(), "served": self.served, "running": len(self.children),
                         "uptime_s": round(time.time() - self.started, 1), "socket": self.path})
            conn.close()
            return request.get("cmd")
        if len(fds) != 3:
            conn.close()
            return None
        pid = os.fork()
        if pid == 0:
            for other in [listener, *self.children.values()]:  # the server's, not the child's
                other.close()
            if self.claim is not None:  # the lock stays the server's: a child outliving it never holds it
                os.close(self.claim)
            _run_child(conn, request, fds)  # never returns
        try:  # here too (the child sets it as well): its group exists before the command can signal it
            os.setpgid(pid, pid)
        except OSError:
            pass
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        self.served += 1
        try:
            _send(conn, {"pid": pid})
        except OSError:
            pass  # the command is gone already: its child will notice and end
        return None

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            done = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"code": os.WEXITSTATUS(status)}
            try:
                _send(conn, done)
            except OSError:
                pass
            conn.close()
            self.last = time.time()


def _claim(path: str) -> int | None:
    """An exclusive lock on `<socket>.lock`, held for the server's life (the kernel drops it when the
    process ends), or None when another server of this venv holds it. Without it, a second server
    started while the first preloads took over the socket path, and the first, idle, later unlinked it."""
    import fcntl

    fd = os.open(path.removesuffix(".sock") + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def remove_stale(path: str, older_than: float = 3600.0) -> list[str]:
    """Remove the socket, log and lock files of this user's servers of other venv states (each install
    that changes site-packages gets a new fingerprint, and so a new set of files) that no server holds
    and nothing has touched for `older_than` seconds: left alone, they pile up in /tmp. Returns the
    names removed."""
    import fcntl
    import glob

    own = os.path.basename(path).removesuffix(".sock")
    prefix = os.path.join(os.path.dirname(path), f"tactic-stage-server-{os.getuid()}-")
    removed = []
    for name in sorted({f.rsplit(".", 1)[0] for f in glob.glob(prefix + "*.*")} - {os.path.join(os.path.dirname(path), own)}):
        files = [name + ext for ext in (".sock", ".log", ".lock") if os.path.exists(name + ext)]
        try:
            if any(time.time() - os.stat(f).st_mtime < older_than for f in files):
                continue  # a server of another venv may be starting: its `start` wrote the log first
            fd = os.open(name + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held for the life of a running server
        except BlockingIOError:
            os.close(fd)
            continue
        for f in (name + ".sock", name + ".log", name + ".lock"):
            try:
                os.unlink(f)
                removed.append(os.path.basename(f))
            except FileNotFoundError:
                pass
        os.close(fd)
    return removed


def _claim_unless_served(path: str, timeout: float = 120.0) -> int | None:
    """The start-up lock once it is free, or None as soon as another server of this venv answers.
    A server that holds the lock without answering is either preloading (two `start`s at once: it
    will answer) or going away (stopped, or idle): giving up at once in the second case left the venv
    without a server, and every stage of the run that had just started it unserved (seen: a `start`
    right after a `stop`)."""
    deadline = time.monotonic() + timeout
    while True:
        claim = _claim(path)
        if claim is not None or _ask("status") or time.monotonic() > deadline:
            return claim
        time.sleep(0.2)


def _ask(cmd: str) -> dict | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(socket_path())
        _send(sock, {"cmd": cmd}, [0, 1, 2])  # fds keep one message format; the server closes them
        return _recv(sock)
    except (OSError, EOFError, ValueError):
        return None
    finally:
        sock.close()


def start(idle: float, wait: float) -> int:
    """Start a detached server for this venv unless one answers; wait until it listens."""
    import subprocess

    info = _ask("status")
    if info:
        print(f"stage server {info['pid']} already running ({info['socket']})")
        return 0
    path = socket_path()
    log = path.removesuffix(".sock") + ".log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "stages.server", "serve", "--idle", str(idle)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, cwd="/",
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    if wait <= 0:  # the caller goes on: stages that start before the server listens run as normal processes
        print(f"stage server starting in the background (log {log})")
        return 0
    deadline = time.time() + wait
    while time.time() < deadline:
        info = _ask("status")
        if info:
            print(f"stage server {info['pid']} started ({path}; log {log})")
            return 0
        if proc.poll() is not None and proc.returncode != ANOTHER:  # ANOTHER: wait for that one's answer
            with open(log, "rb") as f:
                last = f.read().decode(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            print(f"stage server exited before serving (log {log}): {last[0]}", file=sys.stderr)
            return 1
        time.sleep(0.2)
    print(f"stage server: not answering after {wait:.0f} s (see {log}); stages run as normal processes", file=sys.stderr)
    return 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stages.server", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("start", "status", "stop", "serve"))
    ap.add_argument("--idle", type=float, default=600.0, help="exit after this many seconds without a stage (default 600)")
    ap.add_argument("--wait", type=float, default=60.0, help="start: seconds to wait for the server to listen (0: do not wait)")
    args = ap.parse_args(argv)
    if args.command == "start":
        return start(args.idle, args.wait)
    if args.command == "serve":
        claim = _claim_unless_served(socket_path())
        if claim is None:  # two `start`s before either server listened: the first one serves
            print("stage server: another server of this venv is starting or running; not serving", file=sys.stderr)
            return ANOTHER
        server = Server(socket_path(), args.idle)
        server.claim = claim
        removed = remove_stale(server.path)
        if removed:
            print(f"stage server: removed {len(removed)} files of servers of earlier installs", file=sys.stderr, flush=True)
        server.preload()
        server.serve()
        return 0
    info = _ask(args.command)
    if info is None:
        print("no stage server running for this venv")
        return 1 if args.command == "status" else 0
    print(json.dumps(info) if args.command == "status" else f"stage server {info['pid']} stopping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
