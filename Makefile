# `make run`: set everything up and run the experiment on the embedded data ([PROFILE=name]).
# `make test`: set everything up and run the test suite.
# Both start the stage server (stages/server.py): stage processes fork from one that has imported
# torch, CompressAI and MLflow already, instead of paying ~8 s of imports each.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# DVC stage commands call `python`: it must be the project's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test serve setup data dvc-init clean

# PROFILE=<name> first merges profiles/<name>.yaml into params.yaml (e.g. segmentation, smoke).
# JOBS: stages at a time (pipeline/repro.py --jobs): auto = one per core (per `threads` cores where
# params set it), each on cores // JOBS torch threads; one at a time where the stages use a GPU.
# JOBS=1 is plain `dvc repro`.
JOBS ?= auto
run: setup data dvc-init
	$(if $(PROFILE),$(VENV)/bin/tactic profile $(PROFILE))
	@$(PY) -m stages.server start --wait 0
	$(PY) -m pipeline.repro --jobs $(JOBS)
	@echo; cat results/table.md; echo; cat results/summary.md; echo "plot: $(CURDIR)/results/rate_accuracy.png"
	@echo "browse the runs: start the MLflow UI and open its runs view:"; $(PY) -m tactic.mlflow_view

# Two pytest workers: the end-to-end tests spend much of their time waiting on subprocesses and
# servers, so the unit tests fit in beside them (conftest.py starts the long ones first).
test: setup data
	@$(PY) -m stages.server start --wait 0
	$(PY) -m pytest -n 2 --dist loadgroup

# Start a local Prefect server (if none answers; detached, log in .prefect/server.log) and serve
# the deployment tactic/full.
serve: export PREFECT_API_URL ?= http://127.0.0.1:4200/api
serve: setup data dvc-init
	$(PY) -m pipeline.server start
	python -m pipeline.serve

setup: $(STAMP)

# uv installs the 6 GB stack in about a minute where pip takes four. It byte-compiles on purpose:
# with PYTHONDONTWRITEBYTECODE set (as on our machines) Python would otherwise recompile torch and
# mlflow from source in every stage process.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q uv
	$(VENV)/bin/uv pip install --python $(PY) --compile-bytecode -q -e '.[test,kubeflow]'
	rm -f $(VENV)/.installed-* && touch $@

data:
	@test -f $(FMNIST) || { echo "installing the embedded data (Debian package dataset-fashion-mnist)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

# .dvc/ is committed; a tree outside git (an unpacked archive) runs DVC without SCM.
dvc-init:
	@test -d .dvc || $(VENV)/bin/dvc init -q --no-scm
	@git rev-parse --git-dir >/dev/null 2>&1 || $(VENV)/bin/dvc config core.no_scm true

clean:
	rm -rf data/prepared models results .checkpoints mlflow.db mlruns
