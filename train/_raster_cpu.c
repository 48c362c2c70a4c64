/* Compositing of projected 3D Gaussians on the CPU: forward and backward.
 *
 * The same rules as train/raster.py's torch compositing (and gsplat's kernel): per pixel
 * (centre at col + 0.5, row + 0.5), front to back, a Gaussian is drawn where the pixel
 * lies in its pixel range [x0, x1) x [y0, y1), sigma >= 0 and
 * alpha = min(0.999, opacity * exp(-sigma)) >= 1/255; the pixel stops before the
 * Gaussian that would take its transmittance to 1e-4 or below.
 *
 * Gaussians are binned into square tiles (a list per tile, front to back); threads take
 * tiles, and each tile visits its Gaussians in order, each only over the pixels its range
 * covers. The backward pass walks the list back to front, recovering each pixel's
 * transmittance from what the forward pass left (as gsplat's kernel does); gradients go to
 * one slot per (tile, Gaussian) entry and are summed per Gaussian afterwards in a fixed
 * order, so results do not depend on the number of threads. Everything is in double.
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

/* Tile t's first column and row, and its width and height inside the image. */
static inline void tile_extent(int64_t t, int32_t tiles_x, int32_t tile, int32_t W, int32_t H, int32_t *tx,
                               int32_t *ty, int32_t *tw, int32_t *th) {
    *tx = (int32_t)(t % tiles_x) * tile;
    *ty = (int32_t)(t / tiles_x) * tile;
    *tw = W - *tx < tile ? W - *tx : tile;
    *th = H - *ty < tile ? H - *ty : tile;
}

/* The pixels of tile t that Gaussian g's range covers: [*c0, *c1) x [*r0, *r1). */
static inline void cover(int64_t t, int32_t tiles_x, int32_t tile, int32_t W, int32_t H, int32_t x0, int32_t x1,
                         int32_t y0, int32_t y1, int32_t *c0, int32_t *c1, int32_t *r0, int32_t *r1) {
    int32_t tx, ty, tw, th;
    tile_extent(t, tiles_x, tile, W, H, &tx, &ty, &tw, &th);
    *c0 = x0 > tx ? x0 : tx;
    *c1 = x1 < tx + tw ? x1 : tx + tw;
    *r0 = y0 > ty ? y0 : ty;
    *r1 = y1 < ty + th ? y1 : ty + th;
}

static inline double sigma_at(double mx, double my, double a, double b, double c, int32_t col, int32_t row,
                              double *dx, double *dy) {
    *dx = mx - (col + 0.5);
    *dy = my - (row + 0.5);
    return 0.5 * (a * *dx * *dx + c * *dy * *dy) + b * *dx * *dy;
}

/* Forward, one tile at a time: the tile's Gaussians front to back, each over the pixels its range
 * covers. out [H*W*D] = sum of weight * feature, t_final [H*W] = transmittance left, last [H*W] =
 * 1 + the position in the tile's list of the last Gaussian drawn (0: none). Returns 0, or -1 when a
 * scratch buffer could not be allocated. */
