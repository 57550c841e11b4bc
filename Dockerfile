# siamcam API image: one model served on CPU or on an NVIDIA GPU by `python -m app` (app/__main__.py, app/container.py).
#
#   docker build -t siamcam .                                        # PyPI's torch: the CUDA build (also runs on CPU)
#   docker build -t siamcam:cpu \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .   # CPU-only torch: a much smaller image
#   docker run -p 8000:8000 siamcam                                  # serves the bundled model_store/flowers
#   docker run --gpus all -p 8000:8000 siamcam                       # same image; CUDA is picked at start-up
#
# One container holds one copy of the model, in one process that forms every batch; HTTP_WORKERS front processes
# beside it (0: none, one process does everything) do the per-request work on the other cores. Scale a
# container's CPUs with HTTP_WORKERS, and the deployment with replicas (docs/deployment.md).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- deps: a virtualenv with the service's runtime dependencies, exactly as pinned in pyproject.toml --------
FROM ${PYTHON_IMAGE} AS deps

# Empty: torch from PyPI (CUDA build). Set to a PyTorch wheel index, e.g. https://download.pytorch.org/whl/cpu,
# to take torch and torchvision from there instead.
ARG TORCH_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

# Only pyproject.toml, so that this slow layer is rebuilt when dependencies change, not when code does.
# The runtime dependencies only: the train and test extras stay out of the image.
COPY pyproject.toml /tmp/pyproject.toml
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && if [ -n "$TORCH_INDEX_URL" ]; then \
        grep -E '^(torch|torchvision)==' /tmp/requirements.txt > /tmp/torch.txt \
        && pip install --index-url "$TORCH_INDEX_URL" -r /tmp/torch.txt; \
    fi \
 && pip install -r /tmp/requirements.txt

# ---- compiled: the default model's backbone compiled for the CPU (contract/compiled.py), so that replicas start
# ready instead of compiling for tens of seconds. A package runs on CPUs with the instruction set of the machine
# that built the image (its name says which); elsewhere the service logs why and serves TorchScript.
FROM deps AS compiled
# AOTInductor compiles C++: the compiler, and training's own dependencies for its command, stay in this stage.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/* \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['optional-dependencies']['train']))" \
        > /tmp/train.txt \
 && pip install -r /tmp/train.txt
WORKDIR /build
COPY contract/ /build/contract/
COPY training/ /build/training/
COPY model_store/flowers/ /build/model_store/flowers/
RUN python -m training compile --model model_store/flowers --device cpu --cache /opt/compiled

# ---- runtime: the virtualenv, the service code and the default model; no compilers, no pip cache -------------
FROM ${PYTHON_IMAGE} AS runtime

RUN groupadd --system --gid 10001 siamcam \
 && useradd --system --uid 10001 --gid siamcam --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin siamcam

COPY --from=deps /opt/venv /opt/venv
WORKDIR /srv
# The service needs app/, the artifact contract it reads models with, and a model store; nothing else from the
# repository (it never imports training/).
COPY app/ /srv/app/
COPY contract/ /srv/contract/
# The default model, baked in. Serve another one by mounting a store and pointing MODEL_STORE/MODEL_NAME at it:
#   docker run -v /path/to/store:/models:ro -e MODEL_STORE=/models -e MODEL_NAME=mine siamcam
COPY model_store/flowers/ /srv/model_store/flowers/
# Its backbone compiled for this image's CPUs (COMPILE=auto loads it; a mounted model is compiled at start-up only
# where a compiler is present, and served with TorchScript otherwise).
COPY --from=compiled /opt/compiled/ /srv/compiled/

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MODEL_STORE=/srv/model_store \
    MODEL_NAME=flowers \
    COMPILE_CACHE_DIR=/srv/compiled \
    FORWARDED_ALLOW_IPS=127.0.0.1

USER siamcam:siamcam
EXPOSE 8000

# Liveness only (/healthz): whether the replica should get traffic is /readyz's job, for the balancer.
# No curl in slim images: the image's own Python does the request and fails on anything but 2xx.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# Exec form: `python -m app` is PID 1 and receives SIGTERM itself, which starts the graceful drain (of every front
# process first, with HTTP_WORKERS > 0). Its options are uvicorn's.
# --proxy-headers: the client's address comes from X-Forwarded-For (logs, rate limits per address), but only
# from the addresses in FORWARDED_ALLOW_IPS (uvicorn reads it from the environment): set it to the balancer's
# address (compose) or network (Kubernetes); anyone else's X-Forwarded-For is ignored.
CMD ["python", "-m", "app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]
