"""ListOps: nested list operations written as step-by-step reductions (paper section 3.2, app. C.2).

Samples
-------
A sample is a tree. The root is a function; every function node has a number of arguments drawn
uniformly from ``[min_args, max_args]``. The root has depth 0 and its arguments depth 1; an argument at a
depth below ``max_depth`` is a function with probability ``p_func`` (else a leaf), an argument at depth
``max_depth`` is always a leaf, so functions nest at most ``max_depth`` deep. Leaves are uniform over
``inputs``; every function's op is uniform over ``ops``. The ops, all taken mod ``modulus``:

* ``max``, ``min``;
* ``median``: ``sorted(xs)[len(xs) // 2]`` (for an even count, the upper of the two middle elements);
* ``add``: the sum.

Op tokens carry the modulus, as in the authors' reference code: ``max_10``, ``min_10``, ``median_10``,
``add_10``. A sample is one line of space-separated tokens: the expression, then each reduction step,
then the answer, separated by ``=``::

    median_10 ( max_10 ( 9 9 ) max_10 ( 0 1 ) 4 ) = median_10 ( 9 max_10 ( 0 1 ) 4 ) = median_10 ( 9 1 4 ) = 4

A reduction step evaluates exactly one function, the one reached by descending from the root through
the first function argument at each level (so all its arguments are leaves). The training stream is the
samples' tokens, each sample followed by ``<eos>``.

Held-out argument tuples and the test split
-------------------------------------------
The argument tuple of a function node is the tuple of its arguments' values, in order: exactly the leaves
it has at the reduction step that evaluates it. (Before that step some arguments may still be functions;
after it the node is gone. So the functions whose arguments are all numbers, ``op ( a b c )``, in all the
steps of a chain show exactly the argument tuples of its nodes. Since a run of consecutive numbers in a
step lies inside one argument list, which has at most ``max_args`` entries, a run of ``max_args`` numbers
is a whole argument tuple: this is the same as the reference code's test for held-out tuples.) A fraction
``heldout_fraction`` of all ``max_args``-tuples of inputs (with ``heldout_distinct``: of the tuples of
``max_args`` distinct inputs, ordered) is drawn once per seed. A sample *contains* a held-out tuple when
the argument tuple of any of its function nodes equals one. Samples are drawn from one seeded stream;
those that contain a held-out tuple go to the test split (until it has ``n_test``), all others to the
training split (until it has ``n_train``). So no held-out tuple ever appears as the arguments of a
function in any training sample at any step, every test sample contains one, the two splits are disjoint,
and the test set does not depend on ``n_train``.

Files written by ``prepare_listops`` (and ``import_listops``): ``train.txt`` and ``test.txt`` (one sample
a line), ``test.jsonl`` (one JSON object per test sample, from ``listops_sample_info``: prompt, target,
answer, the ops it uses, number of function nodes, depth and the held-out tuples it contains),
``listops.json`` (the generation parameters, seed and held-out tuples), ``vocab.json``, ``train.bin``,
``val.bin`` (the test samples' token stream) and ``meta.json``.

Presets (``LISTOPS_PRESETS``; any field can be overridden):

* ``reference``: the parameters of the dataset the authors released with their code
  (``ListOpsDataset_funcs(add_10,max_10,median_10)_depth2_args(2,3)_funcprob0.25_ntrain50000_ntest2000``):
  ops max, median, add mod 10, inputs 0-9, max depth 2, 2-3 arguments, p_func 0.25, 50,000 train and
  2,000 test samples; 5% of the 720 ordered 3-tuples of distinct inputs held out (36 tuples; the reference
  code draws 5% of 10**3 = 50 random distinct-input tuples, repeats allowed). The samples themselves
  differ from the released file (a different random generator).
* ``paper``: what the paper states (ops max, median, sum mod 20, inputs 0-19) with our choices for the
  rest: the paper's example ``SUM(2, MAX(4, 13, 1), MEDIAN(5, 3, 16))`` has depth 2 and 3 arguments, so
  max depth 2 and 2-3 arguments as in ``reference``; p_func 0.5 for more nesting; 100,000 train samples
  (the 3-tuples of 20 inputs are 8 times as many as of 10) and 2,000 test samples; 5% of the 3-tuples of
  distinct inputs held out (342 tuples).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .stream import DataError, start_dataset_dir, token_dtype, write_meta, write_tokens
from .tokenizers import LISTOPS_EOS, ListOpsTokenizer

OPS = ("max", "min", "median", "add")
_OP_ALIASES = {"sum": "add"}
_OP_TOKEN = re.compile(r"(max|min|median|add)_([1-9][0-9]*)")
_NUMBER = re.compile(r"0|[1-9][0-9]*")
_PUNCT = ("(", ")", "=")

LISTOPS_PRESETS: dict[str, dict[str, Any]] = {
    "reference": {
        "ops": ["max", "median", "add"], "modulus": 10, "inputs": list(range(10)), "max_depth": 2,
        "min_args": 2, "max_args": 3, "p_func": 0.25, "n_train": 50_000, "n_test": 2_000,
        "heldout_fraction": 0.05, "heldout_distinct": True,
    },
    "paper": {
        "ops": ["max", "median", "add"], "modulus": 20, "inputs": list(range(20)), "max_depth": 2,
        "min_args": 2, "max_args": 3, "p_func": 0.5, "n_train": 100_000, "n_test": 2_000,
        "heldout_fraction": 0.05, "heldout_distinct": True,
    },
}


@dataclass
class Func:
    """A function node: op name (one of OPS), modulus and arguments (function nodes or ints)."""

    op: str
    mod: int
    args: list[Expr]


Expr = Func | int


@dataclass(frozen=True)
class ListOpsConfig:
    """Generation parameters; see the module docstring. Build with ``listops_config``."""

    ops: tuple[str, ...]
    modulus: int
    inputs: tuple[int, ...]
    max_depth: int
    min_args: int
    max_args: int
    p_func: float
    n_train: int
    n_test: int
    heldout_fraction: float
    heldout_distinct: bool


def _int_field(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise DataError(f"listops {name} must be an integer >= {low}, got {value!r}")
    return value


def _fraction_field(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise DataError(f"listops {name} must be a number in [0, 1], got {value!r}")
    return float(value)


def listops_config(preset: str = "reference", **overrides: Any) -> ListOpsConfig:
    """The preset's parameters with ``overrides`` applied, checked; DataError names a bad field.

    ``inputs`` may be a list of non-negative ints or an int n (meaning 0..n-1); ``ops`` names from
    max, min, median, add (``sum`` is accepted for add).
    """
    if preset not in LISTOPS_PRESETS:
        raise DataError(f"unknown ListOps preset {preset!r}: choose one of {', '.join(LISTOPS_PRESETS)}")
    fields = dict(LISTOPS_PRESETS[preset])
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise DataError(f"unknown ListOps field(s) {', '.join(unknown)}: valid fields are {', '.join(fields)}")
    fields.update(overrides)
    ops = fields["ops"]
    if isinstance(ops, str):
        ops = [o.strip() for o in ops.split(",")]
    ops = [_OP_ALIASES.get(o, o) for o in ops]
    if not ops or any(o not in OPS for o in ops) or len(set(ops)) != len(ops):
        raise DataError(f"listops ops must be distinct names from {', '.join(OPS)} (or sum), got {fields['ops']!r}")
    inputs = fields["inputs"]
    if isinstance(inputs, int) and not isinstance(inputs, bool):
        inputs = list(range(_int_field("inputs", inputs, 1)))
    if (not isinstance(inputs, (list, tuple)) or not inputs
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in inputs)):
        raise DataError(f"listops inputs must be a non-empty list of non-negative integers, got {inputs!r}")
    cfg = ListOpsConfig(
        ops=tuple(ops), modulus=_int_field("modulus", fields["modulus"], 1), inputs=tuple(sorted(set(inputs))),
        max_depth=_int_field("max_depth", fields["max_depth"], 1),
        min_args=_int_field("min_args", fields["min_args"], 1), max_args=_int_field("max_args", fields["max_args"], 1),
        p_func=_fraction_field("p_func", fields["p_func"]),
        n_train=_int_field("n_train", fields["n_train"], 0), n_test=_int_field("n_test", fields["n_test"], 0),
        heldout_fraction=_fraction_field("heldout_fraction", fields["heldout_fraction"]),
        heldout_distinct=fields["heldout_distinct"],
    )
    if cfg.min_args > cfg.max_args:
        raise DataError(f"listops min_args ({cfg.min_args}) is larger than max_args ({cfg.max_args})")
    if not isinstance(cfg.heldout_distinct, bool):
        raise DataError(f"listops heldout_distinct must be true or false, got {cfg.heldout_distinct!r}")
    if cfg.heldout_distinct and cfg.max_args > len(cfg.inputs):
        raise DataError(f"listops heldout_distinct needs at least max_args ({cfg.max_args}) distinct inputs, "
                        f"got {len(cfg.inputs)}")
    if cfg.n_test > 0 and cfg.heldout_fraction == 0:
        raise DataError("listops n_test > 0 needs heldout_fraction > 0: test samples are those that contain a "
                        "held-out tuple")
    if cfg.n_train + cfg.n_test == 0:
        raise DataError("listops n_train and n_test are both 0: nothing to generate")
    return cfg


# ----------------------------------------------------------------------------------------------- trees


def apply_op(op: str, values: Sequence[int], mod: int) -> int:
    """``op`` (max, min, median or add) of ``values``, mod ``mod``; median of an even count is the upper
    middle element."""
    if not values:
        raise DataError(f"{op} of no arguments")
    if op == "max":
        return max(values) % mod
    if op == "min":
        return min(values) % mod
    if op == "median":
        return sorted(values)[len(values) // 2] % mod
    if op == "add":
        return sum(values) % mod
    raise DataError(f"unknown ListOps op {op!r}: expected one of {', '.join(OPS)}")


def evaluate(expr: Expr) -> int:
    """The value of an expression tree."""
    if isinstance(expr, int):
        return expr
    return apply_op(expr.op, [evaluate(a) for a in expr.args], expr.mod)


def argument_tuples(expr: Expr) -> list[tuple[int, ...]]:
    """The argument tuple of every function node (its arguments' values, in order), children first."""
    out: list[tuple[int, ...]] = []

    def walk(e: Expr) -> int:
        if isinstance(e, int):
            return e
        values = tuple(walk(a) for a in e.args)
        out.append(values)
        return apply_op(e.op, values, e.mod)

    walk(expr)
    return out


def tree_depth(expr: Expr) -> int:
    """Nesting depth of functions: 0 for a number, 1 for a function of numbers."""
    if isinstance(expr, int):
        return 0
    return 1 + max(tree_depth(a) for a in expr.args)


def _functions(expr: Expr) -> Iterable[Func]:
    if isinstance(expr, Func):
        yield expr
        for a in expr.args:
            yield from _functions(a)


def render(expr: Expr) -> list[str]:
    """The tokens of an expression: ``op_M ( args ) ``."""
    if isinstance(expr, int):
        return [str(expr)]
    tokens = [f"{expr.op}_{expr.mod}", "("]
    for a in expr.args:
        tokens.extend(render(a))
    tokens.append(")")
    return tokens


def _copy(expr: Expr) -> Expr:
    return expr if isinstance(expr, int) else Func(expr.op, expr.mod, [_copy(a) for a in expr.args])


def reduce_once(expr: Expr) -> Expr:
    """One reduction step (on a copy): evaluate the function reached from the root through the first
    function argument at each level."""
    if isinstance(expr, int):
        return expr
    root = _copy(expr)
    parent, index, node = None, -1, root
    while True:
        i = next((i for i, a in enumerate(node.args) if isinstance(a, Func)), None)
        if i is None:
            break
        parent, index, node = node, i, node.args[i]
    value = apply_op(node.op, node.args, node.mod)
    if parent is None:
        return value
    parent.args[index] = value
    return root


def reduction_chain(expr: Expr) -> str:
    """The sample line of a tree: the expression, each reduction step and the answer, joined by ``=``."""
    steps = [render(expr)]
    while not isinstance(expr, int):
        expr = reduce_once(expr)
        steps.append(render(expr))
    return " = ".join(" ".join(s) for s in steps)


def random_tree(rng: random.Random, cfg: ListOpsConfig, depth: int = 0) -> Func:
    """A random function node at ``depth`` (0 for the root) following the shape rules of the module docstring."""
    args: list[Expr] = []
    for _ in range(rng.randint(cfg.min_args, cfg.max_args)):
        if depth + 1 < cfg.max_depth and rng.random() < cfg.p_func:
            args.append(random_tree(rng, cfg, depth + 1))
        else:
            args.append(rng.choice(cfg.inputs))
    return Func(rng.choice(cfg.ops), cfg.modulus, args)


def heldout_tuples(rng: random.Random, cfg: ListOpsConfig) -> list[tuple[int, ...]]:
    """Draw the held-out ``max_args``-tuples: ``heldout_fraction`` of all of them (rounded, at least one
    when the fraction is positive), sorted."""
    k, pool = cfg.max_args, cfg.inputs
    total = math.perm(len(pool), k) if cfg.heldout_distinct else len(pool) ** k
    count = round(cfg.heldout_fraction * total)
    if cfg.heldout_fraction > 0:
        count = max(count, 1)
    out = []
    for rank in rng.sample(range(total), count):
        if cfg.heldout_distinct:  # unrank an ordered choice of k distinct inputs
            left, t = list(pool), []
            for j in range(k):
                rank, d = divmod(rank, len(pool) - j)
                t.append(left.pop(d))
        else:
            t = []
            for _ in range(k):
                rank, d = divmod(rank, len(pool))
                t.append(pool[d])
        out.append(tuple(t))
    return sorted(out)


def listops_vocab(op_tokens: Iterable[str], numbers: Iterable[int]) -> list[str]:
    """The ordered ListOps vocabulary: ``<eos> ( ) =``, the op tokens, then the numbers ascending."""
    return [LISTOPS_EOS, *_PUNCT, *op_tokens, *(str(n) for n in sorted(set(numbers)))]


# ----------------------------------------------------------------------------------------------- parsing


def _parse_step(tokens: Sequence[str]) -> Expr:
    """Parse one step (the tokens between two ``=``) into a tree; DataError says what is malformed."""
    if not tokens:
        raise DataError("empty expression (two '=' in a row, or '=' at the start or end)")

    def parse(i: int) -> tuple[Expr, int]:
        t = tokens[i]
        if _NUMBER.fullmatch(t):
            return int(t), i + 1
        m = _OP_TOKEN.fullmatch(t)
        if m is None:
            if t in ("(", ")"):
                raise DataError(f"unbalanced parentheses: unexpected {t!r} at token {i + 1}")
            raise DataError(f"unknown token {t!r} (expected a number, (, ), = or an op like max_10)")
        if i + 1 >= len(tokens) or tokens[i + 1] != "(":
            raise DataError(f"op {t!r} at token {i + 1} is not followed by '('")
        args: list[Expr] = []
        i += 2
        while True:
            if i >= len(tokens):
                raise DataError("unbalanced parentheses: missing ')'")
            if tokens[i] == ")":
                break
            arg, i = parse(i)
            args.append(arg)
        if not args:
            raise DataError(f"op {t!r} has no arguments")
        return Func(m.group(1), int(m.group(2)), args), i + 1

    expr, end = parse(0)
    if end != len(tokens):
        if tokens[end] == ")":
            raise DataError(f"unbalanced parentheses: unexpected ')' at token {end + 1}")
        raise DataError(f"extra tokens after the expression: {' '.join(tokens[end:])!r}")
    return expr


def _split_steps(line: str) -> list[list[str]]:
    steps: list[list[str]] = [[]]
    for t in line.split():
        if t == "=":
            steps.append([])
        else:
            steps[-1].append(t)
    return steps


def parse_sample(line: str) -> tuple[Expr, list[Expr], int]:
    """Check a sample line; return its expression, all its steps (expression first) and its stated answer.

    DataError for a malformed line: no ``=``, an empty step, unbalanced parentheses, an unknown op or
    token, or a final step that is not a single number.
    """
    if LISTOPS_EOS in line.split():
        raise DataError(f"a sample line must not contain {LISTOPS_EOS}")
    steps = _split_steps(line)
    if len(steps) < 2:
        raise DataError("no '=': a sample is 'expression = ... = answer'")
    exprs = [_parse_step(s) for s in steps]
    if not isinstance(exprs[-1], int):
        raise DataError(f"the final step {' '.join(steps[-1])!r} is not a single number")
    return exprs[0], exprs, exprs[-1]


def evaluate_listops_expression(line_prefix: str) -> str:
    """The answer (as a token) of the expression before the first ``=`` (or of the whole text if it has
    none), e.g. ``'max_10 ( 3 add_10 ( 4 9 ) ) ='`` -> ``'3'``."""
    return str(evaluate(_parse_step(_split_steps(line_prefix)[0])))


def split_sample(line: str) -> tuple[str, str]:
    """(prompt, target): the tokens up to and including the first ``=``, and the rest (the remaining
    steps and the answer), each joined by single spaces."""
    tokens = line.split()
    if "=" not in tokens:
        raise DataError("no '=' in the sample: a sample is 'expression = ... = answer'")
    i = tokens.index("=")
    return " ".join(tokens[: i + 1]), " ".join(tokens[i + 1:])


def listops_sample_info(line: str, heldout: Iterable[Sequence[int]] | None = None) -> dict[str, Any]:
    """What the evaluator needs about a sample (the records of ``test.jsonl``).

    Keys: line, prompt, target, answer (the final token), ops (sorted op names used), n_funcs (function
    nodes), depth (``tree_depth``) and heldout: the held-out tuples the sample contains (as lists, in the
    order its functions are evaluated, without repeats), or None when ``heldout`` is None.
    """
    expr, _, answer = parse_sample(line)
    prompt, target = split_sample(line)
    funcs = list(_functions(expr))
    info: dict[str, Any] = {
        "line": " ".join(line.split()), "prompt": prompt, "target": target, "answer": str(answer),
        "ops": sorted({f.op for f in funcs}), "n_funcs": len(funcs), "depth": tree_depth(expr), "heldout": None,
    }
    if heldout is not None:
        held = {tuple(t) for t in heldout}
        hits = [t for t in argument_tuples(expr) if t in held]
        info["heldout"] = [list(t) for t in dict.fromkeys(hits)]
    return info


def read_listops_test(data_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``data_dir/test.jsonl`` (see ``listops_sample_info``)."""
    path = Path(data_dir) / "test.jsonl"
    if not path.is_file():
        raise DataError(f"{path} is missing: prepare the ListOps dataset (`nrgpt prepare listops`) first")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------- writing


def _write_listops(out_dir: Path, train: list[str], test: list[str], vocab: list[str],
                   heldout: list[tuple[int, ...]] | None, info: dict[str, Any], source: str) -> Path:
    start_dataset_dir(out_dir)
    tok = ListOpsTokenizer(vocab)
    dtype = token_dtype(len(vocab))

    def stream(lines: list[str]) -> tuple[np.ndarray, int]:
        ids: list[int] = []
        longest = 0
        for line in lines:
            ids.extend(tok.encode(line))
            ids.append(tok.eos_id)
            longest = max(longest, len(line.split()) + 1)
        return np.array(ids, dtype=dtype), longest

    (out_dir / "vocab.json").write_text(json.dumps(vocab) + "\n", encoding="utf-8")
    for name, lines in (("train.txt", train), ("test.txt", test)):
        (out_dir / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    with open(out_dir / "test.jsonl", "w", encoding="utf-8") as f:
        for line in test:
            f.write(json.dumps(listops_sample_info(line, heldout)) + "\n")
    (out_dir / "listops.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    train_ids, train_longest = stream(train)
    test_ids, test_longest = stream(test)
    write_meta(out_dir, {
        "kind": "listops", "vocab_size": len(vocab), "dtype": dtype, "eos_id": tok.eos_id,
        "train_tokens": write_tokens(out_dir / "train.bin", [train_ids], dtype),
        "val_tokens": write_tokens(out_dir / "val.bin", [test_ids], dtype),
        "source": source, "n_train": len(train), "n_test": len(test),
        "max_sample_tokens": max(train_longest, test_longest),
    })
    return out_dir


def generate_listops(cfg: ListOpsConfig, seed: int = 0) -> tuple[list[str], list[str], list[tuple[int, ...]], int]:
    """(train lines, test lines, held-out tuples, samples drawn) for a config and seed; deterministic."""
    rng = random.Random(seed)
    heldout = heldout_tuples(rng, cfg)
    held = set(heldout)
    train: list[str] = []
    test: list[str] = []
    limit = 200 * (cfg.n_train + cfg.n_test) + 10_000
    drawn = 0
    while len(train) < cfg.n_train or len(test) < cfg.n_test:
        if drawn >= limit:
            raise DataError(f"drew {drawn} ListOps samples and found only {len(train)} train / {len(test)} test "
                            f"samples (test samples must contain one of the {len(held)} held-out tuples): raise "
                            "heldout_fraction or lower n_train/n_test")
        drawn += 1
        tree = random_tree(rng, cfg)
        if held.isdisjoint(argument_tuples(tree)):
            if len(train) < cfg.n_train:
                train.append(reduction_chain(tree))
        elif len(test) < cfg.n_test:
            test.append(reduction_chain(tree))
    return train, test, heldout, drawn


def prepare_listops(out_dir: str | Path, preset: str = "reference", seed: int = 0, **overrides: Any) -> Path:
    """Generate a ListOps dataset (see the module docstring) into ``out_dir``; return ``out_dir``.

    ``overrides`` replace preset fields (``n_train=1000``, ``ops=['max', 'min']``, ...); bad values raise
    DataError.
    """
    cfg = listops_config(preset, **overrides)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"listops seed must be an integer, got {seed!r}")
    train, test, heldout, drawn = generate_listops(cfg, seed)
    vocab = listops_vocab((f"{op}_{cfg.modulus}" for op in cfg.ops), [*cfg.inputs, *range(cfg.modulus)])
    info = {
        "preset": preset, "seed": seed, "config": dataclasses.asdict(cfg), "samples_drawn": drawn,
        "contains": "a sample contains a held-out tuple when the argument values of one of its function nodes, "
                    "in order, equal it",
        "heldout": [list(t) for t in heldout],
    }
    return _write_listops(Path(out_dir), train, test, vocab, heldout, info,
                          source=f"listops preset {preset!r}, seed {seed}")


def _read_listops_file(path: Path) -> tuple[list[str], list[Expr], int, str | None]:
    """(normalised lines, expressions, answer mismatches, first mismatch location) of a sample file."""
    lines: list[str] = []
    exprs: list[Expr] = []
    mismatches, first = 0, None
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    expr, _, answer = parse_sample(raw)
                    value = evaluate(expr)
                except DataError as e:
                    raise DataError(f"{path}:{lineno}: {e}") from None
                if value != answer:
                    mismatches += 1
                    first = first or f"{path}:{lineno}"
                lines.append(" ".join(raw.split()))
                exprs.append(expr)
    except FileNotFoundError:
        raise DataError(f"ListOps file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e})") from None
    return lines, exprs, mismatches, first


def import_listops(out_dir: str | Path, train_txt: str | Path, test_txt: str | Path) -> Path:
    """Import ListOps samples made elsewhere (one sample a line, in the format of the module docstring).

    The vocabulary is built from both files. A malformed line raises DataError naming file:line; lines
    whose stated answer differs from a recomputation are counted and reported in one warning (and in
    ``listops.json``). Held-out tuples are unknown, so ``test.jsonl`` records have ``heldout: null``.
    """
    train_txt, test_txt = Path(train_txt), Path(test_txt)
    train, train_exprs, bad_train, first_train = _read_listops_file(train_txt)
    test, test_exprs, bad_test, first_test = _read_listops_file(test_txt)
    if not train:
        raise DataError(f"{train_txt} has no samples")
    funcs = [f for e in train_exprs + test_exprs for f in _functions(e)]
    op_tokens = sorted({(f.op, f.mod) for f in funcs}, key=lambda om: (OPS.index(om[0]), om[1]))
    numbers = {int(t) for line in train + test for t in line.split() if _NUMBER.fullmatch(t)}
    vocab = listops_vocab((f"{op}_{mod}" for op, mod in op_tokens), numbers)
    if bad_train or bad_test:
        warnings.warn(f"ListOps import: {bad_train} of {len(train)} train and {bad_test} of {len(test)} test "
                      f"lines end in an answer that differs from recomputation (first: {first_train or first_test})",
                      stacklevel=2)
    info = {"imported": True, "train_file": str(train_txt), "test_file": str(test_txt), "heldout": None,
            "answer_mismatches": {"train": bad_train, "test": bad_test}}
    return _write_listops(Path(out_dir), train, test, vocab, None, info,
                          source=f"imported from {train_txt} and {test_txt}")
