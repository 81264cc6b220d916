# The GPU worker image: CUDA torch, Triton for the compiled kernels, one Celery worker that takes
# the `gpu` and `cpu` queues (settings via MODELPRESS_* environment variables).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /srv/modelpress
RUN pip install --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0
COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
COPY gpu_kernels ./gpu_kernels
COPY modelpress ./modelpress
RUN pip install ".[kernels]" && useradd --system --uid 10001 modelpress \
    && mkdir -p /data && chown modelpress /data
USER modelpress
ENV MODELPRESS_DATA_DIR=/data MODELPRESS_WORKER_QUEUES=gpu,cpu
CMD ["modelpress", "worker", "--concurrency", "1", "--name", "gpu-worker"]
