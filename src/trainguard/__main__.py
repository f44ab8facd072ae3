"""``python -m trainguard``."""

from trainguard.cli import entry

entry()
