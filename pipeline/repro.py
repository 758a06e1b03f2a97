"""`dvc repro` with DVC's lock file read and written by libyaml: the same stages, the same `dvc.lock`.

    python -m pipeline.repro [dvc repro options]      # what the flow's tasks and KFP's run
    python -m pipeline.repro --jobs auto              # what `make run` runs: the stages, one per core at a time

`--jobs N` (or `auto`, below) runs the stages of DVC's graph N at a time (`parallel`), each as
`pipeline.repro -s <stage>`: DVC's semantics, stage by stage. On 2 cores two single-threaded
stages at once do 1.3-1.5x the training of one stage on both cores (benchmarks/train_step.py);
the results then come from torch at cores // N threads, which rounds differently from 2 threads
in the last bits of a float (`threads` in params.yaml fixes the count for every runner).

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

from stages.server import handoff

handoff(__name__)  # into the stage server, which has DVC imported, when one runs (stages/server.py)

import math
import os
import sys
import time
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


def parallel(root: str, jobs: int) -> int:
    """Every stage of DVC's graph, `jobs` at a time: each as `python -m pipeline.repro -s <stage>` (so
    DVC decides, stage by stage, what is up to date and records it in dvc.lock, as `dvc repro` does)
    once the stages it needs have ended, but for those DVC would skip (`still_fresh`: up to date at
    the start, nothing they need changed since); DVC's lock conflicts between them are retried
    (`run_dvc_stage`). Each stage gets cores // jobs torch threads (`TACTIC_THREADS`; a stage nothing
    can run beside, `evaluate` or `report`, gets them all). Stages that more stages wait on start
    first, then those deeper in the graph, so the short leaves (JPEG, uncompressed) fill the end.
    After a failure no stage starts; those running end, and the run exits 1 with the failed
    stage's output. A stage never outlives this process (`run_guarded`)."""
    import concurrent.futures as cf

    from pipeline.stages import (RETRIED, StageFailed, dvc_graph, fresh_at_start, lock_outs, run_dvc_stage, stage_env,
                                 stage_priority, stage_threads, still_fresh)
    from stages import server

    started = time.monotonic()
    if os.environ.get(server.DISABLE) != "0":
        # As `make run` and the flow do: without it every stage pays its imports (the default profile,
        # 2 jobs, in fresh copies: 539.5 s, against 312.5 s served). It preloads while the first
        # stages run as plain processes, and exits after 10 idle minutes.
        server.start(idle=600, wait=0)
    graph = dvc_graph(root)
    threads = stage_threads(graph, jobs)
    priority = stage_priority(graph)
    fresh = fresh_at_start(root, graph)
    statuses: dict[str, str] = {}
    running: dict[cf.Future, str] = {}
    failed: list[StageFailed] = []

    def start(pool, name):
        env = stage_env({"TACTIC_THREADS": threads[name]})
        running[pool.submit(run_dvc_stage, name, root, env)] = name
        print(f"[{len(statuses) + len(running)}/{len(graph)}] {name} started", flush=True)

    with cf.ThreadPoolExecutor(jobs) as pool:
        try:
            while True:
                ready = [name for name in graph if name not in statuses and name not in running.values()
                         and all(statuses.get(n) in ("ran", "skipped") for n in graph[name])]
                candidates = [] if failed else [name for name in ready if fresh[name] is not None]
                now = lock_outs(root) if any(fresh[name] for name in candidates) else {}  # one read for them all
                skip = [name for name in candidates if still_fresh(fresh[name], now)]
                for name in skip:  # no DVC process for what DVC would skip; what needs it may now be ready
                    statuses[name] = "skipped"
                    print(f"[{len(statuses) + len(running)}/{len(graph)}] {name} up to date", flush=True)
                if skip:
                    continue
                for name in sorted(ready, key=lambda n: -priority[n])[:0 if failed else jobs - len(running)]:
                    start(pool, name)
                if not running:
                    break
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    name = running.pop(future)
                    try:
                        statuses[name], output = future.result()
                        print(output.rsplit(RETRIED, 1)[-1].rstrip(), flush=True)  # the attempt that ran
                    except StageFailed as err:
                        statuses[name] = "failed"
                        failed.append(err)
                        print(f"{err.output.rsplit(RETRIED, 1)[-1].rstrip()}\nerror: {name} failed; the stages running "
                              f"beside it end, no other starts", file=sys.stderr, flush=True)
        except KeyboardInterrupt:  # the stages got Ctrl-C too (same terminal); else leaving closes their guards' pipes
            print("interrupted: stopping the running stages", file=sys.stderr, flush=True)
            cf.wait(running, timeout=15)
            os._exit(130)
    ran = sum(s == "ran" for s in statuses.values())
    print(f"{ran} stages ran, {sum(s == 'skipped' for s in statuses.values())} up to date, {len(failed)} failed, "
          f"{len(graph) - len(statuses)} not started; {jobs} at a time, {time.monotonic() - started:.0f} s", flush=True)
    return 1 if failed else 0


def jobs_for(value: str, root: str = ".") -> int:
    """`--jobs`: a number, or `auto`: one stage per core on CPU (per `threads` cores where params fix
    the stages' torch threads, so that they never oversubscribe the cores); one at a time where the
    stages use a GPU (params `device: cuda`, or `auto` with an NVIDIA device present), which they
    would share."""
    if value != "auto":
        if not value.isdigit() or int(value) < 1:
            raise SystemExit(f"pipeline.repro: --jobs takes a positive number or auto, not {value!r}")
        return int(value)
    with open(os.path.join(root, "params.yaml")) as f:
        params = yaml.safe_load(f) or {}
    device = params.get("device", "auto")
    gpu = device == "cuda" or (device == "auto" and any(name.startswith("nvidia") and name[6:].isdigit() for name in os.listdir("/dev")))
    return 1 if gpu else max(1, (os.cpu_count() or 1) // (params.get("threads") or 1))


def main(argv=None) -> int:
    from dvc.cli import main as dvc_main

    argv = list(sys.argv[1:] if argv is None else argv)
    jobs = 1
    if argv[:1] == ["--jobs"] or argv[:1] and argv[0].startswith("--jobs="):
        value = argv.pop(0).partition("=")[2] or (argv.pop(0) if argv else "")
        jobs = jobs_for(value)
        if jobs > 1 and argv:
            raise SystemExit("pipeline.repro: --jobs runs the whole pipeline; DVC's own options go without it")
    try:
        use_fast_lock()
    except (ImportError, AttributeError) as err:  # another DVC than pyproject pins: its own writer, said once
        print(f"pipeline.repro: DVC's lock writer left as it is ({type(err).__name__}: {err})", file=sys.stderr)
    if jobs > 1:
        return parallel(os.getcwd(), jobs)
    return dvc_main(["repro", *argv])


if __name__ == "__main__":
    sys.exit(main())
