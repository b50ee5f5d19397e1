"""Q5: evaluation throughput of ListOps accuracy (test samples scored per second).

A small ListOps dataset (preset 'reference', few training samples, ``--n-test`` test samples) is
generated into a temporary directory with ``nrgpt.data.prepare_listops``; then
``nrgpt.evaluate.listops_accuracy(model, data_dir, max_samples=...)`` is timed for freshly
initialised models (block_size = the longest sample; n_embd 128, 1 head, 8 steps), the models'
runs interleaved and medians taken. Untrained weights: the throughput measures the evaluation
machinery, not the accuracy (meaningless here). Decoding stops once every row of a batch has
emitted <eos>, which for untrained weights happens at random; so the <eos> logit is suppressed
(lm_head bias -1e4) and every model decodes the full budget: the same work for all models, the
worst case (a trained model stops earlier). Reported: samples/s of the whole call, samples/s of
its decoding part (its own ``seconds``), and the forward_cached calls and tokens per run.

If ``nrgpt.evaluate.listops_accuracy`` is not available yet, the script records a 'skipped' result
and exits 0.
"""

from __future__ import annotations

import inspect
import tempfile

import torch
from common import build, finish, interleave, parser, setup, stats, table

PRESETS = ("NRGPT_H_FF2W", "NRGPT_H_FF1", "GPT_Rec_parallel")


def count_calls(model: torch.nn.Module, counter: list[int]) -> None:
    """Count forward_cached calls and tokens fed (per instance)."""
    inner = model.forward_cached

    def counted(idx: torch.Tensor, cache):
        counter[0] += 1
        counter[1] += idx.numel()
        return inner(idx, cache)

    model.forward_cached = counted


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n-test", type=int, default=None, help="test samples scored per run (default 256)")
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    args = p.parse_args()
    setup(args)
    n_test = args.n_test or (64 if args.quick else 256)
    reps = args.reps or (1 if args.quick else 3)
    try:
        from nrgpt.data import load_meta, prepare_listops
        from nrgpt.evaluate import listops_accuracy
    except ImportError as e:
        msg = f"skipped: {e} (nrgpt.evaluate.listops_accuracy not available yet)"
        finish("listops_eval", args, {"skipped": msg}, [msg])
        return

    with tempfile.TemporaryDirectory(prefix="nrgpt-bench-listops-") as tmp:
        prepare_listops(tmp, preset="reference", n_train=200, n_test=n_test)
        meta = load_meta(tmp)
        block = int(meta["max_sample_tokens"])
        shape = dict(n_embd=args.n_embd, n_head=1, n_steps=8, block_size=block, vocab_size=int(meta["vocab_size"]))
        kwargs = {"max_samples": n_test} if "max_samples" in inspect.signature(listops_accuracy).parameters else {}
        models = {name: build(name, **shape).eval() for name in args.presets}
        calls: dict[str, list[int]] = {}
        for name, model in models.items():
            with torch.no_grad():
                model.lm_head.bias[int(meta["eos_id"])] = -1e4
            count_calls(model, calls.setdefault(name, [0, 0]))
        accuracy = {}

        def runner(name: str):
            def run() -> None:
                calls[name][:] = [0, 0]
                accuracy[name] = listops_accuracy(models[name], tmp, **kwargs)
            return run

        times = interleave({name: runner(name) for name in args.presets}, reps=reps, warmup=1)

    results, rows = [], []
    for name in args.presets:
        s = stats(times[name])
        acc = accuracy[name]
        decode_s = acc.get("seconds") if isinstance(acc, dict) else None
        results.append({"preset": name, "n_test": n_test, "block_size": block, "seconds": s,
                        "samples_per_s": n_test / s["median"], "decode_seconds_last_run": decode_s,
                        "forward_cached_calls": calls[name][0], "tokens_fed": calls[name][1]})
        rows.append([name, n_test, s["median"], n_test / s["median"],
                     "-" if decode_s is None else n_test / decode_s, calls[name][0], calls[name][1]])
    title = (f"ListOps evaluation throughput (listops_accuracy, {n_test} test samples, block {block}, "
             f"n_embd {args.n_embd}, 8 steps, untrained); median of {reps} interleaved reps")
    tab = table(["model", "samples", "time (s)", "samples/s", "samples/s (decoding only, last run)",
                 "forward_cached calls", "tokens fed"], rows, title)
    finish("listops_eval", args, {"rows": results, "reps": reps}, [tab])


if __name__ == "__main__":
    main()
