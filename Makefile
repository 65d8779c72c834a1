# egresscore: the two commands a newcomer needs are `make demo` and `make test`.
# Both bootstrap everything on a fresh Debian machine: system packages (when missing),
# a virtual environment in .venv, and the build of the Cython extensions.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages the build and the tests need: the C libraries the NFQUEUE binding links
# with, and the tools the gateway and its network tests and benches drive (iptables,
# conntrack, ip, ping, ethtool, iperf3, sysctl, and tcpdump for the leak captures).
DEB_PACKAGES := build-essential pkg-config libnetfilter-queue-dev libmnl-dev libnetfilter-conntrack-dev iptables conntrack iproute2 iputils-ping ethtool iperf3 procps tcpdump
BENCH_ARGS ?=

.PHONY: all demo test bench build lint clean system-deps

all: build

system-deps:
	@missing=""; \
	for package in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$package 2>/dev/null | grep -q "ok installed" || missing="$$missing $$package"; \
	done; \
	if ! $(PYTHON) -c "import ensurepip, venv" >/dev/null 2>&1; then missing="$$missing python3-venv python3-dev"; fi; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml setup.py | system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "setuptools>=77" wheel "Cython>=3.0,<4"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,bench]"
	touch $@

# Rebuild the extensions in place; Cython and C warnings fail the build.
build: $(VENV)/.installed
	EGRESSCORE_WERROR=1 $(PY) setup.py --quiet build_ext --inplace

test: build
	$(PY) -m pytest tests benches --benchmark-disable

demo: build
	$(VENV)/bin/egresscore demo

# Every suite in benches/, saved as pytest-benchmark JSON under .benchmarks/.
# Compare with the previous saved run: make bench BENCH_ARGS=--benchmark-compare
# numpy's OpenBLAS worker threads spin after use and would compete for the 2 cores.
bench: build
	OPENBLAS_NUM_THREADS=1 $(PY) -m pytest benches --benchmark-only --benchmark-autosave --benchmark-storage=.benchmarks $(BENCH_ARGS)

lint: build
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

clean:
	rm -rf build $(VENV) egresscore/core/*.c egresscore/core/*.so egresscore/core/*.html *.egg-info
