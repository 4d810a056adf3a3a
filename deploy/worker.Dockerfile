# A vLLM worker with alignd installed, so alignd's worker-side code (plugins
# registered under vLLM's entry-point groups, e.g. `vllm.logits_processors`)
# is importable inside the worker. Built from the repository root:
#   docker build -f deploy/worker.Dockerfile -t alignd-worker .
# Keep the tag in step with the `gpu` extra in pyproject.toml (vllm>=0.32,<0.34):
# worker-side plugins implement vLLM's interfaces, which change between releases.
FROM vllm/vllm-openai:v0.33.0

COPY pyproject.toml README.md /opt/alignd/
COPY server /opt/alignd/server
COPY decoding /opt/alignd/decoding
COPY models /opt/alignd/models
# --no-deps: the image already has torch, transformers and vLLM in the versions it
# was built and tested with; alignd's own pins must not replace them. Code that
# runs inside the worker may therefore import only what the vLLM image provides.
RUN python3 -m pip install --no-cache-dir --no-deps /opt/alignd

# Stated rather than inherited: the compose commands pass the model directory as
# `vllm serve`'s positional argument.
ENTRYPOINT ["vllm", "serve"]
