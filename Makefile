# Two commands set up a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: venv test demo bench bench-full gpu-check real-data clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Real annotated data that ships on PyPI (stardist's nuclei image and label image, labelme's annotated example
# photos): `pip download`, no install.
REAL_DATA := .cache/real/img2d.tif .cache/real/labelme/reference.json
.cache/real/img2d.tif: $(VENV)/.installed
	$(PY) -m benchmarks.real_nuclei fetch
.cache/real/labelme/reference.json: $(VENV)/.installed
	$(PY) -m benchmarks.real_labelme fetch

real-data: $(REAL_DATA)

# Two workers (most tests run one thread; a module's tests stay on one worker, its fixtures made once); the
# slowest tests are listed at the end.
test: venv $(REAL_DATA)
	$(PY) -m pytest -q -n 2 --dist loadscope --durations=20 tests

demo: venv
	$(VENV)/bin/isda demo

# ISDA vs torchvision Mask R-CNN on CPU (2 threads). Quick: prints a summary (a minute or two).
bench: venv
	$(PY) -m benchmarks.run --quick

# Everything, incl. the same-budget accuracy runs (about 3 hours; two 1-thread runs at a time); writes docs/benchmarks.{md,json,png}.
bench-full: venv
	$(PY) -m benchmarks.run --full --jobs 2

# On a CUDA machine: the GPU path's checks and measurements (about 5 minutes on an H200); writes docs/gpu_check.md.
gpu-check: venv
	$(PY) -m benchmarks.gpu_check

clean:
	rm -rf $(VENV) runs .pytest_cache .cache

.PHONY: figures figures-check demo-figures

# The measured numbers on README.md and docs/*.md, from the JSON the benchmarks wrote (benchmarks/figures.py).
figures: venv
	$(PY) -m benchmarks.figures --write

figures-check: venv
	$(PY) -m benchmarks.figures --check

# Run the demo (2 threads) and record its figures: docs/demo.json, docs/demo_predictions.png.
demo-figures: venv
	$(PY) -m benchmarks.demo_page --run
