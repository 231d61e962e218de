# Two commands do everything on a fresh Debian/Ubuntu machine:
#   make demo   broker + fleet server + agent on the sample video, on the CPU
#   make test   the test suite (real Mosquitto, real ONNX Runtime, real video)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
CLIP   := clips/vtest.avi

.PHONY: demo test setup system-deps lint typecheck bench clean

setup: $(STAMP) $(CLIP) system-deps

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -U pip
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[cv,test,dev]'
	touch $(STAMP)

# Debian's mosquitto for the broker the tests and the demo start on loopback; shellcheck for
# the scripts' test (tests/test_install_jetson.py).
system-deps:
	@command -v mosquitto >/dev/null && command -v mosquitto_pub >/dev/null && command -v shellcheck >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends mosquitto mosquitto-clients shellcheck >/dev/null; }
	@# the package starts a system broker on 1883; ours run on free ports, so it may stay or go
	@true

$(CLIP):
	scripts/fetch_footage.sh clips

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) scripts/bench_pipeline.py

clean:
	rm -rf $(VENV) .state build *.egg-info
