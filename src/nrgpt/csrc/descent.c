/* NRGPT's one-token decoding step in C: eq. 6 for one new token per row, every step of every block.

   The same math as nrgpt.energy.descent with a KV cache (nrgpt/energies, nrgpt/layers), for one query
   token: g = norm(x), x <- x - eta^(t) dE/dg with E = E^AT + s E^FF. Python's eager step dispatches a
   few hundred small ATen ops per token; here a token is plain loops over weights that stay in cache.
   nrgpt/native.py builds this file (REAL = float and REAL = double) and says which models it serves.

   Layout: weights row-major as PyTorch stores them; keys[slot] is the cache's (batch, H, capacity, hd)
   buffer of that step, the new token's keys written at position `length`. */

#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifndef REAL
#define REAL float
#endif

enum { NORM_NONE, NORM_LAYER, NORM_RMS };
enum { ATT_NONE, ATT_LOWRANK, ATT_FULL };
enum { FF_FF1, FF_FF2W, FF_FF2, FF_DAM };
/* per block, the weight pointers in this order (NULL where unused); for ff2w, W_FC1_W is the stacked
   [W1; W2^T] (2 hidden x D) and W_FC2_W is unused */
enum { W_NORM_W, W_NORM_B, W_QUERY, W_KEY, W_ALPHA, W_FC1_W, W_FC1_B, W_FC2_W, W_FC2_B, W_FF_SCALE, W_ETA, W_COUNT };
/* the config ints */
enum { C_D, C_H, C_HD, C_HIDDEN, C_BLOCKS, C_STEPS, C_NORM, C_ATT, C_STRICT, C_SELF, C_FF, C_ETA_N, C_COUNT };

#define EPS 1e-5

/* Y (nb, n) = X W^T + b for nb rows X (nb, m), W (n, m). Four weight rows at a time: four independent
   sums (one vectorised sum is bound by the latency of its FMAs), each weight row read once for all rows */
static void matvec(const REAL *W, const REAL *X, const REAL *b, REAL *Y, int nb, int n, int m) {
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        const REAL *w0 = W + (size_t)i * m, *w1 = w0 + m, *w2 = w1 + m, *w3 = w2 + m;
        for (int r = 0; r < nb; r++) {
            const REAL *x = X + (size_t)r * m;
            REAL s0 = 0, s1 = 0, s2 = 0, s3 = 0;
            for (int j = 0; j < m; j++) {
                s0 += w0[j] * x[j];
                s1 += w1[j] * x[j];
                s2 += w2[j] * x[j];
                s3 += w3[j] * x[j];
            }
            REAL *y = Y + (size_t)r * n + i;
            y[0] = b ? s0 + b[i] : s0;
            y[1] = b ? s1 + b[i + 1] : s1;
            y[2] = b ? s2 + b[i + 2] : s2;
            y[3] = b ? s3 + b[i + 3] : s3;
        }
    }
    for (; i < n; i++) {
        const REAL *w = W + (size_t)i * m;
        for (int r = 0; r < nb; r++) {
            const REAL *x = X + (size_t)r * m;
            REAL s = 0;
            for (int j = 0; j < m; j++) s += w[j] * x[j];
            Y[(size_t)r * n + i] = b ? s + b[i] : s;
        }
    }
}

/* Y (nb, m) += a X W for nb rows X (nb, n), W (n, m) */
static void matvec_t_add(const REAL *W, const REAL *X, REAL a, REAL *Y, int nb, int n, int m) {
    for (int i = 0; i < n; i++) {
        const REAL *w = W + (size_t)i * m;
        for (int r = 0; r < nb; r++) {
            const REAL c = a * X[(size_t)r * n + i];
            REAL *y = Y + (size_t)r * m;
            for (int j = 0; j < m; j++) y[j] += c * w[j];
        }
    }
}

/* the exact GELU sigma(h) = h Phi(h) and sigma'(h) = Phi(h) + h phi(h), in REAL's precision */
#define ERF(z) _Generic((z), float: erff, default: erf)(z)
#define EXP(z) _Generic((z), float: expf, default: exp)(z)
static void gelu_terms(REAL h, REAL *s, REAL *s1) {
    const REAL cdf = (REAL)0.5 + (REAL)0.5 * ERF(h * (REAL)0.70710678118654752440);
    const REAL pdf = EXP((REAL)-0.5 * h * h) * (REAL)0.39894228040143267794;
    *s = h * cdf;
    *s1 = cdf + h * pdf;
}

static void norm(int kind, const REAL *x, const REAL *w, const REAL *b, REAL *g, int d) {
    if (kind == NORM_NONE) {
        memcpy(g, x, sizeof(REAL) * d);
        return;
    }
    double mu = 0, var = 0;
    if (kind == NORM_LAYER) {
        for (int i = 0; i < d; i++) mu += x[i];
        mu /= d;
    }
    for (int i = 0; i < d; i++) var += (x[i] - mu) * (x[i] - mu);
    const double r = 1.0 / sqrt(var / d + EPS);
    for (int i = 0; i < d; i++) g[i] = (REAL)((x[i] - mu) * r) * w[i] + (b ? b[i] : 0);
}

