"""Hand-written forward and backward of the feed-forward energy gradients dE^FF/dg (eq. 14, 16, 24).

Training differentiates the update x <- x - eta dE/dg (eq. 6) with respect to the weights, so the
closed-form gradient is itself differentiated. Autograd does that op by op: for the exact GELU it
runs gelu's double backward (about nine passes over every N x mD tensor) and keeps four such
tensors per step. Here the vector-Jacobian product is derived once, by hand.

ff1, ff2w and dam share one form. With g the (N, D) normalised states, a stacked weight A (K, D),
a bias b of Z's first columns and a map P acting on each row of Z (N x K) elementwise:

    Z = g A^T,    dE/dg = P(Z + [b, 0]) A + c                                           (1)

    ff1   A = W1,            P(h) = -2 sigma(h) sigma'(h),                  c = 0
    dam   A = W1,            P(h) = -ReLU(h),                               c = 0
    ff2w  A = [W1; W2^T],    P([h | u]) = -[sigma'(h) * u | sigma(h)],      c = -b2

(ff2w: h = W1 g + b1 and u = W2^T g come out of one product with the stacked 8D x D matrix, and
-(W2 sigma(h) + b2) - W1^T (sigma'(h) * u) is one product with K = 8D.) For an upstream gradient
G = dL/d(dE/dg), (N, D), the backward of (1) is

    R = G A^T,    dZ = J_P^T R  (elementwise),                                                (2)
    dg = dZ A,    dA = dZ^T g + P^T G,    db = sum_rows dZ[:, :len(b)],    dc = sum_rows G,

four products of the forward's size (R, dg, and dA as mm + addmm), the 2x-forward FLOPs of
any backward. The elementwise work of each direction, with the bias added there (sigma, sigma' and
sigma'' of the exact GELU, sigma(h) = h Phi(h): sigma' = Phi + h phi, sigma'' = (2 - h^2) phi), is
one fused pass: ``torch.compile`` of just that function (inductor writes one vectorised C++ loop on
a CPU, Triton on a GPU), eager where compilation is unavailable. Only g, Z, A and b are saved
(autograd of the closed form keeps four N x mD tensors for ff2w); P(Z) is recomputed in the
backward's fused pass, which writes dZ and P and nothing else.

ff2 (E = -||sigma(W2 sigma(h) + b2)||^2, W1 D x D) is ff1's gradient applied to sigma(h) and
carried back through W1: dE/dg = (sigma'(h) * w) W1, w = ff1 gradient of sigma(h) with (W2, b2),
and its backward nests the backward (2) of that inner ff1 inside the outer chain rule.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu_terms(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sigma(h), sigma'(h), sigma''(h) of the exact GELU sigma(h) = h Phi(h)."""
    cdf = 0.5 + 0.5 * torch.erf(h * _SQRT_HALF)
    pdf = torch.exp(-0.5 * h * h) * _INV_SQRT_2PI
    return h * cdf, cdf + h * pdf, (2.0 - h * h) * pdf


# ------------------------------------------------------------------------------ fused elementwise
class Fused:
    """An elementwise function run as one compiled kernel (``torch.compile``: a graph for the first
    shape, then one with dynamic shapes for all others, per dtype and device), or eagerly: for inputs
    of fewer than ``min_elements`` elements (one-token decoding: dispatch-bound either way, and no
    compilation for every small shape), inside an outer compilation (which fuses it anyway), when
    ``enabled`` is False, or after compilation failed once (no C++ compiler, no Triton), which warns."""

    enabled = True
    min_elements = 1 << 16

    def __init__(self, fn: Callable[..., object]):
        self.fn = fn
        self.compiled: Callable[..., object] | None = None
        self.failed = False

    def __call__(self, *args: torch.Tensor):
        if torch.compiler.is_compiling() or not Fused.enabled or self.failed or args[0].numel() < Fused.min_elements:
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, fullgraph=True)
        try:
            return self.compiled(*args)
        except Exception as e:  # noqa: BLE001 - any backend failure: run the same function eagerly
            self.failed = True
            warnings.warn(f"nrgpt.kernels: torch.compile of {self.fn.__name__} failed ({type(e).__name__}); "
                          "running its elementwise work eagerly (same results, slower)", stacklevel=2)
            return self.fn(*args)


