"""Benchmark evaluation: suites on lm-evaluation-harness and evalplus, cached results, reports.

Modules: `suites` (the suite files of eval_configs/), `tasks` (lm-eval task configs for
local files or the hub), `lm_eval_runner` and `code_runner` (one benchmark each),
`sandbox` (confinement of generated code), `extraction` (answers from generated text),
`results` (cache, Parquet and Markdown), `runner` (models x benchmarks), `report`
(benchmark deltas next to exposure bias).
"""