int ts_forward(int32_t D, int32_t W, int32_t H, int32_t tile, int32_t tiles_x, int32_t tiles_y,
               const int64_t *offsets, const int32_t *ids, const double *mx, const double *my, const double *a,
               const double *b, const double *c, const double *op, const int32_t *x0, const int32_t *x1,
               const int32_t *y0, const int32_t *y1, const double *feat, double *out, double *t_final,
               int32_t *last, int32_t threads) {
    int64_t tiles = (int64_t)tiles_x * tiles_y;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        double *T = malloc(sizeof(double) * tile * tile), *acc = malloc(sizeof(double) * tile * tile * D);
        int32_t *lst = malloc(sizeof(int32_t) * tile * tile);
        char *done = malloc(tile * tile);
        if (!T || !acc || !lst || !done) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(dynamic, 4)
            for (int64_t t = 0; t < tiles; t++) {
                int32_t tx, ty, tw, th;
                tile_extent(t, tiles_x, tile, W, H, &tx, &ty, &tw, &th);
                int32_t remaining = tw * th;
                for (int32_t q = 0; q < tile * tile; q++) { T[q] = 1.0; lst[q] = 0; done[q] = 0; }
                for (int32_t q = 0; q < tile * tile * D; q++) acc[q] = 0.0;
                for (int64_t s = offsets[t]; s < offsets[t + 1] && remaining > 0; s++) {
                    int32_t g = ids[s], c0, c1, r0, r1;
                    cover(t, tiles_x, tile, W, H, x0[g], x1[g], y0[g], y1[g], &c0, &c1, &r0, &r1);
                    const double *f = &feat[(int64_t)g * D];
                    double smax = log(255.0 * op[g]) + 1e-9;
                    for (int32_t row = r0; row < r1; row++)
                        for (int32_t col = c0; col < c1; col++) {
                            int32_t q = (row - ty) * tile + (col - tx);
                            if (done[q]) continue;
                            double dx, dy, sigma = sigma_at(mx[g], my[g], a[g], b[g], c[g], col, row, &dx, &dy);
                            if (sigma < 0 || sigma > smax) continue; /* beyond smax, alpha < 1/255 */
                            double alpha = op[g] * exp(-sigma);
                            if (alpha > ALPHA_MAX) alpha = ALPHA_MAX;
                            if (alpha < ALPHA_MIN) continue;
                            double next = T[q] * (1.0 - alpha);
                            if (next <= T_MIN) { done[q] = 1; remaining--; continue; }
                            double w = alpha * T[q];
                            for (int32_t d = 0; d < D; d++) acc[q * D + d] += w * f[d];
                            T[q] = next;
                            lst[q] = (int32_t)(s - offsets[t] + 1);
                        }
                }
                for (int32_t row = ty; row < ty + th; row++)
                    for (int32_t col = tx; col < tx + tw; col++) {
                        int32_t q = (row - ty) * tile + (col - tx);
                        int64_t p = (int64_t)row * W + col;
                        for (int32_t d = 0; d < D; d++) out[p * D + d] = acc[q * D + d];
                        t_final[p] = T[q];
                        last[p] = lst[q];
                    }
            }
        }
        free(T); free(acc); free(lst); free(done);
    }
    return failed ? -1 : 0;
}

/* Gradients given d_out [H*W*D] (colour) and d_alpha [H*W] (alpha = 1 - t_final), per Gaussian:
 * grad [n*(6+D)] laid out as (mx, my, a, b, c, opacity, feature 0..D-1). Each tile walks its list
 * back to front, recovering the transmittance in front of each drawn Gaussian from the pixel's
 * t_final; each (tile, Gaussian) entry's gradient goes to its slot of ``slots`` [M*(6+D)], and the
 * slots are summed per Gaussian in list order. */
int ts_backward(int32_t n, int32_t D, int32_t W, int32_t H, int32_t tile, int32_t tiles_x, int32_t tiles_y,
                const int64_t *offsets, const int32_t *ids, const double *mx, const double *my, const double *a,
                const double *b, const double *c, const double *op, const int32_t *x0, const int32_t *x1,
                const int32_t *y0, const int32_t *y1, const double *feat, const double *t_final,
                const int32_t *last, const double *d_out, const double *d_alpha, double *slots, double *grad,
                int32_t threads) {
    int64_t tiles = (int64_t)tiles_x * tiles_y, K = 6 + D, M = offsets[tiles];
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        double *T = malloc(sizeof(double) * tile * tile), *behind = malloc(sizeof(double) * tile * tile * D);
        double *gs = malloc(sizeof(double) * K);
        if (!T || !behind || !gs) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(dynamic, 4)
            for (int64_t t = 0; t < tiles; t++) {
                int32_t tx, ty, tw, th;
                tile_extent(t, tiles_x, tile, W, H, &tx, &ty, &tw, &th);
                for (int32_t row = ty; row < ty + th; row++)
                    for (int32_t col = tx; col < tx + tw; col++)
                        T[(row - ty) * tile + (col - tx)] = t_final[(int64_t)row * W + col];
                for (int32_t q = 0; q < tile * tile * D; q++) behind[q] = 0.0;
                for (int64_t s = offsets[t + 1] - 1; s >= offsets[t]; s--) {
                    int32_t g = ids[s], c0, c1, r0, r1, pos = (int32_t)(s - offsets[t]);
                    cover(t, tiles_x, tile, W, H, x0[g], x1[g], y0[g], y1[g], &c0, &c1, &r0, &r1);
                    const double *f = &feat[(int64_t)g * D];
                    double smax = log(255.0 * op[g]) + 1e-9;
                    for (int64_t k = 0; k < K; k++) gs[k] = 0.0;
                    for (int32_t row = r0; row < r1; row++)
                        for (int32_t col = c0; col < c1; col++) {
                            int64_t p = (int64_t)row * W + col;
                            if (pos >= last[p]) continue; /* behind where the pixel stopped */
                            int32_t q = (row - ty) * tile + (col - tx);
                            double dx, dy, sigma = sigma_at(mx[g], my[g], a[g], b[g], c[g], col, row, &dx, &dy);
                            if (sigma < 0 || sigma > smax) continue;
                            double vis = exp(-sigma), alpha = op[g] * vis;
                            if (alpha > ALPHA_MAX) alpha = ALPHA_MAX;
                            if (alpha < ALPHA_MIN) continue;
                            double keep = 1.0 - alpha, tr = T[q] / keep, w = alpha * tr;
                            const double *dc = &d_out[p * D];
                            /* d pixel / d alpha: this Gaussian's share, less what it hides behind it */
                            double d_alpha_j = d_alpha[p] * t_final[p] / keep;
                            for (int32_t d = 0; d < D; d++) {
                                gs[6 + d] += w * dc[d];
                                d_alpha_j += dc[d] * (tr * f[d] - behind[q * D + d] / keep);
                                behind[q * D + d] += w * f[d];
                            }
                            T[q] = tr;
                            if (op[g] * vis > ALPHA_MAX) continue; /* clamped: no gradient */
                            double d_sigma = -alpha * d_alpha_j;
                            gs[0] += (a[g] * dx + b[g] * dy) * d_sigma;
                            gs[1] += (c[g] * dy + b[g] * dx) * d_sigma;
                            gs[2] += 0.5 * dx * dx * d_sigma;
                            gs[3] += dx * dy * d_sigma;
                            gs[4] += 0.5 * dy * dy * d_sigma;
                            gs[5] += vis * d_alpha_j;
                        }
                    for (int64_t k = 0; k < K; k++) slots[s * K + k] = gs[k];
                }
            }
        }
        free(T); free(behind); free(gs);
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

