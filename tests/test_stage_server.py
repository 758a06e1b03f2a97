"""The stage server runs stage commands in forks of one preloaded process: same output, same exit
status, signals forwarded, and a command killed outright takes its child with it."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, TINY, served

# One worker runs them all (`--dist loadgroup`) with the other end-to-end tests: the server's preload
# (~8 s, conftest.py's `server`) is paid once; the served pipeline run is tests/test_pipeline.py's.
pytestmark = pytest.mark.xdist_group("e2e")

SLEEPER = """from stages.server import handoff

handoff(__name__)

import os, sys, time
print(os.getpid(), os.getppid(), flush=True)
time.sleep(float(sys.argv[1]))
"""


@pytest.mark.slow
def test_a_stage_runs_in_the_server_with_its_own_output_and_exit_status(server, tmp_path):
    env, _ = server
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "train": {"epochs": 0}}))
    before = served(env)
    out = subprocess.run([sys.executable, "-m", "stages.train", "uncompressed", "--seed", "0", "--params", str(bad)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "train.epochs: Input should be greater than 0" in out.stderr, out.stderr
    assert served(env) == before + 1  # it ran in a fork of the server, not as a process of its own
    off = subprocess.run([sys.executable, "-m", "stages.train", "uncompressed", "--seed", "0", "--params", str(bad)],
                         cwd=tmp_path, env={**env, "TACTIC_STAGE_SERVER": "0"}, capture_output=True, text=True, timeout=120)
    assert (off.returncode, off.stderr) == (out.returncode, out.stderr) and served(env) == before + 1


@pytest.mark.slow
def test_signals_reach_the_served_child_and_a_killed_command_takes_it_along(server):
    env, home = server
    (home / "sleeper.py").write_text(SLEEPER)
    for how in (signal.SIGTERM, signal.SIGKILL):
        cmd = subprocess.Popen([sys.executable, "-m", "sleeper", "60"], cwd=home, env=env, stdout=subprocess.PIPE, text=True)
        child, parent = map(int, cmd.stdout.readline().split())
        assert child != cmd.pid and parent != cmd.pid  # forked by the server
        cmd.send_signal(how)
        assert cmd.wait(timeout=30) == -how  # the command ends as the child did (or as it was killed)
        deadline = time.time() + 15
        while time.time() < deadline and _alive(child):
            time.sleep(0.2)
        assert not _alive(child), f"served child {child} outlived its command ({how.name})"


# A served command that runs another (as `pipeline.repro -s` runs its stage under DVC).
NESTER = """from stages.server import handoff

handoff(__name__)

