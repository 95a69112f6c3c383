# Two entry points for a fresh machine (see README.md):
#   make demo   virtualenv + install, train on the offline digits dataset, export with
#               checks, run stn-infer on sample images
#   make test   virtualenv + install, the code checks (import contracts, ruff), the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo

.PHONY: demo test lint install clean

$(BIN)/stn-train: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[cpu,dev]'
	@touch $@

install: $(BIN)/stn-train

demo: install
	$(BIN)/stn-train --dataset digits --output $(DEMO)/stn_digits.pt --visualize $(DEMO)/warps.png
	$(BIN)/stn-export $(DEMO)/stn_digits.pt -o $(DEMO)/stn_digits.onnx --with-theta --with-warped
	$(BIN)/python -m stn_deploy.train.samples --dataset digits --count 200 $(DEMO)/samples
	$(BIN)/stn-infer $(DEMO)/samples --model $(DEMO)/stn_digits.onnx --output $(DEMO)/predictions.csv --visualize $(DEMO)/infer_warps

# The import contracts (pyproject.toml [tool.importlinter]), read from the source tree:
# stn_deploy/train and stn_deploy/export are links to the top-level train/ and export/, so the
# tree lint-imports walks is the tree the code imports.
lint: install
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache build *.egg-info
