"""Command-line parsers of the bench targets, one light module per target (no torch import)."""
