"""Engines and scorers: the Engine protocol and its backends, tiny offline models."""
