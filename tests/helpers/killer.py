"""``python tests/helpers/killer.py K MODE nrgpt-args...``: run the nrgpt command line and SIGKILL it at a
write point, as a crash or a power cut would (fault-injection tests).

The write points are the calls that put a run on disk: ``os.replace``, ``os.fsync``, safetensors'
``save_file``, ``torch.save``, ``shutil.rmtree`` and ``MetricsLog.write``; each counts twice, before and
after the real call. MODE 'any': die at the K-th point. MODE 'metrics-rewrite': die when the rewritten
``metrics.jsonl.tmp`` is complete but not yet renamed over the log (K ignored).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import torch

import nrgpt.checkpoint
import nrgpt.rundir
from nrgpt.cli import main

K, MODE = int(sys.argv[1]), sys.argv[2]
count = 0


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def point() -> None:
    global count
    count += 1
    if MODE == "any" and count == K:
        die()


def wrap(owner: object, name: str) -> None:
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        point()
        if MODE == "metrics-rewrite" and name == "replace" and Path(args[0]).name == "metrics.jsonl.tmp":
            die()
        out = real(*args, **kwargs)
        point()
        return out

    setattr(owner, name, wrapped)


for owner, name in ((os, "replace"), (os, "fsync"), (nrgpt.checkpoint, "save_file"), (torch, "save"),
                    (shutil, "rmtree"), (nrgpt.rundir.MetricsLog, "write")):
    wrap(owner, name)

sys.exit(main(sys.argv[3:]))
