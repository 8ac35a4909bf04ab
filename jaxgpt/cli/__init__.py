"""Command lines: `python -m jaxgpt.cli.NAME` (generate, classify, chat, judge)."""