/* ------------------------------------------------------------------------------------------------
 * Projection, as train/raster.py's _project (gsplat's classic pinhole EWA projection), one camera.
 * view [16] row-major world-to-camera, K [9] row-major intrinsics. Radius 0 marks a Gaussian that
 * is not drawn (outside [near, far] in depth, a degenerate covariance, or off the image).
 */
typedef struct {
    double R[9], t[3], fx, fy, cx, cy, lim_x, lim_y;
} cam_t;

static cam_t camera(const double *view, const double *K, int32_t W, int32_t H) {
    cam_t c;
    for (int i = 0; i < 3; i++) {
        for (int j = 0; j < 3; j++) c.R[i * 3 + j] = view[i * 4 + j];
        c.t[i] = view[i * 4 + 3];
    }
    c.fx = K[0]; c.fy = K[4]; c.cx = K[2]; c.cy = K[5];
    c.lim_x = 0.3 * 0.5 * W / c.fx;
    c.lim_y = 0.3 * 0.5 * H / c.fy;
    return c;
}

/* Everything the forward computes for one Gaussian that the backward needs again. */
typedef struct {
    double p[3], z, q[4], qnorm, Rg[9], M[9], J[6], A[6], cov[3], det, tx, ty;
    int ok, clamp_x, clamp_y;
} proj_t;

