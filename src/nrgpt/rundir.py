"""A run directory: what a training run writes there, one writer at a time, and its metrics log.

``RUN_FILES`` names, exactly, everything a run writes; ``clear_run`` (``--overwrite``) removes those and
nothing else, so a user's own files in the directory (notes, samples, ``dynamics/``) survive.

``RunLock`` is an exclusive OS-level lock (``flock``) on ``<run>/.lock``: a second trainer on the same
directory is refused with the holder's process id. The operating system releases the lock when its
process dies, however it dies, so a killed run never leaves a stale lock.

``metrics.jsonl`` (one JSON record a line) is appended to while the run trains. When a run resumes, the
records written after its checkpoint are dropped by writing the kept ones to a temporary file and
renaming it over the log, so a crash at any moment leaves either the old or the new log, whole. A torn
last line (the record being written when a process died) is dropped with a notice; a corrupt line
before the last one is an error.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import CheckpointError, RunLockedError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None

METRICS_JSONL, METRICS_CSV, LOCK = "metrics.jsonl", "metrics.csv", ".lock"
CHECKPOINTS = ("last", "best")
# Every name a run writes: checkpoints with their in-flight copies, config, logs, result, loggers' folders.
RUN_FILES = (
    *(f"{name}{suffix}" for name in CHECKPOINTS for suffix in ("", ".tmp", ".old")),
    "config.json", METRICS_JSONL, METRICS_CSV, f"{METRICS_JSONL}.tmp", f"{METRICS_CSV}.tmp", "result.json",
    "tensorboard", "wandb",
)
METRIC_COLUMNS = ("iter", "loss", "lr", "tokens_per_s", "elapsed", "train_loss", "val_loss", "steps", "accuracy")


def clear_run(run_dir: Path) -> list[str]:
    """Remove what a run wrote in ``run_dir`` (exactly the names in ``RUN_FILES``); returns the names removed."""
    removed = []
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


class RunLock:
    """The exclusive lock on a run directory, held from ``acquire`` until ``release`` or process exit."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock (creating the run directory); RunLockedError naming the holder if another process has it."""
        if fcntl is None or self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(f"{self.path.parent} is in use by {holder}: one training writes a run directory at "
                                 "a time; wait for it to finish or stop it, or choose another --out-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"nrgpt process {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def _replace_atomically(path: Path, write: Callable[[Any], None], newline: str | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline=newline) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(run_dir: str | Path, notice: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``, in order. A torn last line is dropped (with a notice);
    a corrupt line before it raises CheckpointError naming the line."""
    path = Path(run_dir) / METRICS_JSONL
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("iter"), int):
                raise ValueError("not a record with an integer 'iter'")
        except ValueError as e:
            if number == len(lines):
                message = (f"{path}: dropped its last line, a record cut off when the process writing it died "
                           f"({line[:40]!r})")
                (notice or (lambda m: warnings.warn(m, stacklevel=3)))(message)
                break
            raise CheckpointError(f"{path} line {number} is corrupt ({e}); fix or delete that line") from None
        records.append(record)
    return records


class MetricsLog:
    """metrics.jsonl and metrics.csv in the run directory, plus TensorBoard and W&B when enabled."""

    def __init__(self, run_dir: Path, keep_before: int | None, *, tensorboard: bool = False,
                 wandb: dict[str, Any] | None = None):
        """Start the logs. A resumed run (``keep_before`` = its start step) keeps the records of the steps before
        it and of its evaluation there, and drops the rest (written after the checkpoint it resumes from).
        ``wandb``: the keyword arguments of ``wandb.init``, or None."""
        self.jsonl, self.csv = run_dir / METRICS_JSONL, run_dir / METRICS_CSV
        records = []
        if keep_before is not None and self.jsonl.is_file():
            records = [r for r in read_metrics(run_dir)
                       if r["iter"] < keep_before or (r["iter"] == keep_before and "val_loss" in r)]
        _replace_atomically(self.jsonl, lambda f: f.writelines(json.dumps(r) + "\n" for r in records))
        _replace_atomically(self.csv, lambda f: self._csv_rows(f, records, header=True), newline="")
        self.tb = self.wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if wandb is not None:
            import wandb as wandb_module

            self.wandb = wandb_module.init(dir=str(run_dir), **wandb)

    def _csv_rows(self, f: Any, records: list[dict[str, Any]], header: bool = False) -> None:
        writer = csv.DictWriter(f, METRIC_COLUMNS)
        if header:
            writer.writeheader()
        writer.writerows(records)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (a single write per file, so a crash tears at most the last line)."""
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        with open(self.csv, "a", newline="", encoding="utf-8") as f:
            self._csv_rows(f, [record])
        scalars = {k: v for k, v in record.items() if k != "iter"}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, record["iter"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["iter"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader sees the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
