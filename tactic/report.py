"""Rate-accuracy report across seeds: table, plot, CompressAI-format results and BD-accuracy.

For segmentation, `accuracy` is pixel accuracy and mean IoU (`miou`) is reported beside it: a
second column in the table, a rate-mIoU panel beside the rate-accuracy one, BD-mIoU in the summary.
"""
from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path

import numpy as np

from tactic.grid import MODES
from tactic.io import atomic_path, write_json, write_text
from tactic.metrics import bd_accuracy

FIELDS = ("accuracy", "top5", "miou", "bpp", "bpp_estimated", "bpp_file", "psnr")


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


def _curve(points, mode, field="accuracy"):
    ps = sorted((p for p in points if p["mode"] == mode and field in p), key=lambda p: p["bpp"])
    return [p["bpp"] for p in ps], [p[field] for p in ps]


def bd_summary(points: list[dict], rows: list[dict], field: str = "accuracy") -> dict:
    """BD-accuracy (percentage points) of `aware` against `jpeg` and `agnostic`: on the seed-mean curves,
    and per seed (mean and spread), or the reason it could not be computed."""
    out = {}
    for ref in ("jpeg", "agnostic"):
        key = f"bd_{field}_aware_vs_{ref}"
        try:
            out[key] = 100 * bd_accuracy(*_curve(points, ref, field), *_curve(points, "aware", field))
        except ValueError as err:
            out[key] = None
            out[f"{key}_note"] = str(err)
            continue
        per_seed = []
        for seed in sorted({r["seed"] for r in rows}):
            mine = [r for r in rows if r["seed"] == seed]
            try:
                per_seed.append(100 * bd_accuracy(*_curve(mine, ref, field), *_curve(mine, "aware", field)))
            except ValueError:
                pass
        if len(per_seed) > 1:
            out[f"{key}_seed_std"] = float(np.std(per_seed, ddof=1))
    return out


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
    head = (f"| mode | point | seeds | {task[0]} | {task[1]} | bpp (real) | bpp (estimated) | bpp (JPEG file) | PSNR dB |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for p in points:
        point = f"beta={p['beta']}" if p["beta"] is not None else (f"q={p['quality']}" if p["quality"] is not None else "-")
        lines.append(f"| {p['mode']} | {point} | {len(p['seeds'])} | {_fmt(p, 'accuracy', 100, 2)} | "
                     f"{_fmt(p, 'miou' if seg else 'top5', 100, 2)} | "
                     f"{_fmt(p, 'bpp')} | {_fmt(p, 'bpp_estimated')} | {_fmt(p, 'bpp_file')} | {_fmt(p, 'psnr', 1, 2)} |")
    return head + "\n".join(lines) + "\n"


def points_csv(points: list[dict]) -> str:
    buf = io.StringIO()
    cols = ["mode", "beta", "quality", "bpp", "bpp_std", "accuracy", "accuracy_std", "miou", "miou_std", "psnr"]
    w = csv.DictWriter(buf, cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(points)
    return buf.getvalue()


def compressai_results(points: list[dict], mode: str, dataset: str) -> dict:
    """CompressAI's results format, with accuracy beside bpp, so its plotting tools can be reused."""
    ps = sorted((p for p in points if p["mode"] == mode), key=lambda p: p["bpp"])
    results = {k: [p.get(k) for p in ps] for k in ("bpp", "bpp_std", "accuracy", "accuracy_std", "top5", "miou", "miou_std",
                                                   "bpp_estimated", "bpp_file", "psnr")}
    results = {k: v for k, v in results.items() if any(x is not None for x in v)}
    if "psnr" in results:
        results["psnr-rgb"] = results.pop("psnr")
    return {"name": f"tactic-{mode}", "description": f"{mode} on {dataset}, mean over seeds", "results": results}


def plot(points: list[dict], path: Path, title: str) -> None:
    """Rate-accuracy; for segmentation a rate-mIoU panel beside it."""
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
    styles = {"jpeg": ("tab:gray", "s"), "agnostic": ("tab:blue", "o"), "aware": ("tab:red", "^"),
              "latent-frozen": ("tab:green", "D"), "latent-joint": ("tab:purple", "v"), "pixel-decoded": ("tab:orange", "P")}
    for ax, (field, ylabel) in zip(axes[0], panels):
        for mode, (color, marker) in styles.items():
            ps = sorted((p for p in points if p["mode"] == mode and field in p), key=lambda p: p["bpp"])
            if ps:
                ax.errorbar([p["bpp"] for p in ps], [100 * p[field] for p in ps], xerr=[p["bpp_std"] for p in ps],
                            yerr=[100 * p[f"{field}_std"] for p in ps], color=color, marker=marker, capsize=3, label=mode)
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
    plt.close(fig)


def write_report(rows: list[dict], out: Path, title: str, dataset: str) -> dict:
    """Everything the report stage writes under `out`; returns the summary (the DVC metrics)."""
    points = aggregate(rows)
    summary = {"num_runs": len(rows), **bd_summary(points, rows)}
    if _segmentation(points):
        summary.update(bd_summary(points, rows, "miou"))
    for p in points:
        if p["mode"] == "uncompressed":
            summary["uncompressed_accuracy"] = p.get("accuracy")
            if "miou" in p:
                summary["uncompressed_miou"] = p["miou"]
    write_text(out / "table.md", table(points))
    write_text(out / "points.csv", points_csv(points))
    write_json(out / "points.json", points)
    for mode in MODES:
        if any(p["mode"] == mode for p in points):
            write_json(out / "compressai" / f"{mode}.json", compressai_results(points, mode, dataset))
    plot(points, out / "rate_accuracy.png", title)
    write_json(out / "summary.json", summary)
    return summary