/* K hidden units i0..i0+K-1 of ff1, dam or ff2w in one pass over their weight rows, for nb rows of g:
   h_i = A_i . g + b_i (and u_i = A_{m+i} . g for ff2w), then grad += P_i A_i (+ Q_i A_{m+i}): the form
   (1) of nrgpt/kernels.py with A = W1, or [W1; W2^T] for ff2w, so every weight is read once per step
   (a token 15% faster than a pass for the products and one for their transposes, at n_embd 128) */
static inline void ff_units(int kind, const REAL *A, const REAL *b, REAL s, const REAL *g, REAL *grad,
                            int nb, int d, int m, int i0, const int K) {
    const int two = kind == FF_FF2W;
    for (int r = 0; r < nb; r++) {
        const REAL *x = g + (size_t)r * d;
        REAL h[4] = {0, 0, 0, 0}, u[4] = {0, 0, 0, 0}, P[4], Q[4];
        for (int j = 0; j < d; j++)
            for (int k = 0; k < K; k++) {
                h[k] += A[(size_t)(i0 + k) * d + j] * x[j];
                if (two) u[k] += A[(size_t)(m + i0 + k) * d + j] * x[j];
            }
        for (int k = 0; k < K; k++) {
            REAL a, a1, z = h[k] + (b ? b[i0 + k] : 0);
            if (kind == FF_DAM) {
                P[k] = z > 0 ? -s * z : 0; /* -ReLU(h) */
                continue;
            }
            gelu_terms(z, &a, &a1);
            P[k] = two ? -s * a1 * u[k] : -2 * s * a * a1; /* ff2w: -sigma'(h) u; ff1: -2 sigma sigma' */
            Q[k] = -s * a;                                  /* ff2w: -sigma(h) */
        }
        REAL *y = grad + (size_t)r * d;
        for (int j = 0; j < d; j++)
            for (int k = 0; k < K; k++) {
                y[j] += P[k] * A[(size_t)(i0 + k) * d + j];
                if (two) y[j] += Q[k] * A[(size_t)(m + i0 + k) * d + j];
            }
    }
}

/* grad (nb, D) += s dE^FF/dg at g (nb, D): the closed forms of nrgpt/energies/feedforward.py; for ff2,
   h and u hold nb x max(hidden, 3 D) each */
static void ff_grad(const int *c, const REAL *const *w, const REAL *g, REAL *grad, REAL *h, REAL *u, int nb) {
    const int d = c[C_D], m = c[C_HIDDEN], kind = c[C_FF];
    const size_t n = (size_t)nb * m, nd = (size_t)nb * d;
    const REAL s = w[W_FF_SCALE] ? w[W_FF_SCALE][0] : 1;
    const REAL *W1 = w[W_FC1_W], *W2 = w[W_FC2_W];
    REAL a, a1;
    if (kind == FF_FF2) { /* W1 (D, D), W2 (m, D): u = W2 sigma(h) + b2, w = -2 W2^T (sigma(u) sigma'(u)) */
        REAL *sh = h + nd, *ds = h + 2 * nd;
        matvec(W1, g, w[W_FC1_B], h, nb, d, d);
        for (size_t i = 0; i < nd; i++) gelu_terms(h[i], &sh[i], &ds[i]);
        matvec(W2, sh, w[W_FC2_B], u, nb, m, d);
        for (size_t i = 0; i < n; i++) {
            gelu_terms(u[i], &a, &a1);
            u[i] = -2 * a * a1;
        }
        memset(sh, 0, sizeof(REAL) * nd);
        matvec_t_add(W2, u, 1, sh, nb, m, d);
        for (size_t i = 0; i < nd; i++) sh[i] *= ds[i];
        matvec_t_add(W1, sh, s, grad, nb, d, d);
        return;
    }
#define FF_PASS(KIND)                                                                                  \
    do { /* KIND and K constant in each inlined copy, so that the loops over j vectorise */            \
        int i = 0;                                                                                     \
        for (; i + 4 <= m; i += 4) ff_units(KIND, W1, w[W_FC1_B], s, g, grad, nb, d, m, i, 4);         \
        for (; i < m; i++) ff_units(KIND, W1, w[W_FC1_B], s, g, grad, nb, d, m, i, 1);                 \
    } while (0)
    if (kind == FF_FF2W)
        FF_PASS(FF_FF2W);
    else if (kind == FF_FF1)
        FF_PASS(FF_FF1);
    else
        FF_PASS(FF_DAM);
    if (kind == FF_FF2W && w[W_FC2_B])
        for (size_t r = 0; r < nd; r++) grad[r] -= s * w[W_FC2_B][r % d];
}

/* grad (nb, D) += dE^AT/dg at g (nb, D) for the tokens at `length`, after writing their keys into
   keys (nb, H, cap, hd): -sum_h alpha_h [Q_h^T sum_B p_AB k_B + p_AA K_h^T q_A] (eq. 11; the second
   term with C_SELF) */
