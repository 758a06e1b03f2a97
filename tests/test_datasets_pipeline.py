"""Each real dataset's layout, as a generated fixture, through every stage of the smoke grid, chosen
from the params file alone (the stage entry points DVC calls, run in-process to keep this quick)."""
import json

import pytest
import yaml

from stages import evaluate, prepare, pretrain, pretrain_hyperprior, report, train
from tactic.config import merged, parse_params
from tactic.experiment.grid import pretrain_runs, task_runs
from tactic.data import fixtures
from tests.helpers import CLASSIFICATION, FMNIST_ROOT, REPO, TINY, repo_params

SEGMENTATION = {"model": {"codec": {"N": 8, "M": 4}, "task": {"task": "segmentation", "arch": "small-fcn", "width": 8}}}


def run_grid(params_file, work):
    """What `dvc repro` runs, stage by stage, in dependency order."""
    p = parse_params(yaml.safe_load(params_file.read_text()))
    common = ["--params", str(params_file)]
    data, models, results = work / "data/prepared", work / "models", work / "results"
    prepare.main([*common, "--out", str(data)])
    for run in pretrain_runs(p):
        stage, point = (pretrain, ["--beta", repr(run.beta)]) if run.mode == "pretrain" else (pretrain_hyperprior, ["--quality", str(run.quality)])
        stage.main([*common, *point, "--seed", str(run.seed), "--data", str(data), "--models", str(models)])
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


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["fashion-mnist-canvases", "cityscapes"])
def test_segmentation_grid_on_the_embedded_canvases_and_cityscapes_layout(dataset, tmp_path):
    if dataset == "cityscapes":
        root = fixtures.cityscapes(tmp_path / "raw", per_split={"train": {"aachen": 6, "bremen": 6}, "val": {"lindau": 4}})
        prepare_params = {"root": str(root), "size": 32, "train_size": None, "val_size": None, "test_size": None}
    else:
        prepare_params = {"root": FMNIST_ROOT, "train_size": 120, "val_size": 40, "test_size": 40}
    params = repo_params({**TINY, **SEGMENTATION, "prepare": {"dataset": dataset, **prepare_params}})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    p, rows = run_grid(params_file, tmp_path)
    assert {(r["mode"], r["beta"], r["quality"]) for r in rows} == {(r.mode, r.beta, r.quality) for r in task_runs(p)}
    for r in rows:
        assert 0 <= r["miou"] <= 1 and 0 <= r["accuracy"] <= 1
        assert len(r["iou"]) == (11 if dataset != "cityscapes" else 19) and "top5" not in r
    summary = json.loads((tmp_path / "results/summary.json").read_text())
    assert "uncompressed_miou" in summary and "bd_miou_aware_vs_jpeg" in summary
    assert "| mIoU % |" in (tmp_path / "results/table.md").read_text()


LATENT = {"betas": [], "jpeg": {"qualities": []}, "model": {"task": {"arch": "resnet18"}},
          "prepare": {"size": 64, "train_size": 60, "val_size": 20, "test_size": 20},
          "latent": {"qualities": [1], "N": 8, "M": 12, "pretrain": {"epochs": 1, "batch_size": 20},
                     "train": {"epochs": 1, "batch_size": 20, "lmbda": 0.01, "beta": 0.001}}}


@pytest.mark.slow
def test_compressed_domain_grid(tmp_path):
    params = repo_params({**TINY, **LATENT, "prepare": {**TINY["prepare"], **LATENT["prepare"]}})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    p, rows = run_grid(params_file, tmp_path)
    modes = {(r["mode"], r["quality"]) for r in rows}
    assert modes == {(m, q) for m in ("latent-frozen", "latent-joint", "pixel-decoded") for q in (1,)} | {("uncompressed", None)}
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["num_images"] == 20
        if r["mode"] != "uncompressed":
            # real streams (framing included) vs the entropy model's estimate; PSNR of the codec
            assert r["bpp"] > r["bpp_estimated"] > 0 and r["psnr"] > 5
    frozen = {r["quality"]: r["bpp"] for r in rows if r["mode"] == "latent-frozen"}
    decoded = {r["quality"]: r["bpp"] for r in rows if r["mode"] == "pixel-decoded"}
    assert frozen == decoded  # the same codec and streams: the same rate
    assert not list((tmp_path / ".checkpoints").rglob("*.npy"))  # the decoded-code caches are removed
    assert "latent-frozen" in (tmp_path / "results/table.md").read_text()


