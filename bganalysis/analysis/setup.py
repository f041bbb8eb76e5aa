"""Load the teacher, the students and the documents of an analysis, checking them first."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from bganalysis.analysis.documents import AnalysisDocument, attach_lab_roles, build_documents
from bganalysis.errors import UserError
from bganalysis.rollout import ModelRunner

log = logging.getLogger(__name__)

LAB_TEACHER = "lab"


@dataclass
class AnalysisSetup:
    """Loaded models wrapped in runners, the documents, and lab extras when the teacher is the lab."""

    teacher: ModelRunner
    students: dict[str, ModelRunner]
    kappa_student: str
    tokenizer: object
    eos_ids: set[int]
    rows: list[dict]  # prompt rows; documents are built shard by shard
    exact: object | None  # ExactLossToGo on the lab, else None
    vocab_size: int
    teacher_model: object

    def documents(self, config, indices: range) -> list[AnalysisDocument]:
        """Build the documents of `indices`: prompt ids and a teacher response each."""
        documents = build_documents([self.rows[i] for i in indices], self.tokenizer, self.teacher, self.eos_ids,
                                    chat_template=config.chat_template, max_prompt_tokens=config.max_prompt_tokens,
                                    max_new_tokens=config.max_new_tokens, seed=config.seed,
                                    temperature=config.response_temperature, first_index=indices.start)
        if self.exact is not None:
            attach_lab_roles(documents, self.teacher_model.process)
        return documents


def load_setup(config) -> AnalysisSetup:
    """Load models and tokenizers, reject mismatched tokenizers, build the documents."""
    from bganalysis import lab
    from bganalysis.io import read_prompts
    from bganalysis.models import check_tokenizers_match, load_causal_lm, load_tokenizer

    _check_paths_exist(config)
    if config.teacher == LAB_TEACHER:
        teacher_model, tokenizer = lab.LabTeacher(), lab.lab_tokenizer()
    else:
        teacher_model = load_causal_lm(config.teacher, device=config.device)
        tokenizer = load_tokenizer(config.teacher)
    is_lab = lab.is_lab_model(teacher_model)

    student_models = {}
    for name, path in zip(config.names, config.students):
        student_tokenizer = load_tokenizer(path)
        check_tokenizers_match(tokenizer, student_tokenizer, config.teacher, path)
        student_models[name] = load_causal_lm(path, device=config.device, dtype=None).float()

    vocab_size = min([len(tokenizer), _model_vocab(teacher_model)] + [_model_vocab(m) for m in student_models.values()])
    if vocab_size < len(tokenizer):
        raise UserError(f"a model has {vocab_size} output rows but the tokenizer has {len(tokenizer)} tokens; "
                        "the models do not belong to this tokenizer")
    teacher = ModelRunner(teacher_model, vocab_size, config.device)
    students = {name: ModelRunner(model, vocab_size, config.device) for name, model in student_models.items()}
    eos_ids = _eos_ids(tokenizer, teacher_model)

    rows = _prompt_rows(config, is_lab, read_prompts)
    exact = lab.ExactLossToGo(teacher_model.process) if is_lab else None
    kappa_student = config.kappa_student or config.names[0]
    return AnalysisSetup(teacher, students, kappa_student, tokenizer, eos_ids, rows, exact, vocab_size, teacher_model)


def _check_paths_exist(config) -> None:
    """Fail on a mistyped local path before spending seconds loading models."""
    from pathlib import Path

    from bganalysis.io import check_prompts_file
    from bganalysis.models import looks_like_local_path

    if config.prompts is not None:
        check_prompts_file(config.prompts)
    for option, path in [("--teacher", config.teacher)] + [("--student", s) for s in config.students]:
        if path != LAB_TEACHER and not Path(path).expanduser().exists() and looks_like_local_path(path):
            raise UserError(f"{option} {path}: no such folder; check the path")


def _model_vocab(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None else int(model.config.vocab_size)


def _eos_ids(tokenizer, model) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if not ids:
        raise UserError("the teacher's tokenizer has no eos_token; set one in its tokenizer_config.json")
    return ids


def _prompt_rows(config, is_lab: bool, read_prompts) -> list[dict]:
    if config.prompts is not None:
        rows = read_prompts(config.prompts)
    elif is_lab:
        rows = lab_prompt_rows(config.num_lab_docs, seed=10_000 + config.seed)
    else:
        raise UserError("--prompts is required unless the teacher is the lab; pass a JSONL of {\"prompt\": ...} rows")
    if config.max_docs is not None:
        rows = rows[: config.max_docs]
    return rows


def lab_prompt_rows(count: int, seed: int) -> list[dict]:
    """Prompts of fresh lab documents (the responses are left to the teacher)."""
    from bganalysis.lab import lab_tokenizer, sample_documents

    tokenizer = lab_tokenizer()
    return [
        {"id": f"lab{index}", "prompt": tokenizer.decode(doc.prompt_ids, skip_special_tokens=True), "response": None}
        for index, doc in enumerate(sample_documents(count, seed=seed))
    ]
