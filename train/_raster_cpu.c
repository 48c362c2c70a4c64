/* Compositing of projected 3D Gaussians on the CPU: forward and backward.
 *
 * The same rules as train/raster.py's torch compositing (and gsplat's kernel): per pixel
 * (centre at col + 0.5, row + 0.5), front to back, a Gaussian is drawn where the pixel
 * lies in its pixel range [x0, x1) x [y0, y1), sigma >= 0 and
 * alpha = min(0.999, opacity * exp(-sigma)) >= 1/255; the pixel stops before the
 * Gaussian that would take its transmittance to 1e-4 or below.
 *
 * Gaussians are binned into square tiles (a list per tile, front to back); threads take
 * tiles. The backward pass replays each pixel front to back, then walks its drawn
 * Gaussians back to front; gradients go to one slot per (tile, Gaussian) entry and are
 * summed per Gaussian afterwards in a fixed order, so results do not depend on the
 * number of threads. Everything is computed in double.
 *
 * Built by train/raster_c.py with the system's C compiler; no Python headers needed.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#define ALPHA_MIN (1.0 / 255.0)
#define ALPHA_MAX 0.999
#define T_MIN 1e-4

/* Per-Gaussian parameters, gathered per tile so that its pixels read them contiguously. */
typedef struct {
    double mx, my, a, b, c, op;
    int32_t x0, x1, y0, y1;
    int64_t slot;  /* index of this (tile, Gaussian) entry */
    int32_t id;    /* Gaussian */
} entry_t;

/* Per-tile counts of the Gaussians whose pixel range touches the tile; returns the total. */
int64_t ts_count(int32_t n, const int32_t *x0, const int32_t *x1, const int32_t *y0, const int32_t *y1,
                 int32_t tile, int32_t tiles_x, int32_t tiles_y, int64_t *counts) {
    int64_t total = 0;
    for (int64_t t = 0; t < (int64_t)tiles_x * tiles_y; t++) counts[t] = 0;
    for (int32_t g = 0; g < n; g++) {
        if (x1[g] <= x0[g] || y1[g] <= y0[g]) continue;
        int32_t tx0 = x0[g] / tile, tx1 = (x1[g] - 1) / tile, ty0 = y0[g] / tile, ty1 = (y1[g] - 1) / tile;
        for (int32_t ty = ty0; ty <= ty1; ty++)
            for (int32_t tx = tx0; tx <= tx1; tx++) counts[(int64_t)ty * tiles_x + tx]++;
        total += (int64_t)(tx1 - tx0 + 1) * (ty1 - ty0 + 1);
    }
    return total;
}

/* Fills each tile's list (offsets: exclusive prefix sums of the counts, tiles + 1 long)
 * with Gaussian ids, taking the Gaussians in ``order`` (front to back). */
void ts_fill(int32_t n, const int64_t *order, const int32_t *x0, const int32_t *x1, const int32_t *y0,
             const int32_t *y1, int32_t tile, int32_t tiles_x, const int64_t *offsets, int64_t *cursor,
             int32_t *ids) {
    for (int32_t i = 0; i < n; i++) {
        int32_t g = (int32_t)order[i];
        if (x1[g] <= x0[g] || y1[g] <= y0[g]) continue;
        int32_t tx0 = x0[g] / tile, tx1 = (x1[g] - 1) / tile, ty0 = y0[g] / tile, ty1 = (y1[g] - 1) / tile;
        for (int32_t ty = ty0; ty <= ty1; ty++)
            for (int32_t tx = tx0; tx <= tx1; tx++) {
                int64_t t = (int64_t)ty * tiles_x + tx;
                ids[offsets[t] + cursor[t]++] = g;
            }
    }
}

static void gather(int64_t begin, int64_t end, const int32_t *ids, const double *mx, const double *my,
                   const double *a, const double *b, const double *c, const double *op, const int32_t *x0,
                   const int32_t *x1, const int32_t *y0, const int32_t *y1, entry_t *out) {
    for (int64_t s = begin; s < end; s++) {
        int32_t g = ids[s];
        entry_t *e = &out[s - begin];
        e->mx = mx[g]; e->my = my[g]; e->a = a[g]; e->b = b[g]; e->c = c[g]; e->op = op[g];
        e->x0 = x0[g]; e->x1 = x1[g]; e->y0 = y0[g]; e->y1 = y1[g];
        e->slot = s; e->id = g;
    }
}

