"""Resumable, shardable analysis: documents are processed in shards saved one file each.

A shard is a fixed range of documents. Its results are pickled to
`analysis/shards/shard-NNNNN.pkl` through a temporary file and a rename, so a killed
run leaves only whole shards behind, and a rerun with the same settings skips them.
Several processes split the shards by rank (`RANK` and `WORLD_SIZE`, as set by
`accelerate launch` or `torchrun`): process r takes shards r, r + W, r + 2W, ... and
rank 0 waits for all of them before writing the tables. Every random draw is seeded
per document, so the tables do not depend on the number of processes.

The pickles are a private cache of this tool, read back only from the run's own folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import time
from pathlib import Path

from bganalysis.errors import UserError
from bganalysis.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

# Settings that change only the aggregation, not the per-document results.
AGGREGATION_ONLY = {"out", "device", "bootstrap", "bridge_fraction", "garden_fraction", "label_scope",
                    "label_ranking", "heatmap_docs", "force"}


def process_rank() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) for a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# Settings added after shards were first written, at the value that gives the results of before.
# At that value they are left out of the fingerprint, so shards written earlier still match.
ADDED_WITH_DEFAULT = {"kappa_random": 0, "estimators": ["monte_carlo", "teacher_only"]}


def fingerprint(settings: dict) -> dict:
    """Return the settings that determine per-document results, with their hash."""
    relevant = {key: value for key, value in sorted(settings.items())
                if key not in AGGREGATION_ONLY and not (key in ADDED_WITH_DEFAULT and ADDED_WITH_DEFAULT[key] == value)}
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"hash": digest, "settings": relevant}


class ShardStore:
    """Finished shards of one analysis under `folder`, tied to one settings fingerprint."""

    def __init__(self, folder: Path, settings: dict, force: bool):
        self.folder = folder
        self.meta = fingerprint(settings)
        meta_path = folder / "meta.json"
        if meta_path.exists():
            previous = json.loads(meta_path.read_text())
            if previous["hash"] != self.meta["hash"]:
                if not force:
                    changed = sorted(key for key in set(previous["settings"]) | set(self.meta["settings"])
                                     if previous["settings"].get(key) != self.meta["settings"].get(key))
                    raise UserError(f"{folder} contains results computed with other settings (changed: {', '.join(changed)}); "
                                    "pass --force to discard them, or choose another --out")
                self._discard()
        folder.mkdir(parents=True, exist_ok=True)
        if process_rank()[0] == 0:
            atomic_write_json(meta_path, self.meta)

    def _discard(self) -> None:
        for path in self.folder.glob("shard-*.pkl"):
            path.unlink()
        log.info("discarded shards of other settings in %s", self.folder)

    def path(self, index: int) -> Path:
        return self.folder / f"shard-{index:05d}.pkl"

    def has(self, index: int) -> bool:
        return self.path(index).exists()

    def write(self, index: int, results: list) -> None:
        atomic_write_bytes(self.path(index), pickle.dumps(results, protocol=pickle.HIGHEST_PROTOCOL))

    def read(self, index: int) -> list:
        with open(self.path(index), "rb") as handle:
            return pickle.load(handle)

    def wait_for(self, indices: list[int], timeout_s: float, poll_s: float = 2.0) -> None:
        """Block until every shard in `indices` exists (other processes write them)."""
        deadline = time.monotonic() + timeout_s
        missing = [i for i in indices if not self.has(i)]
        while missing:
            if time.monotonic() > deadline:
                raise UserError(f"timed out after {timeout_s:.0f} s waiting for shards {missing[:5]} from other processes; "
                                "rerun the same command to resume")
            time.sleep(poll_s)
            missing = [i for i in missing if not self.has(i)]


def model_signature(paths: list[str]) -> dict:
    """Name, size and modification time of each model's weight files, so retrained models invalidate shards."""
    signature = {}
    for path in paths:
        folder = Path(path)
        if folder.is_dir():
            files = sorted(list(folder.glob("*.safetensors")) + list(folder.glob("*.bin")))
            signature[path] = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        else:
            signature[path] = path
    return signature


def shard_ranges(num_documents: int, shard_size: int) -> list[range]:
    return [range(start, min(start + shard_size, num_documents)) for start in range(0, num_documents, shard_size)]