def _ff1_forward(z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    s, s1, _ = gelu_terms(z + b)
    return -2.0 * s * s1


def _ff1_backward(z: torch.Tensor, b: torch.Tensor, r: torch.Tensor):
    """(dZ, P) for P = -2 sigma sigma' of h = z + b: dP/dh = -2 (sigma'^2 + sigma sigma'')."""
    s, s1, s2 = gelu_terms(z + b)
    return -2.0 * r * (s1 * s1 + s * s2), -2.0 * s * s1


def _dam_forward(z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return -torch.relu(z + b)


def _dam_backward(z: torch.Tensor, b: torch.Tensor, r: torch.Tensor):
    """(dZ, P) for P = -ReLU(h), h = z + b: dP/dh = -[h > 0]."""
    h = z + b
    return torch.where(h > 0, -r, 0.0), -torch.relu(h)


def _ff2w_forward(z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    m = b.shape[0]
    s, s1, _ = gelu_terms(z[:, :m] + b)
    return torch.cat([-s1 * z[:, m:], -s], dim=-1)


def _ff2w_backward(z: torch.Tensor, b: torch.Tensor, r: torch.Tensor):
    """(dZ, P) for P([h | u]) = -[sigma'(h) u | sigma(h)], h = z_1 + b, u = z_2, and R = [R1 | R2]:
    dh = -(R1 u sigma''(h) + R2 sigma'(h)), du = -R1 sigma'(h)."""
    m = b.shape[0]
    u, r1, r2 = z[:, m:], r[:, :m], r[:, m:]
    s, s1, s2 = gelu_terms(z[:, :m] + b)
    return torch.cat([-(r1 * u * s2 + r2 * s1), -r1 * s1], dim=-1), torch.cat([-s1 * u, -s], dim=-1)


ELEMENTWISE = {  # kind -> (P(z + b), the elementwise backward of (2): (dZ, P))
    "ff1": (Fused(_ff1_forward), Fused(_ff1_backward)),
    "dam": (Fused(_dam_forward), Fused(_dam_backward)),
    "ff2w": (Fused(_ff2w_forward), Fused(_ff2w_backward)),
}


# ------------------------------------------------------------------------------ the form (1)
def _stacked_forward(kind: str, g: torch.Tensor, a_mat: torch.Tensor, b: torch.Tensor,
                     c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dE/dg, Z) of (1) for 2-D g; the bias b is added inside the fused pass."""
    z = torch.mm(g, a_mat.T)
    p = ELEMENTWISE[kind][0](z, b)
    out = torch.mm(p, a_mat) if c is None else torch.addmm(c, p, a_mat)
    return out, z


def _stacked_backward(kind: str, grad: torch.Tensor, g: torch.Tensor, z: torch.Tensor, a_mat: torch.Tensor,
                      b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dg, dA, db) of (2). dA = dZ^T g + P^T G is accumulated by addmm rather than computed as one
    product over [dZ; P] and [g; G]: on a CPU, fresh 2N-row buffers cost more in page faults than
    they save."""
    dz, p = ELEMENTWISE[kind][1](z, b, torch.mm(grad, a_mat.T))
    dg = torch.mm(dz, a_mat)
    d_a_mat = torch.addmm(torch.mm(dz.T, g), p.T, grad)
    return dg, d_a_mat, dz[:, : b.shape[0]].sum(0)


def _autocast(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The Functions' inputs in the autocast dtype where autocast is on (its products would run in it),
    so that forward and backward (which runs outside autocast) see one dtype."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


class StackedGrad(torch.autograd.Function):
    """dE/dg = P(g A^T + [b, 0]) A + c, eq. (1), with the backward (2)."""

    @staticmethod
    def forward(ctx, kind: str, g: torch.Tensor, a_mat: torch.Tensor, b: torch.Tensor,
                c: torch.Tensor | None) -> torch.Tensor:
        g, a_mat, b, c = _autocast(g, a_mat, b, c)
        out, z = _stacked_forward(kind, g, a_mat, b, c)
        ctx.kind, ctx.has_c = kind, c is not None
        ctx.save_for_backward(g, z, a_mat, b)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g, z, a_mat, b = ctx.saved_tensors
        grad = grad.contiguous()
        dg, d_a_mat, db = _stacked_backward(ctx.kind, grad, g, z, a_mat, b)
        dc = grad.sum(0) if ctx.has_c else None
        return None, dg, d_a_mat, db, dc


def _rows(g: torch.Tensor) -> torch.Tensor:
    return g.reshape(-1, g.shape[-1])


def _inference() -> bool:
    """No autograd graph is being recorded (decoding, evaluation): the closed form in ATen's own fused ops
    is then the fastest path; the Functions' stacked products and saved tensors only pay for a backward."""
    return not torch.is_grad_enabled()


# ``torch.backends.mkldnn.enabled``'s own getter and setter: the property costs ~1.7 us a toggle, these ~0.1
_onednn_enabled, _set_onednn = torch._C._get_mkldnn_enabled, torch._C._set_mkldnn_enabled


def _aten(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    """``fn(*args)``, ``F.gelu(h)`` or ``aten.gelu_backward(v, h)``, with oneDNN off for a small CPU input h.
    ATen hands a contiguous float32 or bfloat16 CPU tensor's GELU to oneDNN, whose fixed cost per call
    (~20 us) is 5-10x ATen's own vectorised kernel below ``Fused.min_elements`` elements: one-token
    decoding. Larger inputs keep oneDNN, which is faster there."""
    h = args[-1]
    if (h.numel() >= Fused.min_elements or h.device.type != "cpu" or torch.compiler.is_compiling()
            or not _onednn_enabled()):
        return fn(*args)
    _set_onednn(False)
    try:
        return fn(*args)
    finally:
        _set_onednn(True)


def _aten_gelu_backward(v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """v * sigma'(h) in one kernel."""
    return _aten(torch.ops.aten.gelu_backward, v, h)


def gelu(h: torch.Tensor) -> torch.Tensor:
    """The exact GELU, ``F.gelu``, its small CPU inputs kept off oneDNN (``_aten``)."""
    return _aten(F.gelu, h)


def ff1_grad(g: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """dE/dg = -2 W1^T (sigma(h) * sigma'(h)), h = W1 g + b1 (eq. 14), for g (..., D)."""
    if _inference():
        h = F.linear(g, w1, b1)
        return -2.0 * (_aten_gelu_backward(gelu(h), h) @ w1)
    return StackedGrad.apply("ff1", _rows(g), w1, b1, None).view_as(g)


def dam_grad(g: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """dE/dg = -W1^T ReLU(h), h = W1 g + b1 (eq. 16: F = ReLU^2 / 2), for g (..., D)."""
    if _inference():
        return -(F.relu(F.linear(g, w1, b1)) @ w1)
    return StackedGrad.apply("dam", _rows(g), w1, b1, None).view_as(g)


def ff2w_grad(g: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """dE/dg = -(W2 sigma(h) + b2) - W1^T (sigma'(h) * W2^T g), h = W1 g + b1 (eq. 24), for g (..., D);
    W1 (mD, D), W2 (D, mD). The stacking [W1; W2^T] is an autograd op (cheap: weights)."""
    if _inference():
        h = F.linear(g, w1, b1)
        return -(F.linear(gelu(h), w2, b2) + _aten_gelu_backward(g @ w2, h) @ w1)
    return StackedGrad.apply("ff2w", _rows(g), torch.cat([w1, w2.T]), b1, -b2).view_as(g)


# ------------------------------------------------------------------------------ ff2
def _gelu(h: torch.Tensor) -> torch.Tensor:
    return gelu_terms(h)[0]


def _gelu_grad(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return gelu_terms(h)[1] * w


def _ff2_outer_backward(h: torch.Tensor, w: torch.Tensor, dy: torch.Tensor):
    """For y = sigma'(h) w: (sigma(h), y, dw = dy sigma'(h), the direct part dy w sigma''(h) of dh)."""
    s, s1, s2 = gelu_terms(h)
    return s, s1 * w, dy * s1, dy * w * s2


def _add_gelu_grad(direct: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return direct + gelu_terms(h)[1] * w


GELU, GELU_GRAD = Fused(_gelu), Fused(_gelu_grad)
FF2_OUTER_BACKWARD, ADD_GELU_GRAD = Fused(_ff2_outer_backward), Fused(_add_gelu_grad)


class FF2Grad(torch.autograd.Function):
    """dE/dg = (sigma'(h) * w) W1, h = g W1^T + b1, w = ff1 gradient (1) of sigma(h) with (W2, b2)."""

    @staticmethod
    def forward(ctx, g, w1, b1, w2, b2):
        g, w1, b1, w2, b2 = _autocast(g, w1, b1, w2, b2)
        h = torch.addmm(b1, g, w1.T)
        w, u = _stacked_forward("ff1", GELU(h), w2, b2, None)
        out = torch.mm(GELU_GRAD(h, w), w1)
        ctx.save_for_backward(g, h, u, w, w1, w2, b2)
        return out

    @staticmethod
    def backward(ctx, grad):
        g, h, u, w, w1, w2, b2 = ctx.saved_tensors
        grad = grad.contiguous()
        s, y, dw, direct = FF2_OUTER_BACKWARD(h, w, torch.mm(grad, w1.T))
        ds, dw2, db2 = _stacked_backward("ff1", dw, s, u, w2, b2)
        dh = ADD_GELU_GRAD(direct, h, ds)
        dg = torch.mm(dh, w1)
        dw1 = torch.addmm(torch.mm(dh.T, g), y.T, grad)
        return dg, dw1, dh.sum(0), dw2, db2


def ff2_grad(g: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """dE/dg = -2 W1^T (sigma'(h) * W2^T (sigma(u) * sigma'(u))), h = W1 g + b1, u = W2 sigma(h) + b2,
    for g (..., D); W1 (D, D), W2 (mD, D)."""
    if _inference():
        h = F.linear(g, w1, b1)
        u = F.linear(gelu(h), w2, b2)
        return -2.0 * (_aten_gelu_backward(_aten_gelu_backward(gelu(u), u) @ w2, h) @ w1)
    return FF2Grad.apply(_rows(g), w1, b1, w2, b2).view_as(g)
