"""Train a student from a teacher with hard, soft or hybrid labels (a plain PyTorch loop).

`train(TrainConfig(...))` is the entry point for scripts and the demo; the CLI command
`bganalysis train` builds the config from a recipe YAML and flags. `bganalysis.train_loss`
builds the per-token loss λ·soft + (1 - λ)·hard for the configured divergence and λ
scheme. It uses `losses`, `divergences` and `weights`, which know nothing of this loop,
so another loop (the transformers Trainer, say) can reuse them.

One optimiser step: `grad_accum` micro-batches of `batch_size` sequences each run the
teacher (under no_grad) and the student. Each micro-batch's loss is its sum over valid
tokens divided by the valid tokens of the whole step, so the summed gradients equal those
of one batch of `batch_size × grad_accum` sequences. Then the gradient norm is clipped and
AdamW steps, with linear warmup and cosine decay of the learning rate.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import re
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

from bganalysis.errors import UserError
from bganalysis.io import atomic_directory, atomic_write_text
from bganalysis.train_data import IGNORE_INDEX, Example, collate, jsonl_examples, lab_examples, step_batches

logger = logging.getLogger(__name__)

METHODS = ("hard", "soft", "hybrid")
HARD_TARGETS = ("sample", "argmax")
METHOD_LAMBDA = {"hard": 0.0, "soft": 1.0, "hybrid": 0.5}
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_NAME = re.compile(r"[A-Za-z0-9][\w.+-]*")


def _option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Settings of one training run, validated at construction (UserError names the field).

    Every field is also a CLI flag of `bganalysis train` (`loss_temperature` is
    `--loss-temperature`) and a key of a recipe YAML. Numbers given as strings (from
    flags, or YAML such as `1e-3`, which YAML 1.1 reads as a string) are converted.
    """

    method: str = _option("hybrid", "supervision: hard (cross-entropy on teacher tokens), soft (KL to the teacher distribution) or hybrid (a mix of both)")
    lam: float | None = _option(None, "weight of the soft loss, in [0, 1], for the static and risk_guided schemes; method hard forces 0, soft forces 1, hybrid defaults to 0.5")
    loss_temperature: float = _option(1.0, "temperature T of the soft loss: both distributions at softmax(logits / T), loss scaled by T²; not a sampling temperature")
    hard_target: str = _option("sample", "hard label: sample (the token of the teacher-written response) or argmax (the teacher's most likely token)")
    divergence: str = _option("forward_kl", "divergence D of the soft loss D(teacher || student): forward_kl, reverse_kl, jsd, total_variation, skew_forward_kl, skew_reverse_kl or ab")
    divergence_beta: float | None = _option(None, "beta of the divergence: jsd (in [0, 1], default 0.5) and ab (required); unset for the others")
    divergence_alpha: float | None = _option(None, "alpha of the divergence: skew_forward_kl and skew_reverse_kl (in [0, 1], default 0.1) and ab (required); unset for the others")
    weight_scheme: str = _option("static", "per-token soft weight: static (lam), confidence, entropy, curriculum, reverse_curriculum, bridge_garden or risk_guided (lam plus a risk penalty on the hard loss)")
    tsallis_order: float = _option(1.0, "entropy scheme: Tsallis order of the teacher entropy, > 0; 1 is Shannon entropy")
    lam_max: float = _option(1.0, "curriculum schemes: the soft weight at the end (curriculum) or start (reverse_curriculum) of the ramp, in [0, 1]")
    ramp_fraction: float = _option(0.5, "curriculum schemes: fraction of the steps the linear ramp takes, in (0, 1]")
    lam_bridge: float = _option(0.1, "bridge_garden scheme: soft weight at Bridges (the riskiest positions), in [0, 1]")
    lam_garden: float = _option(0.9, "bridge_garden scheme: soft weight at Gardens (the safest positions), in [0, 1]")
    lam_middle: float = _option(0.5, "bridge_garden scheme with a map: soft weight at unlabelled positions, in [0, 1]")
    bridge_garden_map: str | None = _option(None, "bridge_garden scheme: analysis/tokens.parquet from bganalysis analyze, read by token and context; unset uses bridge_garden_proxy")
    bridge_garden_proxy: str = _option("teacher_entropy", "bridge_garden scheme without a map: teacher_entropy, teacher_pmax or teacher_margin, ranked within each micro-batch")
    risk_alpha: float = _option(0.1, "risk_guided scheme: weight alpha of the penalty (alpha/4)·delta² added to the hard loss, >= 0")
    teacher: str = _option("lab", "teacher: a model folder or hub id, or lab for the exact lab teacher")
    student: str = _option("tiny", "student: a model folder or hub id sharing the teacher's tokenizer, or tiny for a random-init Llama built for the tokenizer")
    student_hidden: int = _option(128, "hidden size of the tiny student")
    student_layers: int = _option(2, "number of layers of the tiny student")
    student_heads: int = _option(4, "attention heads of the tiny student")
    student_kv_heads: int = _option(2, "key/value heads of the tiny student (grouped-query attention)")
    student_intermediate: int = _option(384, "MLP width of the tiny student")
    data: str = _option("lab", "training data: lab (documents sampled from the lab teacher) or a JSONL file with prompt and response fields")
    num_docs: int = _option(2000, "number of lab documents to sample (data=lab only)")
    chat_template: bool = _option(True, "wrap JSONL prompts in the tokenizer's chat template when it has one")
    steps: int = _option(300, "optimiser steps")
    batch_size: int = _option(16, "sequences per micro-batch")
    grad_accum: int = _option(1, "micro-batches per optimiser step; the effective batch is batch_size × grad_accum")
    lr: float = _option(1e-3, "peak learning rate of AdamW")
    warmup_steps: int = _option(20, "steps of linear learning-rate warmup before the cosine decay")
    weight_decay: float = _option(0.01, "AdamW weight decay, applied to weight matrices and embeddings only")
    max_grad_norm: float = _option(1.0, "clip the global gradient norm to this value; 0 turns clipping off")
    max_len: int = _option(512, "max tokens per sequence; longer prompts are cut from the left")
    seed: int = _option(0, "seed of the student's initialisation, the lab documents and the batch order")
    out: str = _option("runs/lab", "run folder; the student is written to OUT/students/NAME")
    name: str | None = _option(None, "student name, its folder under OUT/students (default: the method)")
    log_every: int = _option(10, "optimiser steps between log lines")
    device: str = _option("auto", "auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps")
    loss_chunk_tokens: int = _option(1024, "tokens per chunk of the loss; its float32 scratch memory is chunk × vocabulary × 4 bytes")

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for spec in dataclasses.fields(self):
            setattr(self, spec.name, _coerce(spec.name, getattr(self, spec.name), hints[spec.name]))
        self._check_choices()
        self._check_ranges()
        self._check_divergence()
        self._check_weight_scheme()
        if self.student == "tiny":
            self._check_tiny_student()

    def _check_choices(self) -> None:
        _require(self.method in METHODS, "method", self.method, f"must be one of {', '.join(METHODS)}")
        _require(self.hard_target in HARD_TARGETS, "hard_target", self.hard_target, f"must be one of {', '.join(HARD_TARGETS)}")
        if self.lam is None:
            self.lam = METHOD_LAMBDA[self.method]
        elif self.method != "hybrid":
            forced = METHOD_LAMBDA[self.method]
            _require(self.lam == forced, "lam", self.lam, f"method {self.method} fixes lam (the soft weight) to {forced:g}; use method hybrid to mix the losses")
        _require(0.0 <= self.lam <= 1.0, "lam", self.lam, "lam is the weight of the soft loss and must be in [0, 1]")
        _require(_DEVICE.fullmatch(self.device) is not None, "device", self.device, "must be auto, cpu, cuda, cuda:N or mps")
        if self.name is None:
            self.name = self.method if self.weight_scheme == "static" else self.weight_scheme
        _require(_NAME.fullmatch(self.name) is not None, "name", self.name, "must be a folder name of letters, digits and . _ + - (no slash, not starting with a dot)")
        for key in ("teacher", "student", "data", "out"):
            _require(getattr(self, key) != "", key, "", "must not be empty")
        if self.data != "lab":
            _require(Path(self.data).is_file(), "data", self.data, "is not a file; pass lab or a JSONL file with prompt and response fields")

    def _check_ranges(self) -> None:
        _require(math.isfinite(self.loss_temperature) and self.loss_temperature > 0, "loss_temperature", self.loss_temperature, "must be a number > 0")
        _require(math.isfinite(self.lr) and self.lr > 0, "lr", self.lr, "must be a number > 0")
        for key in ("steps", "batch_size", "grad_accum", "num_docs", "log_every", "loss_chunk_tokens"):
            _require(getattr(self, key) >= 1, key, getattr(self, key), "must be a whole number >= 1")
        _require(self.max_len >= 2, "max_len", self.max_len, "must be >= 2 (one prompt token and one response token)")
        _require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be a whole number >= 0")
        for key in ("weight_decay", "max_grad_norm"):
            value = getattr(self, key)
            _require(math.isfinite(value) and value >= 0, key, value, "must be a number >= 0")
        _require(self.seed >= 0, "seed", self.seed, "must be a whole number >= 0")

    def _check_divergence(self) -> None:
        from bganalysis.divergences import DIVERGENCES
        from bganalysis.train_loss import divergence_parameters

        _require(self.divergence in DIVERGENCES, "divergence", self.divergence, f"must be one of {', '.join(DIVERGENCES)}")
        takes = divergence_parameters(self.divergence)
        for parameter in ("alpha", "beta"):
            key, value = f"divergence_{parameter}", getattr(self, f"divergence_{parameter}")
            if parameter not in takes:
                _require(value is None, key, value, f"divergence {self.divergence} takes no {parameter}; remove {key}")
            elif value is None:
                _require(self.divergence != "ab", key, value, f"divergence ab needs both alpha and beta; set {key}")
            elif self.divergence == "ab":
                _require(math.isfinite(value), key, value, "must be a finite number")
            else:
                _require(0.0 <= value <= 1.0, key, value, f"the {parameter} of divergence {self.divergence} must be in [0, 1]")

    def _check_weight_scheme(self) -> None:
        from bganalysis.train_loss import PROXY_RISK_SIGNS, STATIC_LAMBDA_SCHEMES, WEIGHT_SCHEMES

        scheme = self.weight_scheme
        _require(scheme in WEIGHT_SCHEMES, "weight_scheme", scheme, f"must be one of {', '.join(WEIGHT_SCHEMES)}")
        if scheme not in STATIC_LAMBDA_SCHEMES:
            _require(self.method == "hybrid", "weight_scheme", scheme,
                     f"a per-token soft weight needs method hybrid, but method {self.method} fixes lam; set method hybrid")
        if scheme == "risk_guided":
            _require(self.method != "soft", "weight_scheme", scheme,
                     "risk_guided adds its penalty to the hard loss, which method soft weights by 0; use method hybrid or hard")
            _require(self.hard_target == "sample", "hard_target", self.hard_target,
                     "risk_guided needs the student's logits after the label, which the batch has only for sample labels; use hard_target sample")

        _require(math.isfinite(self.tsallis_order) and self.tsallis_order > 0, "tsallis_order", self.tsallis_order, "must be a number > 0 (1 is Shannon entropy)")
        for key in ("lam_max", "lam_bridge", "lam_garden", "lam_middle"):
            _require(0.0 <= getattr(self, key) <= 1.0, key, getattr(self, key), "is a soft weight and must be in [0, 1]")
        _require(0.0 < self.ramp_fraction <= 1.0, "ramp_fraction", self.ramp_fraction, "must be in (0, 1]; use weight_scheme static for a constant lam")
        _require(math.isfinite(self.risk_alpha) and self.risk_alpha >= 0, "risk_alpha", self.risk_alpha, "must be a number >= 0")
        _require(self.bridge_garden_proxy in PROXY_RISK_SIGNS, "bridge_garden_proxy", self.bridge_garden_proxy,
                 f"must be one of {', '.join(PROXY_RISK_SIGNS)}")
        if self.bridge_garden_map is not None:
            _require(scheme == "bridge_garden", "bridge_garden_map", self.bridge_garden_map,
                     f"only the bridge_garden scheme reads a map, not {scheme}; remove bridge_garden_map or set weight_scheme bridge_garden")
            _require(Path(self.bridge_garden_map).is_file(), "bridge_garden_map", self.bridge_garden_map,
                     "is not a file; pass the analysis/tokens.parquet written by bganalysis analyze")

    def _check_tiny_student(self) -> None:
        for key in ("student_hidden", "student_layers", "student_heads", "student_kv_heads", "student_intermediate"):
            _require(getattr(self, key) >= 1, key, getattr(self, key), "must be a whole number >= 1")
        _require(self.student_hidden % (2 * self.student_heads) == 0, "student_hidden", self.student_hidden,
                 f"must be a multiple of 2 × student_heads={self.student_heads} (rotary embeddings need an even head size)")
        _require(self.student_heads % self.student_kv_heads == 0, "student_kv_heads", self.student_kv_heads,
                 f"must divide student_heads={self.student_heads}")


