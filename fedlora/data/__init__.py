"""Data: sources, partitioners, the embedded task, tokenisation."""