static void project_one(const cam_t *c, const double *m, const double *quat, const double *s, double eps2d,
                        double near, double far, int32_t W, int32_t H, proj_t *o) {
    for (int i = 0; i < 3; i++)
        o->p[i] = c->R[i * 3] * m[0] + c->R[i * 3 + 1] * m[1] + c->R[i * 3 + 2] * m[2] + c->t[i];
    o->ok = o->p[2] >= near && o->p[2] <= far;
    o->z = o->ok ? o->p[2] : 1.0;
    double z = o->z;
    double ux = o->p[0] / z, uy = o->p[1] / z;
    double lo_x = -c->cx / c->fx - c->lim_x, hi_x = (W - c->cx) / c->fx + c->lim_x;
    double lo_y = -c->cy / c->fy - c->lim_y, hi_y = (H - c->cy) / c->fy + c->lim_y;
    o->clamp_x = ux < lo_x || ux > hi_x;
    o->clamp_y = uy < lo_y || uy > hi_y;
    o->tx = ux < lo_x ? lo_x : (ux > hi_x ? hi_x : ux);
    o->ty = uy < lo_y ? lo_y : (uy > hi_y ? hi_y : uy);
    o->J[0] = c->fx / z; o->J[1] = 0.0; o->J[2] = -c->fx * o->tx / z;
    o->J[3] = 0.0; o->J[4] = c->fy / z; o->J[5] = -c->fy * o->ty / z;
    o->qnorm = sqrt(quat[0] * quat[0] + quat[1] * quat[1] + quat[2] * quat[2] + quat[3] * quat[3]);
    double nrm = o->qnorm > 1e-12 ? o->qnorm : 1e-12; /* as F.normalize's eps */
    for (int i = 0; i < 4; i++) o->q[i] = quat[i] / nrm;
    double w = o->q[0], x = o->q[1], y = o->q[2], zq = o->q[3];
    double *Rg = o->Rg;
    Rg[0] = 1 - 2 * (y * y + zq * zq); Rg[1] = 2 * (x * y - w * zq); Rg[2] = 2 * (x * zq + w * y);
    Rg[3] = 2 * (x * y + w * zq); Rg[4] = 1 - 2 * (x * x + zq * zq); Rg[5] = 2 * (y * zq - w * x);
    Rg[6] = 2 * (x * zq - w * y); Rg[7] = 2 * (y * zq + w * x); Rg[8] = 1 - 2 * (x * x + y * y);
    /* M = R_view (R_gauss S) */
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++)
            o->M[i * 3 + j] = (c->R[i * 3] * Rg[j] + c->R[i * 3 + 1] * Rg[3 + j] + c->R[i * 3 + 2] * Rg[6 + j]) * s[j];
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 3; j++)
            o->A[i * 3 + j] = o->J[i * 3] * o->M[j] + o->J[i * 3 + 1] * o->M[3 + j] + o->J[i * 3 + 2] * o->M[6 + j];
    o->cov[0] = o->A[0] * o->A[0] + o->A[1] * o->A[1] + o->A[2] * o->A[2] + eps2d;
    o->cov[1] = o->A[0] * o->A[3] + o->A[1] * o->A[4] + o->A[2] * o->A[5];
    o->cov[2] = o->A[3] * o->A[3] + o->A[4] * o->A[4] + o->A[5] * o->A[5] + eps2d;
    o->det = o->cov[0] * o->cov[2] - o->cov[1] * o->cov[1];
}

void ts_project(int32_t n, const double *means, const double *quats, const double *scales, const double *view,
                const double *K, int32_t W, int32_t H, double eps2d, double near, double far, double *means2d,
                double *depths, double *conics, int32_t *radii, int32_t threads) {
    cam_t c = camera(view, K, W, H);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int32_t g = 0; g < n; g++) {
        proj_t o;
        project_one(&c, &means[g * 3], &quats[g * 4], &scales[g * 3], eps2d, near, far, W, H, &o);
        double mx = c.fx * o.p[0] / o.z + c.cx, my = c.fy * o.p[1] / o.z + c.cy;
        means2d[g * 2] = mx; means2d[g * 2 + 1] = my;
        depths[g] = o.p[2];
        conics[g * 3] = o.cov[2] / o.det; conics[g * 3 + 1] = -o.cov[1] / o.det; conics[g * 3 + 2] = o.cov[0] / o.det;
        double mid = 0.5 * (o.cov[0] + o.cov[2]), disc = mid * mid - o.det;
        double radius = ceil(3.0 * sqrt(mid + sqrt(disc > 0.01 ? disc : 0.01)));
        int on_image = mx + radius > 0 && mx - radius < W && my + radius > 0 && my - radius < H;
        radii[g] = (o.ok && o.det > 0 && on_image) ? (int32_t)radius : 0;
    }
}

