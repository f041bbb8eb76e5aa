"""`bganalysis plot`: every figure as PNG and SVG, one colour per method, report.md embedding them."""

from __future__ import annotations

import re
import shutil

import pandas as pd
import pytest

from bganalysis.cli import main
from bganalysis.plots.style import METHOD_COLOURS, method_colour, pyplot
from tests.app_runs import WINDOWS, app_runs  # noqa: F401  (session fixture)

EXPECTED = ["eb_per_step", "eb_regions", "kappa_map", "kappa_vs_exact", "training_curves", "eb_region_steps",
            "kappa_vs_proxies", "kappa_by_region", "estimator_agreement", "benchmark_decomposition",
            *[f"eb_per_step_w{window}" for window in WINDOWS]]


@pytest.fixture(scope="module")
def plotted(app_runs, tmp_path_factory):
    run = tmp_path_factory.mktemp("plot") / "good"
    shutil.copytree(app_runs / "good", run, ignore=shutil.ignore_patterns("figures", "report.md"))
    assert main(["plot", str(run)]) == 0
    return run


def test_plot_writes_png_and_svg(plotted):
    for name in EXPECTED:
        assert (plotted / "figures" / f"{name}.png").stat().st_size > 5_000, name
        assert (plotted / "figures" / f"{name}.svg").read_text().lstrip().startswith("<?xml"), name


def test_report_embeds_every_figure(plotted):
    embedded = re.findall(r"!\[[^\]]+\]\(figures/([a-z_0-9]+)\.png\)", (plotted / "report.md").read_text())
    assert sorted(embedded) == sorted(EXPECTED)


def test_plot_one_colour_per_method(plotted):
    from matplotlib.colors import to_hex

    from bganalysis.analysis.figures import plot_eb_per_step
    from bganalysis.plots.risk import plot_eb_per_region_step

    plt = pyplot()
    steps = pd.read_parquet(plotted / "analysis" / "steps.parquet")
    tokens = pd.read_parquet(plotted / "analysis" / "tokens.parquet")
    for figure in (plot_eb_per_step(plt, steps), plot_eb_per_step(plt, steps, WINDOWS[0]),
                   plot_eb_per_region_step(plt, tokens, min_documents=1)):
        lines = [line for axis in figure.axes for line in axis.get_lines() if not line.get_label().startswith("_")]
        assert lines
        for line in lines:
            model = line.get_label().split(" ")[0]
            assert to_hex(line.get_color()) == METHOD_COLOURS[model], line.get_label()
        plt.close(figure)


def test_plot_axis_labels_have_units(plotted):
    from bganalysis.analysis.figures import plot_eb_per_step

    plt = pyplot()
    figure = plot_eb_per_step(plt, pd.read_parquet(plotted / "analysis" / "steps.parquet"))
    for axis in figure.axes:
        assert re.search(r"\((nats|tokens)", axis.get_xlabel() + axis.get_ylabel())
        assert re.search(r"\(nats", axis.get_ylabel())
    plt.close(figure)


def test_method_colour_stable():
    assert method_colour("hybrid_lam0.3") == METHOD_COLOURS["hybrid"]
    assert method_colour("hard_argmax") == METHOD_COLOURS["hard_argmax"]
    assert method_colour("my-student") == method_colour("my-student")
    assert len(set(METHOD_COLOURS.values())) == len(METHOD_COLOURS)


@pytest.mark.parametrize("case, expected", [
    ("missing", "run directory not found"),
    ("bare", "tokens.parquet not found; run `bganalysis analyze"),
    ("broken", "tokens.parquet cannot be read"),
])
def test_plot_bad_run_one_line_exit_2(app_runs, tmp_path, capsys, case, expected):
    run = tmp_path / "nothing" if case == "missing" else app_runs / case
    before = sorted(path.name for path in (run / "figures").glob("*")) if (run / "figures").is_dir() else []
    assert main(["plot", str(run)]) == 2
    error = capsys.readouterr().err.strip()
    assert expected in error and "\n" not in error
    after = sorted(path.name for path in (run / "figures").glob("*")) if (run / "figures").is_dir() else []
    assert after == before


def test_app_missing_runs_dir_exit_2(tmp_path, capsys):
    assert main(["app", str(tmp_path / "absent")]) == 2
    error = capsys.readouterr().err.strip()
    assert "is not a folder" in error and "\n" not in error


def test_app_port_out_of_range_exit_2(tmp_path, capsys):
    assert main(["app", str(tmp_path), "--port", "70000"]) == 2
    assert "--port 70000 is invalid" in capsys.readouterr().err
