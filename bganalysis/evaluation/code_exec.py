"""The evalplus execution step, called inside the sandbox (`sandbox_child`).

Nothing here runs in the main process: evalplus reads `HUMANEVAL_OVERRIDE_PATH` and
`MBPP_OVERRIDE_PATH` when it is imported, so the sandbox sets them (to the subset file)
before this module imports evalplus.
"""

from __future__ import annotations

import json
import os


def evaluate_samples(dataset: str, samples: str, parallel: int) -> dict:
    """Score `samples` (evalplus JSONL) with evalplus; return {task_id: {base_status, plus_status}}."""
    from evalplus.evaluate import evaluate

    evaluate(dataset, samples=samples, parallel=parallel, i_just_wanna_run=False)
    with open(samples.replace(".jsonl", "_eval_results.json"), encoding="utf-8") as handle:
        results = json.load(handle)
    return {task_id: {"base_status": rows[0]["base_status"], "plus_status": rows[0]["plus_status"]}
            for task_id, rows in results["eval"].items()}


def dataset_hash() -> str:
    """evalplus's hash of the dataset named by the override variables (for the cache key)."""
    from evalplus.data import get_human_eval_plus_hash, get_mbpp_plus_hash

    return get_mbpp_plus_hash() if os.environ.get("MBPP_OVERRIDE_PATH") else get_human_eval_plus_hash()
