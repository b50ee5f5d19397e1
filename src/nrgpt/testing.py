"""``check_energy(config)``: the checks every energy must pass, for the project's energies and a user's.

    >>> from nrgpt import ModelConfig
    >>> from nrgpt.testing import check_energy
    >>> print(check_energy(ModelConfig.preset("NRGPT_P_FF2W", ff="my_energy")))

It builds a small NRGPT in float64 with the energies the config selects (its other options kept, the
shape shrunk) and random weights, and checks:

1. closed form: each part's ``grad`` (where the class gives one) against autograd of its ``energy``:
   the per-token partial dE_A/dg_A, i.e. the diagonal blocks of the Jacobian of E with every other token
   (and a conditioning) held fixed; the keys are held fixed too under mask 'inclusive' with
   grad_mode 'reference', whose update omits the key-side self term;
2. causality: changing token k leaves every earlier position's logits unchanged;
3. per-token descent (Prop. 2.1, 2.2): with eta = c diag(gamma) under LayerNorm, and with a psd eta
   (and the config's eta if it is 'diag_lowrank') without normalisation, all with a small c and the exact
   gradient, every token's own move lowers its own energy at every step (``own_move_energies``);
4. cached decoding: one-token steps on a growing and on a static cache give the full forward's logits,
   and cached greedy generation (past the block, so the window slides) gives the recomputed tokens.

A failure raises ``AssertionError`` naming the property and by how much; otherwise a short report of what
was checked is returned.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .decoding import KVCache
from .energies import ATTENTION_ENERGIES
from .energy import EnergyBlock
from .model import NRGPT

GRAD_RTOL = 1e-9  # float64
CACHE_ATOL = 1e-9
CAUSAL_ATOL = 1e-12


def _fail(prop: str, detail: str) -> AssertionError:
    return AssertionError(f"check_energy: {prop} failed: {detail}")


def _small(config: ModelConfig, tokens: int) -> ModelConfig:
    return config.replace(
        model="nrgpt", vocab_size=11, block_size=tokens, n_embd=min(config.n_embd, 8 * config.n_head),
        ff_mult=min(config.ff_mult, 2), n_steps=min(config.n_steps, 3), dropout=0.0, checkpoint_steps=False,
        eta_rank=min(config.eta_rank, 4) if config.eta == "diag_lowrank" else config.eta_rank,
    )


def _random_model(config: ModelConfig, seed: int, std: float) -> NRGPT:
    """A float64 NRGPT in eval mode with N(0, std) added to every weight but the inference rate's."""
    torch.manual_seed(seed)
    model = NRGPT(config).double().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".eta." not in name:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return model


def _per_token_partial(energy, g: torch.Tensor) -> torch.Tensor:
    """dE_A/dg_A with every other token held fixed: the diagonal blocks of the Jacobian of ``energy``."""
    jac = torch.autograd.functional.jacobian(energy, g)  # (B, T, B, T, D)
    b, t = g.shape[:2]
    return jac[torch.arange(b)[:, None], torch.arange(t)[None], torch.arange(b)[:, None], torch.arange(t)[None]]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _check_closed_forms(block: EnergyBlock, g: torch.Tensor, cond: torch.Tensor | None) -> list[str]:
    lines = []
    ff_cond = () if block.ff.conditioning is None else (cond,)
    parts = [("ff", block.ff, lambda z: block.ff.energy(z, *ff_cond), lambda: block.ff.grad(g, *ff_cond))]
    if block.attn is not None:
        attn, fixed_keys = block.attn, block.attn.keys(g)
        query_side_only = not attn.strict and not attn.self_term  # inclusive mask, grad_mode 'reference'
        parts.append(("attention", attn,
                      lambda z: attn.energy(z, fixed_keys if query_side_only else attn.keys(z)),
                      lambda: attn.grad(g, fixed_keys)))
    for kind, part, energy, grad in parts:
        if not part.has_closed_form():
            lines.append(f"closed form: {kind} {part.name!r} has none; its gradient is autograd of its energy")
            continue
        with torch.no_grad():
            closed = grad()
        err = _relative(closed, _per_token_partial(energy, g))
        if not err < GRAD_RTOL:
            raise _fail("closed form", f"{kind} energy {part.name!r}: grad differs from autograd of energy by a "
                                       f"relative error of {err:.3e} (float64; allowed {GRAD_RTOL:g})")
        lines.append(f"closed form: {kind} {part.name!r} grad = autograd of energy (relative error {err:.1e})")
    return lines


