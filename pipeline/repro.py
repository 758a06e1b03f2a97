"""`dvc repro` with DVC's lock file read and written by libyaml: the same stages, the same `dvc.lock`.

    python -m pipeline.repro [dvc repro options]      # what `make run`, the flow's tasks and KFP's run

After every stage DVC re-reads and rewrites the whole `dvc.lock` with ruamel's round-trip YAML
(pure Python, kept so comments in hand-edited YAML survive), so its bookkeeping grows with the lock,
and a run's with the square of its stages (treeverse/dvc#10629). The default profile's lock reaches
132 KB (61 stages, 786 dependency entries): 1.7 s to parse and 1.0 s to write at the end of the run,
on a 2-core machine. DVC alone writes that file and it holds no comments, so here it is read as DVC
reads it everywhere else (ruamel's safe loader, libyaml's C parser: 0.3 s) and written by libyaml's
emitter (0.1 s) with ruamel's YAML 1.2 rules for what a plain value means: the same data in the same
layout (only a string too long for one line may wrap at another word; tests/test_repro.py compares
the two writers). Every other file DVC edits (dvc.yaml, its config) keeps DVC's round-trip writer,
and plain `dvc repro` stays a complete alternative: it reads and writes the same lock, only slower.
"""
from __future__ import annotations

import math
import os
import sys
from collections import OrderedDict

import yaml
from ruamel.yaml.resolver import implicit_resolvers

LOCK_NAME = "dvc.lock"


class _LockDumper(yaml.CSafeDumper):
    """libyaml's emitter, writing what ruamel's (YAML 1.2) loader reads back unchanged, as ruamel spells it.

    PyYAML decides which strings need quotes by YAML 1.1's implicit types, under which `yes` is a
    boolean while `0o17`, `1e5` are strings; DVC reads with YAML 1.2, where it is the other way round.
    So the quoting follows ruamel's own 1.2 resolvers, and floats and nulls are spelled as ruamel
    writes them (`1e-05`, an empty value)."""
    yaml_implicit_resolvers: dict = {}


for _versions, _tag, _regexp, _first in implicit_resolvers:
    if (1, 2) in _versions:
        _LockDumper.add_implicit_resolver(_tag, _regexp, _first)


def _float(dumper, value: float):
    text = (".nan" if math.isnan(value) else ".inf" if value == math.inf else "-.inf" if value == -math.inf
            else repr(value).lower())
    return dumper.represent_scalar("tag:yaml.org,2002:float", text)


_LockDumper.add_representer(float, _float)
_LockDumper.add_representer(type(None), lambda dumper, _: dumper.represent_scalar("tag:yaml.org,2002:null", ""))
_LockDumper.add_representer(OrderedDict, yaml.SafeDumper.represent_dict)  # as DVC's writer does


def dump_lock(data, stream) -> None:
    try:
        text = yaml.dump(data, Dumper=_LockDumper, default_flow_style=False, sort_keys=False, allow_unicode=True)
    except yaml.representer.RepresenterError:  # a type libyaml's safe writer does not know: DVC's own writer
        from dvc.utils.serialize._yaml import _dump

        return _dump(data, stream)
    stream.write(text)


def use_fast_lock() -> None:
    """Route DVC's edits of `dvc.lock` through libyaml (idempotent); other files keep DVC's writer.
    Raises ImportError or AttributeError where DVC's internals are not where DVC 3.67 has them."""
    import dvc.dvcfile
    from dvc.utils.serialize._common import _modify_data
    from dvc.utils.serialize._yaml import parse_yaml  # typ="safe": as DVC reads the lock before it runs anything

    original = getattr(dvc.dvcfile.modify_yaml, "dvc_modify_yaml", dvc.dvcfile.modify_yaml)

    def modify_yaml(path, fs=None):
        if os.path.basename(os.fspath(path)) != LOCK_NAME:
            return original(path, fs=fs)
        return _modify_data(path, parse_yaml, dump_lock, fs=fs)

    modify_yaml.dvc_modify_yaml = original
    dvc.dvcfile.modify_yaml = modify_yaml


def main(argv=None) -> int:
    from dvc.cli import main as dvc_main

    try:
        use_fast_lock()
    except (ImportError, AttributeError) as err:  # another DVC than pyproject pins: its own writer, said once
        print(f"pipeline.repro: DVC's lock writer left as it is ({type(err).__name__}: {err})", file=sys.stderr)
    return dvc_main(["repro", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
