"""What every stage entry point shares: the params file option, validation first, clear errors."""
import argparse
import os
import signal
import sys
import warnings
from pathlib import Path

from tactic.config import DEFAULT_PARAMS, Params, load_params

# CompressAI 1.2.8 scripts a helper at import time; torch 2.14 warns about it in every stage's log.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)


def parse(ap: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, Params]:
    ap.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: the repo's params.yaml)")
    args = ap.parse_args(argv)
    return args, load_params(args.params)


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception, so cleanup runs (temporaries removed, the MLflow run ended KILLED)."""


_MAIN_PID = None  # the stage's own process; forked workers (prepare's decoding pool) inherit the handler


def _terminate(signum, frame):
    if os.getpid() != _MAIN_PID:  # a worker that its pool terminates: die as SIGTERM would, no unwinding
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise Terminated("SIGTERM")


def run(main) -> None:
    """Run a stage's main(); expected failures (tactic.errors.TacticError: bad params, missing data,
    unusable files; a missing file; divergence) print one clear line, no traceback. Anything else is
    a bug and shows its traceback. SIGTERM unwinds like Ctrl-C, then ends the process by that signal."""
    from tactic.errors import TacticError
    from tactic.experiment.train import DivergenceError

    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except Terminated:
        print("terminated (SIGTERM): nothing half-written kept; training resumes from its last checkpoint", file=sys.stderr)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    except (TacticError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except DivergenceError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)
