"""Profiles: named sets of params (files in profiles/) merged over params.yaml.

    tactic profile smoke          # merge profiles/smoke.yaml into params.yaml (comments kept), then `dvc repro`
    make run PROFILE=segmentation # the same, then the whole pipeline

The Prefect flow applies its `profile` parameter the same way. A profile overrides what it names and
leaves the rest of params.yaml as it is; `git checkout params.yaml` returns to the committed default.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Optional

import yaml

from tactic.config import ROOT, ParamsError, merged, parse_params
from tactic.io import write_text

PROFILES = ROOT / "profiles"


def resolve_params(root: Path, profile: Optional[str] = None, dataset: Optional[str] = None, seeds: Optional[list] = None,
                   betas: Optional[list] = None, params: Optional[dict] = None) -> dict:
    """params.yaml with the profile and overrides merged in, validated; raises ParamsError naming the key."""
    raw = yaml.safe_load((root / "params.yaml").read_text()) or {}
    if profile:
        file = PROFILES / f"{profile}.yaml"
        if not file.is_file():
            known = sorted(f.stem for f in PROFILES.glob("*.yaml"))
            raise ParamsError(f"profile: unknown {profile!r}; one of {known}")
        raw = merged(raw, yaml.safe_load(file.read_text()) or {})
    overrides = dict(params or {})
    if dataset is not None:
        overrides = merged(overrides, {"prepare": {"dataset": dataset}})
    if seeds is not None:
        overrides["seeds"] = seeds
    if betas is not None:
        overrides["betas"] = betas
    raw = merged(raw, overrides)
    parse_params(raw, source="flow parameters")
    return raw


def write_params(path: Path, raw: dict) -> None:
    """Write `raw` into the params file if it differs, keeping the file's comments and key order."""
    from ruamel.yaml import YAML

    ry = YAML()
    doc = ry.load(path.read_text())
    if doc == raw:
        return

    def update(node, new):
        for k in list(node):
            if k not in new:
                del node[k]
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(node.get(k), dict):
                update(node[k], v)
            elif node.get(k) != v:
                node[k] = v

    update(doc, raw)
    buf = io.StringIO()
    ry.dump(doc, buf)
    write_text(path, buf.getvalue())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tactic profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help=f"one of {sorted(f.stem for f in PROFILES.glob('*.yaml'))}")
    # Like dvc, the params.yaml of the directory it runs in: a second checkout sharing this
    # installation must not rewrite the first one's.
    ap.add_argument("--params", type=Path, help="default: ./params.yaml, else the installed checkout's")
    args = ap.parse_args(argv)
    if args.params is None:
        args.params = Path("params.yaml") if Path("params.yaml").is_file() else ROOT / "params.yaml"
    try:
        raw = resolve_params(args.params.parent, args.name)
    except ParamsError as err:  # an unknown profile, or one that does not validate: a runtime error
        print(f"error: {err}", file=sys.stderr)
        return 1
    write_params(args.params, raw)
    print(f"{args.params}: profile {args.name} applied")
    return 0