def _require(condition: bool, key: str, value, rule: str) -> None:
    if not condition:
        flag = "--" + key.replace("_", "-")
        raise UserError(f"invalid {key}={value!r}: {rule}; set {key} in the recipe or {flag} on the command line")


def _coerce(key: str, value, hint):
    """Convert `value` to the field's type, or raise UserError naming the field."""
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    kind = next(arg for arg in args if arg is not type(None)) if args else hint
    if kind is str:
        if isinstance(value, Path):
            return str(value)
        _require(isinstance(value, str), key, value, "must be a string")
        return value
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        _require(isinstance(value, bool), key, value, "must be true or false")
        return value
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            value = int(value)
        _require(isinstance(value, int) and not isinstance(value, bool), key, value, "must be a whole number")
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    _require(isinstance(value, int | float) and not isinstance(value, bool), key, value, "must be a number")
    return float(value)


def train(config: TrainConfig) -> Path:
    """Train a student with the settings in `config` and return its folder, `<out>/students/<name>`.

    The folder is written atomically: the model (`save_pretrained`), the tokenizer,
    `train_config.yaml` (the resolved config, plus versions, device and final loss under
    `provenance`; the file is itself a valid recipe) and `train_log.jsonl` (one JSON
    object per log line).
    """
    device = _resolve_device(config.device)
    config = dataclasses.replace(config, device=str(device))
    folder = Path(config.out) / "students" / config.name

    tokenizer, teacher = _load_teacher(config, device)
    student = _load_student(config, tokenizer, device)
    examples = _load_examples(config, tokenizer)
    _log_start(config, student, tokenizer, examples)

    if folder.exists():
        logger.info("%s exists and will be replaced when this run finishes", folder)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with atomic_directory(folder) as tmp:
        final = _run_steps(config, teacher, student, tokenizer, examples, tmp / "train_log.jsonl")
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / "train_config.yaml", _config_yaml(config, student, final, started))
    logger.info("wrote %s", folder)
    return folder


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


