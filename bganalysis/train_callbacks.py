"""Trainer callbacks of `bganalysis train`: the JSONL log, one-line progress and stop on a signal."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

logger = logging.getLogger("bganalysis.train")

# Keys of a train_log.jsonl record, in order; parts not measured in a run are null.
RECORD_KEYS = ("step", "loss", "soft", "hard", "risk", "lam_mean", "lr", "grad_norm", "tokens_per_s",
               "loss_tokens", "peak_memory_gb")


def log_record(step: int, logs: dict) -> dict:
    """Turn the Trainer's training log into a train_log.jsonl record."""
    values = dict(logs, step=step, lr=logs.get("learning_rate"))
    return {key: values.get(key) for key in RECORD_KEYS}


def format_record(record: dict, steps: int) -> str:
    """One human-readable log line."""
    soft = "n/a" if record["soft"] is None else f"{record['soft']:.4f}"
    risk = "" if record["risk"] is None else f", risk {record['risk']:.4f}"
    grad_norm = "n/a" if record["grad_norm"] is None else f"{record['grad_norm']:.3f}"
    return (
        f"step {record['step']}/{steps} | loss {record['loss']:.4f} (soft {soft}, hard {record['hard']:.4f}{risk}) "
        f"| lam {record['lam_mean']:.3f} | lr {record['lr']:.2e} | grad norm {grad_norm} "
        f"| {record['tokens_per_s']:,.0f} tokens/s | peak memory {record['peak_memory_gb']:.2f} GB"
    )


def is_training_log(logs: dict) -> bool:
    return "loss" in logs and "lam_mean" in logs


class JsonlLog(TrainerCallback):
    """Append one JSON record per training log to `path` (main process only)."""

    def __init__(self, path: Path, steps: int):
        self.path, self.steps = Path(path), steps

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and is_training_log(logs):
            with self.path.open("a", encoding="utf-8") as file:
                file.write(json.dumps(log_record(state.global_step, logs)) + "\n")


class LineProgress(ProgressCallback):
    """The Trainer's progress bar, with each training log as a readable line instead of a dict."""

    def __init__(self, description: str):
        super().__init__()
        self.description = description

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description(self.description)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and is_training_log(logs):
            self.training_bar.write(format_record(log_record(state.global_step, logs), state.max_steps))


class SignalStop(TrainerCallback):
    """On SIGINT or SIGTERM, finish the current optimiser step, save a checkpoint and stop.

    Used as a context manager around `trainer.train()`; a second signal raises
    KeyboardInterrupt at once. Outside the context the previous handlers are restored.
    """

    def __init__(self):
        self.stopped = False
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave the handlers alone
                pass
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False

    def _handle(self, signum, frame):
        if self.stopped:
            raise KeyboardInterrupt
        self.stopped = True
        logger.warning("signal %d: stopping after this optimiser step and saving a checkpoint (send again to stop at once)", signum)

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped:
            control.should_save = True
            control.should_training_stop = True
        return control
