import json
from pathlib import Path

import numpy as np
import pytest

from tactic.report import aggregate, bd_summary, compressai_results, headline, table, write_report
from tests.helpers import fresh_mlflow


def _rows():
    rows = []
    for seed, noise in ((0, 0.0), (1, 0.02)):
        rows.append({"mode": "uncompressed", "seed": seed, "beta": None, "quality": None, "bpp": 8.0, "accuracy": 0.9 + noise})
        for q, bpp, acc in ((5, 0.5, 0.6), (25, 1.0, 0.7), (50, 2.0, 0.8)):
            rows.append({"mode": "jpeg", "seed": seed, "beta": None, "quality": q, "bpp": bpp, "bpp_file": bpp + 3,
                         "accuracy": acc + noise, "psnr": 20.0})
        for mode, gain in (("agnostic", -0.05), ("aware", 0.05)):
            for beta, bpp, acc in ((0.03, 0.4, 0.6), (0.004, 0.8, 0.7), (0.0005, 1.6, 0.8)):
                rows.append({"mode": mode, "seed": seed, "beta": beta, "quality": None, "bpp": bpp, "bpp_estimated": bpp - 0.05,
                             "accuracy": acc + gain + noise, "psnr": 18.0})
    return rows


def test_aggregate_mean_and_spread():
    points = aggregate(_rows())
    unc = next(p for p in points if p["mode"] == "uncompressed")
    assert unc["accuracy"] == pytest.approx(0.91)
    assert unc["accuracy_std"] == pytest.approx(0.01414, abs=1e-4)  # sample std of (0.90, 0.92)
    assert unc["seeds"] == [0, 1]
    assert [p["mode"] for p in points][:2] == ["uncompressed", "jpeg"]


def test_bd_summary_against_known_gaps():
    rows = _rows()
    s = bd_summary(aggregate(rows), rows)
    assert s["bd_accuracy_aware_vs_agnostic"] == pytest.approx(10.0)  # percentage points
    assert s["bd_accuracy_aware_vs_agnostic_seed_std"] == pytest.approx(0.0, abs=1e-9)
    assert s["bd_accuracy_aware_vs_jpeg"] is not None


def test_bd_summary_says_why_when_curves_do_not_overlap():
    rows = [r for r in _rows() if not (r["mode"] == "jpeg" and r["bpp"] < 1.7)] + [
        {"mode": "jpeg", "seed": s, "beta": None, "quality": 95, "bpp": 4.0, "accuracy": 0.85} for s in (0, 1)]
    s = bd_summary(aggregate(rows), rows)
    assert s["bd_accuracy_aware_vs_jpeg"] is None and "do not overlap" in s["bd_accuracy_aware_vs_jpeg_note"]


