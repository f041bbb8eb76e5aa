"""Each local task definition loads real items from ../shared/benchmarks and scores them."""

from __future__ import annotations

import pytest

from bganalysis.evaluation.lm_eval_runner import LmEvalSettings, make_lm, run_benchmark, spread_indices
from bganalysis.evaluation.suites import load_suite
from bganalysis.evaluation.tasks import CONFIG_DIR, parse_cot_prompt, task_configs
from bganalysis.evaluation.taskfns import extract_filter, theoremqa_filter, theoremqa_results
from tests.eval_helpers import DATA, tiny_byte_model

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/benchmarks")
TEMPLATES = {b.name: b.task for b in load_suite("reasoning")[1]}


@pytest.fixture(scope="module")
def lm():
    model, tokenizer = tiny_byte_model()
    return make_lm(model, tokenizer, "2")


def _configs(name):
    return task_configs(name, TEMPLATES[name], DATA, max_new_tokens=4)


def _load(configs):
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_defaults=False).load_task_or_group(configs)
    return {name: task for name, task in tasks.items()}


@pytest.mark.parametrize("name, subtasks", [("bbh", 27), ("mmlu", 57), ("arc_challenge", 1), ("theoremqa", 1)])
def test_local_task_scores_real_items(lm, name, subtasks):
    configs = _configs(name)
    assert len(configs) == subtasks
    metrics, samples = run_benchmark(lm, configs, LmEvalSettings(limit=3, chat_template=False, batch_size="2"))
    assert [m["n"] for m in metrics] == [3] * len(metrics)
    assert all(0.0 <= m["value"] <= 1.0 for m in metrics)
    assert len(samples) == 3 and samples.prompt.str.len().min() > 20
    if subtasks > 1:  # --limit spreads over subtasks
        assert samples.task.nunique() == 3


def test_bbh_prompt_is_the_official_three_shot_cot():
    for path in sorted((DATA / "bbh" / "cot-prompts").glob("*.txt")):
        description, samples = parse_cot_prompt(path.read_text())
        assert len(samples) == 3, path.name
        assert "the answer is" in samples[-1]["target"].lower() and not description.startswith("BENCHMARK")


def test_bbh_scores_the_target_as_correct_and_another_answer_as_wrong():
    task = next(iter(_load(_configs("bbh")[:1]).values()))
    doc = task.test_docs()[0]  # boolean_expressions: target "False"
    right = extract_filter([[f"Z = not True. So the answer is {doc['target']}."]], [doc])[0][0]
    wrong = extract_filter([["So the answer is maybe."]], [doc])[0][0]
    assert task.process_results(doc, [right])["exact_match"] == 1.0
    assert task.process_results(doc, [wrong])["exact_match"] == 0.0


def test_theoremqa_scores_release_answers():
    task = next(iter(_load(_configs("theoremqa")).values()))
    doc = task.test_docs()[0]  # 11760 ways
    assert theoremqa_results(doc, theoremqa_filter([["Therefore, the answer is 11760."]], [doc])[0]) == {"exact_match": 1.0}
    assert theoremqa_results(doc, theoremqa_filter([["Therefore, the answer is 42."]], [doc])[0]) == {"exact_match": 0.0}


def test_mmlu_has_five_dev_shots_and_zero_based_answers():
    task = next(iter(_load(_configs("mmlu")[:1]).values()))
    doc = task.test_docs()[0]
    context = task.fewshot_context(doc, num_fewshot=5)
    assert context.count("\nAnswer:") == 6 and doc["answer"] in range(4) and len(doc["choices"]) == 4


def test_arc_maps_numeric_answer_keys():
    task = next(iter(_load(_configs("arc_challenge")).values()))
    docs = list(task.test_docs())
    assert len(docs) == 1172 and all(0 <= doc["gold"] < len(doc["choices"]) for doc in docs)


def test_spread_indices_round_robin():
    assert spread_indices([5, 1, 5], 6) == [[0, 1, 2], [0], [0, 1]]
    assert spread_indices([2, 2], 10) == [[0, 1], [0, 1]]


def test_task_files_state_a_version():
    for path in (CONFIG_DIR / "tasks").glob("*.yaml"):
        assert "metadata:\n  version:" in path.read_text(), path


def test_online_configs_use_the_hub_datasets_of_lm_eval_tasks():
    bbh = task_configs("bbh", TEMPLATES["bbh"], None, 8)
    assert len(bbh) == 27 and {c["dataset_path"] for c in bbh} == {"SaylorTwift/bbh"}
    assert all(len(c["fewshot_config"]["samples"]) == 3 for c in bbh)
    local = {c["task"]: c for c in _configs("bbh")}
    assert [c["task"] for c in bbh] == list(local)  # the same 27 tasks offline and online
    mmlu = task_configs("mmlu", TEMPLATES["mmlu"], None, 8)
    assert len(mmlu) == 57 and mmlu[0]["dataset_path"] == "cais/mmlu" and mmlu[0]["dataset_name"] == "abstract_algebra"
    assert task_configs("arc_challenge", TEMPLATES["arc_challenge"], None, 8)[0]["dataset_name"] == "ARC-Challenge"
    assert task_configs("theoremqa", TEMPLATES["theoremqa"], None, 8)[0]["dataset_path"] == "TIGER-Lab/TheoremQA"


def test_offline_bbh_prompt_equals_lm_eval_online_prompt():
    online = task_configs("bbh", TEMPLATES["bbh"], None, 8)
    for remote, local in zip(online, _configs("bbh")):
        assert local["description"] == remote["description"], local["task"]
        assert local["fewshot_config"]["samples"] == remote["fewshot_config"]["samples"], local["task"]


def test_mbpp_snapshot_prompts_name_the_function():
    from bganalysis.evaluation.code_runner import load_problems

    problem = load_problems("mbpp", DATA, 1)[0]
    assert problem["prompt"].startswith('"""\n') and problem["prompt"].endswith('\n"""\n')
    assert "assert similar_elements(" in problem["prompt"] and "'''" not in problem["prompt"]
