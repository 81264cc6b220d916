# The GPU worker image: CUDA torch, Triton for the compiled kernels, one Celery worker that takes
# the `gpu` and `cpu` queues (settings via MODELPRESS_* environment variables).
# Python 3.11 (pyproject requires it; Ubuntu 24.04's CUDA images carry only 3.12). The CUDA runtime
# comes with the cu128 torch wheels and the driver from the host, so no CUDA base image is needed;
# gcc is there because Triton compiles its launcher with the system C compiler on first use.
# The user gets a home: Triton caches compiled kernels under ~/.triton (a system user has none).
FROM python:3.11-slim-bookworm
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* && python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /srv/modelpress
RUN pip install --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0
COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
COPY gpu_kernels ./gpu_kernels
COPY modelpress ./modelpress
RUN pip install ".[kernels]" && useradd --system --create-home --uid 10001 modelpress \
    && mkdir -p /data && chown modelpress /data
USER modelpress
ENV MODELPRESS_DATA_DIR=/data MODELPRESS_WORKER_QUEUES=gpu,cpu
CMD ["modelpress", "worker", "--concurrency", "1", "--name", "gpu-worker"]