static void att_grad(const int *c, const REAL *const *w, const REAL *g, REAL *keys, int length, int cap,
                     REAL *grad, REAL *q, REAL *k, REAL *o, REAL *v, REAL *p, int nb) {
    const int d = c[C_D], H = c[C_H], hd = c[C_HD], full = c[C_ATT] == ATT_FULL;
    const int n_vis = c[C_STRICT] ? length : length + 1;
    const size_t heads = (size_t)H * hd;
    const REAL beta = full ? 1 : 1 / sqrt((double)hd);
    matvec(w[W_KEY], g, NULL, k, nb, H * hd, d);
    if (!full) matvec(w[W_QUERY], g, NULL, q, nb, d, d);
    memset(o, 0, sizeof(REAL) * nb * heads);
    memset(v, 0, sizeof(REAL) * nb * heads);
    for (int r = 0; r < nb; r++) {
        REAL *K = keys + (size_t)r * H * cap * hd;
        for (int h = 0; h < H; h++)
            memcpy(K + ((size_t)h * cap + length) * hd, k + r * heads + (size_t)h * hd, sizeof(REAL) * hd);
        for (int h = 0; h < H; h++) {
            const REAL *qh = full ? g + (size_t)r * d : q + (size_t)r * d + (size_t)h * hd;
            const REAL *Kh = K + (size_t)h * cap * hd;
            const REAL alpha = w[W_ALPHA] ? w[W_ALPHA][h] : 1;
            REAL *oh = o + r * heads + (size_t)h * hd, *vh = v + r * heads + (size_t)h * hd;
            if (n_vis == 0) continue; /* the first token under the strict mask sees no key */
            matvec(Kh, qh, NULL, p, 1, n_vis, hd); /* scores q_A . k_B */
            REAL top = -INFINITY;
            for (int b = 0; b < n_vis; b++) top = p[b] > top ? p[b] : top;
            REAL z = 0;
            for (int b = 0; b < n_vis; b++) z += (p[b] = EXP(beta * (p[b] - top)));
            matvec_t_add(Kh, p, alpha / z, oh, 1, n_vis, hd); /* sum_B p_AB k_B */
            if (c[C_SELF]) {
                const REAL ps = alpha * p[length] / z;
                for (int e = 0; e < hd; e++) vh[e] = ps * qh[e];
            }
        }
    }
    if (full) { /* Q_h = I: sum_h o_h */
        for (int r = 0; r < nb; r++)
            for (int h = 0; h < H; h++)
                for (int e = 0; e < d; e++) grad[(size_t)r * d + e] -= o[r * heads + (size_t)h * hd + e];
    } else {
        matvec_t_add(w[W_QUERY], o, -1, grad, nb, d, d);
    }
    if (c[C_SELF]) matvec_t_add(w[W_KEY], v, -1, grad, nb, H * hd, d);
}

/* Every step of every block for one new token per row. x (batch, D) is updated in place; keys[slot]
   (batch, H, cap, hd) get the new tokens' keys at `length`; w holds W_COUNT pointers per block; eta
   (C_ETA_N matrices of D x D per block) is applied as delta = M grad, or is the identity where NULL.
   Returns 0, or 1 if scratch memory could not be allocated. */
int nrgpt_descend(const int *c, const REAL *const *w, REAL *x, REAL *const *keys, int batch, int length, int cap) {
    const int d = c[C_D], m = c[C_HIDDEN];
    const size_t nb = (size_t)batch, wide = (size_t)(m > 3 * d ? m : 3 * d), heads = (size_t)c[C_H] * c[C_HD];
    REAL *buf = malloc(sizeof(REAL) * (nb * (3 * (size_t)d + 2 * wide + 4 * heads) + (size_t)cap + 1));
    if (!buf) return 1;
    REAL *g = buf, *grad = g + nb * d, *delta = grad + nb * d, *h = delta + nb * d, *u = h + nb * wide,
         *q = u + nb * wide, *k = q + nb * heads, *o = k + nb * heads, *v = o + nb * heads, *p = v + nb * heads;
    for (int blk = 0; blk < c[C_BLOCKS]; blk++) {
        const REAL *const *wb = w + (size_t)blk * W_COUNT;
        for (int t = 0; t < c[C_STEPS]; t++) {
            for (int r = 0; r < batch; r++) norm(c[C_NORM], x + r * d, wb[W_NORM_W], wb[W_NORM_B], g + r * d, d);
            memset(grad, 0, sizeof(REAL) * nb * d);
            ff_grad(c, wb, g, grad, h, u, batch);
            if (c[C_ATT] != ATT_NONE)
                att_grad(c, wb, g, keys[blk * c[C_STEPS] + t], length, cap, grad, q, k, o, v, p, batch);
            const REAL *step = grad;
            if (wb[W_ETA]) {
                const int e = t < c[C_ETA_N] ? t : c[C_ETA_N] - 1;
                matvec(wb[W_ETA] + (size_t)e * d * d, grad, NULL, delta, batch, d, d);
                step = delta;
            }
            for (size_t i = 0; i < nb * d; i++) x[i] -= step[i];
        }
    }
    free(buf);
    return 0;
}
