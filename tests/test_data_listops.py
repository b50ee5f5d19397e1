"""ListOps: ops, reduction chains worked out by hand, generation rules, held-out tuples, presets, import."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from nrgpt.data import (
    DataError,
    TokenStream,
    evaluate_listops_expression,
    import_listops,
    listops_config,
    listops_sample_info,
    load_meta,
    load_tokenizer,
    prepare_listops,
    read_listops_test,
    split_sample,
)
from nrgpt.data.listops import (
    Func,
    apply_op,
    argument_tuples,
    evaluate,
    generate_listops,
    parse_sample,
    random_tree,
    reduction_chain,
    tree_depth,
)

EXAMPLE = ("median_10 ( max_10 ( 9 9 ) max_10 ( 0 1 ) 4 ) = median_10 ( 9 max_10 ( 0 1 ) 4 ) = "
           "median_10 ( 9 1 4 ) = 4")
# add(7, min(median(8, 2, 5, 3), 6), max(1, 4)) mod 10: median of 2 3 5 8 is the upper middle 5,
# min(5, 6) = 5, max(1, 4) = 4, 7 + 5 + 4 = 16 -> 6.
DEEP_TREE = Func("add", 10, [7, Func("min", 10, [Func("median", 10, [8, 2, 5, 3]), 6]), Func("max", 10, [1, 4])])
DEEP = ("add_10 ( 7 min_10 ( median_10 ( 8 2 5 3 ) 6 ) max_10 ( 1 4 ) ) = add_10 ( 7 min_10 ( 5 6 ) max_10 ( 1 4 ) ) = "
        "add_10 ( 7 5 max_10 ( 1 4 ) ) = add_10 ( 7 5 4 ) = 6")
SMALL = {"n_train": 3000, "n_test": 200}


def leaf_argument_lists(line: str) -> list[tuple[int, ...]]:
    """Independent of the generator: every ``op ( n n ... )`` whose arguments are all numbers, at every step."""
    out = []
    for step in line.split(" = "):
        tokens = step.split()
        for i, t in enumerate(tokens):
            if t == "(":
                j = i + 1
                while tokens[j].isdigit():
                    j += 1
                if tokens[j] == ")":
                    out.append(tuple(int(x) for x in tokens[i + 1:j]))
    return out


def number_windows(line: str, k: int) -> set[tuple[int, ...]]:
    """Every run of k consecutive number tokens anywhere in the line (the reference code's check)."""
    tokens = line.split()
    return {tuple(int(x) for x in tokens[i:i + k]) for i in range(len(tokens) - k + 1)
            if all(x.isdigit() for x in tokens[i:i + k])}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return prepare_listops(tmp_path_factory.mktemp("listops") / "small", "reference", seed=1, **SMALL)


def test_ops_by_hand():
    assert apply_op("max", [3, 9, 2], 10) == 9
    assert apply_op("min", [3, 9, 2], 10) == 2
    assert apply_op("median", [3, 9, 2], 10) == 3
    assert apply_op("median", [1, 9, 4, 7], 10) == 7  # 1 4 7 9: the upper middle
    assert apply_op("median", [5, 2], 10) == 5
    assert apply_op("add", [7, 8, 9], 10) == 4  # 24 mod 10
    assert apply_op("add", [19, 19, 5], 20) == 3  # 43 mod 20
    assert apply_op("max", [15, 3], 10) == 5  # every op is taken mod m
    with pytest.raises(DataError, match="unknown ListOps op 'prod'"):
        apply_op("prod", [1, 2], 10)


def test_reduction_chains_by_hand():
    example = Func("median", 10, [Func("max", 10, [9, 9]), Func("max", 10, [0, 1]), 4])
    assert reduction_chain(example) == EXAMPLE
    assert reduction_chain(DEEP_TREE) == DEEP
    assert evaluate(DEEP_TREE) == 6
    expr, steps, answer = parse_sample(DEEP)
    assert expr == DEEP_TREE and answer == 6 and len(steps) == 5
    assert argument_tuples(DEEP_TREE) == [(8, 2, 5, 3), (5, 6), (1, 4), (7, 5, 4)]
    assert tree_depth(DEEP_TREE) == 3


def test_evaluator_helpers():
    assert evaluate_listops_expression(EXAMPLE) == "4"
    assert evaluate_listops_expression("median_10 ( max_10 ( 9 9 ) max_10 ( 0 1 ) 4 ) =") == "4"
    assert evaluate_listops_expression("add_20 ( 19 19 5 )") == "3"
    prompt, target = split_sample(EXAMPLE)
    assert prompt == "median_10 ( max_10 ( 9 9 ) max_10 ( 0 1 ) 4 ) ="
    assert target == "median_10 ( 9 max_10 ( 0 1 ) 4 ) = median_10 ( 9 1 4 ) = 4"
    info = listops_sample_info(DEEP, heldout=[(7, 5, 4), (1, 2, 3)])
    assert info["answer"] == "6" and info["ops"] == ["add", "max", "median", "min"]
    assert info["n_funcs"] == 4 and info["depth"] == 3 and info["heldout"] == [[7, 5, 4]]
    assert listops_sample_info(DEEP)["heldout"] is None
    with pytest.raises(DataError, match="no '='"):
        split_sample("max_10 ( 1 2 )")
    with pytest.raises(DataError, match="missing '\\)'"):
        evaluate_listops_expression("max_10 ( 1 2 =")


def test_generation_is_deterministic():
    cfg = listops_config("reference", n_train=500, n_test=20)
    assert generate_listops(cfg, seed=3) == generate_listops(cfg, seed=3)
    assert generate_listops(cfg, seed=3)[0] != generate_listops(cfg, seed=4)[0]
    # the test split is the first n_test samples that contain a held-out tuple, whatever n_train
    assert generate_listops(listops_config("reference", n_train=50, n_test=20), seed=3)[1] == \
        generate_listops(cfg, seed=3)[1]


def test_prepare_is_deterministic(tmp_path):
    a = prepare_listops(tmp_path / "a", seed=5, n_train=300, n_test=10)
    b = prepare_listops(tmp_path / "b", seed=5, n_train=300, n_test=10)
    for name in ("train.txt", "test.txt", "test.jsonl", "train.bin", "val.bin", "vocab.json", "listops.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _walk(expr, depth, visit):
    visit(expr, depth)
    if isinstance(expr, Func):
        for a in expr.args:
            _walk(a, depth + 1, visit)


def test_tree_shape_rules():
    cfg = listops_config("reference", ops=["min", "sum"], inputs=[3, 5, 11], modulus=7, max_depth=3,
                         min_args=2, max_args=4, p_func=0.4, heldout_distinct=False)
    rng = random.Random(0)
    arg_counts, leaves, ops, depths = set(), set(), set(), set()

    def visit(e, depth):
        if isinstance(e, Func):
            assert depth < cfg.max_depth  # functions only above the last level
            assert cfg.min_args <= len(e.args) <= cfg.max_args and e.mod == 7
            arg_counts.add(len(e.args))
            ops.add(e.op)
        else:
            leaves.add(e)
        depths.add(depth)

    for _ in range(2000):
        tree = random_tree(rng, cfg)
        assert isinstance(tree, Func)  # the root is a function
        _walk(tree, 0, visit)
    assert arg_counts == {2, 3, 4} and leaves == {3, 5, 11} and ops == {"min", "add"} and max(depths) == 3

    full = listops_config("reference", max_depth=3, p_func=1.0)  # every argument above the last level is a function
    for _ in range(50):
        _walk(random_tree(rng, full), 0,
              lambda e, d: (isinstance(e, Func) if d < 3 else isinstance(e, int)) or pytest.fail(f"depth {d}: {e}"))
    flat = listops_config("reference", p_func=0.0)
    assert all(tree_depth(random_tree(rng, flat)) == 1 for _ in range(200))


def test_heldout_tuples_split_train_and_test(small):
    info = json.loads((small / "listops.json").read_text())
    heldout = {tuple(t) for t in info["heldout"]}
    assert len(heldout) == 36  # round(5% of 10 * 9 * 8 ordered 3-tuples of distinct inputs)
    assert all(len(set(t)) == 3 and all(0 <= v < 10 for v in t) for t in heldout)
    train = (small / "train.txt").read_text().splitlines()
    test = (small / "test.txt").read_text().splitlines()
    assert len(train) == 3000 and len(test) == 200 and not set(train) & set(test)
    for line in train:
        assert heldout.isdisjoint(leaf_argument_lists(line)), line
        assert heldout.isdisjoint(number_windows(line, 3)), line
    for line in test:
        assert not heldout.isdisjoint(leaf_argument_lists(line)), line
    records = read_listops_test(small)
    assert [r["line"] for r in records] == test
    assert all(r["heldout"] and {tuple(t) for t in r["heldout"]} <= heldout for r in records)
    assert all(r["prompt"] + " " + r["target"] == r["line"] for r in records)
    assert all(evaluate_listops_expression(r["prompt"]) == r["answer"] == r["line"].split()[-1] for r in records)


def test_reference_preset(tmp_path):
    out = prepare_listops(tmp_path / "ref")
    meta = load_meta(out)
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab == ["<eos>", "(", ")", "=", "max_10", "median_10", "add_10"] + [str(i) for i in range(10)]
    assert meta["kind"] == "listops" and meta["vocab_size"] == 17 and meta["eos_id"] == 0
    assert meta["dtype"] == "uint16" and meta["n_train"] == 50_000 and meta["n_test"] == 2_000
    train = (out / "train.txt").read_text().splitlines()
    test = (out / "test.txt").read_text().splitlines()
    assert len(train) == 50_000 and len(test) == 2_000
    assert meta["train_tokens"] == sum(len(line.split()) + 1 for line in train)
    assert meta["max_sample_tokens"] == max(len(line.split()) + 1 for line in train + test)
    assert all(evaluate_listops_expression(line) == line.split()[-1] for line in train[:2000])
    assert {op for line in train for op in line.split() if "_" in op} == {"max_10", "median_10", "add_10"}
    tok = load_tokenizer(out)
    val = TokenStream(out, "val").tokens
    assert tok.decode(val) == " ".join(line + " <eos>" for line in test)
    assert json.loads((out / "listops.json").read_text())["config"]["p_func"] == 0.25


def test_paper_preset_vocabulary(tmp_path):
    out = prepare_listops(tmp_path / "paper", "paper", n_train=200, n_test=5)
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab[4:7] == ["max_20", "median_20", "add_20"] and vocab[7:] == [str(i) for i in range(20)]
    assert len(json.loads((out / "listops.json").read_text())["heldout"]) == 342  # 5% of 20 * 19 * 18


@pytest.mark.parametrize("overrides, message", [
    ({"depth": 3}, "unknown ListOps field"),
    ({"min_args": 4}, "min_args .4. is larger than max_args"),
    ({"p_func": 1.5}, "p_func must be a number in"),
    ({"ops": ["max", "prod"]}, "ops must be distinct names"),
    ({"heldout_fraction": 0.0}, "n_test > 0 needs heldout_fraction > 0"),
    ({"n_train": -1}, "n_train must be an integer >= 0"),
    ({"inputs": [1, 2], "max_args": 3}, "at least max_args"),
])
def test_bad_config(overrides, message, tmp_path):
    with pytest.raises(DataError, match=message):
        prepare_listops(tmp_path, **overrides)


def test_bad_preset_and_impossible_test_split(tmp_path):
    with pytest.raises(DataError, match="unknown ListOps preset 'huge'"):
        prepare_listops(tmp_path, "huge")
    with pytest.raises(DataError, match="found only 0 train"):  # every sample holds the held-out (0, 0)
        generate_listops(listops_config("reference", min_args=2, max_args=2, heldout_distinct=False,
                                        heldout_fraction=0.01, n_train=1, n_test=0, inputs=[0], modulus=1))


def test_tokenizer_round_trip_and_unknown_tokens(small):
    tok = load_tokenizer(small)
    assert tok.kind == "listops" and tok.vocab_size == 17
    ids = tok.encode(EXAMPLE)
    assert len(ids) == len(EXAMPLE.split()) and tok.decode(ids) == EXAMPLE
    with pytest.raises(DataError, match="not in the ListOps vocabulary: 'max_20', 'sum_10'"):
        tok.encode("sum_10 ( 1 2 ) = max_20 ( 1 )")


def test_import_round_trip(small, tmp_path):
    out = import_listops(tmp_path / "imported", small / "train.txt", small / "test.txt")
    assert (out / "vocab.json").read_text() == (small / "vocab.json").read_text()
    for name in ("train.bin", "val.bin", "train.txt", "test.txt"):
        assert (out / name).read_bytes() == (small / name).read_bytes(), name
    meta = load_meta(out)
    assert meta["n_train"] == 3000 and meta["n_test"] == 200
    assert read_listops_test(out)[0]["heldout"] is None


def test_import_builds_vocabulary_from_both_files(tmp_path):
    (tmp_path / "train.txt").write_text("max_10 ( 1 12 ) = 2\n\nmin_7 ( 3 4 ) = 3\n")
    (tmp_path / "test.txt").write_text("add_10 ( 5 9 )   =  4\n")
    out = import_listops(tmp_path / "out", tmp_path / "train.txt", tmp_path / "test.txt")
    assert json.loads((out / "vocab.json").read_text()) == \
        ["<eos>", "(", ")", "=", "max_10", "min_7", "add_10", "1", "2", "3", "4", "5", "9", "12"]
    assert np.array_equal(TokenStream(out, "val").tokens, [6, 1, 11, 12, 2, 3, 10, 0])


@pytest.mark.parametrize("line, message", [
    ("max_10 ( 1 2 = 2", "bad.txt:2: unbalanced parentheses: missing"),
    ("max_10 ( 1 2 ) ) = 2", "bad.txt:2: unbalanced parentheses: unexpected '\\)'"),
    ("prod_10 ( 1 2 ) = 2", "bad.txt:2: unknown token 'prod_10'"),
    ("max_10 ( 1 2 ) 2", "bad.txt:2: no '='"),
    ("max_10 ( 1 2 ) = max_10 ( 2 )", "bad.txt:2: the final step .* is not a single number"),
    ("max_10 ( ) = 2", "bad.txt:2: op 'max_10' has no arguments"),
])
def test_import_malformed_line(tmp_path, line, message):
    (tmp_path / "bad.txt").write_text(f"max_10 ( 1 2 ) = 2\n{line}\n")
    (tmp_path / "test.txt").write_text("max_10 ( 1 2 ) = 2\n")
    with pytest.raises(DataError, match=message):
        import_listops(tmp_path / "out", tmp_path / "bad.txt", tmp_path / "test.txt")


def test_import_counts_wrong_answers(tmp_path):
    (tmp_path / "train.txt").write_text("max_10 ( 1 2 ) = 1\nmax_10 ( 1 2 ) = 2\nadd_10 ( 5 5 ) = 1\n")
    (tmp_path / "test.txt").write_text("max_10 ( 1 2 ) = 2\n")
    with pytest.warns(UserWarning, match="2 of 3 train and 0 of 1 test lines .*first: .*train.txt:1"):
        out = import_listops(tmp_path / "out", tmp_path / "train.txt", tmp_path / "test.txt")
    assert json.loads((out / "listops.json").read_text())["answer_mismatches"] == {"train": 2, "test": 0}
