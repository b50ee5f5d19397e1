"""Results and aggregations of the nrgpt lm-evaluation-harness tasks.

``nrgpt.hf.harness.write_tasks`` copies this file next to the task YAML, with the import below replaced
by the source of ``nrgpt.evaluate.score_continuation``, so the tasks need no nrgpt installed.
"""

from __future__ import annotations

import math

from nrgpt.evaluate import score_continuation  # replaced by its source when the tasks are written

EOS = "<eos>"


def listops_results(doc, results):
    """nrgpt's ListOps scores of one generation: its first ``budget`` tokens (nrgpt's budget for this
    prompt), terminated when lm-eval stopped it at <eos> (and removed it) before the budget."""
    tokens = results[0].split()
    continuation = tokens[: doc["budget"]] + ([EOS] if len(tokens) < doc["budget"] else [])
    score = score_continuation(continuation, EOS, doc)
    return {"accuracy": float(score["correct"]), "exact_chain": float(score["exact_chain"]),
            "terminated": float(score["terminated"])}


def perplexity_results(doc, results):
    loglikelihood, _ = results[0]
    return {"token_perplexity": (loglikelihood, doc["targets"]), "loss": (loglikelihood, doc["targets"])}


def mean_loss(items):
    """Mean negative log-likelihood per target token over all windows."""
    return -sum(ll for ll, _ in items) / sum(n for _, n in items)


def token_perplexity(items):
    return math.exp(mean_loss(items))
