"""GPU readiness: the model's GPU paths checked on a CUDA device (run with ``--device cuda``).

For each model (NRGPT presets and the baselines), on the device:
  * exactness: the closed-form ``energy_grad`` against autograd of ``energy`` in float64 (NRGPT only);
  * no host synchronisation in a training step: forward, loss, backward and the fused AdamW step (and
    nrgpt's Muon, ``train.optimizer = 'muon'``) run under ``torch.cuda.set_sync_debug_mode("error")``, which
    raises on any device-to-host sync;
  * Muon's Newton-Schulz iteration, which runs in bfloat16 on a GPU: its update against float32's on the
    largest hidden matrix's gradient (relative difference; ~0.027 on a CPU for random matrices);
  * bf16 autocast: the loss under autocast against float32 (relative difference), the parameters'
    gradients stay float32;
  * ``compile_steps()`` (inductor/Triton on a GPU): logits and gradients against eager;
  * cached decoding: greedy tokens identical to full recomputation.
On the CPU the same checks run (the sync check is then vacuous), which keeps the script testable here.
"""

from __future__ import annotations

import torch
from common import batch, build, finish, parser, setup, table, target

from nrgpt.optim import hidden_matrices, make_optimizer, orthogonalize
from nrgpt.runconfig import TrainConfig

PRESETS = ("NRGPT_H_FF2W", "NRGPT_H_FF1", "NRGPT_H_FF2", "NRGPT_P_FF2W", "GPT_Rec_parallel", "GPT_Rec", "GPT")
SHAPE = dict(n_embd=128, n_head=2, n_steps=4, block_size=64, vocab_size=65)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def loss_and_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None = None):
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        logits, loss = model(x, y)
    loss.backward()
    return logits.detach(), loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


def sync_free_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: str = "adamw") -> str:
    """'yes' if forward + backward + the optimizer's step (``nrgpt train``'s: fused AdamW, or Muon with it) ran
    without a device-to-host sync, else the error."""
    opt = make_optimizer(model, TrainConfig(optimizer=optimizer, lr=1e-4), x.device)
    for _ in range(2):  # the first step allocates the optimizer's state
        opt.zero_grad(set_to_none=True)
        if x.is_cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            _, loss = model(x, y)
            loss.backward()
            opt.step()
        except RuntimeError as e:
            return str(e).splitlines()[0][:120]
        finally:
            if x.is_cuda:
                torch.cuda.set_sync_debug_mode("default")
    return "yes"


def check(preset: str, device: torch.device) -> dict:
    model = build(preset, **SHAPE).train()
    x, y = batch(SHAPE["vocab_size"], 4, SHAPE["block_size"])
    r: dict = {"preset": preset}
    if hasattr(model, "block") and hasattr(model.block, "energy_grad"):
        m64 = build(preset, **SHAPE).double().eval()
        g = torch.randn(2, 32, SHAPE["n_embd"], dtype=torch.float64, device=device)
        r["energy_grad_rel_err_f64"] = rel(m64.block.energy_grad(g), m64.block.energy_grad_autograd(g))
    r["sync_free_train_step"] = sync_free_step(build(preset, **SHAPE).train(), x, y)
    r["sync_free_muon_step"] = sync_free_step(build(preset, **SHAPE).train(), x, y, "muon")
    _, l32, g32 = loss_and_grads(model, x, y)
    largest = max(hidden_matrices(model), key=lambda p: p.numel())
    r["muon_bf16_rel_err"] = rel(orthogonalize(largest.grad.bfloat16()), orthogonalize(largest.grad.float()))
    _, lbf, gbf = loss_and_grads(model, x, y, amp=torch.bfloat16)
    r["bf16_loss_rel_diff"] = abs(lbf.item() - l32.item()) / abs(l32.item())
    r["bf16_grads_float32"] = all(g.dtype == torch.float32 for g in gbf)
    r["bf16_grad_rel_err"] = rel(torch.cat([g.flatten() for g in gbf]), torch.cat([g.flatten() for g in g32]))
    eager_logits, _, eager_grads = loss_and_grads(model, x, y)
    compiled = build(preset, **SHAPE).train()
    compiled.load_state_dict(model.state_dict())
    compiled.compile_steps()
    c_logits, _, c_grads = loss_and_grads(compiled, x, y)
    r["compiled_logits_rel_err"] = rel(c_logits, eager_logits)
    r["compiled_grads_rel_err"] = rel(torch.cat([g.flatten() for g in c_grads]),
                                      torch.cat([g.flatten() for g in eager_grads]))
    model.eval()
    prompt = x[:2, :16]
    with torch.no_grad():
        cached = model.generate(prompt, 24, greedy=True, use_cache=True)
        full = model.generate(prompt, 24, greedy=True, use_cache=False)
    r["cached_greedy_identical"] = bool(torch.equal(cached, full))
    return r


def main() -> None:
    p = parser(__doc__.splitlines()[0], gpu=True)
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    args = p.parse_args()
    setup(args)
    from common import DEVICE

    if DEVICE.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 comparisons at float32 precision
        torch.backends.cudnn.allow_tf32 = False
    results = [check(preset, DEVICE) for preset in args.presets]
    cols = ["energy_grad_rel_err_f64", "sync_free_train_step", "sync_free_muon_step", "muon_bf16_rel_err",
            "bf16_loss_rel_diff", "bf16_grads_float32",
            "bf16_grad_rel_err", "compiled_logits_rel_err", "compiled_grads_rel_err", "cached_greedy_identical"]
    rows = [[r["preset"], *(r.get(c) for c in cols)] for r in results]
    tab = table(["model", "energy_grad vs autograd (f64)", "train step sync-free", "Muon step sync-free",
                 "Muon bf16 update rel err", "bf16 loss rel diff",
                 "bf16 grads f32", "bf16 grad rel err", "compiled logits rel err", "compiled grads rel err",
                 "cached greedy identical"], rows,
                f"GPU readiness on {DEVICE} (torch {torch.__version__}), shape {SHAPE}, batch 4")
    worst = lambda key: max(r[key] for r in results if key in r)  # noqa: E731
    targets = [
        target("energy_grad vs autograd, float64, worst relative error", worst("energy_grad_rel_err_f64"), "<=", 1e-9),
        target("training steps with a host sync", sum(r["sync_free_train_step"] != "yes" for r in results), "<=", 0),
        target("Muon training steps with a host sync", sum(r["sync_free_muon_step"] != "yes" for r in results),
               "<=", 0),
        target("Muon's bfloat16 update, worst relative difference to float32", worst("muon_bf16_rel_err"), "<=", 5e-2),
        target("bf16 autocast loss, worst relative difference to float32", worst("bf16_loss_rel_diff"), "<=", 2e-2),
        target("compiled logits, worst relative error to eager", worst("compiled_logits_rel_err"), "<=", 1e-4),
        target("cached greedy decoding differs from full", sum(not r["cached_greedy_identical"] for r in results),
               "<=", 0),
    ]
    finish("gpu_check", args, {"rows": results, "shape": SHAPE}, [tab], targets)


if __name__ == "__main__":
    main()
