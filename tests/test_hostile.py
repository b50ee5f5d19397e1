"""Hostile input through every command: each bad input ends in one line ``nrgpt: error: ...`` with a non-zero
exit status, never a traceback, never a silently accepted value, and never a touched file of the user's.

Every case runs ``nrgpt.cli.main`` in-process (fast: no interpreter start per case) on copies of a tiny
trained run, and is classified as the issue's audit classified them: clean / traceback / misleading
message / silently accepted / data loss. ``python tests/test_hostile.py`` prints those counts for the
package on ``sys.path`` (e.g. ``PYTHONPATH=<an older checkout>/src``), which is how the note's before/after
figures are made.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nrgpt import cli
from nrgpt.data import prepare_listops

if __package__:
    from .conftest import make_text_data, tiny_args, tiny_config
else:  # python tests/test_hostile.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import make_text_data, tiny_args, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")


@dataclass
class Ctx:
    """The places a case may use: a text dataset, a ListOps dataset, a trained run (copy it before changing it),
    a folder of the user's own files, and a scratch folder."""

    data: Path
    listops: Path
    run: Path
    user: Path
    tmp: Path

    def copy_run(self, name: str) -> Path:
        dst = self.tmp / name
        shutil.copytree(self.run, dst)
        return dst

    def train(self, out: Path, *overrides: str) -> list[str]:
        return ["train", *tiny_args(self.data, out, *overrides)]


@dataclass
class Case:
    name: str
    kind: str  # the audit's class of the input
    argv: Callable[[Ctx], list[str]]
    message: str  # a fragment the one line must hold
    code: int = 2


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def _edit_state(ctx: Ctx, name: str, change: Callable[[dict], None]) -> Path:
    run = ctx.copy_run(name)
    state_path = run / "last" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    change(state)
    torch.save(state, state_path)
    return run


def _edit_weights(ctx: Ctx, name: str, change: Callable[[dict], None]) -> Path:
    run = ctx.copy_run(name)
    for which in ("best", "last"):
        path = run / which / "model.safetensors"
        weights = load_file(path)
        change(weights)
        save_file(weights, path)
    return run


def _bad_shapes(state: dict) -> None:
    moments = next(iter(state["optimizer"]["state"].values()))
    moments["exp_avg"] = torch.zeros(3, 3)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def _preset(ctx: Ctx, name: str, text: str | bytes) -> str:
    return str(_write(ctx.tmp / name, text))


def _sample(ctx: Ctx, *args: str) -> list[str]:
    return ["sample", str(ctx.run), "--max-new-tokens", "4", *args]


def _dyn(ctx: Ctx, *args: str) -> list[str]:
    return ["dynamics", str(ctx.run), "--out", str(ctx.tmp / "dyn-out"), *args]


def _depth(ctx: Ctx, *args: str, run: Path | None = None) -> list[str]:
    return ["depth", str(run or ctx.run), "--out", str(ctx.tmp / "depth-out"), "--device", "cpu", *args]