/* The pixel's drawn entries, front to back: their index in ``list``, alpha and the
 * transmittance in front of them. Returns how many. */
static int64_t replay(const entry_t *list, int64_t len, int32_t col, int32_t row, int64_t *drawn, double *alphas,
                      double *trans, double *t_final) {
    double px = col + 0.5, py = row + 0.5, t = 1.0;
    int64_t k = 0;
    for (int64_t i = 0; i < len; i++) {
        const entry_t *e = &list[i];
        if (col < e->x0 || col >= e->x1 || row < e->y0 || row >= e->y1) continue;
        double dx = e->mx - px, dy = e->my - py;
        double sigma = 0.5 * (e->a * dx * dx + e->c * dy * dy) + e->b * dx * dy;
        if (sigma < 0) continue;
        double alpha = e->op * exp(-sigma);
        if (alpha > ALPHA_MAX) alpha = ALPHA_MAX;
        if (alpha < ALPHA_MIN) continue;
        double next = t * (1.0 - alpha);
        if (next <= T_MIN) break;
        drawn[k] = i; alphas[k] = alpha; trans[k] = t; k++;
        t = next;
    }
    *t_final = t;
    return k;
}

static int64_t longest_list(int64_t tiles, const int64_t *offsets) {
    int64_t m = 0;
    for (int64_t t = 0; t < tiles; t++)
        if (offsets[t + 1] - offsets[t] > m) m = offsets[t + 1] - offsets[t];
    return m;
}

/* out [H*W*D] = sum of weight * feature, alpha_out [H*W] = sum of weights. Returns 0, or -1
 * when a scratch buffer could not be allocated. */
int ts_forward(int32_t n, int32_t D, int32_t W, int32_t H, int32_t tile, int32_t tiles_x, int32_t tiles_y,
               const int64_t *offsets, const int32_t *ids, const double *mx, const double *my, const double *a,
               const double *b, const double *c, const double *op, const int32_t *x0, const int32_t *x1,
               const int32_t *y0, const int32_t *y1, const double *feat, double *out, double *alpha_out,
               int32_t threads) {
    int64_t tiles = (int64_t)tiles_x * tiles_y, longest = longest_list(tiles, offsets);
    int failed = 0;
    (void)n;
#pragma omp parallel num_threads(threads)
    {
        entry_t *list = malloc(sizeof(entry_t) * (longest + 1));
        int64_t *drawn = malloc(sizeof(int64_t) * (longest + 1));
        double *alphas = malloc(sizeof(double) * (longest + 1)), *trans = malloc(sizeof(double) * (longest + 1));
        if (!list || !drawn || !alphas || !trans) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(dynamic, 1)
            for (int64_t t = 0; t < tiles; t++) {
                int64_t len = offsets[t + 1] - offsets[t];
                gather(offsets[t], offsets[t + 1], ids, mx, my, a, b, c, op, x0, x1, y0, y1, list);
                int32_t tx = (int32_t)(t % tiles_x), ty = (int32_t)(t / tiles_x);
                for (int32_t row = ty * tile; row < (ty + 1) * tile && row < H; row++)
                    for (int32_t col = tx * tile; col < (tx + 1) * tile && col < W; col++) {
                        int64_t p = (int64_t)row * W + col;
                        double t_final, acc = 0.0;
                        int64_t k = replay(list, len, col, row, drawn, alphas, trans, &t_final);
                        double *o = &out[p * D];
                        for (int32_t d = 0; d < D; d++) o[d] = 0.0;
                        for (int64_t j = 0; j < k; j++) {
                            double w = alphas[j] * trans[j];
                            const double *f = &feat[(int64_t)list[drawn[j]].id * D];
                            for (int32_t d = 0; d < D; d++) o[d] += w * f[d];
                            acc += w;
                        }
                        alpha_out[p] = acc;
                    }
            }
        }
        free(list); free(drawn); free(alphas); free(trans);
    }
    return failed ? -1 : 0;
}

/* Gradients of a loss given d_out [H*W*D] and d_alpha [H*W], per Gaussian: grad [n*(6+D)]
 * laid out as (mx, my, a, b, c, opacity, feature 0..D-1). slots [M*(6+D)] is scratch. */
