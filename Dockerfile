# syntax=docker/dockerfile:1
# MoPEQ service image, multi-stage. One image runs the API or a GPU worker (docker-compose.yml picks the command).
#   docker build -t mopeq:gpu .                                   # workers: CUDA build of torch
#   docker build -t mopeq:api --build-arg TORCH_FLAVOR=cpu .      # API only: smaller, it never imports torch
ARG PYTHON_VERSION=3.11

# ---- builder: a virtual environment with the project and its dependencies ------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS builder
ARG TORCH_FLAVOR=cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends build-essential git \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch and torchvision are pinned as a pair (see pyproject.toml); the index picks the CUDA (or CPU) build.
RUN pip install --upgrade pip setuptools wheel \
    && pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/${TORCH_FLAVOR}
WORKDIR /srv/mopeq
COPY pyproject.toml README.md* ./
COPY mopeq_core ./mopeq_core
COPY mopeq_client ./mopeq_client
COPY app ./app
COPY worker ./worker
# Editable install: the runtime stage copies the same tree to the same path, so migrations/ and alembic.ini
# (not Python packages) sit next to the code that runs them.
RUN pip install -e .

# ---- runtime: slim, non-root, no compilers ----------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 mopeq \
    && mkdir -p /data /models && chown mopeq:mopeq /data
COPY --from=builder /opt/venv /opt/venv
WORKDIR /srv/mopeq
COPY --from=builder /srv/mopeq /srv/mopeq
COPY alembic.ini ./
COPY migrations ./migrations
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MOPEQ_HOME=/data/home \
    MOPEQ_ARTIFACT_DIR=/data/artifacts \
    MOPEQ_WORK_DIR=/data/work \
    MOPEQ_MODEL_ROOTS=/models \
    HF_HOME=/data/hf
USER mopeq
EXPOSE 8000
ENTRYPOINT ["tini", "--"]
# The API by default; workers run `python -m worker` (one per GPU), migrations `python -m app.cli_admin migrate`.
CMD ["uvicorn", "--factory", "app.main:create_app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]
