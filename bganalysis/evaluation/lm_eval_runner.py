"""One reasoning benchmark through `lm_eval.simple_evaluate`, on a model already loaded.

A benchmark with subtasks (BBH, MMLU) is scored as the mean over all its items, which
is lm-eval's `weight_by_size` group aggregate; its standard error is lm-eval's
`mean_stderr` over the same items. `--limit N` takes N items of the benchmark: for a
benchmark with subtasks, the first item of each subtask in turn, then the second, so a
small limit still covers many subtasks (lm-eval's own `--limit` would take N items of
every subtask).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LmEvalSettings:
    limit: int | None
    chat_template: bool
    batch_size: str  # an integer or "auto"


def make_lm(model, tokenizer, batch_size: str):
    """lm-eval's HFLM around a loaded model (the in-memory path used for every model)."""
    from lm_eval.models.huggingface import HFLM

    size = batch_size if batch_size == "auto" else int(batch_size)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=size)


def spread_indices(counts: list[int], limit: int) -> list[list[int]]:
    """Item indices per subtask for `limit` items taken round-robin over subtasks of `counts` items."""
    taken = [0] * len(counts)
    total = 0
    while total < min(limit, sum(counts)):
        for i, count in enumerate(counts):
            if taken[i] < count and total < limit:
                taken[i] += 1
                total += 1
    return [list(range(n)) for n in taken]


def run_benchmark(lm, configs: list[dict], settings: LmEvalSettings) -> tuple[list[dict], pd.DataFrame]:
    """Evaluate the subtask `configs`; return metric rows and the per-sample table."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if settings.limit is not None and settings.limit < len(configs):
        configs = configs[:settings.limit]  # round-robin takes one item from each of the first `limit` subtasks
    manager = TaskManager(include_defaults=False)
    tasks = load_tasks(configs, manager)  # loaded once: the sizes need them, and simple_evaluate reuses them
    names = [config["task"] for config in configs]
    samples = None
    if settings.limit is not None:
        chosen = spread_indices([len(tasks[name].eval_docs) for name in names], settings.limit)
        samples = {name: indices for name, indices in zip(names, chosen) if indices}
        names = [name for name in names if name in samples]
    output = lm_eval.simple_evaluate(model=lm, tasks=[tasks[name] for name in names], task_manager=manager,
                                     samples=samples, log_samples=True, apply_chat_template=settings.chat_template,
                                     fewshot_as_multiturn=settings.chat_template)
    table = _sample_table(output["samples"])
    return _metric_rows(table, configs[0]), table


def load_tasks(configs: list[dict], manager) -> dict:
    """{task name: lm-eval Task} for the subtask `configs` (this loads their datasets)."""
    return dict(_leaves(manager.load_task_or_group(configs)))


def _leaves(tasks: dict):
    for name, value in tasks.items():
        if isinstance(value, dict):
            yield from _leaves(value)
        else:
            yield name, value


def _metric_rows(table: pd.DataFrame, config: dict) -> list[dict]:
    from lm_eval.api.metrics import mean_stderr

    rows = []
    for metric in [entry["metric"] for entry in config["metric_list"]]:
        values = table[metric].astype(float).tolist()
        stderr = float(mean_stderr(values)) if len(values) > 1 else float("nan")
        rows.append({"metric": metric, "value": float(np.mean(values)), "stderr": stderr, "n": len(values)})
    return rows


def _sample_table(samples: dict) -> pd.DataFrame:
    """One row per item: task, doc_id, prompt, generation, extracted answer, correct, metric values."""
    rows = []
    for task, items in samples.items():
        for item in items:
            rows.append({"task": task, "doc_id": str(item["doc_id"]), **_describe(item)})
    return pd.DataFrame(rows)


def _describe(item: dict) -> dict:
    metrics = {key: float(item[key]) for key in ("acc", "acc_norm", "exact_match") if key in item}
    first = item["arguments"][0]
    if isinstance(first, (list, tuple)) and len(first) == 2 and isinstance(first[1], str):  # loglikelihood
        scores = [resp[0][0] if isinstance(resp[0], (list, tuple)) else resp[0] for resp in item["resps"]]
        choices = [argument[1] for argument in item["arguments"]]
        chosen = choices[int(np.argmax(scores))]
        return {"prompt": first[0], "generation": chosen, "extracted": chosen.strip(), "target": str(item["target"]),
                "correct": bool(metrics.get("acc", 0.0)), **metrics}
    generation = item["resps"][0][0] if item["resps"] and item["resps"][0] else ""
    extracted = item["filtered_resps"][0] if item["filtered_resps"] else ""
    return {"prompt": first[0] if isinstance(first, (list, tuple)) else str(first), "generation": generation,
            "extracted": str(extracted), "target": str(item["target"]), "correct": bool(metrics.get("exact_match", 0.0)),
            **metrics}
