"""Stage `weights`: the hash of every file params name (task weights, codec checkpoints), one file per
param in data/weights/, so the stages that read a file re-run when its contents change.

    python -m stages.weights [--out data/weights]

DVC tracks params by value: a weights file rewritten in place keeps its path, so without this stage
`dvc repro` would keep models trained from the old contents. The stage always runs (it only hashes);
what depends on it re-runs only when a hash changes.
"""
from stages.server import handoff

handoff(__name__)  # into a preloaded stage server, when one runs (stages/server.py)

import argparse
from pathlib import Path

from stages import cli
from tactic.io import sha256, write_json


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("data/weights"))
    args, p = cli.parse(ap, argv)
    for param, files in p.weight_files().items():
        for f in files:
            if not Path(f).is_file():
                raise FileNotFoundError(f"{param}: no such file {f}")
        write_json(args.out / f"{param}.json", {f: sha256(Path(f)) for f in files})


if __name__ == "__main__":
    cli.run(main)