import subprocess, sys
subprocess.run([sys.executable, "-m", "sleeper", sys.argv[1]])
"""


@pytest.mark.slow
def test_a_served_command_s_own_commands_are_served_and_stopped_with_it(server):
    """The commands a served child starts hand off too (DVC's stage under a served `pipeline.repro`),
    and stopping the outer command stops the inner one first, as a process group stops under a
    normal parent; killed outright, both go."""
    env, home = server
    (home / "nester.py").write_text(NESTER)
    (home / "sleeper.py").write_text(SLEEPER)
    for how in (signal.SIGTERM, signal.SIGKILL):
        before = served(env)
        cmd = subprocess.Popen([sys.executable, "-m", "nester", "60"], cwd=home, env=env, stdout=subprocess.PIPE, text=True)
        inner, _ = map(int, cmd.stdout.readline().split())
        assert served(env) == before + 2  # the outer command and the one it started, each in a fork
        cmd.send_signal(how)
        assert cmd.wait(timeout=30) == -how
        if how == signal.SIGTERM:  # stopped, not killed: the inner child was gone before the command ended
            assert not _alive(inner)
        deadline = time.time() + 15
        while time.time() < deadline and _alive(inner):
            time.sleep(0.2)
        assert not _alive(inner), f"the inner served child {inner} outlived its command ({how.name})"


CUDA_CHILD = """from stages.server import handoff

handoff(__name__)

import torch
print(torch.cuda.is_initialized(), float(torch.ones(4, device="cuda").sum()), flush=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device (the server must not hold a context)")
def test_a_served_child_can_use_cuda(server):
    """The server imports torch but never touches CUDA before forking (a CUDA context does not
    survive fork): its child starts with CUDA uninitialised and can then use the device."""
    env, home = server
    (home / "cuda_child.py").write_text(CUDA_CHILD)
    before = served(env)
    out = subprocess.run([sys.executable, "-m", "cuda_child"], cwd=home, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["False", "4.0"], out.stdout + out.stderr
    assert served(env) == before + 1


# Imported by the preload below in place of CompressAI: it reads torch's build report at import, as
# torch_geometric (which CompressAI imports) does, and it is where the fake driver gets initialised.
GEOMETRIC_LIKE = """import torch
REPORT = torch.__config__.show()
"""


def test_preloading_never_asks_cuda_and_stops_at_an_import_that_initialises_the_driver(monkeypatch, tmp_path):
    """torch's build report asks the CUDA runtime for devices, which initialises the driver (seen on an
    H200, through CompressAI's import of torch_geometric): while the server preloads, the report is
    the one flag torch_geometric reads. An import that initialises the driver anyway stops the
    server, naming the import, instead of forking children whose first CUDA call fails."""
    import torch

    from stages import server as srv

    name = f"geometric_like_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(GEOMETRIC_LIKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(srv, "PRELOAD", ("json", name))
    monkeypatch.setattr(srv, "cuda_driver_initialised", lambda: name in sys.modules)
    real = torch.__config__.show
    with pytest.raises(RuntimeError, match=f"importing {name} initialised the CUDA driver"):
        srv.Server("unused", 1).preload()
    assert torch.__config__.show is real  # children get torch's own report
    report = sys.modules[name].REPORT
    assert ("USE_MKL=ON" in real()) == ("USE_MKL=ON" in report) and "CUDA" not in report
    sys.modules.pop(name)


# Starts a server from this repository's `start`, whose `python -m stages.server serve` finds a
# `stages` package that exits at once (as a server does when its preload fails) first on its path.
START_A_DYING_SERVER = """import sys
from stages import server
sys.path.insert(0, sys.argv[1])
sys.exit(server.start(idle=60, wait=120))
"""


def test_a_second_server_of_the_venv_leaves_the_socket_to_the_first(server):
    """Two `start`s before either server listens (two `pipeline.repro --jobs` at once) start two
    servers: the second must not take over the socket path, which the first, idle, would later unlink."""
    from stages import server as srv

    env, _ = server

    def status():
        out = subprocess.run([sys.executable, "-m", "stages.server", "status"], cwd=REPO, env=env, capture_output=True, text=True)
        return yaml.safe_load(out.stdout)

    before = status()
    second = subprocess.run([sys.executable, "-m", "stages.server", "serve", "--idle", "5"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == srv.ANOTHER and "another server of this venv is starting or running" in second.stderr, second.stderr
    assert status()["pid"] == before["pid"]


def test_a_server_going_away_hands_the_lock_to_the_next(monkeypatch):
    """A server that holds the start-up lock but no longer answers is exiting (stopped, or idle): a
    `serve` started then waits for the lock instead of leaving the venv without a server (it used to
    give up at once: a `start` right after a `stop` left a whole run unserved). One that answers
    keeps the socket."""
    import threading

    from stages import server as srv

    home = Path(tempfile.mkdtemp(prefix="tss", dir="/tmp"))
    monkeypatch.setenv("TMPDIR", str(home))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    try:
        path = srv.socket_path()
        going = srv._claim(path)  # the server on its way out: the lock held, no socket answering
        assert going is not None and srv._claim(path) is None
        threading.Timer(1.0, os.close, [going]).start()
        t0 = time.monotonic()
        claim = srv._claim_unless_served(path, timeout=30)
        assert claim is not None and 0.9 < time.monotonic() - t0 < 10
        # Now it holds the lock and answers (as once it serves): a third gives up at once.
        monkeypatch.setattr(srv, "_ask", lambda cmd: {"pid": 1})
        t0 = time.monotonic()
        assert srv._claim_unless_served(path, timeout=30) is None and time.monotonic() - t0 < 1
        os.close(claim)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_start_reports_a_server_that_exits_before_serving(tmp_path):
    fake = tmp_path / "fake" / "stages"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "server.py").write_text("import sys\nsys.exit('stage server: could not preload (a stand-in)')\n")
    home = Path(tempfile.mkdtemp(prefix="tss", dir="/tmp"))  # short: the socket's path would be under it
    env = {**os.environ, "TMPDIR": str(home), "PYTHONPATH": str(REPO)}
    env.pop("XDG_RUNTIME_DIR", None)
    try:
        out = subprocess.run([sys.executable, "-c", START_A_DYING_SERVER, str(fake.parent)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=150)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    # Reported as it happened, with its reason, not after waiting out the 120 s for an answer.
    assert out.returncode == 1 and "exited before serving" in out.stderr, out.stderr
    assert "stage server: could not preload (a stand-in)" in out.stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie waiting for the server to reap it is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_files_of_servers_of_earlier_installs_are_removed_unless_held_or_recent(tmp_path):
    """Each install that changes site-packages starts servers under a new name; a server removes the
    files of the others that no server holds (their lock) and nothing touched for an hour: never its
    own, a running one's, or those of a server that is just starting."""
    import fcntl

    from stages import server as srv

    uid = os.getuid()
    own = tmp_path / f"tactic-stage-server-{uid}-000000000000.sock"
    sets = {name: [tmp_path / f"tactic-stage-server-{uid}-{name}{ext}" for ext in (".sock", ".log", ".lock")]
            for name in ("aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc")}
    other_user = tmp_path / f"tactic-stage-server-{uid + 1}-dddddddddddd.log"
    for f in [own, own.with_suffix(".log"), own.with_suffix(".lock"), other_user, *sum(sets.values(), [])]:
        f.write_text("")
        os.utime(f, (time.time() - 7200, time.time() - 7200))
    os.utime(sets["cccccccccccc"][1])  # its log just written: a server starting
    held = os.open(sets["bbbbbbbbbbbb"][2], os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a server running
    try:
        removed = srv.remove_stale(str(own))
    finally:
        os.close(held)
    assert sorted(removed) == sorted(f.name for f in sets["aaaaaaaaaaaa"])
    assert not any(f.exists() for f in sets["aaaaaaaaaaaa"])
    assert all(f.exists() for f in sets["bbbbbbbbbbbb"] + sets["cccccccccccc"] + [own, other_user])
