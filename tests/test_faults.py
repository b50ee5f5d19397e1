"""One writer per run directory, and crashes at any point of a run's writes: the run resumes and its loss curve
continues bitwise as if it had never been interrupted."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from nrgpt import checkpoint
from nrgpt.errors import CheckpointError, RunLockedError
from nrgpt.rundir import RunLock, read_metrics

from .conftest import REPO, records, run_nrgpt, tiny_args

KILLER = Path(__file__).resolve().parent / "helpers" / "killer.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def comparable(run_dir: Path) -> list[dict]:
    """The run's records without the wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in ("elapsed", "tokens_per_s")} for r in records(run_dir)]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "last" / "model.safetensors"), load_file(b / "last" / "model.safetensors")
    return wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def killed_at(k: int, mode: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(KILLER), str(k), mode, *args], capture_output=True, text=True,
                          cwd=REPO, env=ENV)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> tuple[list[str], Path]:
    """The arguments of a small run with dropout (so RNG states matter) and that run, uninterrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    args = tiny_args(data_dir, out, "train.max_iters=30", "model.dropout=0.1")
    proc = run_nrgpt("train", *args)
    assert proc.returncode == 0, proc.stderr
    return args, out


def _start(args: list[str], out: Path, resume: bool) -> list[str]:
    return ["train", "--resume", "--out-dir", str(out)] if resume else ["train", *args, "--out-dir", str(out),
                                                                       "--overwrite"]


def test_killed_at_random_write_points_resumes_bitwise(reference, tmp_path):
    """SIGKILL at random points of the checkpoint and metrics writes, many times; every time the run is started
    again (resumed when it has a checkpoint) and in the end its log and weights equal the uninterrupted run's."""
    args, full = reference
    run = tmp_path / "run"
    rng = random.Random(1)
    kills = 0
    for _ in range(8):
        proc = killed_at(rng.randint(1, 260), "any", *_start(args, run, checkpoint.find(run / "last") is not None))
        if proc.returncode == 0:
            break
        assert proc.returncode == -9, proc.stderr
        kills += 1
    else:
        proc = run_nrgpt(*_start(args, run, checkpoint.find(run / "last") is not None))
        assert proc.returncode == 0, proc.stderr
    assert kills >= 4
    assert comparable(run) == comparable(full)
    assert same_weights(run, full)


def test_killed_during_the_metrics_rewrite_loses_nothing(reference, tmp_path):
    args, full = reference
    run = tmp_path / "run"
    assert killed_at(150, "any", *_start(args, run, False)).returncode == -9
    at = checkpoint.read_info(checkpoint.find(run / "last"))["iter"]
    before = records(run)
    assert at > 0 and len(before) > at

    assert killed_at(0, "metrics-rewrite", *_start(args, run, True)).returncode == -9
    assert records(run) == before  # the rename never happened: the old log is whole
    assert (run / "metrics.jsonl.tmp").is_file()

    assert run_nrgpt(*_start(args, run, True)).returncode == 0
    assert comparable(run) == comparable(full) and same_weights(run, full)


def test_a_torn_last_line_is_dropped_and_a_corrupt_line_refused(reference, tmp_path):
    args, full = reference
    run = tmp_path / "run"
    assert killed_at(150, "any", *_start(args, run, False)).returncode == -9
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iter": 17, "loss": 2.3')  # the record being written when the process died
    with pytest.warns(UserWarning, match="dropped its last line"):
        kept = read_metrics(run)
    assert kept == records_without_last_line(run)
    resumed = run_nrgpt(*_start(args, run, True))
    assert resumed.returncode == 0, resumed.stderr
    assert "dropped its last line" in resumed.stderr
    assert comparable(run) == comparable(full)

    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[3] = lines[3][:-5]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(CheckpointError, match="line 4 is corrupt"):
        read_metrics(run)
    refused = run_nrgpt("report", str(run))
    assert refused.returncode == 2 and "line 4 is corrupt" in refused.stderr.strip().splitlines()[-1]


def records_without_last_line(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()[:-1]]


def test_one_writer_per_run_directory(data_dir, tmp_path):
    """Two trainings started together on one run directory: one runs, the other is refused with the holder's
    pid; --resume and --overwrite while it runs are refused too, and its log is never interleaved."""
    run = tmp_path / "run"
    args = ["train", *tiny_args(data_dir, run, "train.max_iters=1500", "train.eval_interval=300")]
    pair = [subprocess.Popen([sys.executable, "-m", "nrgpt", *args], cwd=REPO, env=ENV, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    deadline = time.time() + 120
    while time.time() < deadline and all(p.poll() is None for p in pair):
        time.sleep(0.05)
    loser = next(p for p in pair if p.poll() is not None)
    winner = next(p for p in pair if p is not loser)
    err = loser.communicate()[1].strip()
    assert loser.returncode == 2 and len(err.splitlines()) == 1 and f"is in use by nrgpt process {winner.pid}" in err
    assert winner.poll() is None, "the first training should still be running"

    while time.time() < deadline and checkpoint.find(run / "last") is None:
        time.sleep(0.05)
    others = [subprocess.Popen([sys.executable, "-m", "nrgpt", *cmd], cwd=REPO, env=ENV, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for cmd in (["train", "--resume", "--out-dir", str(run)], [*args, "--overwrite"])]
    for proc in others:
        err = proc.communicate()[1]
        assert proc.returncode == 2 and "is in use by" in err, err
    assert winner.poll() is None, "the first training ended before the others were tried; make it longer"
    assert winner.wait() == 0, winner.communicate()[1]
    steps = [r["iter"] for r in read_metrics(run) if "loss" in r]
    assert steps == list(range(1500))  # one writer: every step once, in order


def test_the_lock_is_released_by_a_dead_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from nrgpt.rundir import RunLock; RunLock(Path(sys.argv[1])).acquire(); "
                               "print('held', flush=True); time.sleep(60)", str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLockedError, match=f"nrgpt process {holder.pid}"):
        RunLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    RunLock(tmp_path).acquire().release()  # no stale lock after a SIGKILL
