"""Distributed data parallel: two gloo processes (torchrun) train exactly like one with the doubled batch."""

from __future__ import annotations

import pytest

from .conftest import make_text_data, tiny_args, train_one_and_two_processes


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_processes_match_one_with_double_batch(tmp_path, optimizer):
    data = make_text_data(tmp_path / "text")
    common = tiny_args(data, tmp_path / "x", "train.max_iters=12", "train.eval_interval=6", "train.grad_accum=2",
                       f"train.optimizer={optimizer}")
    one, two, stdout = train_one_and_two_processes(common, tmp_path)
    assert [(r["iter"], sorted(r)) for r in one] == [(r["iter"], sorted(r)) for r in two]  # rank 0 logs, once
    assert stdout.count("done:") == 1
