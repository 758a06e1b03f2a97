"""The pipeline as a user runs it: `make run`'s `pipeline.repro --jobs` (DVC's stages two at a time) on a copy of the repo with the tiny profile."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from tactic.config import parse_params
from tactic.experiment.grid import pretrain_runs, task_runs
from tests.helpers import BIN, ONE_POINT, REPO, TINY, copy_repo, dvc, results_of, served, subprocess_env

def _stage(args, cwd, db_uri):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=subprocess_env(db_uri), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.xdist_group("e2e")  # with the stage server's tests and `reference`, made once for the group
def test_dvc_repro_runs_the_grid_then_does_nothing(tmp_path, _mlflow_db, server, reference):
    # One operating point per mode (9 stages): each stage process costs ~10 s of imports and MLflow
    # set-up, and the grid's width is covered in-process by tests/test_datasets_pipeline.py.
    repo = copy_repo(tmp_path / "repo", ONE_POINT)
    # Every command served by a stage server of its own (`server`), which counts them, as `make run`'s
    # serves them. System metrics every 0.1 s: MLflow logs a sample only after a full interval, and
    # these stages' runs last well under a second (at 0.5 s, a CI run once found none logged for
    # train_aware's run).
    env = {**server[0], "PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": _mlflow_db, "PYTHONUNBUFFERED": "1",
           "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.1"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)  # .dvc/ came with the copy
    p = parse_params(ONE_POINT)
    expected = {r.stage for r in pretrain_runs(p) + task_runs(p)} | {"prepare", "weights", "evaluate", "report"}
    assert set(dvc(repo, "stage", "list", "--name-only").split()) == expected  # tactic.experiment.grid names stages exactly as DVC does

    # As `make run` runs it on 2 cores (pipeline.repro --jobs: the stages two at a time, each a
    # `dvc repro -s` whose lock libyaml writes) ...
    before = served(env)
    first = subprocess.run([sys.executable, "-m", "pipeline.repro", "--jobs", "2"], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "| aware | beta=0.004 |" in first.stdout and "9 stages ran, 0 up to date, 0 failed" in first.stdout
    # Every command in a fork of the server: the run itself, each stage's `pipeline.repro -s`, and the
    # stage's own command that DVC runs under it.
    assert served(env) - before == 1 + 2 * 9
    # Served, it computes what the same stage commands compute run plainly, one after the other in one
    # process: the same table and rows.
    assert results_of(repo) == reference

    rows = json.loads((repo / "results/eval.json").read_text())
    assert {(r["mode"], r["beta"], r["quality"], r["seed"]) for r in rows} == {
        (r.mode, r.beta, r.quality, r.seed) for r in task_runs(p)}
    summary = json.loads((repo / "results/summary.json").read_text())
    assert summary["num_runs"] == len(rows) == 4 and summary["bd_accuracy_aware_vs_agnostic"] is None
    assert "at least two points" in summary["bd_accuracy_aware_vs_agnostic_note"]  # said, not crashed
    assert (repo / "results/rate_accuracy.png").stat().st_size > 10_000
    assert not list(repo.rglob(".*.tmp"))

    # ... then DVC's own `dvc repro`, which reads that lock as its own. Nothing re-runs: only `weights`
    # re-hashes the files params name (none here), as it always does.
    again = subprocess.run([BIN / "dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("Running stage") == 1 and "Running stage 'weights'" in again.stdout

    mlflow.set_tracking_uri(_mlflow_db)
    runs = mlflow.search_runs(experiment_names=["tactic"], filter_string="params.mode = 'aware'")
    aware = runs[runs["tags.dvc_stage"] == "train_aware@0.004-0"]
    # Two at a time: two training stages were running at once, by pipeline.repro's account (it prints
    # "[k/n] <stage> started", and a stage's output when it ends). Whether their commands overlapped is
    # up to DVC's repo lock, which each `dvc repro -s` holds before and after its command while the
    # other waits for it (DVC's own retries, 0.5 s apart): with stages of a second or two they can miss
    # each other (a CI run saw the nine one after another in MLflow's run times), so those are not
    # asserted on here.
    running, most = set(), 0
    for line in first.stdout.splitlines():
        if m := re.fullmatch(r"\[\d+/9\] (\S+) started", line):
            running.add(m.group(1))
        elif m := re.match(r"Running stage '([^']+)'", line):
            running.discard(m.group(1))
        most = max(most, sum(name.startswith(("pretrain", "train_")) for name in running))
    assert most == 2, first.stdout
    assert len(aware) >= 1
    last = aware.iloc[0]
    assert float(last["params.beta"]) == 0.004 and float(last["params.alpha"]) == p.train.alpha
    assert 0 < last["metrics.bpp"] < 8 and 0 <= last["metrics.top1"] <= 1 and last["metrics.bpp_estimated"] > 0
    assert "metrics.accuracy" not in runs or runs["metrics.accuracy"].isna().all()  # MLflow says top1, not accuracy
    # The model as DVC knows it: its path, and the hash dvc.lock records for the stage's output.
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train_aware@0.004-0"]
    assert last["tags.model_path"].startswith("models/aware/") and last["tags.dvc_md5"] == lock["outs"][0]["md5"]
    assert last["metrics.system/cpu_utilization_percentage"] >= 0  # system metrics on
    report = mlflow.search_runs(experiment_names=["tactic"], filter_string="tags.dvc_stage = 'report'").iloc[0]
    assert "rate_accuracy.png" in [a.path for a in mlflow.MlflowClient().list_artifacts(report["run_id"])]  # log_figure

    # DVC's plots: one series per mode on a log rate axis, valid Vega-Lite (rendered offline by vl-convert).
    import vl_convert

    shown = subprocess.run([BIN / "dvc", "plots", "show", "--json"], cwd=repo, env=env, capture_output=True, text=True, check=True)
    plots = json.loads(shown.stdout)["data"]
    spec = plots["rate-accuracy"][0]["content"]
    assert spec["encoding"]["x"]["scale"]["type"] == "log" and spec["encoding"]["color"]["field"] == "mode"
    assert {v["mode"] for v in spec["data"]["values"]} == {"uncompressed", "jpeg", "agnostic", "aware"}
    curves = plots["training-curves"][0]["content"]
    assert len({v["run"] for v in curves["data"]["values"]}) == 4 and {v["epoch"] for v in curves["data"]["values"]} == {"0", "1"}
    for name in ("rate-accuracy", "rate-psnr", "training-curves"):
        assert "<svg" in vl_convert.vegalite_to_svg(json.dumps(plots[name][0]["content"])), name


def test_stage_with_bad_params_names_the_key(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "train": {"epochs": 0}}))
    out = _stage(["stages.train", "uncompressed", "--seed", "0", "--params", str(bad)], tmp_path, "sqlite:///" + str(tmp_path / "m.db"))
    assert out.returncode == 2
    assert "train.epochs: Input should be greater than 0" in out.stderr and "Traceback" not in out.stderr


def test_prepare_without_the_data_says_how_to_get_it(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"prepare": {"root": str(tmp_path / "nowhere")}}))
    out = _stage(["stages.prepare", "--params", str(params), "--out", str(tmp_path / "prepared")], tmp_path, "sqlite:///" + str(tmp_path / "m.db"))
    assert out.returncode == 2
    assert "expected layout <root>/{train,t10k}" in out.stderr and "apt-get install dataset-fashion-mnist" in out.stderr
    assert not (tmp_path / "prepared").exists()


def test_train_before_prepare_says_which_stage(tmp_path):
    out = _stage(["stages.train", "uncompressed", "--seed", "0", "--data", str(tmp_path / "none")], tmp_path, "sqlite:///" + str(tmp_path / "m.db"))
    assert out.returncode == 2 and "run the prepare stage first" in out.stderr


# Prints {entry: [files of the project modules it imports]}: the third-party libraries imported once,
# as the stage server has them (in a fork of the server when one runs for this venv, as `make test`
# starts it: 0.7 s instead of ~8 s of imports; else importing its PRELOAD here), then each entry
# imported in a fork of its own, so that what one entry imports never hides what another needs.
IMPORTS = """from stages.server import handoff