def _load_teacher(config: TrainConfig, device):
    """Return (tokenizer, teacher); the tokenizer is the teacher's and is shared by the student."""
    from bganalysis.lab import LabTeacher, lab_tokenizer

    if config.teacher == "lab":
        tokenizer, teacher = lab_tokenizer(), LabTeacher()
    else:
        from bganalysis.models import load_causal_lm, load_tokenizer

        tokenizer, teacher = load_tokenizer(config.teacher), load_causal_lm(config.teacher, device="cpu")
        if config.data == "lab" and tokenizer.get_vocab() != lab_tokenizer().get_vocab():
            raise UserError(
                f"invalid data='lab' with teacher={config.teacher!r}: lab documents use the lab vocabulary, "
                "which this teacher's tokenizer does not have; use teacher lab or pass data=FILE.jsonl"
            )
    _check_width(teacher, tokenizer, "teacher", config.teacher)
    return tokenizer, teacher.to(device).eval().requires_grad_(False)


def _load_student(config: TrainConfig, tokenizer, device):
    """Return the student in float32 and train mode. NOTE: no mixed precision yet."""
    import torch

    if config.student == "tiny":
        student = _tiny_student(config, tokenizer)
    else:
        from bganalysis.models import check_tokenizers_match, load_causal_lm, load_tokenizer

        check_tokenizers_match(tokenizer, load_tokenizer(config.student), config.teacher, config.student)
        student = load_causal_lm(config.student, device="cpu", dtype=torch.float32)
    _check_width(student, tokenizer, "student", config.student)
    return student.to(device).train()


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