CASES = [
    # ---------------------------------------------------------------- lost work
    Case("quickstart over an existing run", "lost work",
         lambda c: ["quickstart", "--data-dir", str(c.data), "--out-dir", str(c.run), "--max-iters", "2"],
         "already holds a run"),
    Case("quickstart bad prompt over an existing run", "lost work",
         lambda c: ["quickstart", "--data-dir", str(c.data), "--out-dir", str(c.run), "--prompt", "Zebra €",
                    "--overwrite", "--max-iters", "2"], "'Z'"),
    Case("quickstart bad prompt, new run", "lost work",
         lambda c: ["quickstart", "--data-dir", str(c.data), "--out-dir", str(c.tmp / "q"), "--prompt", "€",
                    "--max-iters", "2"], "'€'"),
    Case("quickstart --resume --overwrite", "lost work",
         lambda c: ["quickstart", "--data-dir", str(c.data), "--out-dir", str(c.run), "--resume", "--overwrite"],
         "give one of them"),
    Case("train over an existing run", "lost work", lambda c: c.train(c.run), "already holds a run"),
    # ---------------------------------------------------------------- operating system
    Case("out_dir is a file", "OS error", lambda c: c.train(_write(c.tmp / "afile", "x")), "is a file"),
    Case("out_dir below a file", "OS error", lambda c: c.train(_write(c.tmp / "f2", "x") / "run"), "Not a directory"),
    Case("prepare into a full disk", "OS error",
         lambda c: ["prepare", "shakespeare", "--source", str(c.data.with_suffix(".txt")), "--out", "/dev/full/x"],
         "Not a directory"),
    Case("dynamics output is a file", "OS error", lambda c: ["dynamics", str(c.run), "--ids", "1,2", "--out",
                                                             str(_write(c.tmp / "out-file", "x"))], "File exists"),
    Case("prepare source is a directory", "OS error",
         lambda c: ["prepare", "shakespeare", "--source", str(c.user), "--out", str(c.tmp / "p")], "directory"),
    Case("import-listops source is a directory", "OS error",
         lambda c: ["prepare", "import-listops", str(c.user), str(c.user), "--out", str(c.tmp / "il")],
         "directory"),
    Case("prompt file is a directory", "directory for a file",
         lambda c: _sample(c, "--prompt-file", str(c.user)), "--prompt-file"),
    Case("preset is a directory", "directory for a file",
         lambda c: ["train", "--preset", str((c.tmp / "p.toml").mkdir() or c.tmp / "p.toml")], "is a directory"),
    Case("dynamics reference checkpoint is a directory", "directory for a file",
         lambda c: ["dynamics", str(c.user), "--ids", "1,2"], "holds no checkpoint"),
    # ---------------------------------------------------------------- resume states and checkpoints
    Case("resume: state lacks a key", "bad resume state",
         lambda c: ["train", "--resume", "--out-dir", str(_edit_state(c, "r1", lambda s: s.pop("data_rng")))],
         "lacks 'data_rng'"),
    Case("resume: iter is a string", "bad resume state",
         lambda c: ["train", "--resume", "--out-dir", str(_edit_state(c, "r2", lambda s: s.update(iter="7")))],
         "'iter' is of type str"),
    Case("resume: optimizer tensors of another shape", "bad resume state",
         lambda c: ["train", "--resume", "--out-dir", str(_edit_state(c, "r3", _bad_shapes))], "has shape (3, 3)"),
    Case("resume: optimizer state is a list", "bad resume state",
         lambda c: ["train", "--resume", "--out-dir", str(_edit_state(c, "r4", lambda s: s.update(optimizer=[])))],
         "'optimizer' is of type list"),
    Case("resume: a bad RNG state", "bad resume state",
         lambda c: ["train", "--resume", "--out-dir",
                    str(_edit_state(c, "r5", lambda s: s.update(data_rng=torch.zeros(3, dtype=torch.uint8))))],
         "data generator"),
    Case("resume: state with pickled code", "bad resume state",
         lambda c: ["train", "--resume", "--out-dir", str(_edit_state(c, "r6", lambda s: s.update(x=_Evil())))],
         "pickled code"),
    Case("resume: truncated state", "bad resume state",
         lambda c: ["train", "--resume", "--out-dir",
                    str(_write(c.copy_run("r7") / "last" / "state.pt", b"PK\x03\x04trunc").parents[1])],
         "not a readable torch checkpoint"),
    Case("weights: a tensor missing", "bad checkpoint",
         lambda c: ["sample", str(_edit_weights(c, "w1", lambda w: w.pop("lm_head.bias")))],
         "missing: lm_head.bias"),
    Case("weights: a tensor of another shape", "bad checkpoint",
         lambda c: ["sample", str(_edit_weights(c, "w2", lambda w: w.update({"lm_head.bias": torch.zeros(3)})))],
         "lm_head.bias (3,)"),
    Case("weights: NaN", "NaN weights",
         lambda c: ["sample", str(_edit_weights(c, "w3", lambda w: w["tok_emb.weight"].fill_(math.nan)))],
         "non-finite values"),
    Case("checkpoint.json is not JSON", "bad checkpoint",
         lambda c: ["eval", str(_write(c.copy_run("j1") / "best" / "checkpoint.json", "{").parents[1])],
         "not valid JSON"),
    Case("checkpoint.json holds a bad config", "bad checkpoint",
         lambda c: ["eval", str(_write(c.copy_run("j2") / "best" / "checkpoint.json", json.dumps(
             {"format": "nrgpt-checkpoint-1", "config": {"train": {"lr": -1}}})).parents[1])],
         "invalid config"),
    # ---------------------------------------------------------------- another dataset's vocabulary
    Case("eval with another dataset", "vocabulary", lambda c: ["eval", str(c.run), "--data-dir", str(c.listops)],
         "not the model's"),
    Case("sample with another dataset", "vocabulary", lambda c: _sample(c, "--data-dir", str(c.listops)),
         "not the model's"),
    Case("dynamics on another dataset", "vocabulary", lambda c: _dyn(c, "--data", str(c.listops)),
         "not the model's"),
    Case("dynamics ids beyond the vocabulary", "vocabulary", lambda c: _dyn(c, "--ids", "1,2,9999"),
         "outside the model's vocabulary"),
    Case("run's dataset gone", "vocabulary",
         lambda c: ["sample", str(_gone_dataset(c))], "pass --data-dir"),
    # ---------------------------------------------------------------- sampling
    Case("temperature inf", "sampling", lambda c: _sample(c, "--temperature", "inf"), "not a finite number"),
    Case("temperature nan", "sampling", lambda c: _sample(c, "--temperature", "nan"), "not a finite number"),
    Case("temperature 0", "sampling", lambda c: _sample(c, "--temperature", "0"), "--greedy"),
    Case("temperature -1", "sampling", lambda c: _sample(c, "--temperature", "-1"), "--greedy"),
    Case("top-k 0", "sampling", lambda c: _sample(c, "--top-k", "0"), "--top-k"),
    Case("top-p 1.5", "sampling", lambda c: _sample(c, "--top-p", "1.5"), "--top-p"),
    Case("negative token count", "sampling", lambda c: _sample(c, "--max-new-tokens", "-1"), "out of range"),
    Case("sample --steps 0", "sampling", lambda c: _sample(c, "--steps", "0"), "out of range"),
    Case("sample negative --early-exit", "sampling", lambda c: _sample(c, "--early-exit", "-1"), "out of range"),
    Case("eval quality temperature inf", "sampling",
         lambda c: ["eval", str(c.run), "--task", "quality", "--temperature", "inf"], "not a finite number"),
    # ---------------------------------------------------------------- dynamics arguments
    Case("dynamics ids not numbers", "dynamics", lambda c: _dyn(c, "--ids", "a,b"), "'a' is not an integer"),
    Case("dynamics empty ids", "dynamics", lambda c: _dyn(c, "--ids", ","), "comma-separated integers"),
    Case("dynamics negative id", "dynamics", lambda c: _dyn(c, "--ids", "-1"), "out of range"),
    Case("dynamics early exit not numbers", "dynamics", lambda c: _dyn(c, "--ids", "1,2", "--early-exit", "x"),
         "'x' is not a number"),
    Case("dynamics --steps 0", "dynamics", lambda c: _dyn(c, "--ids", "1,2", "--steps", "0"), "out of range"),
    Case("dynamics --steps -3", "dynamics", lambda c: _dyn(c, "--ids", "1,2", "--steps", "-3"), "out of range"),
    Case("dynamics --batch 0", "dynamics", lambda c: _dyn(c, "--data", str(c.data), "--batch", "0"), "out of range"),
    Case("dynamics --length 1", "dynamics", lambda c: _dyn(c, "--data", str(c.data), "--length", "1"),
         "out of range"),
    Case("dynamics --sequence beyond the batch", "dynamics", lambda c: _dyn(c, "--ids", "1,2", "--sequence", "3"),
         "not in the batch"),
    Case("dynamics negative energy tolerance", "dynamics",
         lambda c: _dyn(c, "--ids", "1,2", "--energy-tol", "-1"), "out of range"),
    Case("dynamics early-exit-steps 0", "dynamics",
         lambda c: _dyn(c, "--ids", "1,2", "--early-exit", "0.1", "--early-exit-steps", "0"), "out of range"),
    # ---------------------------------------------------------------- depth arguments
    Case("depth steps not numbers", "depth", lambda c: _depth(c, "--steps", "2,a"), "'a' is not an integer"),
    Case("depth empty steps", "depth", lambda c: _depth(c, "--steps", ","), "comma-separated integers"),
    Case("depth --steps 0", "depth", lambda c: _depth(c, "--steps", "0,2"), "out of range"),
    Case("depth steps beyond 64x the trained", "depth", lambda c: _depth(c, "--steps", "2,129"), "more than 64x"),
    Case("depth of a deep GPT", "depth", lambda c: _depth(c, run=_deep_gpt(c)), "need a recurrent model"),
    Case("depth without a dataset", "depth", lambda c: _depth(c, run=_gone_dataset(c)), "pass --data"),
    Case("depth on a folder that is no dataset", "depth", lambda c: _depth(c, "--data", str(c.user)),
         "has no meta.json"),
    # ---------------------------------------------------------------- seeds and threads
    Case("train seed -1", "seed", lambda c: c.train(c.tmp / "s1", "train.seed=-1"), "train.seed = -1"),
    Case("train seed 2^70", "seed", lambda c: c.train(c.tmp / "s2", f"train.seed={2**70}"), "train.seed"),
    Case("sample seed -5", "seed", lambda c: _sample(c, "--seed", "-5"), "out of range"),
    Case("prepare listops seed 2^64", "seed",
         lambda c: ["prepare", "listops", "--seed", str(2**64), "--out", str(c.tmp / "lo")], "out of range"),
    Case("dynamics seed -1", "seed", lambda c: _dyn(c, "--data", str(c.data), "--seed", "-1"), "out of range"),
    Case("threads beyond the machine", "threads", lambda c: c.train(c.tmp / "t1", "system.threads=100000"),
         "more than the"),
    Case("negative threads", "threads", lambda c: c.train(c.tmp / "t2", "system.threads=-1"), "system.threads"),
    # ---------------------------------------------------------------- preset files
    Case("preset not UTF-8", "preset", lambda c: ["train", "--preset", _preset(c, "latin.toml", b"lr = \"\xe9\"\n")],
         "not UTF-8"),
    Case("preset section is a scalar", "preset",
         lambda c: ["train", "--preset", _preset(c, "scalar.toml", "train = 5\n")], "train must be a table"),
    Case("preset section is a scalar, then --set", "preset",
         lambda c: ["train", "--preset", _preset(c, "scalar2.toml", "train = 5\n"), "--set", "train.lr=1e-3"],
         "train must be a table"),
    Case("YAML preset is a list", "preset", lambda c: ["train", "--preset", _preset(c, "list.yaml", "- 1\n- 2\n")],
         "must be a table"),
    Case("preset model section is a scalar", "preset",
         lambda c: ["train", "--preset", _preset(c, "model.toml", "model = 'GPT'\n")], "model must be a table"),
    Case("preset value is inf", "preset",
         lambda c: ["train", "--preset", _preset(c, "inf.toml", "[train]\nlr = inf\n")], "finite"),
    # ---------------------------------------------------------------- silent nonsense
    Case("--lr inf", "silent nonsense", lambda c: c.train(c.tmp / "l1") + ["--lr", "inf"], "must be a finite number"),
    Case("--lr nan", "silent nonsense", lambda c: c.train(c.tmp / "l2") + ["--lr", "nan"], "must be a finite number"),
    Case("--max-minutes inf", "silent nonsense", lambda c: c.train(c.tmp / "l3") + ["--max-minutes", "inf"],
         "must be a finite number"),
    Case("model.eta_init inf", "silent nonsense", lambda c: c.train(c.tmp / "l4", "model.eta_init=inf"), "finite"),
    Case("random steps for the deep GPT", "silent nonsense",
         lambda c: c.train(c.tmp / "rs1", "model.preset=GPT", "train.steps_distribution=lognormal"),
         "needs a recurrent model"),
    Case("negative steps_sigma", "silent nonsense",
         lambda c: c.train(c.tmp / "rs2", "train.steps_distribution=lognormal", "train.steps_sigma=-1"),
         "train.steps_sigma = -1.0"),
    Case("steps_min above steps_max", "silent nonsense",
         lambda c: c.train(c.tmp / "rs3", "train.steps_distribution=uniform", "train.steps_min=5", "train.steps_max=4"),
         "train.steps_min = 5 must be <= train.steps_max = 4"),
    Case("an NRGPT option for a GPT", "silent nonsense",
         lambda c: c.train(c.tmp / "u1", "model.preset=GPT", "model.mask=strict"),
         "model.mask = 'strict' does not apply to GPT"),
    Case("sweep --dry-run --shard 3/2", "silent nonsense",
         lambda c: ["sweep", _sweep_file(c), "--dry-run", "--shard", "3/2"], "--shard '3/2'"),
    Case("eval batch size 0", "silent nonsense", lambda c: ["eval", str(c.run), "--batch-size", "0"], "out of range"),
    Case("corpus val fraction 2", "silent nonsense",
         lambda c: ["prepare", "corpus", str(c.user), "--val-fraction", "2", "--out", str(c.tmp / "c")],
         "out of range"),
    # ---------------------------------------------------------------- export
    Case("export into a folder of the user's", "lost work", lambda c: ["export", str(c.run), str(c.user)],
         "not empty and not an nrgpt export"),
    Case("export into a run directory", "lost work", lambda c: ["export", str(c.run), str(c.run)],
         "not empty and not an nrgpt export"),
    Case("export with another dataset", "vocabulary",
         lambda c: ["export", str(c.run), str(c.tmp / "e1"), "--data-dir", str(c.listops)], "not the model's"),
    Case("export of no run", "bad checkpoint", lambda c: ["export", str(c.user), str(c.tmp / "e2")],
         "holds no checkpoint"),
    Case("sample a damaged export", "bad checkpoint",
         lambda c: ["sample", str(_write(_exported(c) / "nrgpt_run.json", "{").parent)], "not valid JSON"),
    # ---------------------------------------------------------------- command line
    Case("unknown command", "CLI", lambda c: ["trian"], "invalid choice"),
    Case("unknown option", "CLI", lambda c: ["sample", str(c.run), "--temprature", "1"], "unrecognized arguments"),
    Case("missing argument", "CLI", lambda c: ["sample"], "the following arguments are required"),
]


