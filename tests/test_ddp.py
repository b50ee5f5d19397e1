"""Distributed data parallel: two gloo processes (torchrun) train exactly like one with the doubled batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import REPO, make_text_data, records, run_nrgpt, tiny_args


def test_two_processes_match_one_with_double_batch(tmp_path):
    data = make_text_data(tmp_path / "text")
    common = tiny_args(data, tmp_path / "x", "train.max_iters=12", "train.eval_interval=6", "train.grad_accum=2")
    single = run_nrgpt("train", *common, "--batch-size", "8", "--out-dir", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nrgpt",
         "train", *common, "--batch-size", "4", "--out-dir", str(tmp_path / "two")],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert [(r["iter"], sorted(r)) for r in one] == [(r["iter"], sorted(r)) for r in two]  # rank 0 logs, once
    for a, b in zip(one, two):
        for key in ("loss", "train_loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (a["iter"], key)
    assert ddp.stdout.count("done:") == 1
