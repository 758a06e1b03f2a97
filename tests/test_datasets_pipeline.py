"""Each real dataset's layout, as a generated fixture, through every stage of the smoke grid, chosen
from the params file alone (the stage entry points DVC calls, run in-process to keep this quick)."""
import json

import pytest
import yaml

from stages import evaluate, prepare, pretrain, report, train
from tactic.config import parse_params
from tactic.grid import task_runs
from tests.conftest import TINY, repo_params
from tests.test_datasets import CLASSIFICATION


def run_grid(params_file, work):
    """What `dvc repro` runs, stage by stage, in dependency order."""
    p = parse_params(yaml.safe_load(params_file.read_text()))
    common = ["--params", str(params_file)]
    data, models, results = work / "data/prepared", work / "models", work / "results"
    prepare.main([*common, "--out", str(data)])
    for beta in p.betas:
        for seed in p.seeds:
            pretrain.main([*common, "--beta", str(beta), "--seed", str(seed), "--data", str(data), "--models", str(models)])
    for run in task_runs(p):
        point = ["--beta", repr(run.beta)] if run.beta is not None else ["--quality", str(run.quality)] if run.quality else []
        train.main([*common, run.mode, "--seed", str(run.seed), *point, "--data", str(data), "--models", str(models)])
    evaluate.main([*common, "--data", str(data), "--models", str(models), "--out", str(results / "eval.json")])
    report.main([*common, "--eval", str(results / "eval.json"), "--out", str(results)])
    return p, json.loads((results / "eval.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("dataset", sorted(CLASSIFICATION))
def test_smoke_grid_on_each_dataset_layout(dataset, tmp_path):
    make, make_kw, cfg_kw = CLASSIFICATION[dataset]
    make(tmp_path / "raw", **make_kw)
    params = repo_params({**TINY, "prepare": {"dataset": dataset, "root": str(tmp_path / "raw"), "size": 32,
                                              "train_size": None, "val_size": None, "test_size": None, **cfg_kw}})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    p, rows = run_grid(params_file, tmp_path)
    assert {(r["mode"], r["beta"], r["quality"]) for r in rows} == {(r.mode, r.beta, r.quality) for r in task_runs(p)}
    meta = json.loads((tmp_path / "data/prepared/meta.json").read_text())
    assert meta["dataset"] == dataset and meta["channels"] == 3
    for r in rows:
        assert r["num_images"] == meta["counts"]["test"] and 0 <= r["accuracy"] <= 1
        if r["mode"] in ("agnostic", "aware"):
            assert 0 < r["bpp"] < 24 and r["bpp_estimated"] > 0
    assert (tmp_path / "results/rate_accuracy.png").is_file()
