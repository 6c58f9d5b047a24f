"""workerbus tools: the CLI, demos, stats server, live view, bench suite and conformance kit.

They sit above the library and are never imported by it (docs/architecture.md).
"""
