"""The `tactic` command: `tactic compare ...` (tactic.compare), `tactic profile NAME` (tactic.profiles),
`tactic runs [clean]` (tactic.runs), `tactic datasets check DATASET ROOT` (tactic.data.check)."""
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"compare": "tactic.compare", "profile": "tactic.profiles", "runs": "tactic.runs", "datasets": "tactic.data.check"}
    if not argv or argv[0] not in commands:
        print(f"usage: tactic {{{','.join(commands)}}} [--help]", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
