"""One module per explorer page, each with `render(run, run_names)`."""
