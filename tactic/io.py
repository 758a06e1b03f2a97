"""Atomic file output: a stage that is interrupted never leaves a half-written file behind.

Everything the pipeline writes goes to a temporary file in the destination folder and is renamed
into place only once complete (rename is atomic on POSIX within one filesystem). A temporary name
carries its writer's process token (pid and start time), so what a killed writer left is recognised
and removed by the next writer of the same output. `load_torch` reads the files params name.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

from tactic.errors import TacticError


class BadFileError(TacticError):
    """A file that cannot be used, named with the param (or stage) it belongs to and what is wrong."""


def process_start(pid: int) -> str | None:
    """The start time of process `pid` (/proc/<pid>/stat field 22), None if it is gone or a zombie:
    with the pid it tells a live process from a later one that was given the same pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None if Path("/proc/self/stat").exists() else _pid_exists(pid)
    return None if fields[0] in ("Z", "X") else fields[19]


def _pid_exists(pid: int) -> str | None:  # without /proc (macOS): the pid alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return "0"


def process_token() -> str:
    """`<pid>-<start>`: names this process in temporary outputs and MLflow tags."""
    return f"{os.getpid()}-{process_start(os.getpid()) or 0}"


def token_alive(token: str) -> bool:
    pid, _, start = token.partition("-")
    now = process_start(int(pid))
    return now is not None and (now == start or now == "0" or start == "0")


def remove_stale(folder: Path, prefix: str) -> None:
    """Remove temporaries `<prefix><token>.*` in `folder` whose writing process is gone."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        m = re.fullmatch(re.escape(prefix) + r"(\d+-\d+)\..*", path.name)
        if m and not token_alive(m.group(1)):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            print(f"removed {path}: left by an interrupted run", file=sys.stderr)


def temp_prefix(path: Path) -> str:
    return f".{path.name}."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, temp_prefix(path))
    fd, tmp = tempfile.mkstemp(prefix=f"{temp_prefix(path)}{process_token()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs should read like any other file
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def copy_tracked(repo: Path, dest: Path) -> Path:
    """Copy the files git tracks in `repo` to `dest`: a clean workspace for tests and benchmarks."""
    files = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (repo / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / f, dest / f)
    return dest


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_torch(path, obj) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path, what: str, weights_only: bool = True):
    """torch.load, failing with one line that names `what` (the param, or the stage that wrote the
    file), the path and what is wrong with it: missing, not a PyTorch file, truncated or damaged."""
    import torch

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what}: no such file {file}")
    try:
        with warnings.catch_warnings():  # junk opening with 0x80 reads as a pickle of an odd protocol
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(file, map_location="cpu", weights_only=weights_only)
    except Exception as err:  # garbage makes the unpickler fail in any way (IndexError, KeyError, ...)
        raise BadFileError(f"{what}: {file}: {_diagnose(file, err)}") from err


# torch.save's legacy format opens with a pickle of its magic number (torch.serialization.MAGIC_NUMBER),
# after the pickle header (and a frame opcode from protocol 4): a lone 0x80 opens one random file in 256.
_LEGACY_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


def _diagnose(file: Path, err: Exception) -> str:
    head, size = file.open("rb").read(32), file.stat().st_size
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if head[:4] == b"PK\x03\x04":  # torch.save's zip format
        if not zipfile.is_zipfile(file):
            return f"truncated or damaged PyTorch file ({size} bytes: its zip directory is missing)"
    elif not (head[:1] == b"\x80" and _LEGACY_MAGIC in head):  # neither zip nor torch's legacy format
        return f"not a PyTorch file ({size} bytes, starts with {head[:4]!r})"
    if "Weights only load failed" in str(err):
        return "holds Python objects, not only tensors (save a state dict: torch.save(model.state_dict(), path))"
    return f"truncated or damaged PyTorch file ({size} bytes): {first}"
