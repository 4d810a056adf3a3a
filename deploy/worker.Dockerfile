# A vLLM worker with alignd installed, so worker-side alignd code (plugins
# registered under vLLM's entry-point groups) is importable inside the worker.
# Keep the tag in step with the `gpu` extra in pyproject.toml.
FROM vllm/vllm-openai:v0.33.0

COPY pyproject.toml README.md /opt/alignd/
COPY server /opt/alignd/server
COPY decoding /opt/alignd/decoding
COPY models /opt/alignd/models
# --no-deps: the image already has torch, transformers and vLLM in the versions it was built with.
RUN pip install --no-cache-dir --no-deps /opt/alignd