def _gone_dataset(ctx: Ctx) -> Path:
    """A run trained on a dataset that has since been removed (made once, then reused)."""
    run = ctx.tmp / "gone" / "run"
    if run.is_dir():
        return run
    data = make_text_data(ctx.tmp / "gone" / "data", n_lines=300)
    from nrgpt.train import train

    train(tiny_config(data, run, "train.max_iters=1", "train.eval_iters=1"), quiet=True)
    shutil.rmtree(data)
    return run


def _deep_gpt(ctx: Ctx) -> Path:
    """A run directory holding an (untrained) deep GPT for the dataset of the tiny run."""
    from nrgpt import build_model
    from nrgpt.checkpoint import save_checkpoint
    from nrgpt.data import load_meta

    run, vocab = ctx.tmp / "deep-gpt", load_meta(ctx.data)["vocab_size"]
    config = tiny_config(ctx.data, run, "model.preset=GPT", f"model.vocab_size={vocab}")
    save_checkpoint(run / "best", build_model(config.model_config(vocab)), config, {"iter": 0})
    return run


def _exported(ctx: Ctx) -> Path:
    out = ctx.tmp / "exported"
    assert cli.main(["export", str(ctx.run), str(out)]) == 0
    return out


def _sweep_file(ctx: Ctx) -> str:
    return str(_write(ctx.tmp / "s.toml", f'name = "s"\n[base]\nextends = "listops-cpu"\n[base.data]\n'
                                          f'dir = "{ctx.listops}"\n[grid]\n"model.n_embd" = [8, 16]\n'))


