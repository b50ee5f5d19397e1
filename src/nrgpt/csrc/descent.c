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
/* per block, the weight pointers in this order (NULL where unused) */
enum { W_NORM_W, W_NORM_B, W_QUERY, W_KEY, W_ALPHA, W_FC1_W, W_FC1_B, W_FC2_W, W_FC2_B, W_FF_SCALE, W_ETA, W_COUNT };
/* the config ints */
enum { C_D, C_H, C_HD, C_HIDDEN, C_BLOCKS, C_STEPS, C_NORM, C_ATT, C_STRICT, C_SELF, C_FF, C_ETA_N, C_COUNT };

#define EPS 1e-5

/* y (n) = W x + b, W (n, m) */
static void matvec(const REAL *W, const REAL *x, const REAL *b, REAL *y, int n, int m) {
    for (int i = 0; i < n; i++) {
        const REAL *w = W + (size_t)i * m;
        REAL s = 0;
        for (int j = 0; j < m; j++) s += w[j] * x[j];
        y[i] = b ? s + b[i] : s;
    }
}

/* y (m) += a W^T x, W (n, m) */
static void matvec_t_add(const REAL *W, const REAL *x, REAL a, REAL *y, int n, int m) {
    for (int i = 0; i < n; i++) {
        const REAL c = a * x[i];
        const REAL *w = W + (size_t)i * m;
        for (int j = 0; j < m; j++) y[j] += c * w[j];
    }
}

