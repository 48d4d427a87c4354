/* sai-hf's CPU kernels: the whole SGD-SaI update of a contiguous block in one loop, and the first
 * step's g-SNR sums (at the end of the file). sai_hf/native.py builds this file with the system C
 * compiler, once per process; sai_hf/cpu_update.py and sai_hf/gsnr.py call it through ctypes.
 *
 * For every element, in the block's precision (the scalars arrive rounded to it):
 *
 *     d <- -g if maximize else g                   (a negation: NaN signs flip as with torch's -g)
 *     m <- d                         first         (the block's first update: m_1 = g_1)
 *     m <- mu * m + (1 - mu) * d     otherwise
 *     p <- p * decay + step * m                    (decay = 1 - lr wd, step = -lr s_i)
 *
 * and with momentum 0 (no buffer) p <- p * decay + step * d. Each operation is rounded separately:
 * the file must be compiled without floating-point contraction (-ffp-contract=off) and without
 * -ffast-math, so that a float32 block gets bit for bit the Triton kernel's result.
 *
 * A bfloat16 buffer of a float32 block: m is computed in float32 from the stored value
 * (bfloat16 -> float32 is exact), the parameter is updated with that float32 m, and the buffer
 * stores m stochastically rounded. With b the float32 bits of m, i the element's flat index in
 * its tensor (wrapping mod 2^32) and key the seed's 32-bit key, all arithmetic mod 2^32:
 *
 *     x = (b + i) ^ key;  x = (x ^ (x >> 16)) * M1;  x = (x ^ (x >> 15)) * M2;
 *     stored bits = (b + (x >> 16)) >> 16
 *
 * (sai_hf.functional.stochastic_round_to_bf16 documents why this is unbiased.) Unsigned
 * arithmetic: the wrapping is defined behaviour in C.
 *
 * Threads: an OpenMP loop over the block with the caller's thread count when built with -fopenmp
 * (the library then shares torch's libgomp), one thread otherwise. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MIX_1 0x7FEB352Du
#define MIX_2 0x846CA68Bu
/* Below this many elements one thread does the block: waking the team costs more than it saves. */
#define PARALLEL_MIN 65536

#ifdef _OPENMP
#define PARALLEL_FOR _Pragma("omp parallel for simd num_threads(threads) schedule(static) if(n >= PARALLEL_MIN)")
#else
#define PARALLEL_FOR
#endif

/* The loops are written once and expanded twice, with the gradient read as G(i) = g[i] or -g[i]
 * (maximize): a test inside a loop (even of a constant: OpenMP outlines the loop before constants
 * are propagated) costs ~60% on a 38.6M-entry block. */
#define DEFINE_LOOPS(NAME, T, G)                                                                      \
    static void NAME(T *restrict p, const T *restrict g, T *restrict m, int64_t n, int first, T mu,   \
                     T one_minus_mu, T decay, T step, int threads) {                                  \
        (void)threads;                                                                                \
        if (m == NULL) {                                                                              \
            PARALLEL_FOR                                                                              \
            for (int64_t i = 0; i < n; ++i) p[i] = p[i] * decay + step * G(i);                        \
        } else if (first) {                                                                           \
            PARALLEL_FOR                                                                              \
            for (int64_t i = 0; i < n; ++i) {                                                         \
                T d = G(i);                                                                           \
                m[i] = d;                                                                             \
                p[i] = p[i] * decay + step * d;                                                       \
            }                                                                                         \
        } else {                                                                                      \
            PARALLEL_FOR                                                                              \
            for (int64_t i = 0; i < n; ++i) {                                                         \
                T new_m = mu * m[i] + one_minus_mu * G(i);                                            \
                m[i] = new_m;                                                                         \
                p[i] = p[i] * decay + step * new_m;                                                   \
            }                                                                                         \
        }                                                                                             \
    }

#define GRADIENT(i) (g[i])
#define NEGATED_GRADIENT(i) (-g[i])