def _load_examples(config: TrainConfig, tokenizer) -> list[Example]:
    if config.data == "lab":
        return lab_examples(config.num_docs, config.seed, config.max_len)
    return jsonl_examples(config.data, tokenizer, config.max_len, config.chat_template)


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


def _run_steps(config: TrainConfig, teacher, student, tokenizer, examples: list[Example], log_path: Path) -> dict:
    """Run `config.steps` optimiser steps; write one JSON line per log step; return the last one."""
    import torch
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    optimizer = _adamw(student, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config.warmup_steps, config.steps))
    batches = step_batches(examples, config.batch_size, config.grad_accum, config.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    max_grad_norm = config.max_grad_norm or math.inf  # an infinite bound measures the norm, clips nothing

    soft_weights = _soft_weights(config, len(tokenizer))
    window, record = _LogWindow(student.device), {}
    with logging_redirect_tqdm(), log_path.open("w", encoding="utf-8") as log_file:
        for step in tqdm(range(1, config.steps + 1), desc=f"train {config.name}", unit="step", disable=None):
            micro_batches = [collate(batch, pad_id) for batch in next(batches)]
            step_valid_tokens = sum(int((batch["targets"] != IGNORE_INDEX).sum()) for batch in micro_batches)
            for batch in micro_batches:
                window.add(_micro_step(config, teacher, student, batch, step_valid_tokens, len(tokenizer), soft_weights, step))

            window.grad_norms.append(float(torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)))
            learning_rate = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            if step % config.log_every == 0 or step == config.steps:
                record = window.record(step, learning_rate)
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                logger.info(_format_record(record, config.steps))
                window = _LogWindow(student.device)
    return record


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