/* the exact GELU sigma(h) = h Phi(h) and sigma'(h) = Phi(h) + h phi(h) */
static void gelu_terms(REAL h, REAL *s, REAL *s1) {
    const double cdf = 0.5 + 0.5 * erf((double)h * 0.70710678118654752440);
    const double pdf = exp(-0.5 * (double)h * h) * 0.39894228040143267794;
    *s = (REAL)(h * cdf);
    *s1 = (REAL)(cdf + h * pdf);
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

/* grad (D) += s dE^FF/dg at g: the closed forms of nrgpt/energies/feedforward.py */
static void ff_grad(const int *c, const REAL *const *w, const REAL *g, REAL *grad, REAL *h, REAL *u) {
    const int d = c[C_D], m = c[C_HIDDEN], kind = c[C_FF];
    const REAL s = w[W_FF_SCALE] ? w[W_FF_SCALE][0] : 1;
    const REAL *W1 = w[W_FC1_W], *W2 = w[W_FC2_W];
    REAL a, a1;
    if (kind == FF_FF2) { /* W1 (D, D), W2 (m, D): u = W2 sigma(h) + b2, w = -2 W2^T (sigma(u) sigma'(u)) */
        matvec(W1, g, w[W_FC1_B], h, d, d);
        REAL *sh = h + d, *ds = h + 2 * d;
        for (int i = 0; i < d; i++) gelu_terms(h[i], &sh[i], &ds[i]);
        matvec(W2, sh, w[W_FC2_B], u, m, d);
        for (int i = 0; i < m; i++) {
            gelu_terms(u[i], &a, &a1);
            u[i] = -2 * a * a1;
        }
        memset(sh, 0, sizeof(REAL) * d);
        matvec_t_add(W2, u, 1, sh, m, d);
        for (int i = 0; i < d; i++) sh[i] *= ds[i];
        matvec_t_add(W1, sh, s, grad, d, d);
        return;
    }
    matvec(W1, g, w[W_FC1_B], h, m, d);
    if (kind == FF_FF2W) { /* -(W2 sigma(h) + b2) - W1^T (sigma'(h) * W2^T g), W2 (D, m) */
        memset(u, 0, sizeof(REAL) * m);
        matvec_t_add(W2, g, 1, u, d, m);
        for (int i = 0; i < m; i++) {
            gelu_terms(h[i], &a, &a1);
            h[i] = a;
            u[i] *= a1;
        }
        for (int i = 0; i < d; i++) {
            const REAL *row = W2 + (size_t)i * m;
            REAL t = w[W_FC2_B] ? w[W_FC2_B][i] : 0;
            for (int j = 0; j < m; j++) t += row[j] * h[j];
            grad[i] -= s * t;
        }
        matvec_t_add(W1, u, -s, grad, m, d);
        return;
    }
    for (int i = 0; i < m; i++) {
        if (kind == FF_FF1) {
            gelu_terms(h[i], &a, &a1);
            h[i] = -2 * a * a1;
        } else {
            h[i] = h[i] > 0 ? -h[i] : 0; /* dam: -ReLU(h) */
        }
    }
    matvec_t_add(W1, h, s, grad, m, d);
}

/* grad (D) += dE^AT/dg at g for the token at `length`, after writing its keys into K (H, cap, hd):
   -sum_h alpha_h [Q_h^T sum_B p_AB k_B + p_AA K_h^T q_A] (eq. 11; the second term with C_SELF) */
static void att_grad(const int *c, const REAL *const *w, const REAL *g, REAL *K, int length, int cap,
                     REAL *grad, REAL *q, REAL *k, REAL *o, REAL *v, REAL *p) {
    const int d = c[C_D], H = c[C_H], hd = c[C_HD], full = c[C_ATT] == ATT_FULL;
    const int n_vis = c[C_STRICT] ? length : length + 1;
    const REAL beta = full ? 1 : 1 / sqrt((double)hd);
    matvec(w[W_KEY], g, NULL, k, H * hd, d);
    for (int h = 0; h < H; h++) memcpy(K + ((size_t)h * cap + length) * hd, k + (size_t)h * hd, sizeof(REAL) * hd);
    if (!full) matvec(w[W_QUERY], g, NULL, q, d, d);
    for (int h = 0; h < H; h++) {
        const REAL *qh = full ? g : q + (size_t)h * hd, *Kh = K + (size_t)h * cap * hd;
        const REAL alpha = w[W_ALPHA] ? w[W_ALPHA][h] : 1;
        REAL *oh = o + (size_t)h * hd, *vh = v + (size_t)h * hd;
        memset(oh, 0, sizeof(REAL) * hd);
        memset(vh, 0, sizeof(REAL) * hd);
        if (n_vis == 0) continue; /* the first token under the strict mask sees no key */
        REAL top = -INFINITY;
        for (int b = 0; b < n_vis; b++) {
            const REAL *kb = Kh + (size_t)b * hd;
            REAL s = 0;
            for (int e = 0; e < hd; e++) s += qh[e] * kb[e];
            p[b] = beta * s;
            if (p[b] > top) top = p[b];
        }
        double z = 0;
        for (int b = 0; b < n_vis; b++) z += (p[b] = exp(p[b] - top));
        for (int b = 0; b < n_vis; b++) {
            const REAL pb = (REAL)(alpha * p[b] / z), *kb = Kh + (size_t)b * hd;
            for (int e = 0; e < hd; e++) oh[e] += pb * kb[e];
        }
        if (c[C_SELF]) {
            const REAL ps = (REAL)(alpha * p[length] / z);
            for (int e = 0; e < hd; e++) vh[e] = ps * qh[e];
        }
    }
    if (full) { /* Q_h = I: sum_h o_h */
        for (int h = 0; h < H; h++)
            for (int e = 0; e < d; e++) grad[e] -= o[(size_t)h * hd + e];
    } else {
        matvec_t_add(w[W_QUERY], o, -1, grad, d, d);
    }
    if (c[C_SELF]) matvec_t_add(w[W_KEY], v, -1, grad, H * hd, d);
}

/* Every step of every block for one new token per row. x (batch, D) is updated in place; keys[slot]
   (batch, H, cap, hd) get the new token's keys at `length`; w holds W_COUNT pointers per block; eta
   (C_ETA_N matrices of D x D per block) is applied as delta = M grad, or is the identity where NULL.
   Returns 0, or 1 if scratch memory could not be allocated. */
int nrgpt_descend(const int *c, const REAL *const *w, REAL *x, REAL *const *keys, int batch, int length, int cap) {
    const int d = c[C_D], H = c[C_H], hd = c[C_HD], m = c[C_HIDDEN];
    const size_t wide = (size_t)(m > 3 * d ? m : 3 * d), heads = (size_t)H * hd;
    REAL *buf = malloc(sizeof(REAL) * (3 * (size_t)d + 2 * wide + 4 * heads + (size_t)cap + (size_t)d));
    if (!buf) return 1;
    REAL *g = buf, *grad = g + d, *delta = grad + d, *h = delta + d, *u = h + wide, *q = u + wide,
         *k = q + heads, *o = k + heads, *v = o + heads, *p = v + heads;
    for (int r = 0; r < batch; r++) {
        REAL *xr = x + (size_t)r * d;
        for (int blk = 0; blk < c[C_BLOCKS]; blk++) {
            const REAL *const *wb = w + (size_t)blk * W_COUNT;
            for (int t = 0; t < c[C_STEPS]; t++) {
                const int slot = blk * c[C_STEPS] + t;
                norm(c[C_NORM], xr, wb[W_NORM_W], wb[W_NORM_B], g, d);
                memset(grad, 0, sizeof(REAL) * d);
                ff_grad(c, wb, g, grad, h, u);
                if (c[C_ATT] != ATT_NONE)
                    att_grad(c, wb, g, keys[slot] + (size_t)r * H * cap * hd, length, cap, grad, q, k, o, v, p);
                if (wb[W_ETA]) {
                    const int step = t < c[C_ETA_N] ? t : c[C_ETA_N] - 1;
                    matvec(wb[W_ETA] + (size_t)step * d * d, grad, NULL, delta, d, d);
                    for (int i = 0; i < d; i++) xr[i] -= delta[i];
                } else {
                    for (int i = 0; i < d; i++) xr[i] -= grad[i];
                }
            }
        }
    }
    free(buf);
    return 0;
}
