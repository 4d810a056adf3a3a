# The alignd gateway. Model work runs in vLLM workers (deploy/); the gateway
# itself needs CPU torch only (in-process engine, guideline embedder).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
WORKDIR /app

RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY server ./server
COPY decoding ./decoding
COPY models ./models
RUN pip install .

RUN useradd --create-home alignd
USER alignd
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
ENTRYPOINT ["alignd", "serve", "--host", "0.0.0.0"]