def _check_causality(model: NRGPT, idx: torch.Tensor) -> str:
    with torch.no_grad():
        logits = model(idx)[0]
        worst = 0.0
        for k in range(1, idx.shape[1]):
            changed = idx.clone()
            changed[:, k] = (changed[:, k] + 1) % model.config.vocab_size
            worst = max(worst, float((model(changed)[0][:, :k] - logits[:, :k]).abs().max()))
    if not worst <= CAUSAL_ATOL:
        raise _fail("causality", f"changing a token changed earlier positions' logits by up to {worst:.3e}")
    return f"causality: no earlier logit moves when a token changes (max change {worst:.1e})"


def _check_descent(config: ModelConfig, idx: torch.Tensor, seed: int) -> list[str]:
    from .dynamics import record_dynamics

    lines = []
    mask = config.mask
    attention = ATTENTION_ENERGIES.get(config.attention)
    if attention is not None and not attention.has_closed_form() and mask == "inclusive":
        mask = "strict"  # autograd gives the query side only: the exact inclusive gradient needs a closed form
    cases = [("layernorm", "descent"), ("none", "psd")]
    if config.eta == "diag_lowrank":  # the lightweight preconditioner: Prop. 2.2's argument
        cases.append(("none", "diag_lowrank"))
    for norm, eta in cases:
        rank = config.eta_rank if eta == "diag_lowrank" else ModelConfig.eta_rank
        cfg = config.replace(norm=norm, eta=eta, eta_init=1e-3, eta_rank=rank, eta_per_step=False, grad_mode="exact",
                             mask=mask)
        model = _random_model(cfg, seed, std=0.2)
        dyn = record_dynamics(model, idx)
        moving = dyn.grad_norm[:-1] > 1e-8
        rises = dyn.own_move_change[moving]
        worst = float(rises.max()) if rises.size else float("-inf")
        if not worst < 0:
            raise _fail("per-token descent", f"with norm {norm!r}, eta {eta!r} (c = 1e-3, mask {mask!r}) a token's "
                                             f"own move raised its energy by {worst:.3e} ({int((rises >= 0).sum())} "
                                             f"of {rises.size} token-steps)")
        lines.append(f"descent: norm {norm!r}, eta {eta!r}, mask {mask!r}: every own move lowers E_A "
                     f"({rises.size} token-steps, largest change {worst:.1e})")
    return lines


def _check_cache(model: NRGPT, idx: torch.Tensor) -> str:
    t = idx.shape[1]
    split = t // 2
    worst = 0.0
    with torch.no_grad():
        full = model(idx)[0]
        for static in (False, True):
            cache = KVCache(t, static=static)
            steps = [model.forward_cached(idx[:, :split], cache)]
            steps += [model.forward_cached(idx[:, i:i + 1], cache) for i in range(split, t)]
            worst = max(worst, float((torch.stack(steps, 1) - full[:, split - 1:]).abs().max()))
    if not worst < CACHE_ATOL:
        raise _fail("cached decoding", f"cached logits differ from the full forward's by {worst:.3e}")
    cached = model.generate(idx[:, :2], t + 3, greedy=True)
    if not torch.equal(cached, model.generate(idx[:, :2], t + 3, greedy=True, use_cache=False)):
        raise _fail("cached decoding", "cached greedy generation gives other tokens than recomputation")
    return f"cached decoding: growing and static caches equal the full forward (max difference {worst:.1e}); " \
           "cached greedy generation past the block equals recomputation"


def check_energy(config: ModelConfig, *, tokens: int = 6, batch: int = 2, seed: int = 0) -> str:
    """Run the checks of this module on the energies ``config`` selects; return the report (see above)."""
    cfg = _small(config, tokens)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (batch, tokens), generator=gen)
    model = _random_model(cfg, seed, std=0.3)
    block = model.block
    x = torch.randn(batch, tokens, cfg.n_embd, generator=gen, dtype=torch.float64) * 1.5
    with torch.no_grad():
        g = block.norm(x)
        cond = block.norm(torch.randn(x.shape, generator=gen, dtype=x.dtype)) if block.ff.conditioning else None
    lines = [f"check_energy: attention {cfg.attention!r}, ff {cfg.ff!r}, mask {cfg.mask!r}, grad_mode "
             f"{cfg.grad_mode!r} (float64, {batch} x {tokens} tokens, n_embd {cfg.n_embd})"]
    lines += _check_closed_forms(block, g, cond)
    lines.append(_check_causality(model, idx))
    lines += _check_descent(cfg, idx, seed)
    lines.append(_check_cache(model, idx))
    return "\n".join(lines)
