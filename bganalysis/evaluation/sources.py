"""Turn `--model` values into named model folders or hub ids, and hash loaded models.

A value is a GGUF file (imported once into ~/.cache/bganalysis/gguf/), a run folder
(every student under its `students/`), a model folder, or a hub id.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from bganalysis.errors import UserError

GGUF_CACHE = Path("~/.cache/bganalysis/gguf").expanduser()


@dataclass(frozen=True)
class ModelSource:
    name: str  # the column name in the results table
    path: str  # a model folder or a hub id
    run_dir: Path | None  # the run folder the model belongs to


def resolve_models(values: list[str]) -> list[ModelSource]:
    """All models named by `values`, in order, with unique names."""
    sources: list[ModelSource] = []
    for value in values:
        try:
            sources += _resolve(value)
        except PermissionError as error:
            raise UserError(f"--model {value}: {error.filename} cannot be read ({error.strerror}); "
                            "check its permissions or pass another model") from None
    names: dict[str, int] = {}
    unique = []
    for source in sources:
        names[source.name] = names.get(source.name, 0) + 1
        name = source.name if names[source.name] == 1 else f"{source.name}-{names[source.name]}"
        unique.append(ModelSource(name, source.path, source.run_dir))
    return unique


def _resolve(value: str) -> list[ModelSource]:
    path = Path(value).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return [ModelSource(path.stem, str(_imported_gguf(path)), None)]
    if path.is_dir() and (path / "students").is_dir() and not (path / "config.json").is_file():
        students = sorted(p for p in (path / "students").iterdir() if (p / "config.json").is_file())
        if not students:
            raise UserError(f"--model {value}: the run folder has no students (no students/*/config.json); "
                            "train one with `bganalysis train --out RUN` or pass a model folder")
        return [ModelSource(p.name, str(p), path.resolve()) for p in students]
    if path.is_dir():
        run_dir = path.resolve().parent.parent if path.resolve().parent.name == "students" else None
        return [ModelSource(path.resolve().name, str(path), run_dir)]
    return [ModelSource(value.rstrip("/").split("/")[-1], value, None)]  # a hub id; load_causal_lm checks it


def _imported_gguf(path: Path) -> Path:
    from bganalysis.models import import_gguf

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = GGUF_CACHE / f"{path.stem}-{key}"
    if not (target / "config.json").is_file():
        import_gguf(path, target)
    return target


def model_hash(model, tokenizer) -> str:
    """A hash of the weights as loaded (names, dtypes, shapes, bytes) and of the vocabulary."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy() if tensor.numel() else b"")  # a buffer: no copy
    digest.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return digest.hexdigest()[:16]
