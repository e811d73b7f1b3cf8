"""The one front door: the command line (see main.py)."""

from llamadist.cli.main import main

__all__ = ["main"]
