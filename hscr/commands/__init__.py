"""Subcommands of ``python -m hscr``; each module has ``register(subparsers)`` that sets ``handler``."""
