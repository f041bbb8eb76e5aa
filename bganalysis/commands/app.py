"""`bganalysis app`: the Streamlit explorer over the run directories under RUNS_DIR."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "app",
        help="open the explorer (Streamlit) over the run directories in RUNS_DIR",
        description="Serve the explorer: runs, per-token Bridge/Garden maps, exposure bias, risk and "
                    "benchmarks. It reads only run directories inside RUNS_DIR and loads no model "
                    "unless a live analysis is requested.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("runs_dir", nargs="?", default="runs", metavar="RUNS_DIR", help="folder of run directories (or one run directory)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; the default serves this machine only")
    parser.add_argument("--port", type=int, default=8501, help="TCP port to listen on")
    parser.set_defaults(func=run)


def run(args) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    from bganalysis.app import RUNS_DIR_VARIABLE
    from bganalysis.errors import UserError

    root = Path(args.runs_dir)
    if not root.is_dir():
        raise UserError(f"RUNS_DIR {root} is not a folder; pass the folder that contains your runs, e.g. runs")
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is invalid: it must be in 1..65535")
    script = Path(__file__).resolve().parent.parent / "app" / "main.py"
    command = [sys.executable, "-m", "streamlit", "run", str(script),
               "--server.address", args.host, "--server.port", str(args.port), "--server.headless", "true",
               "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
               "--global.developmentMode", "false", "--client.toolbarMode", "minimal"]
    environment = {**os.environ, RUNS_DIR_VARIABLE: str(root.resolve())}
    process = subprocess.Popen(command, env=environment)
    try:
        status = process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait(timeout=10)
        raise
    if status != 0:
        raise SystemExit(status)
