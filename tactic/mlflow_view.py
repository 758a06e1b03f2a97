"""The MLflow UI's view of the experiment: a saved view that opens the runs table on the columns that
matter and a bpp-vs-accuracy chart, and the URL that opens it.

MLflow 3.17's UI opens an experiment on its GenAI overview (Traces, no data) unless the URL says
`workflowType=machine_learning` (or the user clicks "Model training" at the top left; the choice then
sticks in the browser). The experiment tag `mlflow.experimentKind` does not change that in 3.17: the UI
takes the kind from that switch and reads the tag only when the switch is turned off in its build.

The columns and charts of the runs view live in the browser (localStorage), except in a saved view:
an experiment tag `mlflow.sharedViewState.<id>` holding `{"name", "createdAt", "updatedAt", "state"}`,
`state` being the JSON of the view (search filter, sort, columns, grouping, chart sections and cards).
The UI lists it under "Views" on the Runs tab and opens it from `?viewStateShareKey=<id>`. There
is one a task (`tactic-classification`, `tactic-segmentation`: the accuracy metric differs);
`tracking.setup()` writes the one of params.yaml's task when it is missing, so a view replaced in the
UI ("Override saved view") is kept.

    python -m tactic.mlflow_view [--port 5000] [--task T]   # the URLs, for this repo's mlflow.db
"""
from __future__ import annotations

import json
import time
from pathlib import Path

PREFIX = "mlflow.sharedViewState."  # the UI's saved views: experiment tags PREFIX + view id
SECTION_ID = "tactic-rate-accuracy"
PARAMS = ("mode", "beta", "quality", "seed")
TASKS = ("classification", "segmentation")


def view_id(task: str = "classification") -> str:
    return f"tactic-{task}"


def view_tag_key(task: str = "classification") -> str:
    return PREFIX + view_id(task)


def current_task() -> str:
    """The task of params.yaml (`model.task.task`), read with yaml alone; classification, its
    default, when there is no such file or key."""
    import yaml

    from tactic.config import DEFAULT_PARAMS

    try:
        task = yaml.safe_load(DEFAULT_PARAMS.read_text())["model"]["task"]["task"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return "classification"
    return task if task in TASKS else "classification"


def accuracy_metric(task: str) -> str:
    """What the task's `accuracy` is called in MLflow (`top1`, `pixel_accuracy`), from tactic.metrics;
    `accuracy` where it keeps that name. Imports torch: call it only when the view is written."""
    from tactic import metrics

    return getattr(metrics, "TRACKED_NAMES", {}).get(task, {}).get("accuracy", "accuracy")


def search_filter(task: str) -> str:
    """The task's runs with a test rate, i.e. the training runs that `evaluate` wrote into, but
    uncompressed (8 bpp for grey, 24 for RGB images), so that the chart's bpp axis shows the codecs."""
    return f"params.task = '{task}' and params.mode != 'uncompressed' and metrics.bpp >= 0"


def view_state(task: str, accuracy: str | None = None) -> dict:
    """The runs view: the filter above, newest first, columns mode, beta, quality, seed, bpp and
    accuracy, every run shown (not the first 10), grouped by operating point (mode, beta, quality:
    a group's row holds the mean over its seeds), and a chart of accuracy (y) against bpp (x) with a
    point per run, every seed."""
    accuracy = accuracy or accuracy_metric(task)
    chart = {"uuid": f"{SECTION_ID}-{accuracy}", "type": "SCATTER", "runsCountToCompare": 100, "metricSectionId": SECTION_ID,
             "deleted": False, "isGenerated": False, "displayName": f"bpp vs {accuracy}",
             "xaxis": {"key": "bpp", "type": "METRIC"}, "yaxis": {"key": accuracy, "type": "METRIC"}}
    return {
        "searchFilter": search_filter(task),
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "selectedColumns": [f"params.`{p}`" for p in PARAMS] + [f"metrics.`{m}`" for m in ("bpp", accuracy)],
        "runsHiddenMode": "SHOW_ALL",
        "groupBy": {"aggregateFunction": "average",
                    "groupByKeys": [{"mode": "param", "groupByData": key} for key in ("mode", "beta", "quality")]},
        "useGroupedValuesInCharts": False,  # a point per run, not one per group
        "compareRunSections": [{"uuid": SECTION_ID, "name": "Rate vs accuracy", "display": True, "isReordered": False,
                                "deleted": False, "isGenerated": False, "columns": 1, "cardHeight": 480}],
        "compareRunCharts": [chart],
    }


def view_tag(task: str, accuracy: str | None = None) -> tuple[str, str]:
    """(key, value) of the experiment tag that holds the task's saved view."""
    state = view_state(task, accuracy)
    name = f"tactic: bpp vs {state['compareRunCharts'][0]['yaxis']['key']} ({task})"
    now = int(time.time() * 1000)
    return view_tag_key(task), json.dumps({"name": name, "createdAt": now, "updatedAt": now, "state": json.dumps(state)})


def url(experiment_id: str, base: str = "http://127.0.0.1:5000", task: str = "classification", chart: bool = False) -> str:
    """The runs view of the experiment in the task's saved view: its table, or (`chart`) its charts."""
    query = f"workflowType=machine_learning&viewStateShareKey={view_id(task)}" + ("&compareRunsMode=CHART" if chart else "")
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def main(argv=None) -> int:
    """Print the command that starts the UI on this repo's database and the URLs of the saved view,
    writing the view into a database from before it (as the next stage would)."""
    import argparse

    from tactic import tracking

    parser = argparse.ArgumentParser(prog="python -m tactic.mlflow_view", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=5000, help="the port `mlflow ui` listens on (default 5000)")
    parser.add_argument("--task", choices=TASKS, default=None, help="whose view (default: the task of params.yaml)")
    args = parser.parse_args(argv)
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        print(f"{uri}: no database yet: run the pipeline first (`make run`)")
        return 1
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    if experiment is None:
        print(f"{uri}: no experiment {tracking.EXPERIMENT!r} yet: run the pipeline first (`make run`)")
        return 1
    task = args.task or current_task()
    if view_tag_key(task) not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, *view_tag(task))
    base = f"http://127.0.0.1:{args.port}"
    print(f"mlflow ui --backend-store-uri {uri} --port {args.port}")
    print(url(experiment.experiment_id, base, task))
    print(url(experiment.experiment_id, base, task, chart=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
