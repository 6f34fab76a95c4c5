"""The product: engine, context window, tasks, review and the CLI."""

__version__ = "0.1.0"
