"""The MLflow UI's saved view of the runs (tactic.mlflow_view): what setup() writes, once, and that
MLflow's UI still reads it the way the view and the README's URL assume."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from tactic import mlflow_view, tracking
from tests.helpers import fresh_mlflow

JS = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"


@pytest.fixture
def fresh_db(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fresh_mlflow(tmp_path / "m.db"))
    monkeypatch.setattr(mlflow_view, "current_task", lambda: "classification")  # whatever params.yaml says
    yield
    monkeypatch.undo()
    tracking.setup()  # back to the session's database for the tests that follow on this worker


def test_setup_writes_the_saved_view_once_and_keeps_one_replaced_in_the_ui(fresh_db, monkeypatch):
    client = tracking.setup().MlflowClient()
    exp = client.get_experiment_by_name(tracking.EXPERIMENT)
    key = mlflow_view.view_tag_key("classification")
    envelope = json.loads(exp.tags[key])
    state = json.loads(envelope["state"])
    assert envelope["name"] == "tactic: bpp vs top1 (classification)" and isinstance(envelope["createdAt"], int)
    assert state["selectedColumns"] == ["params.`mode`", "params.`beta`", "params.`quality`", "params.`seed`",
                                        "metrics.`bpp`", "metrics.`top1`"]
    [chart] = state["compareRunCharts"]
    assert chart["type"] == "SCATTER" and chart["xaxis"] == {"key": "bpp", "type": "METRIC"}
    assert chart["yaxis"] == {"key": "top1", "type": "METRIC"}
    assert chart["metricSectionId"] == state["compareRunSections"][0]["uuid"]

    client.set_experiment_tag(exp.experiment_id, key, "replaced in the UI")
    calls = []
    monkeypatch.setattr(mlflow.MlflowClient, "set_experiment_tag", lambda *a: calls.append(a))
    tracking.setup()
    assert calls == [] and client.get_experiment(exp.experiment_id).tags[key] == "replaced in the UI"


def test_the_view_filter_keeps_the_evaluated_codec_runs_of_its_task(fresh_db):
    client = tracking.setup().MlflowClient()
    exp = client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    kept = set()
    for mode, task, bpp in (("aware", "classification", 0.2), ("agnostic", "classification", 0.3), ("jpeg", "classification", 0.5),
                            ("uncompressed", "classification", 8.0), ("pretrain", "classification", None),
                            ("aware", "segmentation", 0.2)):
        run = client.create_run(exp, run_name=f"{mode}-{task}")
        client.log_param(run.info.run_id, "mode", mode)
        client.log_param(run.info.run_id, "task", task)
        if bpp is not None:
            client.log_metric(run.info.run_id, "bpp", bpp)
        if task == "classification" and mode in ("aware", "agnostic", "jpeg"):
            kept.add(run.info.run_id)
    found = client.search_runs([exp], mlflow_view.search_filter("classification"))
    assert {r.info.run_id for r in found} == kept


def test_url_opens_the_runs_tab_of_the_machine_learning_ui_in_the_view():
    assert mlflow_view.url("1") == ("http://127.0.0.1:5000/#/experiments/1/runs"
                                    "?workflowType=machine_learning&viewStateShareKey=tactic-classification")
    assert mlflow_view.url("7", "http://h:1/", "segmentation", chart=True).endswith(
        "/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=tactic-segmentation&compareRunsMode=CHART")


def test_mlflows_ui_reads_saved_views_workflow_type_and_chart_mode_as_assumed():
    """An MLflow upgrade that renames any of these breaks the view or the README's URL."""
    bundle = "".join(p.read_text(errors="replace") for p in JS.glob("*.js"))
    for needle in ('"mlflow.sharedViewState."', '"viewStateShareKey"', 'MACHINE_LEARNING="machine_learning"',
                   '"compareRunsMode"', 'SCATTER="SCATTER"', '"selectedColumns"', '"compareRunCharts"',
                   '"runsHiddenMode"', 'SHOWALL="SHOW_ALL"', '"useGroupedValuesInCharts"'):
        assert needle in bundle, needle