void ts_project_backward(int32_t n, const double *means, const double *quats, const double *scales,
                         const double *view, const double *K, int32_t W, int32_t H, double eps2d, double near,
                         double far, const double *g_means2d, const double *g_depths, const double *g_conics,
                         double *g_means, double *g_quats, double *g_scales, int32_t threads) {
    cam_t c = camera(view, K, W, H);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int32_t g = 0; g < n; g++) {
        proj_t o;
        const double *s = &scales[g * 3];
        project_one(&c, &means[g * 3], &quats[g * 4], s, eps2d, near, far, W, H, &o);
        double a = o.cov[0], b = o.cov[1], cc = o.cov[2], D = o.det, D2 = D * D;
        const double *gc = &g_conics[g * 3];
        /* conic = (c, -b, a) / D */
        double ga = (gc[0] * -cc * cc + gc[1] * b * cc + gc[2] * -b * b) / D2;
        double gb = (gc[0] * 2 * b * cc + gc[2] * 2 * a * b) / D2 + gc[1] * (-1.0 / D - 2 * b * b / D2);
        double gcc = (gc[0] * -b * b + gc[1] * a * b + gc[2] * -a * a) / D2;
        double gA[6];
        for (int k = 0; k < 3; k++) {
            gA[k] = 2 * o.A[k] * ga + o.A[3 + k] * gb;
            gA[3 + k] = 2 * o.A[3 + k] * gcc + o.A[k] * gb;
        }
        /* A = J M: dJ = dA M^T, dM = J^T dA */
        double gJ[6], gM[9];
        for (int i = 0; i < 2; i++)
            for (int k = 0; k < 3; k++)
                gJ[i * 3 + k] = gA[i * 3] * o.M[k * 3] + gA[i * 3 + 1] * o.M[k * 3 + 1] + gA[i * 3 + 2] * o.M[k * 3 + 2];
        for (int k = 0; k < 3; k++)
            for (int j = 0; j < 3; j++) gM[k * 3 + j] = o.J[k] * gA[j] + o.J[3 + k] * gA[3 + j];
        /* M[i][j] = sum_k R[i][k] Rg[k][j] s[j] */
        double gRg[9], *gs = &g_scales[g * 3];
        gs[0] = gs[1] = gs[2] = 0.0;
        for (int k = 0; k < 3; k++)
            for (int j = 0; j < 3; j++) {
                double rs = c.R[k] * gM[j] + c.R[3 + k] * gM[3 + j] + c.R[6 + k] * gM[6 + j]; /* (R^T gM)[k][j] */
                gRg[k * 3 + j] = rs * s[j];
                gs[j] += rs * o.Rg[k * 3 + j];
            }
        double w = o.q[0], x = o.q[1], y = o.q[2], zq = o.q[3], *r = gRg;
        double gq[4] = {
            2 * (-zq * r[1] + y * r[2] + zq * r[3] - x * r[5] - y * r[6] + x * r[7]),
            2 * (y * r[1] + zq * r[2] + y * r[3] - 2 * x * r[4] - w * r[5] + zq * r[6] + w * r[7] - 2 * x * r[8]),
            2 * (-2 * y * r[0] + x * r[1] + w * r[2] + x * r[3] + zq * r[5] - w * r[6] + zq * r[7] - 2 * y * r[8]),
            2 * (-2 * zq * r[0] - w * r[1] + x * r[2] + w * r[3] - 2 * zq * r[4] + y * r[5] + x * r[6] + y * r[7]),
        };
        double *gquat = &g_quats[g * 4];
        if (o.qnorm > 1e-12) {
            double dot = o.q[0] * gq[0] + o.q[1] * gq[1] + o.q[2] * gq[2] + o.q[3] * gq[3];
            for (int i = 0; i < 4; i++) gquat[i] = (gq[i] - o.q[i] * dot) / o.qnorm;
        } else {
            for (int i = 0; i < 4; i++) gquat[i] = gq[i] / 1e-12;
        }
        /* camera-space point: means2d, the Jacobian (through z and the clamped tx, ty) and the depth */
        double z = o.z, gp[3] = {0.0, 0.0, g_depths[g]}, gz = 0.0;
        const double *gm2 = &g_means2d[g * 2];
        gp[0] += gm2[0] * c.fx / z;
        gp[1] += gm2[1] * c.fy / z;
        gz += -gm2[0] * c.fx * o.p[0] / (z * z) - gm2[1] * c.fy * o.p[1] / (z * z);
        gz += -gJ[0] * c.fx / (z * z) + gJ[2] * c.fx * o.tx / (z * z) - gJ[4] * c.fy / (z * z) +
              gJ[5] * c.fy * o.ty / (z * z);
        double gtx = -gJ[2] * c.fx / z, gty = -gJ[5] * c.fy / z;
        if (!o.clamp_x) { gp[0] += gtx / z; gz -= gtx * o.p[0] / (z * z); }
        if (!o.clamp_y) { gp[1] += gty / z; gz -= gty * o.p[1] / (z * z); }
        if (o.ok) gp[2] += gz; /* elsewhere z was replaced by 1 */
        double *gm = &g_means[g * 3];
        for (int j = 0; j < 3; j++) gm[j] = c.R[j] * gp[0] + c.R[3 + j] * gp[1] + c.R[6 + j] * gp[2];
    }
}
