"""``alignd eval``: what alignment configurations do to the answers of any deployment, through its HTTP API.

Imports nothing of ``server``, ``decoding`` or ``models``: it measures a deployment as its clients see it.
"""
