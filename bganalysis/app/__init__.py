"""The Streamlit explorer of run directories; `bganalysis app` starts it (entry script: main.py)."""

RUNS_DIR_VARIABLE = "BGANALYSIS_RUNS_DIR"  # how `bganalysis app` passes RUNS_DIR to the script
