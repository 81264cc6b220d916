# The API image: FastAPI under uvicorn. CPU-only torch (the API never runs models, but shares the
# wire contract and file checks with the workers, which import torch for .pt2 checks).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /srv/modelpress
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
COPY gpu_kernels ./gpu_kernels
COPY modelpress ./modelpress
RUN pip install . && useradd --system --create-home --uid 10001 modelpress \
    && mkdir -p /data && chown modelpress /data
USER modelpress
ENV MODELPRESS_DATA_DIR=/data MODELPRESS_API_HOST=0.0.0.0 MODELPRESS_API_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["uvicorn", "--factory", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]
