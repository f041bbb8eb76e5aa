"""Train a student from a teacher with hard, soft or hybrid labels, on the transformers Trainer.

`train(TrainConfig(...))` is the entry point for scripts and the demo; `bganalysis train`
builds the config from a recipe YAML and flags. The loss, the step-level normalisation
and on-policy mixing live in `bganalysis.trainer.DistillTrainer`; this module loads the
teacher, the student and the data, runs the Trainer, and writes the student.

Layout of a run, for a student NAME under OUT:

- `OUT/checkpoints/NAME/`: `train_config.yaml`, `train_log.jsonl` and the Trainer's
  `checkpoint-STEP` folders (model, optimiser, scheduler, random states). They exist
  while the run is unfinished, so `--resume` continues it; a finished run removes them.
- `OUT/students/NAME/`: the trained student, its tokenizer, `train_config.yaml` (the
  resolved settings plus provenance; itself a valid recipe) and `train_log.jsonl`,
  written atomically when training ends.

SIGINT or SIGTERM stops at the end of the current optimiser step and saves a checkpoint;
the same command with `--resume` continues from it. A second signal stops at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

from bganalysis.errors import UserError
from bganalysis.io import atomic_directory, atomic_write_text
from bganalysis.train_config import DTYPES, HARD_TARGETS, METHOD_LAMBDA, METHODS, TrainConfig
from bganalysis.train_data import Example, collate, jsonl_examples, lab_examples

__all__ = ["DTYPES", "HARD_TARGETS", "METHOD_LAMBDA", "METHODS", "TrainConfig", "train"]

logger = logging.getLogger(__name__)

# Settings that may change between an interrupted run and its --resume.
RESUMABLE_CHANGES = ("resume", "force", "log_every", "report_to", "device", "save_every")


def train(config: TrainConfig, callbacks: tuple = ()) -> Path:
    """Train a student with the settings in `config` and return its folder, `<out>/students/<name>`.

    `callbacks` are extra transformers `TrainerCallback`s (for example to log elsewhere).
    Raises KeyboardInterrupt after saving a checkpoint when a signal stopped the run.
    """
    _resolve_device(config.device)
    folder = Path(config.out) / "students" / config.name
    run_dir = Path(config.out) / "checkpoints" / config.name
    checkpoint = _prepare_run_dir(config, run_dir)

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    trainer, stopper = make_trainer(config, run_dir, callbacks)
    if checkpoint is None:
        _start_run_dir(config, run_dir)
    tokenizer = trainer.processing_class
    with stopper:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if not trainer.is_world_process_zero():
        return folder
    if stopper.stopped:
        logger.warning("stopped at step %d; checkpoint saved in %s; rerun the same command with --resume to continue",
                       trainer.state.global_step, run_dir)
        raise KeyboardInterrupt

    student = trainer.accelerator.unwrap_model(trainer.model)
    if config.lora:
        student = student.merge_and_unload()
    log_records = _read_log(run_dir / "train_log.jsonl")
    if folder.exists():
        logger.info("%s exists and is replaced", folder)
    with atomic_directory(folder) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.copyfile(run_dir / "train_log.jsonl", tmp / "train_log.jsonl")
        atomic_write_text(tmp / "train_config.yaml", _config_yaml(config, student, log_records[-1] if log_records else {}, started))
    shutil.rmtree(run_dir, ignore_errors=True)  # the run is finished: its checkpoints are no longer needed
    if run_dir.parent.is_dir() and not any(run_dir.parent.iterdir()):
        run_dir.parent.rmdir()
    logger.info("wrote %s", folder)
    return folder


def _prepare_run_dir(config: TrainConfig, run_dir: Path):
    """Check the checkpoint folder against `config.resume`; return the checkpoint to resume from, or None."""
    saved_path = run_dir / "train_config.yaml"
    checkpoint = _last_complete_checkpoint(run_dir)
    if not config.resume:
        if checkpoint is not None:
            raise UserError(f"{run_dir} holds checkpoints of an unfinished run; pass --resume to continue it, "
                            f"or delete {run_dir} to start over")
        _check_finished_student(config, Path(config.out) / "students" / config.name)
        return None  # the folder is written by _start_run_dir, once teacher, student and data have loaded
    if checkpoint is None:
        raise UserError(f"--resume was given but {run_dir} has no checkpoint; run without --resume to start training")
    saved = _saved_settings(saved_path)
    if saved is None:
        raise UserError(f"cannot resume {run_dir}: its train_config.yaml is missing or unreadable, so the settings "
                        f"of the interrupted run are unknown; delete {run_dir} to start over")
    changed = _changed_settings(saved, config, RESUMABLE_CHANGES)
    if changed:
        raise UserError(f"cannot resume {run_dir}: settings differ from the interrupted run ({', '.join(changed)}); "
                        "use the same settings, or delete the folder to start over")
    step = int(Path(checkpoint).name.split("-")[-1])
    if int(os.environ.get("RANK", "0")) != 0:
        return Path(checkpoint)
    kept = [record for record in _read_log(run_dir / "train_log.jsonl") if record["step"] <= step]
    atomic_write_text(run_dir / "train_log.jsonl", "".join(json.dumps(record) + "\n" for record in kept))
    logger.info("resuming from %s (step %d)", checkpoint, step)
    return Path(checkpoint)


def _check_finished_student(config: TrainConfig, folder: Path) -> None:
    """Raise UserError when `folder` contains a student trained with other settings, unless `config.force`."""
    saved_path = folder / "train_config.yaml"
    if config.force or not saved_path.is_file():
        return
    saved = _saved_settings(saved_path)
    if saved is None:
        changed = ["train_config.yaml is unreadable"]
    else:
        changed = _changed_settings(saved, config, (*RESUMABLE_CHANGES, "out"))
    if changed:
        raise UserError(f"{folder} holds a student trained with other settings ({', '.join(changed)}); pass --force "
                        "to replace it, or choose another --out or --name")


def _saved_settings(path: Path) -> dict | None:
    """Return the settings in the train_config.yaml at `path`, or None when it is missing or unreadable."""
    import yaml

    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return saved if isinstance(saved, dict) else None


def _changed_settings(saved: dict, config: TrainConfig, ignored: tuple[str, ...]) -> list[str]:
    """Return "key=saved -> current" for each setting of `config` outside `ignored` that differs, sorted by key."""
    current = dataclasses.asdict(config)
    return [f"{key}={saved.get(key)!r} -> {current[key]!r}" for key in sorted(current)
            if key not in ignored and saved.get(key) != current[key]]


def _start_run_dir(config: TrainConfig, run_dir: Path) -> None:
    """Create the checkpoint folder of a new run with its settings and an empty log."""
    import yaml

    if int(os.environ.get("RANK", "0")) != 0:
        return  # one process of a multi-process launch prepares the folder
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "train_config.yaml", yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    atomic_write_text(run_dir / "train_log.jsonl", "")


def _last_complete_checkpoint(run_dir: Path) -> str | None:
    """Return the latest checkpoint whose trainer_state.json (the file the Trainer saves last) exists.

    A process killed while saving leaves a checkpoint folder without it, which cannot be resumed.
    """
    if not run_dir.is_dir():
        return None
    steps = [int(path.name.split("-")[-1]) for path in run_dir.glob("checkpoint-*")
             if path.name.split("-")[-1].isdigit() and (path / "trainer_state.json").is_file()]
    return str(run_dir / f"checkpoint-{max(steps)}") if steps else None


def _read_log(path: Path) -> list[dict]:
    """Read train_log.jsonl; a last line cut off by a killed process is dropped."""
    if not path.is_file():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines) - 1:
                raise
    return records


def make_trainer(config: TrainConfig, run_dir: Path, callbacks: tuple = ()):
    """Load the teacher, the student and the data, and return (DistillTrainer, SignalStop).

    Tests use it to see the batches in the order training draws them
    (`trainer.get_train_dataloader()`).
    """
    from transformers import TrainingArguments
    from transformers.trainer_callback import ProgressCallback

    from bganalysis.train_callbacks import JsonlLog, LineProgress, SignalStop
    from bganalysis.trainer import DistillTrainer

    tokenizer, teacher, cache = _load_teacher(config)
    student = _load_student(config, tokenizer, teacher)
    examples = _load_examples(config, tokenizer, _max_len(config, teacher, student))
    _log_start(config, student, tokenizer, examples)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    args = TrainingArguments(
        output_dir=str(run_dir),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.log_every,
        save_strategy="steps" if config.save_every else "no",
        save_steps=config.save_every or config.steps,
        save_total_limit=2,
        seed=config.seed,
        data_seed=config.seed,
        bf16=config.dtype == "bfloat16",
        use_cpu=config.device == "cpu",
        report_to=[] if config.report_to == "none" else [name.strip() for name in config.report_to.split(",")],
        remove_unused_columns=False,
        label_names=["targets"],
        dataloader_num_workers=0,
        ddp_backend="gloo" if config.device == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )
    collator = (lambda batch: cache.collate(batch, pad_id)) if cache is not None else (lambda batch: collate(batch, pad_id))
    stopper = SignalStop()
    trainer = DistillTrainer(
        model=student, args=args, train_dataset=_Examples(examples), data_collator=collator, processing_class=tokenizer,
        callbacks=[*callbacks, JsonlLog(run_dir / "train_log.jsonl", config.steps), stopper],
        config=config, teacher=teacher, vocab_size=len(tokenizer), soft_weights=_soft_weights(config, len(tokenizer)),
        pad_id=pad_id, eos_id=tokenizer.eos_token_id,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LineProgress(f"train {config.name}"))
    return trainer, stopper


def _lr_factor(warmup_steps: int, steps: int):
    """The learning-rate schedule of `bganalysis.trainer`, imported late so the CLI starts without transformers."""
    from bganalysis.trainer import lr_factor

    return lr_factor(warmup_steps, steps)


class _Examples:
    """A map-style dataset of examples for the Trainer's sampler."""

    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def _resolve_device(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"invalid device={name!r}: CUDA is not available here; use --device cpu or --device auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"invalid device={name!r}: MPS is not available here; use --device cpu or --device auto")
    return device


def _load_teacher(config: TrainConfig):
    """Return (tokenizer, teacher, cache): the teacher's tokenizer, shared by the student.

    With a teacher cache the teacher model is not loaded (None), unless the student is
    derived from it; the lab teacher is always built (it is small and exact).
    """
    from bganalysis.lab import LabTeacher, lab_tokenizer

    cache = None
    if config.teacher_cache is not None:
        from bganalysis.teacher_cache import TeacherCache

        cache = TeacherCache.open(config.teacher_cache)
    if config.teacher == "lab":
        tokenizer, teacher = lab_tokenizer(), LabTeacher()
    else:
        from bganalysis.models import load_causal_lm, load_tokenizer

        tokenizer = load_tokenizer(config.teacher)
        teacher = None if cache is not None and config.student != "derived" else load_causal_lm(config.teacher, device="cpu")
        if config.data == "lab" and tokenizer.get_vocab() != lab_tokenizer().get_vocab():
            raise UserError(
                f"invalid data='lab' with teacher={config.teacher!r}: lab documents use the lab vocabulary, "
                "which this teacher's tokenizer does not have; use teacher lab or pass data=FILE.jsonl"
            )
    if cache is not None:
        cache.check_compatible(tokenizer, config.loss_temperature)
    if teacher is not None:
        _check_width(teacher, tokenizer, "teacher", config.teacher)
        teacher = teacher.eval().requires_grad_(False)
    return tokenizer, teacher, cache


def _load_student(config: TrainConfig, tokenizer, teacher):
    """Return the student in float32 and train mode, wrapped in LoRA adapters when `config.lora`."""
    import torch

    if config.student == "tiny":
        student = _tiny_student(config, tokenizer)
    elif config.student == "derived":
        from bganalysis.models import derive_student

        student = derive_student(teacher, config.student_layers).float()
    elif config.student.endswith(".json"):
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(config.seed)
        student = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config.student))
    else:
        from bganalysis.models import check_tokenizers_match, load_causal_lm, load_tokenizer

        check_tokenizers_match(tokenizer, load_tokenizer(config.student), config.teacher, config.student)
        student = load_causal_lm(config.student, device="cpu", dtype=torch.float32)
    _check_width(student, tokenizer, "student", config.student)
    if config.lora:
        student = _with_lora(student, config)
    return student.train()


