"""The `tactic` command.

    tactic compare ...                  operating points across seeds, from MLflow (tactic.compare)
    tactic profile NAME                 merge profiles/NAME.yaml into params.yaml (tactic.profiles)
    tactic runs [clean]                 MLflow runs left RUNNING; end those whose process is gone (tactic.runs)
    tactic datasets check DATASET ROOT  a dataset's layout, counts and every image, before a long run (tactic.data.check)
    tactic codec compress|decompress --model M IN OUT   a trained codec on an image file (tactic.codecs.tool)
    tactic kubeflow compile [--profile NAME] -o tactic.yaml   the stages as a Kubeflow pipeline (pipeline.kubeflow)
    tactic kubeflow run-local [--profile NAME]                 the same graph run here through kfp.local

Exit status: 0 on success, 1 when the command ran and found a problem (or failed), 2 for usage errors.
"""
import sys

COMMANDS = {"compare": "tactic.compare", "profile": "tactic.profiles", "runs": "tactic.runs", "datasets": "tactic.data.check",
            "codec": "tactic.codecs.tool",
            "kubeflow": "pipeline.kubeflow"}  # the one command above the library: it needs the optional kfp


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("tactic")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if argv[:1] == ["--version"]:
        print(f"tactic {version()}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: tactic {{{','.join(COMMANDS)}}} [--help] | --help | --version", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