handoff(__name__)

import importlib, json, os, sys
from stages.server import PRELOAD

for name in PRELOAD:
    importlib.import_module(name)
found = {}
for entry in sys.argv[1:]:
    read, write = os.pipe()
    if os.fork() == 0:
        importlib.import_module(entry)
        files = [m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None) and m.__name__.startswith(("tactic", "stages"))]
        with os.fdopen(write, "w") as out:
            json.dump(sorted(files), out)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as got:
        found[entry] = json.load(got)
    assert os.waitstatus_to_exitcode(os.waitpid(-1, 0)[1]) == 0, entry
print(json.dumps(found))
"""


def test_each_stage_depends_on_every_module_it_imports_and_not_on_the_report(tmp_path):
    """DVC re-runs a stage when a dep changes: a module a stage imports but does not list would let
    stale results pass; and the report's code (which training never imports) must not re-train."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    checked = [("prepare", "stages.prepare"), ("pretrain", "stages.pretrain"), ("train_aware", "stages.train"),
               ("train_latent_joint", "stages.train"), ("evaluate", "stages.evaluate"), ("report", "stages.report")]
    (tmp_path / "imports_probe.py").write_text(IMPORTS)
    out = subprocess.run([sys.executable, "-m", "imports_probe", *sorted({entry for _, entry in checked})], cwd=tmp_path,
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    seen = json.loads(out.stdout)
    for name, entry in checked:
        imported = {str(Path(f).relative_to(REPO)) for f in seen[entry]}
        imported = {f for f in imported if f not in ("stages/__init__.py", "stages/server.py", "stages/cli.py", "tactic/__init__.py")}
        deps = [d for d in stages[name]["deps"] if d.startswith(("tactic", "stages"))]
        missing = [f for f in imported if not any(f == d or f.startswith(d + "/") for d in deps)]
        assert not missing, (name, missing)
        assert "tactic" not in deps and not any(d.startswith("tactic/report") for d in deps if name != "report"), name
