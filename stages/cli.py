"""What every stage entry point shares: the params file option, validation first, clear errors."""
import argparse
import sys
import warnings
from pathlib import Path

from tactic.config import DEFAULT_PARAMS, ParamsError, Params, load_params

# CompressAI 1.2.8 scripts a helper at import time; torch 2.14 warns about it in every stage's log.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)


def parse(ap: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, Params]:
    ap.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: the repo's params.yaml)")
    args = ap.parse_args(argv)
    return args, load_params(args.params)


def run(main) -> None:
    """Run a stage's main(); expected failures (bad params, missing data) print one clear line, no traceback."""
    from tactic.data.errors import DatasetError
    from tactic.data.prepared import PreparedDataError
    from tactic.train import DivergenceError

    try:
        main()
    except (ParamsError, DatasetError, PreparedDataError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except DivergenceError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)
