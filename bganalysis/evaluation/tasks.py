"""lm-eval task configs for the reasoning benchmarks, from local files or the hub.

The scoring part of each benchmark (prompt, shots, filters, metrics, version) is a
task file in `eval_configs/tasks/`, loaded with lm-eval's own YAML loader. This module
adds what depends on the source: with a data folder (`--data-dir`, the layout of
docs/eval.md) `dataset_path: json|csv` and the local files; without one the
hub datasets that lm-eval's own tasks use. The result is a list of task config dicts,
one per subtask, that `lm_eval.simple_evaluate` accepts as they are.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from bganalysis.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "eval_configs"
HUB = {"bbh": "SaylorTwift/bbh", "mmlu": "cais/mmlu", "arc_challenge": "allenai/ai2_arc", "theoremqa": "TIGER-Lab/TheoremQA"}
PREFIX = "bga_"  # task names, so they never collide with lm-eval's registered tasks


def task_configs(benchmark: str, template: Path, data_dir: Path | None, max_new_tokens: int) -> list[dict]:
    """One lm-eval config dict per subtask of `benchmark`."""
    from lm_eval.tasks._yaml_loader import load_yaml

    base = load_yaml(template)
    if "generation_kwargs" in base:
        base["generation_kwargs"] = {**base["generation_kwargs"], "max_gen_toks": max_new_tokens}
    builders = {"bbh": _bbh, "mmlu": _mmlu, "arc_challenge": _arc, "theoremqa": _theoremqa}
    if benchmark not in builders:
        raise UserError(f"benchmark {benchmark!r} has no lm-eval task builder; use one of {', '.join(builders)}")
    return [{**base, **extra} for extra in builders[benchmark](data_dir)]


def _bbh(data_dir: Path | None) -> list[dict]:
    configs = []
    for name in bbh_subtasks(data_dir):
        if data_dir is not None:
            description, samples = parse_cot_prompt((Path(data_dir) / "bbh" / "cot-prompts" / f"{name}.txt").read_text())
            source = {"dataset_path": "json", "dataset_kwargs": {
                "data_files": {"test": str(Path(data_dir) / "bbh" / "bbh" / f"{name}.json")}, "field": "examples"}}
        else:
            description, samples = _lm_eval_bbh_examples(name)
            source = {"dataset_path": HUB["bbh"], "dataset_name": name}
        configs.append({"task": f"{PREFIX}bbh_{name}", "description": description,
                        "fewshot_config": {"sampler": "first_n", "samples": samples}, **source})
    return configs


def bbh_subtasks(data_dir: Path | None) -> list[str]:
    """The 27 BBH task names, from the data folder or from lm-eval's task files."""
    if data_dir is not None:
        return sorted(path.stem for path in (Path(data_dir) / "bbh" / "bbh").glob("*.json"))
    return sorted(path.stem for path in _lm_eval_bbh_dir().glob("*.yaml") if not path.name.startswith("_"))


def parse_cot_prompt(text: str) -> tuple[str, list[dict]]:
    """Split an official BBH CoT prompt file into (description, [{input, target}, ...]).

    The file is a canary line, a `-----` line, a task description (one or more
    paragraphs), then examples "Q: <input>\\nA: Let's think step by step.\\n<reasoning and answer>".
    """
    body = text.split("-----", 1)[-1].strip()
    description, examples = re.split(r"\n\n(?=Q: )", body, maxsplit=1)
    samples = []
    for block in re.split(r"\n\n(?=Q: )", examples.strip()):
        question, _, answer = block.partition("\nA: Let's think step by step.")  # then a newline or a space
        samples.append({"input": question.removeprefix("Q: ").strip(), "target": answer.strip()})
    return description.strip() + "\n\n", samples


def _lm_eval_bbh_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks" / "bbh" / "cot_fewshot"


@functools.cache
def _lm_eval_bbh_examples(name: str) -> tuple[str, list[dict]]:
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(_lm_eval_bbh_dir() / f"{name}.yaml", resolve_func=False, recursive=False)
    return config["description"], config["fewshot_config"]["samples"]


def _mmlu(data_dir: Path | None) -> list[dict]:
    if data_dir is not None:
        subjects = sorted(path.name.removesuffix("_test.csv") for path in (Path(data_dir) / "mmlu" / "test").glob("*_test.csv"))
    else:
        from lm_eval.tasks._yaml_loader import load_yaml
        import lm_eval

        folder = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
        subjects = sorted(load_yaml(path, resolve_func=False, recursive=False)["dataset_name"]
                          for path in folder.glob("mmlu_*.yaml"))
    configs = []
    for subject in subjects:
        description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        if data_dir is not None:
            files = {split: str(Path(data_dir) / "mmlu" / split / f"{subject}_{split}.csv") for split in ("dev", "test")}
            source = {"dataset_path": "csv", "dataset_kwargs": {"data_files": files}}
        else:
            source = {"dataset_path": HUB["mmlu"], "dataset_name": subject}
        configs.append({"task": f"{PREFIX}mmlu_{subject}", "description": description, **source})
    return configs


def _arc(data_dir: Path | None) -> list[dict]:
    if data_dir is None:
        return [{"task": f"{PREFIX}arc_challenge", "dataset_path": HUB["arc_challenge"], "dataset_name": "ARC-Challenge"}]
    folder = Path(data_dir) / "arc_challenge"
    files = {"train": str(folder / "ARC-Challenge-Train.jsonl"), "validation": str(folder / "ARC-Challenge-Dev.jsonl"),
             "test": str(folder / "ARC-Challenge-Test.jsonl")}
    return [{"task": f"{PREFIX}arc_challenge", "dataset_path": "json", "dataset_kwargs": {"data_files": files}}]


def _theoremqa(data_dir: Path | None) -> list[dict]:
    if data_dir is None:
        return [{"task": f"{PREFIX}theoremqa", "dataset_path": HUB["theoremqa"]}]
    from bganalysis.evaluation.taskfns import theoremqa_local

    # The release JSON mixes answer types in one column, which the json loader rejects.
    return [{"task": f"{PREFIX}theoremqa", "dataset_path": "json", "custom_dataset": theoremqa_local,
             "dataset_kwargs": {"data_file": str(Path(data_dir) / "theoremqa" / "theoremqa_test.json")}}]
