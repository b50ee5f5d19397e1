"""Causal attention on a CPU: ``scaled_dot_product_attention`` against ``nrgpt.explicit_attention``.

Forward + backward of one causal attention whose values are its keys (NRGPT's energy gradient, eq. 11) at
the shapes the presets train, in float32 and bfloat16, interleaved; medians per call. This is the
measurement behind ``layers.causal_attention``'s choice: the row-blocked explicit form for bfloat16 and
float16 on a CPU that multiplies bfloat16 in hardware, where the flash kernel is slow, and
``scaled_dot_product_attention`` otherwise (on a CPU that emulates bfloat16 the explicit form is the slower).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from common import finish, interleave, reps_of, start, stats, table

from nrgpt.device import native_bf16_cpu
from nrgpt.explicit_attention import explicit_causal_attention

SHAPES = [  # (batch, heads, context, head size): where each comes from
    (16, 1, 256, 128, "the paper's Shakespeare shape"),
    (16, 1, 64, 96, "the quickstart"),
    (64, 1, 128, 48, "ListOps on a CPU (listops-cpu)"),
    (16, 4, 256, 32, "4 heads of 32"),
    (8, 12, 256, 64, "GPT-2 small's heads, context 256"),
    (4, 1, 1024, 128, "context 1024"),
]


def sdpa(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, k, is_causal=True)


def explicit(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return explicit_causal_attention(q, k, k, strict=False, scale=q.shape[-1] ** -0.5)


def step(fn, q: torch.Tensor, k: torch.Tensor, up: torch.Tensor) -> None:
    fn(q, k).backward(up)


def main() -> None:
    args = start(__doc__)
    reps = reps_of(args, 7)
    native = native_bf16_cpu()
    shapes = SHAPES[:2] if args.quick else SHAPES
    rows, results = [], []
    for b, h, t, d, what in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator().manual_seed(t + d)
            q, k = (torch.randn(b, t, h, d, generator=gen).transpose(1, 2).to(dtype).requires_grad_() for _ in "qk")
            up = torch.randn(b, h, t, d, generator=gen).to(dtype)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(explicit(q, k), sdpa(q, k), rtol=tol, atol=tol)
            times = interleave({"sdpa": partial(step, sdpa, q, k, up), "explicit": partial(step, explicit, q, k, up)},
                               reps=reps, warmup=2)
            s, e = stats(times["sdpa"]), stats(times["explicit"])
            name = str(dtype).removeprefix("torch.")
            results.append({"shape": [b, h, t, d], "what": what, "dtype": name, "sdpa_s": s, "explicit_s": e,
                            "speedup": s["median"] / e["median"]})
            rows.append([what, f"{b} x {h} x {t} x {d}", name, 1e3 * s["median"], 1e3 * e["median"],
                         s["median"] / e["median"], "explicit" if dtype == torch.bfloat16 and native else "sdpa"])
    cpu = "multiplies bfloat16 in hardware" if native else "emulates bfloat16"
    tab = table(["shape", "B x H x T x d", "dtype", "sdpa (ms)", "explicit (ms)", "speed-up", "nrgpt uses"], rows,
                f"Causal attention forward + backward on a CPU that {cpu}, {args.threads} threads; medians of "
                f"{reps} interleaved calls")
    finish("attention", args, {"rows": results, "reps": reps, "native_bf16": native}, [tab])


if __name__ == "__main__":
    main()
