"""pipeline.repro: `dvc repro` whose dvc.lock libyaml reads and writes, the same lock as DVC's own writer."""
import io
import math
import os
import subprocess
import sys

import pytest
import yaml

from tests.helpers import BIN, REPO, subprocess_env

# What a lock holds, with the values whose YAML spelling differs between writers if any does.
PARAMS = {"model": {"N": 8, "weights": None, "relu": False, "name": "yes", "version": "2.0", "title": "Fashion-MNIST é"},
          "lr": 0.0001, "tiny": 1e-05, "big": 1.5e+20, "betas": [0.02, 2.0], "empty": [], "seeds": [0, 1]}
DVC_YAML = {"stages": {
    "make": {"matrix": {"seed": "${seeds}"}, "cmd": "python -c \"open('out${item.seed}.txt', 'w').write('${item.seed}')\"",
             "deps": ["in.txt"], "params": ["model", "lr", "tiny", "big", "betas", "empty"], "outs": ["out${item.seed}.txt"]},
    "sum": {"cmd": "cat out0.txt out1.txt > sum.txt", "deps": ["out0.txt", "out1.txt"], "outs": [{"sum.txt": {"cache": False}}]},
}}


def _repo(path):
    path.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run([BIN / "dvc", "init", "-q"], cwd=path, check=True)
    (path / "params.yaml").write_text(yaml.safe_dump(PARAMS, allow_unicode=True))
    (path / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    (path / "in.txt").write_text("x")
    return path


def test_a_run_through_pipeline_repro_writes_the_lock_dvc_writes(tmp_path):
    env = subprocess_env("sqlite:///" + str(tmp_path / "unused.db"))
    fast, plain = _repo(tmp_path / "fast"), _repo(tmp_path / "plain")
    first = subprocess.run([sys.executable, "-m", "pipeline.repro"], cwd=fast, env={**env, "PYTHONPATH": str(REPO)},
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    subprocess.run([BIN / "dvc", "repro"], cwd=plain, env=env, check=True, capture_output=True)
    assert (fast / "dvc.lock").read_text() == (plain / "dvc.lock").read_text()  # byte for byte
    assert (fast / "sum.txt").read_text() == "01"
    # DVC's own repro reads that lock as its own: nothing to do.
    again = subprocess.run([BIN / "dvc", "repro"], cwd=fast, env=env, capture_output=True, text=True, check=True)
    assert "Running stage" not in again.stdout and again.stdout.count("didn't change, skipping") == 3


def test_the_libyaml_writer_keeps_the_data_where_its_layout_differs():
    from dvc.utils.serialize._yaml import _dump, parse_yaml, parse_yaml_for_update

    from pipeline.repro import dump_lock

    lock = {"schema": "2.0", "stages": {"report": {"cmd": "python -m stages.report", "params": {"params.yaml": {
        "report": {"title": "TACTIC segmentation on the embedded canvases (Fashion-MNIST items), a title too long for a line"}}}}}}
    theirs, ours = io.StringIO(), io.StringIO()
    _dump(lock, theirs)
    dump_lock(lock, ours)
    assert ours.getvalue() != theirs.getvalue()  # the long line wraps at another word
    assert parse_yaml(ours.getvalue(), "dvc.lock") == parse_yaml_for_update(theirs.getvalue(), "dvc.lock") == lock


def test_only_the_lock_changes_writer(tmp_path):
    import dvc.dvcfile

    from pipeline.repro import use_fast_lock

    use_fast_lock()
    use_fast_lock()  # idempotent: one wrapper, over DVC's own
    assert not hasattr(dvc.dvcfile.modify_yaml.dvc_modify_yaml, "dvc_modify_yaml")
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text("stages:\n  a:  # a comment DVC's round-trip writer keeps\n    cmd: echo\n")
    with dvc.dvcfile.modify_yaml(dvc_yaml) as data:
        data["stages"]["a"]["cmd"] = "echo a"
    assert "# a comment DVC's round-trip writer keeps" in dvc_yaml.read_text()
    lock = tmp_path / "dvc.lock"
    lock.write_text("schema: '2.0'\nstages: {}\n")
    with dvc.dvcfile.modify_yaml(lock) as data:
        data["stages"]["a"] = {"cmd": "echo a"}
    assert lock.read_text() == "schema: '2.0'\nstages:\n  a:\n    cmd: echo a\n"


def test_every_value_reads_back_as_dvc_reads_it():
    """Strings YAML 1.1 and 1.2 disagree on (DVC reads 1.2), and every scalar type a lock holds."""
    from dvc.utils.serialize._yaml import parse_yaml

    from pipeline.repro import dump_lock

    values = ["yes", "no", "on", "off", "y", "0o17", "012", "1e5", "1:20", "0b11", "0x1F", "1_000", "~", "null", "",
              "true", "True", ".inf", "-.5", "+1", "2.0", "2026-12-02", "<<", "=", "a: b", "# x", "é", "two words",
              None, True, False, 0, -3, 10**20, 0.1, 1e-05, 1.5e+20, float("inf"), float("-inf"), [], {}, [1, "1"]]
    lock = {"stages": {f"s{i}": {"params": {"params.yaml": {"v": v}}} for i, v in enumerate(values)}}
    out = io.StringIO()
    dump_lock(lock, out)
    back = parse_yaml(out.getvalue(), "dvc.lock")
    assert [back["stages"][f"s{i}"]["params"]["params.yaml"]["v"] for i in range(len(values))] == values
    nan = io.StringIO()
    dump_lock({"v": float("nan")}, nan)
    assert math.isnan(parse_yaml(nan.getvalue(), "dvc.lock")["v"])


def test_another_dvc_without_those_internals_runs_with_its_own_writer(tmp_path, monkeypatch, capsys):
    import dvc.dvcfile

    from pipeline import repro

    monkeypatch.delattr(dvc.dvcfile, "modify_yaml")
    monkeypatch.setattr("dvc.cli.main", lambda argv: 0 if argv == ["repro", "-s", "x"] else 1)
    assert repro.main(["-s", "x"]) == 0
    assert "DVC's lock writer left as it is (AttributeError" in capsys.readouterr().err


def test_jobs_run_the_stages_side_by_side_and_record_what_dvc_repro_records(tmp_path):
    env = {**subprocess_env("sqlite:///" + str(tmp_path / "unused.db")), "PYTHONPATH": str(REPO)}
    side, plain = _repo(tmp_path / "side"), _repo(tmp_path / "plain")
    # Each `make` entry waits until both have started: they finish only if they run at once.
    wait = ("import pathlib, sys, time\npathlib.Path(f'started{sys.argv[1]}').touch()\nend = time.time() + 60\n"
            "while not (pathlib.Path('started0').exists() and pathlib.Path('started1').exists()):\n"
            "    assert time.time() < end, 'the other entry never started'\n    time.sleep(0.1)\n"
            "pathlib.Path(f'out{sys.argv[1]}.txt').write_text(sys.argv[1])\n")
    make = {**DVC_YAML["stages"]["make"], "cmd": "python wait.py ${item.seed}"}
    for repo in (side, plain):
        (repo / "wait.py").write_text(wait)
        (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {**DVC_YAML["stages"], "make": make}}))
    run = subprocess.run([sys.executable, "-m", "pipeline.repro", "--jobs", "2"], cwd=side, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (side / "sum.txt").read_text() == "01" and "3 stages ran, 0 up to date, 0 failed, 0 not started; 2 at a time" in run.stdout
    assert run.stdout.index("make@0 started") < run.stdout.index("make@1 started") < run.stdout.index("Running stage 'make@")
    assert "> cat out0.txt out1.txt > sum.txt" in run.stdout  # each stage's output, as dvc repro prints it
    # What DVC records, as data (its order follows the order stages ended in), is what a serial run records.
    (plain / "started0").touch(), (plain / "started1").touch()  # serial: nothing to wait for
    subprocess.run([BIN / "dvc", "repro"], cwd=plain, env=env, check=True, capture_output=True)
    assert yaml.safe_load((side / "dvc.lock").read_text()) == yaml.safe_load((plain / "dvc.lock").read_text())
    again = subprocess.run([sys.executable, "-m", "pipeline.repro", "--jobs", "2"], cwd=side, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "0 stages ran, 3 up to date" in again.stdout


def test_jobs_start_no_dvc_for_what_dvc_would_skip_and_dvc_for_the_rest(tmp_path):
    repo = _repo(tmp_path / "repo")
    env = {**subprocess_env("sqlite:///" + str(tmp_path / "unused.db")), "PYTHONPATH": str(REPO)}

    def run():
        out = subprocess.run([sys.executable, "-m", "pipeline.repro", "--jobs", "2"], cwd=repo, env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    assert "3 stages ran, 0 up to date" in run()
    again = run()  # nothing changed: no stage goes to DVC
    assert "0 stages ran, 3 up to date" in again and "] make@0 started" not in again and "sum up to date" in again
    # make@0 and make@1 read in.txt: DVC re-runs them; they write the same bytes, so `sum` stays up to date.
    (repo / "in.txt").write_text("y")
    same = run()
    assert "2 stages ran, 1 up to date" in same and "make@0 started" in same and "sum up to date" in same
    # What make@* writes changes: `sum` goes to DVC, which re-runs it on the new files.
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    dvc_yaml["stages"]["make"]["cmd"] = dvc_yaml["stages"]["make"]["cmd"].replace("'${item.seed}')", "'${item.seed}!')")
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml))
    assert "3 stages ran, 0 up to date" in run() and (repo / "sum.txt").read_text() == "0!1!"
    status = subprocess.run([BIN / "dvc", "status"], cwd=repo, env=env, capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout  # DVC agrees with what was skipped


def test_jobs_after_a_failure_start_nothing_and_say_which_stage(tmp_path):
    repo = _repo(tmp_path / "repo")
    sleep = "python -c \"import time; time.sleep({}); open('{}', 'w').write('x')\""
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "fails": {"cmd": "python -c \"import time, sys; time.sleep(1); print('boom: the cause'); sys.exit(3)\"", "outs": ["f.txt"]},
        "after": {"cmd": sleep.format(0, "a.txt"), "deps": ["f.txt"], "outs": ["a.txt"]},  # needs the failed one
        "beside": {"cmd": sleep.format(4, "b.txt"), "outs": ["b.txt"]},  # running when it fails: runs to its end
        "later": {"cmd": sleep.format(0, "l.txt"), "outs": ["l.txt"]},  # not started after the failure
    }}))
    env = {**subprocess_env("sqlite:///" + str(tmp_path / "unused.db")), "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "pipeline.repro", "--jobs", "2"], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "boom: the cause" in run.stdout + run.stderr and "error: fails failed" in run.stderr
    assert (repo / "b.txt").exists() and not (repo / "a.txt").exists() and not (repo / "l.txt").exists()
    assert "1 stages ran, 0 up to date, 1 failed, 2 not started" in run.stdout
    assert "beside" in yaml.safe_load((repo / "dvc.lock").read_text())["stages"]  # what finished is recorded


def test_jobs_take_a_number_or_auto(tmp_path, monkeypatch):
    from pipeline import repro

    (tmp_path / "params.yaml").write_text("device: cpu\n")
    monkeypatch.chdir(tmp_path)
    assert repro.jobs_for("3") == 3 and repro.jobs_for("auto") == (os.cpu_count() or 1)
    (tmp_path / "params.yaml").write_text(f"device: cpu\nthreads: {os.cpu_count()}\n")
    assert repro.jobs_for("auto") == 1  # stages that take every core run one at a time
    (tmp_path / "params.yaml").write_text("device: cuda\n")
    assert repro.jobs_for("auto") == 1  # stages on one GPU run one at a time
    with pytest.raises(SystemExit, match="--jobs takes a positive number or auto, not '0'"):
        repro.jobs_for("0")
    with pytest.raises(SystemExit, match="--jobs runs the whole pipeline"):
        repro.main(["--jobs", "2", "-s", "x"])


def test_jobs_start_the_stage_server_unless_it_is_turned_off(monkeypatch, capsys):
    """`pipeline.repro --jobs` by hand starts the server as `make run` does (without it every stage
    pays its imports), in the background; TACTIC_STAGE_SERVER=0 keeps every stage a process of its own."""
    import pipeline.stages
    from pipeline import repro
    from stages import server

    started = []
    monkeypatch.setattr(server, "start", lambda idle, wait: started.append((idle, wait)) or 0)
    monkeypatch.setattr(pipeline.stages, "dvc_graph", lambda root: {})
    monkeypatch.delenv(server.DISABLE, raising=False)
    assert repro.parallel(".", 2) == 0 and started == [(600, 0)]
    monkeypatch.setenv(server.DISABLE, "0")
    assert repro.parallel(".", 2) == 0 and started == [(600, 0)]


def test_stages_share_the_cores_and_a_lone_stage_gets_them_all(monkeypatch):
    from pipeline.stages import stage_threads

    monkeypatch.delenv("TACTIC_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    graph = {"prepare": [], "a": ["prepare"], "b": ["prepare"], "evaluate": ["a", "b"]}
    assert stage_threads(graph, 2) == {"prepare": "4", "a": "2", "b": "2", "evaluate": "4"}
    assert stage_threads(graph, 8)["a"] == "1"  # never below one thread
    monkeypatch.setenv("TACTIC_THREADS", "3")  # what the runner was given wins over the share
    assert stage_threads(graph, 2) == {"prepare": "4", "a": "3", "b": "3", "evaluate": "4"}


def test_stages_that_others_wait_on_start_first_then_the_deepest():
    from pipeline.stages import stage_priority

    graph = {"prepare": [], "jpeg": ["prepare"], "pretrain": ["prepare"], "agnostic": ["pretrain"], "aware": ["pretrain"],
             "evaluate": ["jpeg", "agnostic", "aware"]}
    order = sorted(graph, key=lambda n: -stage_priority(graph)[n])
    assert order[:2] == ["prepare", "pretrain"]  # two stages wait on pretrain, one on jpeg
    assert order.index("agnostic") < order.index("jpeg")  # same users, deeper first: the short leaf fills the end
