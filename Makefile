# voxgate — developer and operator entry points. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := python3 python3-venv python3-dev gcc pkg-config libsystemd-dev systemd \
	sip-tester baresip kamailio espeak-ng sox libsox-fmt-all tcpdump util-linux procps \
	libssl-dev libsrtp2-dev \
	dpkg-dev curl libasound2-dev libasound2-plugins alsa-utils libportaudio2 \
	prometheus lintian debootstrap systemd-container man-db
STAMP := $(VENV)/.installed
# The real Pipecat bot that the stream-agent integration tests talk to
# (tests/bots/pipecat_bot.py, started by tests/harness/bot.py) runs in its own
# virtualenv: Pipecat's dependencies are not voxgate's. Everything on the wire path
# is pinned (the bot's WebSocket server is uvicorn on websockets).
BOT_VENV := .venv-bot
BOT_STAMP := $(BOT_VENV)/.installed
BOT_PACKAGES := 'pipecat-ai[websocket]==1.14.0' fastapi==0.165.0 starlette==1.10.0 \
	uvicorn==0.55.0 websockets==17.4
# Fuzzing (fuzz/run.py): seconds per target for `make fuzz` and for the short pass of
# `make test`; FUZZ_TARGET=name runs one target only.
FUZZ_SECONDS ?= 600
FUZZ_CI_SECONDS ?= 15
FUZZ_TARGET ?=

.PHONY: setup bot-venv run demo test test-pure fuzz bench deb lint clean

setup: $(STAMP) $(BOT_STAMP)

# The editable install also compiles the media cores with mypyc (setup.py): their
# sources are prerequisites, so editing one rebuilds it (tests/conftest.py refuses to
# run against a compiled module older than its source).
NATIVE_SOURCES := $(shell sed -n 's|^    "\(voxgate/.*\.py\)",$$|daemon/\1|p' setup.py) \
	$(wildcard daemon/voxgate/*/_*.c)

$(STAMP): pyproject.toml setup.py $(NATIVE_SOURCES)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null \
		| grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

bot-venv: $(BOT_STAMP)

# Order-only on $(STAMP): that recipe installs the Debian packages (python3-venv).
$(BOT_STAMP): Makefile | $(STAMP)
	test -x $(BOT_VENV)/bin/python || $(PYTHON) -m venv $(BOT_VENV)
	echo '*' > $(BOT_VENV)/.gitignore
	$(BOT_VENV)/bin/pip install -q $(BOT_PACKAGES)
	touch $(BOT_STAMP)

run: setup
	$(BIN)/voxgated --config config/voxgate.toml

demo: setup
	$(BIN)/python -m bench.demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q
	$(MAKE) test-pure
	$(BIN)/python -m fuzz.run --seconds-per-target $(FUZZ_CI_SECONDS)

# The pure-Python path (setup.py's VOXGATE_PURE_PYTHON): the unit tests again, on a
# copy of daemon/ without the compiled modules (tests/test_native.py checks that they
# run on it); the package's tests build the .deb, which is compiled either way.
PURE := build/pure
test-pure: setup
	rm -rf $(PURE) && mkdir -p $(PURE)
	tar -C daemon --exclude='*.so' --exclude=__pycache__ -cf - voxgate | tar -C $(PURE) -xf -
	VOXGATE_PURE_PYTHON=1 PYTHONPATH=$(PURE) $(BIN)/pytest -q -p no:cacheprovider tests \
		--ignore=tests/integration --ignore=tests/system --ignore=tests/test_package.py

# The system test (tests/system, as root): the .deb installed and driven under a real
# systemd, in Debian 12 debootstrapped (cached in /var/cache/voxgate-test-system) and
# booted with systemd-nspawn.
.PHONY: test-system
test-system: setup
	VOXGATE_TEST_SYSTEM=1 $(BIN)/pytest -q -rA tests/system

fuzz: setup
	$(BIN)/python -m fuzz.run --seconds-per-target $(FUZZ_SECONDS) \
		$(if $(FUZZ_TARGET),--target $(FUZZ_TARGET))

bench: setup
	$(BIN)/python -m bench.sip_load
	$(BIN)/python -m bench.rtp_load
	$(BIN)/python -m bench.admission_latency
	$(BIN)/python -m bench.rss_sessions
	$(BIN)/python -m bench.ws_load
	$(BIN)/python -m bench.bot_load
	$(BIN)/python -m bench.agent_latency
	$(BIN)/python -m bench.recognition_load

# Soak (bench/soak.py): how long `make soak` runs, seconds or with s/m/h (600, 10m, 1h).
DURATION ?= 10m
.PHONY: soak
soak: setup
	$(BIN)/python -m bench.soak --duration $(DURATION)

deb: setup
	packaging/build-deb.sh dist

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(BOT_VENV) .mypy_cache .ruff_cache .pytest_cache build
	find daemon -name '*.so' -delete
