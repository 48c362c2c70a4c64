# Idempotent set-up and the project's main jobs. On a fresh machine:
#   make demo   -> installs what is missing, then runs the pipeline on the virtual studio
#   make test   -> installs what is missing, then runs the tests
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.twinstudio-installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEBS   := libusb-1.0-0 gcc libc6-dev libgomp1

.PHONY: setup system-deps browser-deps demo test test-all bench clean

setup: system-deps $(STAMP)

# Debian libraries: open3d needs libusb-1.0 to import; the CPU rasteriser's compositing is C (gcc, OpenMP).
system-deps:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

# Debian's Chromium, for the bundle viewer's tests (tests/handoff/test_viewer.py): only make test needs it
BROWSER_DEBS := chromium
browser-deps:
	@missing=""; for p in $(BROWSER_DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,train]'
	@# nuscenes-devkit (a nerfstudio dependency) pulls the GUI build opencv-python, which owns cv2 too:
	@# keep only the headless build that the project pins
	@if $(PY) -m pip show -q opencv-python >/dev/null 2>&1; then \
	  $(PY) -m pip uninstall -y -q opencv-python && \
	  $(PY) -m pip install -q --force-reinstall --no-deps 'opencv-python-headless==4.10.0.84'; fi
	$(PY) -c "import cv2, open3d, pycolmap, torch, gsplat, nerfstudio; print('set-up ok: opencv', cv2.__version__, '| torch', torch.__version__, '| nerfstudio ok')"
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/twinstudio demo

test: setup browser-deps
	$(PY) -m pytest -q

# the slow tests too
test-all: setup browser-deps
	TWINSTUDIO_SLOW=1 $(PY) -m pytest -q

bench: setup browser-deps
	$(PY) benchmarks/render.py
	$(PY) benchmarks/capture.py
	$(PY) benchmarks/reconstruct.py
	$(PY) benchmarks/raster_cpu.py
	$(PY) benchmarks/train_cpu.py
	$(PY) benchmarks/bundle.py
	$(PY) benchmarks/formats.py
	$(PY) benchmarks/viewer.py
	$(PY) benchmarks/ledger.py
	$(PY) benchmarks/marking.py
	$(PY) benchmarks/licensed_render.py
	$(PY) benchmarks/faults.py
	$(PY) benchmarks/batch.py
	$(PY) benchmarks/capture_hosts.py
	$(PY) benchmarks/verify_inputs.py
	$(PY) benchmarks/sfm.py
	$(PY) benchmarks/sfm_real.py

clean:
	rm -rf out .pytest_cache
