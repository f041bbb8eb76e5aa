"""The explorer's pages under Streamlit's AppTest, on run directories built by the real pipeline."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from bganalysis.app import RUNS_DIR_VARIABLE
from bganalysis.app.token_html import token_map_html
from tests.app_runs import LONG_TOKENS, WINDOWS, app_runs  # noqa: F401  (session fixture)

SCRIPT = str(Path(__file__).resolve().parent.parent / "bganalysis" / "app" / "main.py")
PAGES = ["Runs", "Token map", "Exposure bias", "Risk", "Benchmarks"]


def open_page(root: Path, page: str, run: str | None = None, **params) -> AppTest:
    import os

    os.environ[RUNS_DIR_VARIABLE] = str(root)
    app = AppTest.from_file(SCRIPT, default_timeout=120)
    app.query_params["page"] = page
    if run is not None:
        app.query_params["run"] = run
    for key, value in params.items():
        app.query_params[key] = str(value)
    app.run()
    assert not app.exception, [error.value for error in app.exception]
    return app


def texts(elements) -> str:
    return "\n".join(str(element.value) for element in elements)


def images(app: AppTest) -> list:
    return app.image


def test_runs_page_lists_runs_and_students(app_runs):
    app = open_page(app_runs, "Runs", "good")
    overview = app.dataframe[0].value
    assert set(overview.run) == {"good", "bare", "broken", "long"}
    students = app.dataframe[1].value
    assert set(students.student) == {"hard", "soft", "hybrid", "hard_argmax"}
    assert set(students.method) == {"hard", "soft", "hybrid"}
    eb = app.dataframe[2].value
    assert "eb bridge (nats/token)" in eb.columns and "[" in eb["eb overall (nats/token)"].iloc[0]
    assert len(images(app)) == 1  # training curves


def test_runs_page_compares_two_students(app_runs):
    app = open_page(app_runs, "Runs", "good")
    app.selectbox(key="compare_a").set_value("soft")
    app.selectbox(key="compare_b").set_value("hybrid").run()
    table = app.dataframe[-1].value
    row = table[table.metric == "eb overall (nats/token)"].iloc[0]
    assert row["B - A"] == pytest.approx(row["hybrid"] - row["soft"])
    assert "humaneval pass@1 (score)" in set(table.metric)


def test_runs_page_benchmark_table(app_runs):
    app = open_page(app_runs, "Runs", "good")
    results = pd.read_parquet(app_runs / "good" / "eval" / "results.parquet")
    table = app.dataframe[3].value
    assert len(table) == results.groupby(["suite", "benchmark", "metric"]).ngroups
    assert set(results.model) <= set(table.columns)


def test_token_map_selected_token_details(app_runs):
    tokens = pd.read_parquet(app_runs / "good" / "analysis" / "tokens.parquet")
    doc = tokens.doc_id.iloc[0]
    row = tokens[(tokens.doc_id == doc) & (tokens.model == "hard") & (tokens.position == 2)].iloc[0]
    app = open_page(app_runs, "Token map", "good", doc=doc, student="hard")
    app.number_input(key="pos").set_value(2).run()
    assert f"Position 2: {row.token!r}" in texts(app.subheader)
    metrics = {metric.label: metric.value for metric in app.metric}
    assert metrics["kappa ± standard error (nats)"] == f"{row.kappa:.2f} ± {row.kappa_se:.2f}"
    assert metrics["exact kappa (lab, nats)"] == f"{row.exact_kappa:.3f}"
    assert metrics["true role (lab)"] == row.true_role
    next_tokens = app.dataframe[0].value
    assert list(next_tokens.columns) == ["teacher", "hard", "soft", "hybrid", "hard_argmax"]
    actions = app.dataframe[1].value
    assert list(actions["Q (Monte-Carlo)"]) == pytest.approx(list(row.action_q))
    assert list(actions["Q (exact)"]) == pytest.approx(list(row.exact_action_q))


def test_token_map_colour_modes(app_runs):
    app = open_page(app_runs, "Token map", "good")
    for mode in ["kappa", "region", "teacher entropy", "per-token loss"]:
        app.radio(key="colour").set_value(mode).run()
        assert not app.exception
        html = next(m.value for m in app.markdown if 'class="bg-tokens' in m.value)
        assert html.count('class="tok') == html.count("</a>") > 0
        assert f"colour={mode.replace(' ', '+')}" in html


def test_token_map_marks_divergence(app_runs):
    continuations = pd.read_parquet(app_runs / "good" / "analysis" / "continuations.parquet")
    own = continuations[continuations.model == "soft"].iloc[0]
    app = open_page(app_runs, "Token map", "good", doc=own.doc_id, student="soft")
    marked = [m.value for m in app.markdown if "<span" in m.value]
    assert len(marked) == 2
    if own.diverge_at >= 0:
        assert all(value.count('class="diverge"') == 1 for value in marked)
        assert f"diverge at step {own.diverge_at}" in texts(app.caption)


def test_exposure_page_windows_and_regions(app_runs):
    app = open_page(app_runs, "Exposure bias", "good")
    assert app.radio(key="eb_window").options == ["full rollout"] + [f"window W = {w}" for w in WINDOWS]
    assert len(images(app)) == 2
    app.radio(key="eb_window").set_value("window W = 2").run()
    app.multiselect(key="eb_students").set_value(["hard", "soft"]).run()
    assert not app.exception
    assert list(app.dataframe[0].value.student) == ["hard", "soft"]


def test_risk_page_agreement_table(app_runs):
    import json

    summary = json.loads((app_runs / "good" / "analysis" / "summary.json").read_text())
    app = open_page(app_runs, "Risk", "good")
    table = app.dataframe[0].value.set_index("estimator")
    assert table.loc["teacher-only kappa", "rho vs exact kappa"] == pytest.approx(summary["kappa"]["teacher_only"]["spearman_vs_exact"])
    assert table.loc["proxy: teacher_entropy", "rho vs Monte-Carlo kappa"] == pytest.approx(
        summary["kappa"]["proxies"]["teacher_entropy"]["spearman_vs_kappa"])
    assert len(images(app)) == 2


def test_benchmarks_page_table_and_figure(app_runs):
    app = open_page(app_runs, "Benchmarks", "good")
    assert len(app.dataframe[0].value) == 12
    assert len(images(app)) == 1
    app.multiselect(key="bench_suites").set_value(["code"]).run()
    assert set(app.dataframe[0].value.suite) == {"code"}


@pytest.mark.parametrize("page", PAGES)
def test_empty_runs_dir_message(tmp_path, page):
    app = open_page(tmp_path, page)
    assert "bganalysis demo --out" in texts(app.info)


@pytest.mark.parametrize("page", ["Token map", "Exposure bias", "Risk"])
def test_run_without_analysis_message(app_runs, page):
    app = open_page(app_runs, page, "bare")
    message = texts(app.warning)
    assert "not found" in message and "bganalysis analyze --teacher" in message and "--out" in message


def test_run_without_analysis_keeps_runs_page(app_runs):
    app = open_page(app_runs, "Runs", "bare")
    assert set(app.dataframe[1].value.student) == {"hard", "soft", "hybrid", "hard_argmax"}
    assert "summary.json not found" in texts(app.warning)


def test_run_without_results_message(app_runs):
    app = open_page(app_runs, "Benchmarks", "bare")
    message = texts(app.warning)
    assert "results.parquet not found" in message
    assert f"bganalysis eval --suite reasoning --model {app_runs / 'bare'}" in message


@pytest.mark.parametrize("page", ["Token map", "Risk"])
def test_corrupt_parquet_message(app_runs, page):
    app = open_page(app_runs, page, "broken")
    message = texts(app.warning)
    assert "tokens.parquet cannot be read" in message and "bganalysis analyze" in message


def test_corrupt_parquet_other_pages_work(app_runs):
    app = open_page(app_runs, "Exposure bias", "broken")
    assert len(app.dataframe) == 1 and len(images(app)) == 1  # steps still shown; per-region needs tokens
    assert "tokens.parquet cannot be read" in texts(app.warning)
    assert len(open_page(app_runs, "Benchmarks", "broken").dataframe) == 1


@pytest.mark.parametrize("run", ["..", "../..", "/etc"])
def test_run_outside_root_rejected(app_runs, run):
    app = open_page(app_runs, "Runs", run)
    assert "outside" in texts(app.error)
    assert not app.dataframe


def test_long_document_renders_fast(app_runs):
    tokens = pd.read_parquet(app_runs / "long" / "analysis" / "tokens.parquet")
    rows = tokens[tokens.model == "hard"].sort_values("position")
    assert len(rows) == LONG_TOKENS
    started = time.perf_counter()
    html = token_map_html(rows, "kappa", {"doc": "long"}, 5)
    built = time.perf_counter() - started
    assert built < 0.5
    assert html.count("</a>") == LONG_TOKENS

    app = open_page(app_runs, "Token map", "long", doc="long", student="hard")
    started = time.perf_counter()
    app.number_input(key="pos").set_value(1500).run()
    elapsed = time.perf_counter() - started
    assert "Position 1500" in texts(app.subheader)
    assert elapsed < 2.0, f"a {LONG_TOKENS}-token document took {elapsed:.2f} s to render"
    print(f"{LONG_TOKENS} tokens: HTML built in {built * 1000:.0f} ms, page rerun in {elapsed:.2f} s")  # pytest -s


def test_model_loaded_once_across_reruns(app_runs, caplog):
    from bganalysis.app.live import load_models

    load_models.clear()
    app = open_page(app_runs, "Token map", "good")
    with caplog.at_level(logging.INFO, logger="bganalysis.app.live"):
        for text in ["prog 3 : let a = 2 ;", "calc 3 + 5 : 3 + 5 = 8", "prog 2 : let b = 1 ;"]:
            app.text_area(key="live_text").set_value(text)
            app.button(key="live_run").click().run()
            assert not app.exception
        app.run()
    loads = [record for record in caplog.records if record.getMessage().startswith("loading teacher")]
    assert len(loads) == 1
    result = app.dataframe[-1].value
    assert list(result.token) == ["prog", "2", ":", "let", "b", "=", "1", ";"]
    for name in ["hard", "soft", "hybrid", "hard_argmax"]:
        assert (result[f"KL {name} (nats)"] >= 0).all()


def test_no_model_loaded_without_request(app_runs, caplog):
    from bganalysis.app.live import load_models

    load_models.clear()
    with caplog.at_level(logging.INFO, logger="bganalysis.app.live"):
        for page in PAGES:
            open_page(app_runs, page, "good")
    assert not [record for record in caplog.records if record.getMessage().startswith("loading teacher")]
