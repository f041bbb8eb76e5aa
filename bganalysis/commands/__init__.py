"""One module per CLI command; see `bganalysis.cli`."""