PAPER_PROFILES = {  # profile -> (its dataset's fixture, the fixture's kwargs, prepare overrides)
    "imagenet50-paper": (fixtures.imagenet, {"classes": 3}, {"classes": 3, "size": 76}),  # Inception v3 takes >= 75 px
    "cityscapes-paper": (fixtures.cityscapes, {"per_split": {"train": {"aachen": 10}, "val": {"lindau": 2}}}, {"size": 64}),
    "minc-paper": (fixtures.minc, {"classes": 3}, {"classes": 3, "size": 64}),
    "rsscn7-paper": (fixtures.rsscn7, {}, {"size": 64}),
    "resisc45-paper": (fixtures.resisc, {"classes": 3}, {"classes": 3, "size": 64}),
}


def _one_step(profile: str, root) -> dict:
    """The profile as shipped, cut to one step of each stage and one evaluation batch on its dataset's
    fixture at `root` (images, splits, seeds and operating points cut to one each)."""
    from tactic.profiles import resolve_params

    raw = resolve_params(REPO, profile=profile)
    one = {"epochs": 1, "batch_size": 2, "limit_batches": 1}
    return merged(raw, {"seeds": [0], "betas": raw["betas"][:1], "jpeg": {"qualities": raw["jpeg"]["qualities"][:1]},
                        "prepare": {"root": str(root), "workers": 1, **PAPER_PROFILES[profile][2]}, "pretrain": one, "train": one,
                        "latent": {"qualities": raw["latent"]["qualities"][:1], "pretrain": one, "train": one},
                        "evaluate": {"batch_size": 2, "limit": 2}})


def _beyond_the_data(params: dict) -> dict:
    """What a profile's stages after `prepare` compute with: everything but the dataset and the report's title."""
    return {k: v for k, v in params.items() if k not in ("prepare", "report")}


@pytest.mark.slow
@pytest.mark.parametrize("profile", sorted(PAPER_PROFILES))
def test_every_paper_profile_runs_one_step_of_each_stage(profile, tmp_path):
    """A profile that would crash (a network, a size, a loss that does not fit its dataset) fails
    here on CPU in seconds, not hours into a GPU run: the profile as shipped (networks, codec,
    losses, modes) on a generated copy of its dataset's layout, with images, splits, seeds, operating
    points and training cut to one step of each stage and one evaluation batch.

    The compressed-domain paper's three profiles differ only in their dataset (and the report's
    title), so cut to the same image size they compute the same stages with the same params: the
    first of them (minc-paper) runs every stage, the others `prepare` alone: they are found by comparing
    the params after `prepare`, so a profile whose training differs from every other's runs it all.
    (Each dataset's layout runs every stage in test_smoke_grid_on_each_dataset_layout.)"""
    make, make_kw, _ = PAPER_PROFILES[profile]
    root = make(tmp_path / "raw", **make_kw)
    params = _one_step(profile, root)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    twin = next((other for other in sorted(PAPER_PROFILES) if other < profile
                 and _beyond_the_data(_one_step(other, root)) == _beyond_the_data(params)), None)
    if twin:
        prepare.main(["--params", str(params_file), "--out", str(tmp_path / "data/prepared")])
        meta = json.loads((tmp_path / "data/prepared/meta.json").read_text())
        assert meta["dataset"] == params["prepare"]["dataset"] and min(meta["counts"].values()) > 0
        return
    p, rows = run_grid(params_file, tmp_path)
    assert {(r["mode"], r["beta"], r["quality"]) for r in rows} == {(r.mode, r.beta, r.quality) for r in task_runs(p)}
    assert all(r["num_images"] == 2 and r["bpp"] > 0 for r in rows) and (tmp_path / "results/summary.json").is_file()
