"""The `crosspt` command."""
from crosspt.cli.main import main

__all__ = ["main"]