def _needs_teacher(config: TrainConfig) -> bool:
    """Return False only for hard labels from the data under a constant λ, where nothing reads the teacher."""
    from bganalysis.train_loss import STATIC_LAMBDA_SCHEMES

    return config.method != "hard" or config.hard_target == "argmax" or config.weight_scheme not in STATIC_LAMBDA_SCHEMES


def _micro_step(
    config: TrainConfig, teacher, student, batch: dict, step_valid_tokens: int, vocab_size: int, soft_weights=None, step: int = 1
) -> dict:
    """Run forward and backward on one micro-batch of optimiser step `step`; return its summed loss parts and token counts."""
    import torch

    from bganalysis.losses import align_vocab, masked_mean
    from bganalysis.train_loss import SoftWeights, token_losses

    batch = {key: value.to(student.device) for key, value in batch.items()}
    targets = batch.pop("targets")
    valid = targets != IGNORE_INDEX
    soft_weights = soft_weights or SoftWeights(config)

    # Hard sample labels under a constant λ need nothing from the teacher, so it is not run (soft is then not measured).
    teacher_logits = None
    if _needs_teacher(config):
        with torch.no_grad():
            teacher_logits = teacher(**batch, use_cache=False).logits.to(student.device)
    student_logits = student(**batch, use_cache=False).logits
    if teacher_logits is None:
        student_logits = student_logits[..., :vocab_size]
    else:
        teacher_logits, student_logits = align_vocab(teacher_logits, student_logits, vocab_size)
    if config.hard_target == "argmax":
        targets = torch.where(valid, teacher_logits.argmax(dim=-1), IGNORE_INDEX)

    lam = soft_weights(step, teacher_logits, targets)
    parts = token_losses(config, student_logits, teacher_logits, batch, targets, lam)
    masked_mean(parts["total"], valid, step_valid_tokens).backward()

    with torch.no_grad():
        sums = {key: float(torch.where(valid, values, 0.0).sum()) for key, values in parts.items()}
        sums["lam"] = float(torch.where(valid, lam, 0.0).sum())
    if teacher_logits is None:
        sums["soft"] = math.nan
    if config.weight_scheme != "risk_guided":
        sums["risk"] = math.nan
    sums.update(loss_tokens=int(valid.sum()), tokens=int(batch["attention_mask"].sum()))
    return sums


