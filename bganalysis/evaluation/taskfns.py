"""Functions that the task files in `eval_configs/tasks/` name with `!function`.

lm-eval calls them while it loads documents and scores answers. Each `*_docs` function
maps both the local file layout (`--data-dir`) and the hub dataset of the same
benchmark to one schema, so the prompt templates are shared by both sources.
"""

from __future__ import annotations

import json

from bganalysis.evaluation.extraction import extract_answer, theoremqa_correct, theoremqa_prediction


def extract_filter(resps, docs):
    """lm-eval `custom` filter: every generation -> `extract_answer(generation)`."""
    return [[extract_answer(text) for text in group] for group in resps]


def theoremqa_filter(resps, docs):
    """lm-eval `custom` filter for TheoremQA: extraction that keeps lists and booleans whole."""
    return [[theoremqa_prediction(text, doc["Answer_type"]) for text in group] for group, doc in zip(resps, docs)]


def theoremqa_results(doc, results):
    """lm-eval `process_results`: exact_match is 1.0 when the extracted answer matches."""
    answer = json.loads(doc["answer_json"])
    return {"exact_match": float(theoremqa_correct(results[0], answer, doc["Answer_type"]))}


def mmlu_docs(dataset):
    """Local CSV rows (question, choice0..choice3, answer) -> the hub schema (question, choices, answer)."""
    if "choices" in dataset.column_names:
        return dataset

    def to_hub(row):
        return {"question": row["question"], "choices": [str(row[f"choice{i}"]) for i in range(4)],
                "answer": int(row["answer"])}

    return dataset.map(to_hub, remove_columns=dataset.column_names)


def arc_docs(dataset):
    """ARC-V1 rows (nested question) or hub rows (flat) -> (question, choices, gold index)."""
    def normalise(row):
        question = row["question"]
        if isinstance(question, dict):  # ARC-V1 jsonl: question.stem, question.choices[{text, label}]
            texts = [choice["text"] for choice in question["choices"]]
            labels = [choice["label"] for choice in question["choices"]]
            question = question["stem"]
        else:
            texts, labels = list(row["choices"]["text"]), list(row["choices"]["label"])
        return {"question": question, "choices": texts, "gold": labels.index(row["answerKey"])}

    return dataset.map(normalise, remove_columns=dataset.column_names)


def theoremqa_docs(dataset):
    """Keep Question, Answer_type; add `answer_json` (the reference answer as JSON text)."""
    def normalise(row):
        answer = row.get("answer_json")
        if answer is None:
            answer = _answer_json(row["Answer"])
        return {"Question": row["Question"], "Answer": str(json.loads(answer)), "Answer_type": row["Answer_type"],
                "answer_json": answer}

    return dataset.map(normalise, remove_columns=dataset.column_names)


def theoremqa_local(data_file: str, **_metadata):
    """lm-eval `custom_dataset` for the release JSON, whose Answer column mixes types."""
    import datasets

    with open(data_file, encoding="utf-8") as handle:
        rows = json.load(handle)
    records = [{"Question": row["Question"], "Answer_type": row["Answer_type"], "answer_json": json.dumps(row["Answer"]),
                "Answer": str(row["Answer"])} for row in rows]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})


def _answer_json(answer) -> str:
    """The hub stores answers as text ("[0, 5]", "True", "11760"); parse them back where possible."""
    if not isinstance(answer, str):
        return json.dumps(answer)
    text = answer.strip()
    for candidate in (text, text.lower()):
        try:
            return json.dumps(json.loads(candidate))
        except json.JSONDecodeError:
            continue
    return json.dumps(text)
