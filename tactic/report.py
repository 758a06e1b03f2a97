"""Rate-accuracy report across seeds: table, plot, CompressAI-format results and BD-accuracy.

For segmentation, `accuracy` is pixel accuracy and mean IoU (`miou`) is reported beside it: a
second column in the table, a rate-mIoU panel beside the rate-accuracy one, BD-mIoU in the summary.
"""
from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from tactic import tracking
from tactic.experiment.grid import MODES
from tactic.experiment.modes import MODES as MODE_TABLE
from tactic.io import atomic_path, write_json, write_text
from tactic.metrics import ALL_TEST_METRICS as FIELDS
from tactic.metrics import BD_METHODS, accuracy_at_rate, accuracy_read_at, at_chance, bd_accuracy, bd_rate, rate_at_accuracy


def aggregate(rows: list[dict]) -> list[dict]:
    """One point per (mode, operating point): mean and sample standard deviation over seeds."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["mode"], r.get("beta"), r.get("quality"))].append(r)
    points = []
    for (mode, beta, quality), rs in groups.items():
        p = {"mode": mode, "beta": beta, "quality": quality, "seeds": sorted(r["seed"] for r in rs)}
        for f in FIELDS:
            vals = [r[f] for r in rs if r.get(f) is not None]
            if vals:
                p[f] = float(np.mean(vals))
                p[f"{f}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        points.append(p)
    order = {m: i for i, m in enumerate(MODES)}
    return sorted(points, key=lambda p: (order.get(p["mode"], 99), p["beta"] or 0, p["quality"] or 0))


def point_label(r: dict) -> str:
    """A run's or point's operating point as the tables name it: beta=<b>, q=<quality> or -."""
    return f"beta={r['beta']}" if r.get("beta") is not None else f"q={r['quality']}" if r.get("quality") is not None else "-"


def _gain_key(field: str, mode: str, ref: str, p: dict) -> str:
    """The summary key of `mode`'s gain over `ref` at point `p`; MLflow's metric names (the report logs
    the summary) allow no '=' or '@', so beta=0.4 is written beta_0.4 (`_gain_label` reads it back)."""
    return f"gain_{field}_{mode}_vs_{ref}_at_{point_label(p).replace('=', '_')}"


def _gain_label(key: str, field: str) -> str:
    return (key.removeprefix(f"gain_{field}_").replace("_vs_", " vs ")
            .replace("_at_beta_", " at beta=").replace("_at_q_", " at q="))


def _curve(points, mode, field="accuracy"):
    ps = sorted((p for p in points if p["mode"] == mode and field in p), key=lambda p: p["bpp"])
    return [p["bpp"] for p in ps], [p[field] for p in ps]


# (mode, reference) pairs compared wherever both modes ran: TACTIC's, then the compressed-domain ones.
# BD comparisons: each mode against its references (tactic.experiment.modes), in mode order.
PAIRS = tuple((name, ref) for name, mode in MODE_TABLE.items() for ref in mode.references)
MATCH_TOLERANCE = 0.01  # "within 1 point of JPEG's accuracy at its lowest rate"


def comparisons(points: list[dict], field: str = "accuracy") -> tuple[dict, dict]:
    """Each mode against its references on one set of curves: (figures, notes saying why a figure is None).

    - bd_<field>_<mode>_vs_<ref>: BD-accuracy (percentage points) over the overlapping rate range;
    - bdrate_<field>_<mode>_vs_<ref>: BD-rate (%) over the overlapping accuracy range;
      both with piecewise-linear interpolation, and with `_pchip` (tactic.metrics.bd_accuracy) beside;
    - gain_<field>_<mode>_vs_<ref>_at_<beta|q>_<value>: at each of the mode's operating points, its accuracy minus
      the reference's read at the same rate (percentage points): where along the curve a BD figure,
      which averages over the whole overlap, comes from;
    and, with `aware` and `jpeg`, at JPEG's lowest rate (its cheapest operating point), which learned
    codecs often undercut, so that a comparison exists where the rate ranges do not overlap:
    - jpeg_min_rate, jpeg_min_rate_<field>: that point;
    - <mode>_<field>_at_jpeg_min_rate: the best accuracy a codec mode reaches with no more bits;
    - <mode>_rate_for_jpeg_min_<field>[_within_1pt]: the lowest rate at which it reaches JPEG's
      accuracy there (or comes within 1 point of it), and `_ratio`, that rate over JPEG's;
    - jpeg_min_rate_psnr, <mode>_psnr_at_jpeg_min_rate: reconstruction quality at that rate
      (interpolated in log rate between a mode's points; None outside them).
    """
    out, notes = {}, {}

    def put(key, fn, *args):
        try:
            out[key] = fn(*args)
        except ValueError as err:
            out[key], notes[key] = None, str(err)

    scale = 100  # accuracies as percentage points
    modes = {p["mode"] for p in points}
    for mode, ref in PAIRS:
        if mode in modes and ref in modes:
            curve, ref_curve = _curve(points, mode, field), _curve(points, ref, field)
            for method in BD_METHODS:  # linear as the headline figure, pchip beside it
                suffix = "" if method == "linear" else f"_{method}"
                put(f"bd_{field}_{mode}_vs_{ref}{suffix}", lambda: scale * bd_accuracy(*ref_curve, *curve, method=method))
                put(f"bdrate_{field}_{mode}_vs_{ref}{suffix}", lambda: bd_rate(*ref_curve, *curve, method=method))
            for p in (p for p in points if p["mode"] == mode and field in p):
                put(_gain_key(field, mode, ref, p), lambda: scale * (p[field] - accuracy_read_at(*ref_curve, p["bpp"])))
    jpeg = [p for p in points if p["mode"] == "jpeg" and field in p]
    if not jpeg or "aware" not in modes:
        return out, notes
    cheapest = min(jpeg, key=lambda p: p["bpp"])
    out["jpeg_min_rate"], out[f"jpeg_min_rate_{field}"] = cheapest["bpp"], cheapest[field]
    if field == "accuracy" and cheapest.get("psnr") is not None:
        out["jpeg_min_rate_psnr"] = cheapest["psnr"]
    for mode in ("aware", "agnostic"):
        if field == "accuracy":
            key = f"{mode}_psnr_at_jpeg_min_rate"
            rate, db = _curve(points, mode, "psnr")
            inside = len(rate) > 1 and rate[0] <= cheapest["bpp"] <= rate[-1]
            out[key] = float(np.interp(np.log10(cheapest["bpp"]), np.log10(rate), db)) if inside else None
            if not inside:
                notes[key] = f"{mode}'s points do not span JPEG's lowest rate ({cheapest['bpp']:.3g} bpp)"
        curve = _curve(points, mode, field)
        key = f"{mode}_{field}_at_jpeg_min_rate"
        put(key, accuracy_at_rate, *curve, cheapest["bpp"])
        if out[key] is None and key not in notes:
            notes[key] = f"every {mode} point is above JPEG's lowest rate ({cheapest['bpp']:.3g} bpp)"
        for suffix, target in (("", cheapest[field]), ("_within_1pt", cheapest[field] - MATCH_TOLERANCE)):
            key = f"{mode}_rate_for_jpeg_min_{field}{suffix}"
            put(key, rate_at_accuracy, *curve, target)
            if out[key] is None and key not in notes:
                notes[key] = f"{mode} never reaches {scale * target:.2f} % (its best: {scale * max(curve[1]):.2f} %)"
            out[f"{key}_ratio"] = None if out[key] is None else out[key] / cheapest["bpp"]
            if key in notes:
                notes[f"{key}_ratio"] = notes[key]
    return out, notes


def bd_summary(points: list[dict], rows: list[dict], field: str = "accuracy") -> dict:
    """`comparisons` on the seed-mean curves, with each figure's sample std over the per-seed curves.

    A figure that cannot be computed is None with a `_note` saying why; a seed whose own curves do
    not give a figure is listed under `_seeds_left_out` with the reason, never dropped silently."""
    out, notes = comparisons(points, field)
    seeds = sorted({r["seed"] for r in rows})
    per_seed = {seed: comparisons([r for r in rows if r["seed"] == seed], field) for seed in seeds}
    summary = {}
    for key, value in out.items():
        summary[key] = value
        if key in notes:
            summary[f"{key}_note"] = notes[key]
        if key == "jpeg_min_rate" or len(seeds) < 2:
            continue  # JPEG's rate is the same for every seed
        values = {s: per_seed[s][0].get(key) for s in seeds}
        kept = [v for v in values.values() if v is not None]
        if len(kept) > 1:
            summary[f"{key}_seed_std"] = float(np.std(kept, ddof=1))
        left_out = {str(s): per_seed[s][1].get(key, "no figure") for s, v in values.items() if v is None}
        if left_out and value is not None:
            summary[f"{key}_seeds_left_out"] = left_out
    return summary


def runs_at_chance(rows: list[dict]) -> list[str]:
    """Classification runs whose test accuracy is at chance (metrics.at_chance). Flagged, not failed:
    such a point is a finding at a very low rate, and a symptom of divergence at any other."""
    return [r["run"] for r in rows if r.get("num_classes", 0) > 1 and r.get("num_images") and "miou" not in r
            and r.get("accuracy") is not None and at_chance(r["accuracy"], r["num_classes"], r["num_images"])]


def _fmt(p, f, scale=1.0, digits=3):
    if f not in p:
        return "-"
    if len(p["seeds"]) < 2:  # one seed has no spread to show (its std is unknown, not 0)
        return f"{p[f] * scale:.{digits}f}"
    return f"{p[f] * scale:.{digits}f} ± {p[f + '_std'] * scale:.{digits}f}"


def _segmentation(points) -> bool:
    return any("miou" in p for p in points)


def table(points: list[dict]) -> str:
    seg = _segmentation(points)
    task = ("pixel acc. %", "mIoU %") if seg else ("top-1 %", "top-5 %")
    msssim = any("msssim" in p for p in points)  # only images of 161 pixels a side or more have one
    head = (f"| mode | point | seeds | {task[0]} | {task[1]} | bpp (real) | bpp (estimated) | bpp (JPEG file) | PSNR dB |"
            f"{' MS-SSIM |' if msssim else ''}\n|---|---|---|---|---|---|---|---|---|{'---|' if msssim else ''}\n")
    lines = []
    for p in points:
        point = point_label(p)
        lines.append(f"| {p['mode']} | {point} | {len(p['seeds'])} | {_fmt(p, 'accuracy', 100, 2)} | "
                     f"{_fmt(p, 'miou' if seg else 'top5', 100, 2)} | "
                     f"{_fmt(p, 'bpp')} | {_fmt(p, 'bpp_estimated')} | {_fmt(p, 'bpp_file')} | {_fmt(p, 'psnr', 1, 2)} |"
                     + (f" {_fmt(p, 'msssim', 1, 4)} |" if msssim else ""))
    return head + "\n".join(lines) + "\n"


def points_csv(points: list[dict]) -> str:
    """One row per operating point (means and spreads over seeds): DVC's rate plots read it."""
    buf = io.StringIO()
    cols = ["mode", "beta", "quality", "bpp", "bpp_std", "accuracy", "accuracy_std", "miou", "miou_std", "psnr", "psnr_std",
            "msssim"]
    w = csv.DictWriter(buf, cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(points)
    return buf.getvalue()


def point_metrics(points: list[dict]) -> dict:
    """{mode: {point: {figure: value}}}: every operating point's mean and spread over seeds, as DVC
    metrics (`dvc exp show` makes a column of each, `dvc metrics diff` compares two experiments)."""
    out = {}
    for p in points:
        point = point_label(p)
        out.setdefault(p["mode"], {})[point] = {k: round(p[k], 6) for k in
                                                 ("accuracy", "accuracy_std", "miou", "miou_std", "top5", "bpp", "bpp_std", "psnr", "msssim")
                                                 if p.get(k) is not None}
    return out


def compressai_results(points: list[dict], mode: str, dataset: str) -> dict:
    """CompressAI's results format, with accuracy beside bpp, so its plotting tools can be reused."""
    ps = sorted((p for p in points if p["mode"] == mode), key=lambda p: p["bpp"])
    results = {k: [p.get(k) for p in ps] for k in ("bpp", "bpp_std", "accuracy", "accuracy_std", "top5", "miou", "miou_std",
                                                   "bpp_estimated", "bpp_file", "psnr", "msssim")}
    results = {k: v for k, v in results.items() if any(x is not None for x in v)}
    for ours, theirs in (("psnr", "psnr-rgb"), ("msssim", "ms-ssim-rgb")):  # CompressAI's names (8-bit, as theirs)
        if ours in results:
            results[theirs] = results.pop(ours)
    return {"name": f"tactic-{mode}", "description": f"{mode} on {dataset}, mean over seeds", "results": results}


_SUFFIXES = ("_note", "_seed_std", "_seeds_left_out")  # what bd_summary adds beside a figure's key


def headline(summary: dict, field: str = "accuracy") -> str:
    """The comparisons of `bd_summary` as a markdown table: figure, value on the seed-mean curves,
    spread over seeds, and the reason where a figure is missing or a seed was left out."""
    name = {"accuracy": "accuracy", "miou": "mIoU"}[field]
    rows = [(f"uncompressed_{field}", f"uncompressed {name} (%)", ".2f")]
    for suffix, method in (("", "linear"), ("_pchip", "pchip")):
        rows += [(f"bd_{field}_{m}_vs_{r}{suffix}", f"BD-{name} {m} vs {r} (points, {method})", ".2f") for m, r in PAIRS]
    for suffix, method in (("", "linear"), ("_pchip", "pchip")):
        rows += [(f"bdrate_{field}_{m}_vs_{r}{suffix}", f"BD-rate {m} vs {r} at equal {name} (%, {method})", ".1f")
                 for m, r in PAIRS]
    gains = [key for key in summary if key.startswith(f"gain_{field}_") and not key.endswith(_SUFFIXES)]
    rows += [(key, f"{name} gain {_gain_label(key, field)}, at the same rate (points)", ".2f") for key in gains if summary[key] is not None]
    rows += [("jpeg_min_rate", "JPEG's lowest rate (bpp)", ".3f"),
            (f"jpeg_min_rate_{field}", f"JPEG's {name} there (%)", ".2f"),
            (f"aware_{field}_at_jpeg_min_rate", f"aware's best {name} at or below that rate (%)", ".2f"),
            (f"agnostic_{field}_at_jpeg_min_rate", f"agnostic's best {name} at or below that rate (%)", ".2f"),
            ("jpeg_min_rate_psnr", "JPEG's PSNR there (dB)", ".2f"),
            ("agnostic_psnr_at_jpeg_min_rate", "agnostic's PSNR at that rate (dB)", ".2f"),
            ("aware_psnr_at_jpeg_min_rate", "aware's PSNR at that rate (dB)", ".2f"),
            (f"aware_rate_for_jpeg_min_{field}_ratio", f"aware's rate to reach JPEG's lowest-rate {name}, / JPEG's rate", ".2f"),
            (f"aware_rate_for_jpeg_min_{field}_within_1pt_ratio", "... to come within 1 point of it, / JPEG's rate", ".2f")]
    lines = ["| figure | value | spread over seeds | note |", "|---|---|---|---|"]
    for key, label, fmt in rows:
        if key not in summary:
            continue
        # BD-accuracy is stored in points already; accuracies as fractions; rates and ratios as they are.
        value, scale = summary[key], 100 if key.startswith(("uncompressed_", "jpeg_min_rate_" + field, "aware_" + field, "agnostic_" + field)) else 1
        std = summary.get(f"{key}_seed_std")
        note = summary.get(f"{key}_note", "")
        if f"{key}_seeds_left_out" in summary:
            note += "; seeds left out: " + ", ".join(f"{s} ({why})" for s, why in summary[f"{key}_seeds_left_out"].items())
        lines.append(f"| {label} | {'-' if value is None else format(scale * value, fmt)} | "
                     f"{'-' if std is None else '± ' + format(scale * std, fmt)} | {note.lstrip('; ')} |")
    outside = [_gain_label(key, field) for key in gains if summary[key] is None]
    if outside:  # a point beyond the reference's rates has no gain at the same rate (summary.json: why, per key)
        lines.append(f"\nNo {name} gain at the same rate (the point lies outside the reference's rates): {'; '.join(outside)}")
    if field == "accuracy" and summary.get("runs_at_chance"):
        lines.append(f"\n**At chance accuracy** (not above 1/classes by 3 standard errors), check these runs: "
                     f"{', '.join(summary['runs_at_chance'])}")
    return "\n".join(lines) + "\n"


def curves_csv(rows: list[dict]) -> str:
    """Every evaluated run's per-epoch training log (its validation scores and losses), one row per
    run and epoch: DVC's training-curve plot reads it, one line per run, coloured by mode."""
    keep = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_miou", "val_psnr", "val_bpp_loss")
    buf = io.StringIO()
    w = csv.DictWriter(buf, ["run", "mode", "point", "seed", *keep], extrasaction="ignore")
    w.writeheader()
    for r in rows:
        point = point_label(r)
        for epoch in r.get("history", []):
            w.writerow({"run": r["run"], "mode": r["mode"], "point": point, "seed": r["seed"],
                        **{k: epoch[k] for k in keep if epoch.get(k) is not None}})
    return buf.getvalue()


def plot(points: list[dict], path: Path, title: str, log_figure=None) -> None:
    """Rate-accuracy; for segmentation a rate-mIoU panel beside it. JPEG's lowest rate and its
    accuracy there are marked: the matched-rate comparison where the rate ranges do not overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatterSciNotation

    class Decimals(LogFormatterSciNotation):
        """The ticks matplotlib would label, as 0.25 rather than 2.5x10^-1 (unreadable when crowded)."""
        def __call__(self, x, pos=None):
            return f"{x:.3g}" if super().__call__(x, pos) else ""

    panels = [("accuracy", "pixel accuracy (%)"), ("miou", "mean IoU (%)")] if _segmentation(points) else [("accuracy", "top-1 accuracy (%)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), dpi=120, squeeze=False)
    styles = {name: mode.style for name, mode in MODE_TABLE.items() if mode.style}
    for ax, (field, ylabel) in zip(axes[0], panels):
        for mode, (color, marker) in styles.items():
            ps = sorted((p for p in points if p["mode"] == mode and field in p), key=lambda p: p["bpp"])
            if ps:
                ax.errorbar([p["bpp"] for p in ps], [100 * p[field] for p in ps], xerr=[p["bpp_std"] for p in ps],
                            yerr=[100 * p[f"{field}_std"] for p in ps], color=color, marker=marker, capsize=3, label=mode)
        jpeg = [p for p in points if p["mode"] == "jpeg" and field in p]
        if jpeg:
            cheapest = min(jpeg, key=lambda p: p["bpp"])
            ax.axvline(cheapest["bpp"], color="tab:gray", ls=":", lw=1)
            ax.axhline(100 * cheapest[field], color="tab:gray", ls=":", lw=1,
                       label=f"JPEG's lowest rate (q={cheapest['quality']}) and its accuracy")
        for p in points:
            if p["mode"] == "uncompressed" and field in p:
                ax.axhline(100 * p[field], color="k", ls="--", lw=1, label=f"uncompressed ({p['bpp']:.0f} bpp)")
                ax.axhspan(100 * (p[field] - p[f"{field}_std"]), 100 * (p[field] + p[f"{field}_std"]), color="k", alpha=0.08)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(Decimals())
        ax.xaxis.set_minor_formatter(Decimals(labelOnlyBase=False))
        ax.set_xlabel("bits per pixel (real bitstreams; JPEG: entropy-coded scan)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    if log_figure:
        log_figure(fig, path.name)
    plt.close(fig)


def write_report(rows: list[dict], out: Path, title: str, dataset: str, log_figure=None) -> dict:
    """Everything the report stage writes under `out`; returns the summary (the DVC metrics).
    `log_figure(figure, name)` also receives the rate-accuracy figure (MLflow's `log_figure`)."""
    points = aggregate(rows)
    summary = {"num_runs": len(rows), "runs_at_chance": runs_at_chance(rows), **bd_summary(points, rows)}
    fields = ["accuracy"]
    if _segmentation(points):
        summary.update(bd_summary(points, rows, "miou"))
        fields.append("miou")
    for p in points:
        if p["mode"] == "uncompressed":
            summary["uncompressed_accuracy"] = p.get("accuracy")
            if "miou" in p:
                summary["uncompressed_miou"] = p["miou"]
    write_text(out / "table.md", table(points))
    write_text(out / "summary.md", "\n".join(headline(summary, f) for f in fields))
    write_text(out / "points.csv", points_csv(points))
    write_text(out / "curves.csv", curves_csv(rows))
    write_json(out / "points.json", points)
    write_json(out / "points_metrics.json", point_metrics(points))
    for mode in MODES:
        if any(p["mode"] == mode for p in points):
            write_json(out / "compressai" / f"{mode}.json", compressai_results(points, mode, dataset))
    plot(points, out / "rate_accuracy.png", title, log_figure)
    write_json(out / "summary.json", summary)
    return summary


def report_tracked(eval_json: Path, out: Path, title: str, dataset: str) -> dict:
    """The `report` stage: results/eval.json -> the report files under `out`, inside an MLflow run
    that logs the summary's figures and the files."""
    rows = json.loads(Path(eval_json).read_text())
    with tracking.start_run("report", "report", {"stage": "report", "num_runs": len(rows)}):
        summary = write_report(rows, out, title, dataset, tracking.log_figure)
        tracking.log_metrics({**{k: v for k, v in summary.items() if isinstance(v, (int, float))},
                              "num_runs_at_chance": len(summary["runs_at_chance"])})
        for name in ("table.md", "summary.md", "summary.json", "points.csv", "curves.csv"):
            tracking.log_artifact(out / name)
    return summary