int ts_backward(int32_t n, int32_t D, int32_t W, int32_t H, int32_t tile, int32_t tiles_x, int32_t tiles_y,
                const int64_t *offsets, const int32_t *ids, const double *mx, const double *my, const double *a,
                const double *b, const double *c, const double *op, const int32_t *x0, const int32_t *x1,
                const int32_t *y0, const int32_t *y1, const double *feat, const double *d_out,
                const double *d_alpha, double *slots, double *grad, int32_t threads) {
    int64_t tiles = (int64_t)tiles_x * tiles_y, longest = longest_list(tiles, offsets);
    int64_t K = 6 + D, M = offsets[tiles];
    int failed = 0;
    for (int64_t i = 0; i < M * K; i++) slots[i] = 0.0;
#pragma omp parallel num_threads(threads)
    {
        entry_t *list = malloc(sizeof(entry_t) * (longest + 1));
        int64_t *drawn = malloc(sizeof(int64_t) * (longest + 1));
        double *alphas = malloc(sizeof(double) * (longest + 1)), *trans = malloc(sizeof(double) * (longest + 1));
        double *behind = malloc(sizeof(double) * (D + 1));
        if (!list || !drawn || !alphas || !trans || !behind) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(dynamic, 1)
            for (int64_t t = 0; t < tiles; t++) {
                int64_t len = offsets[t + 1] - offsets[t];
                if (len == 0) continue;
                gather(offsets[t], offsets[t + 1], ids, mx, my, a, b, c, op, x0, x1, y0, y1, list);
                int32_t tx = (int32_t)(t % tiles_x), ty = (int32_t)(t / tiles_x);
                for (int32_t row = ty * tile; row < (ty + 1) * tile && row < H; row++)
                    for (int32_t col = tx * tile; col < (tx + 1) * tile && col < W; col++) {
                        int64_t p = (int64_t)row * W + col;
                        double t_final;
                        int64_t k = replay(list, len, col, row, drawn, alphas, trans, &t_final);
                        const double *dc = &d_out[p * D];
                        double da = d_alpha[p], behind_alpha = 0.0;
                        for (int32_t d = 0; d < D; d++) behind[d] = 0.0;
                        for (int64_t j = k - 1; j >= 0; j--) {
                            const entry_t *e = &list[drawn[j]];
                            const double *f = &feat[(int64_t)e->id * D];
                            double alpha = alphas[j], tr = trans[j], w = alpha * tr, keep = 1.0 - alpha;
                            double *g = &slots[e->slot * K];
                            /* d pixel / d alpha: this Gaussian's share, less what it hides behind it */
                            double d_alpha_j = da * (tr - behind_alpha / keep);
                            for (int32_t d = 0; d < D; d++) {
                                g[6 + d] += w * dc[d];
                                d_alpha_j += dc[d] * (tr * f[d] - behind[d] / keep);
                                behind[d] += w * f[d];
                            }
                            behind_alpha += w;
                            double px = col + 0.5, py = row + 0.5, dx = e->mx - px, dy = e->my - py;
                            double sigma = 0.5 * (e->a * dx * dx + e->c * dy * dy) + e->b * dx * dy;
                            double vis = exp(-sigma);
                            if (e->op * vis > ALPHA_MAX) continue; /* clamped: no gradient */
                            double d_sigma = -alpha * d_alpha_j;
                            g[0] += (e->a * dx + e->b * dy) * d_sigma;
                            g[1] += (e->c * dy + e->b * dx) * d_sigma;
                            g[2] += 0.5 * dx * dx * d_sigma;
                            g[3] += dx * dy * d_sigma;
                            g[4] += 0.5 * dy * dy * d_sigma;
                            g[5] += vis * d_alpha_j;
                        }
                    }
            }
        }
        free(list); free(drawn); free(alphas); free(trans); free(behind);
    }
    if (failed) return -1;
    for (int64_t i = 0; i < (int64_t)n * K; i++) grad[i] = 0.0;
    for (int64_t s = 0; s < M; s++) {
        double *g = &grad[(int64_t)ids[s] * K];
        const double *v = &slots[s * K];
        for (int64_t q = 0; q < K; q++) g[q] += v[q];
    }
    return 0;
}