def _with_lora(student, config: TrainConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("lora=true needs peft; install it with pip install 'bganalysis[lora]' or set lora false") from None
    targets = config.lora_target_modules
    modules = targets if targets == "all-linear" else [name.strip() for name in targets.split(",")]
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=modules, task_type="CAUSAL_LM")
    try:
        return get_peft_model(student, lora)
    except ValueError as error:
        raise UserError(f"invalid lora_target_modules={targets!r}: {str(error).splitlines()[0]}; "
                        "use all-linear or names of the student's linear layers") from None


def _tiny_student(config: TrainConfig, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.student_hidden,
        intermediate_size=config.student_intermediate,
        num_hidden_layers=config.student_layers,
        num_attention_heads=config.student_heads,
        num_key_value_heads=config.student_kv_heads,
        max_position_embeddings=max(512, config.max_len),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(config.seed)  # the initial weights depend on the seed alone
    return LlamaForCausalLM(model_config)


def _check_width(model, tokenizer, role: str, name: str) -> None:
    width = getattr(model.config, "vocab_size", None)
    if width is not None and width < len(tokenizer):
        raise UserError(
            f"{role} {name} scores {width} tokens but the tokenizer has {len(tokenizer)}; "
            f"pass a {role} built for the teacher's tokenizer"
        )


def _max_len(config: TrainConfig, teacher, student) -> int:
    """Return max_len, lowered to the shorter context of teacher and student, with a warning."""
    contexts = [getattr(model.config, "max_position_embeddings", None) for model in (teacher, student) if model is not None]
    limit = min([config.max_len, *(context for context in contexts if context)])
    if limit < config.max_len:
        logger.warning("max_len=%d exceeds the models' context of %d tokens; sequences are cut to %d",
                       config.max_len, limit, limit)
    return limit


def _load_examples(config: TrainConfig, tokenizer, max_len: int) -> list[Example]:
    if config.data == "lab":
        return lab_examples(config.num_docs, config.seed, max_len)
    return jsonl_examples(config.data, tokenizer, max_len, config.chat_template)


def _log_start(config: TrainConfig, student, tokenizer, examples: list[Example]) -> None:
    from huggingface_hub import constants

    response_tokens = sum(len(example.ids) - example.prompt_length for example in examples)
    logger.info("resolved config: %s", json.dumps(dataclasses.asdict(config)))
    logger.info(
        "training %s on %s: %d examples (%d response tokens), student %s with %d parameters (%s), "
        "vocabulary %d, HF offline mode %s",
        config.name, config.device, len(examples), response_tokens, config.student,
        sum(p.numel() for p in student.parameters()), student.dtype, len(tokenizer), constants.is_offline_mode(),
    )
    if config.warmup_steps >= config.steps:
        logger.warning("warmup_steps=%d >= steps=%d: the learning rate never reaches lr=%g", config.warmup_steps, config.steps, config.lr)


def _soft_weights(config: TrainConfig, vocab_size: int):
    """Return the λ scheme of the run, reading the Bridge/Garden map once when one is set."""
    from bganalysis.region_map import RegionMap
    from bganalysis.train_loss import SoftWeights

    region_map = None
    if config.weight_scheme == "bridge_garden" and config.bridge_garden_map is not None:
        region_map = RegionMap.from_parquet(config.bridge_garden_map, vocab_size)
        sizes = ", ".join(str(len(table)) for table in region_map.tables)
        logger.info("read the Bridge/Garden map %s: contexts of 0, 1, 2 preceding tokens: %s", region_map.source, sizes)
    return SoftWeights(config, region_map)


def _config_yaml(config: TrainConfig, student, final: dict, started: str) -> str:
    import yaml

    from bganalysis.provenance import provenance

    values = dataclasses.asdict(config)
    values["provenance"] = {
        "seed": config.seed,
        "device": config.device,
        "dtype": str(student.dtype).removeprefix("torch."),
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "final_log": final,
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": provenance(),  # package versions, the git commit of bganalysis, the platform
    }
    header = "# Resolved settings of this training run. Pass it as --recipe to repeat the run.\n"
    return header + yaml.safe_dump(values, sort_keys=False)