def _adamw(student, config: TrainConfig):
    """AdamW that decays weight matrices and embeddings but not biases or norm gains."""
    import torch

    parameters = [p for p in student.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr)


def _lr_factor(warmup_steps: int, steps: int):
    """Return the multiplier of the peak learning rate for update number `update` (from 0).

    Linear warmup reaches the peak at update `warmup_steps - 1`, then a cosine decays
    towards 0. Unlike transformers' get_cosine_schedule_with_warmup (5.25), which starts
    warmup at 0, the first update already gets a learning rate above 0.
    """

    def factor(update: int) -> float:
        if update < warmup_steps:
            return (update + 1) / warmup_steps
        progress = (update - warmup_steps) / max(steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class _LogWindow:
    """Loss sums, token counts and time since the last log line."""

    def __init__(self, device):
        self.device = device
        self.sums: dict[str, float] = {}
        self.grad_norms: list[float] = []
        self.start = time.perf_counter()

    def add(self, sums: dict) -> None:
        for key, value in sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def record(self, step: int, learning_rate: float) -> dict:
        """Return the log record: losses in nats per loss token, throughput in input tokens/s."""
        elapsed = time.perf_counter() - self.start
        loss_tokens = int(self.sums["loss_tokens"])
        per_token = {key: self.sums[key] / max(loss_tokens, 1) for key in ("total", "soft", "hard", "risk", "lam")}
        return {
            "step": step,
            "loss": per_token["total"],
            "soft": None if math.isnan(per_token["soft"]) else per_token["soft"],
            "hard": per_token["hard"],
            "risk": None if math.isnan(per_token["risk"]) else per_token["risk"],
            "lam_mean": per_token["lam"],
            "lr": learning_rate,
            "grad_norm": sum(self.grad_norms) / len(self.grad_norms),
            "tokens_per_s": self.sums["tokens"] / elapsed,
            "loss_tokens": loss_tokens,
            "peak_memory_gb": _peak_memory_gb(self.device),
        }


def _format_record(record: dict, steps: int) -> str:
    soft = "n/a" if record["soft"] is None else f"{record['soft']:.4f}"
    risk = "" if record["risk"] is None else f", risk {record['risk']:.4f}"
    return (
        f"step {record['step']}/{steps} | loss {record['loss']:.4f} (soft {soft}, hard {record['hard']:.4f}{risk}) "
        f"| lam {record['lam_mean']:.3f} | lr {record['lr']:.2e} | grad norm {record['grad_norm']:.3f} "
        f"| {record['tokens_per_s']:,.0f} tokens/s | peak memory {record['peak_memory_gb']:.2f} GB"
    )


def _peak_memory_gb(device) -> float:
    """Return peak accelerator memory on CUDA, else the peak resident memory of this process."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if platform.system() == "Darwin" else peak * 1024 / 1e9  # bytes on macOS, KiB on Linux


def _config_yaml(config: TrainConfig, student, final: dict, started: str) -> str:
    import torch
    import transformers
    import yaml

    import bganalysis

    values = dataclasses.asdict(config)
    values["provenance"] = {
        "seed": config.seed,
        "device": config.device,
        "dtype": str(student.dtype).removeprefix("torch."),
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "final_log": final,
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {
            "bganalysis": bganalysis.__version__,
            "torch": str(torch.__version__),
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
    header = "# Resolved settings of this training run. Pass it as --recipe to repeat the run.\n"
    return header + yaml.safe_dump(values, sort_keys=False)
