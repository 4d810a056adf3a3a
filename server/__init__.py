"""The OpenAI-compatible gateway: protocol, routes, streaming, metrics, configuration, CLI."""
