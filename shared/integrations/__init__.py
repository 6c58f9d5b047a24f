"""Adapters between workerbus and web frameworks; each module imports its framework itself,
so importing this package needs none of them."""
