"""Live analysis of a typed text: the run's teacher and students, loaded once per server process.

Nothing is loaded until the user asks: `load_models` is an `st.cache_resource`, so the
first request loads the models (logged once) and every later rerun and session reuses
them. Only models inside the run folder are loaded (RUN/teacher, RUN/students/*), so the
explorer never reads model files outside RUNS_DIR; a run analysed with the built-in lab
teacher and no saved teacher uses the lab teacher.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import streamlit as st

log = logging.getLogger(__name__)


@dataclass
class LiveModels:
    tokenizer: object
    teacher: object
    students: dict[str, object]


def live_sources(run: Path, teacher_setting: str | None) -> tuple[str | None, list[Path]]:
    """(teacher path or "lab", student folders) inside the run; teacher None when it is not there."""
    students = sorted(path for path in (run / "students").glob("*") if (path / "config.json").is_file()) \
        if (run / "students").is_dir() else []
    if (run / "teacher" / "config.json").is_file():
        return str(run / "teacher"), students
    return ("lab" if teacher_setting == "lab" else None), students


@st.cache_resource(show_spinner="Loading the teacher and students (once per server)...", max_entries=2)
def load_models(teacher: str, students: tuple[str, ...]) -> LiveModels:
    """Load the teacher, its tokenizer and the students, float32 on CPU."""
    from bganalysis import lab
    from bganalysis.models import load_causal_lm, load_tokenizer

    log.info("loading teacher %s and %d students for live analysis", teacher, len(students))
    if teacher == "lab":
        teacher_model, tokenizer = lab.LabTeacher(), lab.lab_tokenizer()
    else:
        teacher_model, tokenizer = load_causal_lm(teacher), load_tokenizer(teacher)
    loaded = {Path(path).name: load_causal_lm(path, dtype=None).float() for path in students}
    return LiveModels(tokenizer=tokenizer, teacher=teacher_model.eval(), students=loaded)


def analyse_text(models: LiveModels, text: str, top_k: int = 3) -> pd.DataFrame:
    """One row per token after the first: the teacher's entropy, p(token), top-k, and each student's forward KL."""
    import torch

    with torch.no_grad():
        return _analyse(models, text, top_k)


def _analyse(models: LiveModels, text: str, top_k: int) -> pd.DataFrame:
    import torch

    from bganalysis.losses import kl_from_logprobs

    ids = torch.tensor([models.tokenizer(text)["input_ids"]])
    if ids.shape[1] < 2:
        return pd.DataFrame()
    teacher = torch.log_softmax(models.teacher(input_ids=ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    probs = teacher.exp()
    top = torch.topk(probs, min(top_k, probs.shape[-1]), dim=-1)
    frame = pd.DataFrame({
        "position": range(1, ids.shape[1]),
        "token": [models.tokenizer.decode([int(i)]) for i in targets],
        "teacher p(token)": probs.gather(1, targets[:, None])[:, 0].numpy(),
        "teacher entropy (nats)": -(probs * teacher).nansum(dim=-1).numpy(),
        "teacher top-k": [", ".join(f"{models.tokenizer.decode([int(i)])!r} {p:.2f}" for i, p in zip(row_ids, row_p))
                          for row_ids, row_p in zip(top.indices.tolist(), top.values.tolist())],
    })
    for name, student in models.students.items():
        student_logprobs = torch.log_softmax(student(input_ids=ids).logits[0, :-1].float(), dim=-1)
        frame[f"KL {name} (nats)"] = kl_from_logprobs(teacher, student_logprobs).numpy()
    return frame