def test_write_report(tmp_path):
    summary = write_report(_rows(), tmp_path, "test", "fashion-mnist")
    assert summary["num_runs"] == len(_rows())
    png = (tmp_path / "rate_accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = (tmp_path / "table.md").read_text()
    assert "| aware | beta=0.004 | 2 |" in table
    res = json.loads((tmp_path / "compressai" / "aware.json").read_text())
    assert res["name"] == "tactic-aware" and res["results"]["bpp"] == sorted(res["results"]["bpp"])
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    per_point = json.loads((tmp_path / "points_metrics.json").read_text())  # what `dvc exp show` tabulates
    assert per_point["aware"]["beta=0.004"]["accuracy"] == pytest.approx(0.76) and per_point["jpeg"]["q=5"]["bpp"] == 0.5
    assert per_point["aware"]["beta=0.004"]["accuracy_std"] == pytest.approx(0.01414, abs=1e-5)
    assert compressai_results(aggregate(_rows()), "jpeg", "x")["results"]["psnr-rgb"] == [20.0] * 3


def test_one_seed_shows_no_spread():
    rows = [r for r in _rows() if r["seed"] == 0]
    lines = table(aggregate(rows)).splitlines()
    aware = next(line for line in lines if line.startswith("| aware | beta=0.004 |"))
    assert "| 1 |" in aware and "±" not in aware  # unknown, not 0
    assert "±" in next(line for line in table(aggregate(_rows())).splitlines() if line.startswith("| aware |"))


def test_segmentation_report_adds_miou(tmp_path):
    rows = [dict(r, miou=r["accuracy"] - 0.3) for r in _rows()]
    summary = write_report(rows, tmp_path, "seg", "fashion-mnist-canvases")
    table = (tmp_path / "table.md").read_text()
    assert "| pixel acc. % | mIoU % |" in table and "top-1" not in table
    assert "| aware | beta=0.004 | 2 | 76.00 ± 1.41 | 46.00 ± 1.41 |" in table
    assert summary["bd_miou_aware_vs_agnostic"] == pytest.approx(10.0)  # the same curves, shifted
    assert summary["uncompressed_miou"] == pytest.approx(0.61)
    assert "miou" in json.loads((tmp_path / "compressai" / "aware.json").read_text())["results"]


def test_matched_rate_figures_and_seeds_left_out():
    rows = _rows()
    for r in rows:  # seed 1's aware curve sits wholly below every other rate: no BD figure for that seed
        if r["mode"] == "aware" and r["seed"] == 1:
            r["bpp"] /= 100
    s = bd_summary(aggregate(rows), rows)
    assert s["jpeg_min_rate"] == pytest.approx(0.5) and s["jpeg_min_rate_accuracy"] == pytest.approx(0.61)
    # agnostic's seed-mean curve: 0.56 at 0.4 bpp, 0.66 at 0.8 bpp; at 0.5 bpp (log-interpolated) ~0.592
    assert s["agnostic_accuracy_at_jpeg_min_rate"] == pytest.approx(0.56 + 0.1 * np.log(0.5 / 0.4) / np.log(2))
    assert s["agnostic_rate_for_jpeg_min_accuracy"] > 0.5  # needs more bits than JPEG for JPEG's accuracy
    assert s["agnostic_rate_for_jpeg_min_accuracy_within_1pt_ratio"] == pytest.approx(
        s["agnostic_rate_for_jpeg_min_accuracy_within_1pt"] / 0.5)
    assert s["jpeg_min_rate_psnr"] == 20.0 and s["agnostic_psnr_at_jpeg_min_rate"] == pytest.approx(18.0)
    assert "do not span JPEG's lowest rate" in s["aware_psnr_at_jpeg_min_rate_seeds_left_out"]["1"]
    left_out = s["bd_accuracy_aware_vs_agnostic_seeds_left_out"]
    assert list(left_out) == ["1"] and "do not overlap" in left_out["1"]
    assert "bd_accuracy_aware_vs_agnostic_seed_std" not in s  # one seed left: no spread to claim
    text = headline(s)
    assert "seeds left out: 1 (" in text
    bd = s["bd_accuracy_aware_vs_agnostic"]
    assert f"| BD-accuracy aware vs agnostic (points, linear) | {bd:.2f} |" in text  # points, as stored (not scaled again)
    assert "| JPEG's accuracy there (%) | 61.00 | ± 1.41 |" in text


def test_gain_at_the_same_rate_per_operating_point():
    """At each of aware's points: its accuracy minus agnostic's curve read at aware's own rate (log-linear
    between the agnostic points that bracket it); a point beyond agnostic's rates has none, and says so."""
    rows = _rows()
    for r in rows:
        if r["mode"] == "aware" and r["beta"] == 0.004:
            r["bpp"] = 0.56  # between agnostic's 0.4 and 0.8 bpp
        if r["mode"] == "aware" and r["beta"] == 0.0005:
            r["bpp"] = 3.2  # above agnostic's highest rate, 1.6
    s = bd_summary(aggregate(rows), rows)
    assert s["gain_accuracy_aware_vs_agnostic_at_beta_0.03"] == pytest.approx(10.0)  # same rate: 0.66 - 0.56
    assert s["gain_accuracy_aware_vs_agnostic_at_beta_0.03_seed_std"] == pytest.approx(0.0, abs=1e-9)
    read = 0.56 + 0.1 * np.log(0.56 / 0.4) / np.log(2)  # agnostic's seed-mean curve at 0.56 bpp
    assert s["gain_accuracy_aware_vs_agnostic_at_beta_0.004"] == pytest.approx(100 * (0.76 - read))
    assert s["gain_accuracy_aware_vs_agnostic_at_beta_0.0005"] is None
    assert "outside the reference's rates" in s["gain_accuracy_aware_vs_agnostic_at_beta_0.0005_note"]
    text = headline(s)
    gain = s["gain_accuracy_aware_vs_agnostic_at_beta_0.004"]
    assert f"| accuracy gain aware vs agnostic at beta=0.004, at the same rate (points) | {gain:.2f} | ± 0.00 |" in text
    assert "outside the reference's rates): aware vs agnostic at beta=0.0005" in text


def test_runs_at_chance_are_flagged_not_dropped(tmp_path):
    rows = [{**r, "run": f"{r['mode']}/{r['seed']}/{r['beta'] or r['quality']}", "num_classes": 10, "num_images": 2000}
            for r in _rows()]
    collapsed = rows[-1]  # aware at beta 0.0005, seed 1: 0.11 is within 3 standard errors of 0.10...
    collapsed["accuracy"] = 0.11
    rows[-2]["accuracy"] = 0.125  # ...0.125 is not (the bound is 0.120 for 2000 images)
    summary = write_report(rows, tmp_path, "test", "fashion-mnist")
    assert summary["runs_at_chance"] == [collapsed["run"]] and summary["num_runs"] == len(rows)
    assert "**At chance accuracy**" in (tmp_path / "summary.md").read_text() and collapsed["run"] in (tmp_path / "summary.md").read_text()
    assert write_report(_rows(), tmp_path, "test", "fashion-mnist")["runs_at_chance"] == []


def test_golden_smoke_report(tmp_path):
    """The smoke profile's evaluated rows (tests/golden/smoke_eval.json, from `dvc repro` of the smoke
    profile) give the stored table and summary byte for byte: a refactoring of the report that
    changes a figure, a rounding or an order fails here. Regenerate only for a change meant to show."""
    golden = Path(__file__).parent / "golden"
    write_report(json.loads((golden / "smoke_eval.json").read_text()), tmp_path, "golden", "fashion-mnist")
    assert (tmp_path / "table.md").read_text() == (golden / "smoke_table.md").read_text()
    assert (tmp_path / "summary.md").read_text() == (golden / "smoke_summary.md").read_text()


def test_compare_never_averages_runs_of_different_datasets_or_grids(capsys, tmp_path, monkeypatch):
    """`tactic compare` reads the evaluated runs back from MLflow: runs of two datasets (or two grids)
    at the same mode and point are two tables, not one mean."""
    from tactic import compare, tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", fresh_mlflow(tmp_path / "m.db"))
    client = tracking.setup().MlflowClient()
    exp = client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    for dataset, accuracy in (("fashion-mnist", 0.8), ("rsscn7", 0.4)):
        for seed in (0, 1):
            run = client.create_run(exp, tags={"params_hash": f"h-{dataset}"})
            for k, v in {"mode": "aware", "seed": seed, "beta": 0.1, "quality": None, "dataset": dataset,
                         "task": "classification"}.items():
                client.log_param(run.info.run_id, k, v)
            client.log_metric(run.info.run_id, "top1", accuracy)  # as evaluate names it for classification
            client.log_metric(run.info.run_id, "bpp", 0.2)
            client.set_terminated(run.info.run_id)
    assert compare.main(["--csv", str(tmp_path / "p.csv")]) == 0
    out = capsys.readouterr().out
    assert "## dataset fashion-mnist" in out and "## dataset rsscn7" in out
    assert "| 80.00 ± 0.00 |" in out and "| 40.00 ± 0.00 |" in out and "60.00" not in out
    assert (tmp_path / "p.csv").read_text().count("mode,beta") == 1
    monkeypatch.undo()
    tracking.setup()  # back to the session's database for the tests that follow on this worker


def test_dvc_plot_templates_colour_modes_as_the_report_does():
    """.dvc/plots/*.json fix each mode's colour (DVC would colour by revision): the same as the
    report's figure and MLflow's run colours (tactic.experiment.modes), every mode in grid order."""
    from tactic.experiment.grid import MODES as ORDER
    from tactic.experiment.modes import MODES

    for name in ("rate.json", "curves.json"):
        spec = json.loads((Path(__file__).parent.parent / ".dvc" / "plots" / name).read_text())
        scale = spec["encoding"]["color"]["scale"]
        assert scale["domain"] == list(ORDER), name
        assert scale["range"] == [MODES[m].style[0] if MODES[m].style else "#000000" for m in ORDER], name