# ------------------------------------------------------------------------------------------ running a case


def fingerprint(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` with a digest of its content."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_case(case: Case, ctx: Ctx) -> tuple[str, int, str]:
    """(outcome, exit status, stderr) of one case: 'clean', 'traceback', 'misleading message', 'silently
    accepted' or 'data loss'."""
    argv = case.argv(ctx)
    before = fingerprint(ctx.run, ctx.data, ctx.listops, ctx.user)
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # noqa: BLE001 - an escaped exception is the traceback outcome
            return "traceback", -1, f"{type(e).__name__}: {e}"
    text = err.getvalue()
    lines = [line for line in text.splitlines()
             if line.strip() and not line.startswith(("nrgpt: note:", "nrgpt: warning:"))]
    if fingerprint(ctx.run, ctx.data, ctx.listops, ctx.user) != before:
        return "data loss", code, text
    if "Traceback" in text:
        return "traceback", code, text
    if code == 0:
        return "silently accepted", code, text
    clean = (code == case.code and len(lines) == 1 and ": error: " in lines[0] and case.message in lines[0])
    return ("clean" if clean else "misleading message"), code, text


def make_context(tmp: Path) -> Ctx:
    from nrgpt.train import train

    data = make_text_data(tmp / "data" / "text")
    listops = prepare_listops(tmp / "data" / "listops", n_train=40, n_test=12)
    run = tmp / "runs" / "tiny"
    train(tiny_config(data, run, "train.max_iters=20"), quiet=True)
    user = tmp / "user"
    _write(user / "notes.txt", "my notes")
    _write(user / "nested" / "more.txt", "more")
    _write(run / "best_samples.txt", "samples I kept")  # a user's file inside the run directory
    return Ctx(data=data, listops=listops, run=run, user=user, tmp=tmp / "scratch")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Ctx:
    return make_context(tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_is_one_clean_line(case: Case, ctx: Ctx):
    ctx.tmp.mkdir(parents=True, exist_ok=True)
    outcome, code, err = run_case(case, ctx)
    assert outcome == "clean", f"{outcome} (exit {code}): {err}"


def test_fresh_run_dirs_of_refused_inputs_are_not_created(ctx):
    for name in ("q", "s1", "s2", "t1", "t2", "l1", "l2", "l3", "l4", "rs1", "rs2", "rs3"):
        assert not (ctx.tmp / name).exists(), name


def test_an_internal_error_is_one_line_with_a_log(ctx, monkeypatch, capsys):
    """A bug (here: an exception the code does not expect) prints one line naming a log with the traceback;
    ``--debug`` shows the traceback instead."""
    import nrgpt.sample

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(nrgpt.sample, "load_tokenizer", broken)
    assert cli.main(["sample", str(ctx.run)]) == 1
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "internal error (ZeroDivisionError: a bug)" in line
    log = Path(line.split("the traceback is in ")[1].split(";")[0])
    assert "Traceback" in log.read_text() and "broken" in log.read_text()
    log.unlink()
    with pytest.raises(ZeroDivisionError):
        cli.main(["--debug", "sample", str(ctx.run)])


def test_sample_works_from_any_working_directory(ctx, monkeypatch, capsys, tmp_path):
    """A run trained on a relative data directory samples from elsewhere: the checkpoint records where its
    dataset is."""
    from nrgpt.train import train

    monkeypatch.chdir(ctx.data.parent)
    train(tiny_config(Path(ctx.data.name), tmp_path / "rel", "train.max_iters=1", "train.eval_iters=1"), quiet=True)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sample", str(tmp_path / "rel"), "--max-new-tokens", "3", "--prompt", "The"]) == 0
    assert capsys.readouterr().out.startswith("The")


def test_overwrite_removes_only_what_the_run_wrote(ctx):
    from nrgpt.train import train

    run = ctx.copy_run("overwrite")
    keep = [run / "best_samples.txt", _write(run / "best_of_sweep" / "x.txt", "x"),
            _write(run / "config.json.bak", "{}"), _write(run / "dynamics" / "summary.json", "{}")]
    train(tiny_config(ctx.data, run, "train.max_iters=2", "train.eval_iters=1"), overwrite=True, quiet=True)
    assert all(p.exists() for p in keep)
    assert json.loads((run / "result.json").read_text())["iters"] == 2


def main() -> None:
    """Print the outcome counts of every case for the nrgpt on sys.path (for the issue's note). ``-v`` prints
    every case; ``--skip NAME`` leaves a case out (an older nrgpt crashes the whole process on some)."""
    skip = {sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--skip"}
    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(1)
        ctx = make_context(Path(tmp))
        counts: Counter[str] = Counter()
        for case in (c for c in CASES if c.name not in skip):
            ctx.tmp.mkdir(parents=True, exist_ok=True)
            outcome, code, err = run_case(case, ctx)
            counts[outcome] += 1
            if outcome != "clean" or "-v" in sys.argv:
                print(f"{outcome:18s} {case.name}: exit {code}: {' | '.join(err.strip().splitlines()[-2:])[:160]}")
        order = ("clean", "traceback", "misleading message", "silently accepted", "data loss")
        print(f"{sum(counts.values())} cases: " + ", ".join(f"{counts[k]} {k}" for k in order))


if __name__ == "__main__":
    main()
