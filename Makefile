# Two commands from a fresh machine (Python 3.11 with venv):
#   make run    install, then run a small study with the embedded defaults
#   make test   install, then run every test (unit and end-to-end)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install tools run test test-fast test-isa bench clean

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt -c constraints.txt
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests need, as command:package: headless Chromium for the MLflow UI
# test, QEMU's user-mode emulator for tests/test_pinned.py (the pinned train runs on an
# emulated Haswell, so that its numbers are the same on every x86-64 host). The missing ones
# are installed in one apt-get (needs root); without them their tests are skipped, saying why.
TOOLS := chromium:chromium qemu-x86_64:qemu-user
tools:
	@missing=$$(for t in $(TOOLS); do command -v $${t%%:*} >/dev/null || echo $${t#*:}; done); \
	[ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; } || \
	  echo "not installed and cannot be here: $$missing (their tests will be skipped)"

run: $(STAMP)
	$(PY) run_study.py

# Two workers (pytest-xdist): most of an end-to-end test is waiting (Ray starting, a
# server away, a trial paused), so two share 2 cores well; tests/conftest.py keeps each
# module on one worker and the multi-node clusters on one. `pytest -n 0` runs it serially.
# lint-imports first: the architecture's contracts (.importlinter), in under a second.
test: $(STAMP) tools
	$(VENV)/bin/lint-imports --no-cache --no-logo
	$(PY) -m pytest -ra -n 2
	$(MAKE) --no-print-directory test-isa

# The native checks of tests/test_pinned.py again with the CPU kernels capped at each ISA
# level below this machine's own (the run above is the native one): oneDNN and ATen pick
# kernels by ISA, and a seed's bit-for-bit repeat must hold under every one (issue 24).
# The pin itself runs on an emulated CPU, the same whatever the caps: not rerun. ~10 s.
ISA_LEVELS ?= AVX2
test-isa: $(STAMP)
	@for isa in $(ISA_LEVELS); do \
	  echo "tests/test_pinned.py with ONEDNN_MAX_CPU_ISA=$$isa ATEN_CPU_CAPABILITY=$$(echo $$isa | tr A-Z a-z)"; \
	  ONEDNN_MAX_CPU_ISA=$$isa ATEN_CPU_CAPABILITY=$$(echo $$isa | tr A-Z a-z) \
	    $(PY) -m pytest -ra -q -n 0 tests/test_pinned.py -k "not matches_its_pin" || exit 1; \
	done

test-fast: $(STAMP)
	$(PY) -m pytest -ra -m "not slow"

bench: $(STAMP)
	$(PY) bench/dip_reference.py

clean:
	rm -rf $(VENV) .pytest_cache