#define DEFINE_UPDATE(NAME, T)                                                                        \
    DEFINE_LOOPS(NAME##_descent, T, GRADIENT)                                                         \
    DEFINE_LOOPS(NAME##_ascent, T, NEGATED_GRADIENT)                                                  \
    void NAME(T *restrict p, const T *restrict g, T *restrict m, int64_t n, int first, int maximize,  \
              T mu, T one_minus_mu, T decay, T step, int threads) {                                   \
        (maximize ? NAME##_ascent : NAME##_descent)(p, g, m, n, first, mu, one_minus_mu, decay, step, threads); \
    }

DEFINE_UPDATE(sgd_sai_f32, float)
DEFINE_UPDATE(sgd_sai_f64, double)

static inline uint32_t float_bits(float x) {
    uint32_t b;
    memcpy(&b, &x, sizeof b);
    return b;
}

static inline float bf16_value(uint16_t bits) {
    uint32_t b = (uint32_t)bits << 16;
    float x;
    memcpy(&x, &b, sizeof x);
    return x;
}

static inline uint16_t stochastic_bf16(float x, uint32_t index, uint32_t key) {
    uint32_t b = float_bits(x);
    uint32_t h = (b + index) ^ key;
    h = (h ^ (h >> 16)) * MIX_1;
    h = (h ^ (h >> 15)) * MIX_2;
    return (uint16_t)((b + (h >> 16)) >> 16);
}

#define DEFINE_BF16_LOOPS(NAME, G)                                                                     \
    static void NAME(float *restrict p, const float *restrict g, uint16_t *restrict m, int64_t n, int first, \
                     float mu, float one_minus_mu, float decay, float step, uint32_t key, int threads) {  \
        (void)threads;                                                                                     \
        if (first) {                                                                                       \
            PARALLEL_FOR                                                                                   \
            for (int64_t i = 0; i < n; ++i) {                                                              \
                float d = G(i);                                                                            \
                m[i] = stochastic_bf16(d, (uint32_t)i, key);                                               \
                p[i] = p[i] * decay + step * d;                                                            \
            }                                                                                              \
        } else {                                                                                           \
            PARALLEL_FOR                                                                                   \
            for (int64_t i = 0; i < n; ++i) {                                                              \
                float new_m = mu * bf16_value(m[i]) + one_minus_mu * G(i);                                 \
                m[i] = stochastic_bf16(new_m, (uint32_t)i, key);                                           \
                p[i] = p[i] * decay + step * new_m;                                                        \
            }                                                                                              \
        }                                                                                                  \
    }

DEFINE_BF16_LOOPS(sgd_sai_f32_bf16_descent, GRADIENT)
DEFINE_BF16_LOOPS(sgd_sai_f32_bf16_ascent, NEGATED_GRADIENT)

void sgd_sai_f32_bf16(float *restrict p, const float *restrict g, uint16_t *restrict m, int64_t n, int first,
                      int maximize, float mu, float one_minus_mu, float decay, float step, uint32_t key,
                      int threads) {
    (maximize ? sgd_sai_f32_bf16_ascent : sgd_sai_f32_bf16_descent)(p, g, m, n, first, mu, one_minus_mu, decay, step,
                                                                   key, threads);
}

/* g-SNR statistics of float32 blocks (sai_hf/gsnr.py): for each block b, its sum S and centred sum
 * of squares C, from pieces of `row` entries (the last one shorter). For piece r with m_r entries,
 * in float64, with a shift K_r near the piece's mean:
 *
 *     D1_r = sum_j (g_j - K_r);   D2_r = sum_j (g_j - K_r)^2;   S_r = m_r K_r + D1_r;   C_r = D2_r - D1_r^2 / m_r
 *
 * (exact algebra for any K_r; K_r within a few standard deviations of the mean keeps C_r free of
 * cancellation: see piece_sums), then, with n the block's entry count (Chan et al.: no cancellation either),
 *
 *     S = sum_r S_r;   C = sum_r max(C_r, 0) + sum_r m_r (S_r / m_r - S / n)^2
 *
 * out[2 b] = S, out[2 b + 1] = C. Every sum runs in 32 partial sums (four 8-lane vectors; entry j
 * of a piece into partial j % 32), added in a fixed order at the end: vector registers without
 * reassociating anything, so the result does not depend on the build or the thread count. */
typedef double f64x8 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));

static inline f64x8 widen(const float *x) {
    f32x8 v;
    memcpy(&v, x, sizeof v);
    return __builtin_convertvector(v, f64x8);
}

static inline double lanes_total(f64x8 a, f64x8 b, f64x8 c, f64x8 d) {
    f64x8 v = (a + b) + (c + d);
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

/* D1 = sum_j (x_j - k) and D2 = sum_j (x_j - k)^2 over m entries, in float64. */
static void shifted_sums(const float *restrict x, int64_t m, double k, double *restrict d1, double *restrict d2) {
    f64x8 kv = (f64x8){0} + k, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0}, q0 = {0}, q1 = {0}, q2 = {0}, q3 = {0};
    int64_t whole = m - m % 32, j;
    for (j = 0; j < whole; j += 32) {
        f64x8 c0 = widen(x + j) - kv, c1 = widen(x + j + 8) - kv, c2 = widen(x + j + 16) - kv, c3 = widen(x + j + 24) - kv;
        b0 += c0, b1 += c1, b2 += c2, b3 += c3;
        q0 += c0 * c0, q1 += c1 * c1, q2 += c2 * c2, q3 += c3 * c3;
    }
    double s1 = lanes_total(b0, b1, b2, b3), s2 = lanes_total(q0, q1, q2, q3);
    for (j = whole; j < m; ++j) {
        double c = (double)x[j] - k;
        s1 += c;
        s2 += c * c;
    }
    *d1 = s1, *d2 = s2;
}

/* One pass shifted by the piece's first entry; a second one (from L1), shifted by the mean the
 * first found, where that entry was far from the mean: (mean - x_0)^2 > 2^10 variance would cost
 * more than 2^10 ulps of C to cancellation. */
static void piece_sums(const float *restrict x, int64_t m, double *restrict sum, double *restrict centred) {
    double k = (double)x[0], d1, d2;
    shifted_sums(x, m, k, &d1, &d2);
    double offset = d1 / (double)m, c = d2 - d1 * offset;
    if (offset * offset * (double)m > 1024.0 * c || !(c >= 0.0)) {
        k += offset;
        shifted_sums(x, m, k, &d1, &d2);
        c = d2 - d1 * d1 / (double)m;
    }
    *sum = k * (double)m + d1;
    *centred = c;
}

/* Returns 0, or -1 where the piece buffer could not be allocated. */
int block_statistics_f32(const int64_t *restrict pointers, const int64_t *restrict numels, int64_t blocks,
                         int64_t row, double *restrict out, int threads) {
    (void)threads;
    for (int64_t b = 0; b < blocks; ++b) {
        const float *g = (const float *)(intptr_t)pointers[b];
        int64_t n = numels[b], pieces = (n + row - 1) / row;
        double *piece = malloc(2 * (size_t)(pieces > 0 ? pieces : 1) * sizeof(double));
        if (piece == NULL) return -1;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static) if(n >= PARALLEL_MIN)
#endif
        for (int64_t r = 0; r < pieces; ++r) {
            int64_t start = r * row, m = n - start < row ? n - start : row;
            piece_sums(g + start, m, piece + 2 * r, piece + 2 * r + 1);
        }
        double total = 0.0, centred = 0.0, between = 0.0;
        for (int64_t r = 0; r < pieces; ++r) total += piece[2 * r];
        for (int64_t r = 0; r < pieces; ++r) {
            double m = (double)(n - r * row < row ? n - r * row : row), d = piece[2 * r] / m - total / (double)n;
            centred += piece[2 * r + 1] > 0.0 ? piece[2 * r + 1] : 0.0;
            between += m * d * d;
        }
        free(piece);
        out[2 * b] = total;
        out[2 * b + 1] = centred + between;
    }
    return 0;
}
