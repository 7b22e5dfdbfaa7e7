/* Fused fp32 attention for x86 CPUs with AVX2 and FMA: out = softmax(q k^T * scale) v, per head.

   Why: on a CPU whose widest vectors are AVX2 (torch's CPU capability "AVX2", e.g. AMD Zen 2),
   torch's fp32 scaled_dot_product_attention runs Stable Diffusion's attention at 56-110 GFLOP/s on
   2 cores of a Zen 2, where the UNet's 3x3 convolutions reach 171. At SD's head dims (40-160) each
   score carries little arithmetic, so the three steps must not leave the core's caches between them.

   Algorithm, per (batch, head) and block of ROWS = 6 query rows (the fp32 twin of
   cpu_attention.c, with FMA on 8 fp32 lanes instead of VDPBF16PS; each file stands alone):
     1. S = q k^T           ROWS x Nk: tiles of 6 rows x 16 keys, 12 accumulators (of the 16 ymm
                            registers), keys in the lanes (k packed once per head); the rows'
                            maxima kept on the way
     2. P = exp((S - max_row) * scale), l = sum_row P    (exact softmax: the whole row is in the
                            buffer, no online rescaling), P over S in place; computed as
                            2^(S' - max_row') with S' = (q * scale * log2 e) k^T (the block's q rows
                            are copied anyway: the scale rides along), which saves a multiply per
                            score and the exponential's change of base
     3. out = (P v) / l     tiles of 6 rows x 16 columns (a last pass of 8 where D is not a multiple
                            of 16), columns in the lanes (v packed once per head, pass by pass)
   Memory traffic: q, k, v read once (k and v once more to pack them, into buffers of their own
   size), out written once; S (6 rows: 24 bytes per key, 24 KiB at 1024 keys) stays in L1/L2, its
   rows one cache line longer than the keys (4 KiB apart they would share L1 sets).
   Every sum is fp32, as in torch's fp32 attention; only the summation order differs (max abs error
   against float64 attention within 3x SDPA's, both ~1e-6 relative: tests/test_kernel_cpu_attention_fp32.py).
   Zen 2, 2 threads (benchmarks/bench_attention_cpu.py): SD 1's 32x32 self-attention 1.29-1.33x SDPA
   (85-92 -> 109-122 GFLOP/s), the other SD shapes 1.0x-1.6x; 2^x on scores in log2 units took
   another 1.0x-1.14x (SD 1 self-attention 32x32: 131 -> 145 GFLOP/s).

   Layout: q, k, v, out are (B, N, H * D) fp32 with unit stride along D and head h at offset h * D
   (what a linear projection gives); `*_sb` and `*_sn` are the batch and token strides in elements.
   Threads: OpenMP, static schedule over the heads (packing) and the work items (b, h, row block);
   loaded after torch, the library shares torch's OpenMP runtime and threads (cpu_attention.c says
   why that matters). Every output element is computed by one thread in one fixed order, so the
   result does not depend on the thread count. Returns 0, -1 when a buffer cannot be allocated, -2 for
   impossible sizes.

   Without AVX2 and FMA (or with -DPORTABLE_ONLY) the same steps compile as plain C: correct, slow. */

#include <stdlib.h>
#include <string.h>

#define ROWS 6       /* query rows per tile */
#define LANES 8      /* fp32 lanes of a ymm register */
#define TILE 16      /* keys per tile of step 1, columns per pass of step 3: two vectors */
/* rows of S one cache line more than the keys: at 1024 keys, rows 4 KiB apart would share L1 sets */
#define S_STRIDE(keys_pad) ((long)(keys_pad) + TILE)

typedef struct {
    const float *q, *k, *v;
    float *out;
    long q_sb, q_sn, k_sb, k_sn, v_sb, v_sn, o_sb, o_sn;
    int B, H, Nq, Nk, D;
    int keys_pad;    /* Nk rounded up to TILE */
    int cols_pad;    /* D rounded up to LANES */
    float scale;
    float *k_packed; /* [B*H][keys_pad / 8][D][8]: eight keys in the lanes */
    float *v_packed; /* [B*H][cols_pad / 16 passes][keys_pad][16 (last pass: 8 or 16)], zero padded */
} Job;

static void *alloc64(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

/* Pack k and v of head bh into the layouts of steps 1 and 3 (zero padding). */
static void pack_head(const Job *job, long bh) {
    int b = (int)(bh / job->H), h = (int)(bh % job->H), D = job->D, cols = job->cols_pad;
    const float *k = job->k + b * job->k_sb + (long)h * D, *v = job->v + b * job->v_sb + (long)h * D;
    float *kp = job->k_packed + bh * (long)job->keys_pad * D;
    float *vp = job->v_packed + bh * (long)job->keys_pad * cols;
    for (int n = 0; n < job->keys_pad; n++) {     /* k: key n goes to every LANES-th float of its block */
        float *block = kp + (long)(n / LANES) * D * LANES + n % LANES;
        const float *key = k + n * job->k_sn;
        for (int d = 0; d < D; d++) block[d * LANES] = n < job->Nk ? key[d] : 0.0f;
    }
    for (int c0 = 0; c0 < cols; c0 += TILE) {     /* v: column pass c0 / TILE, [keys_pad][width] */
        int width = cols - c0 < TILE ? cols - c0 : TILE, valid = D - c0 < width ? D - c0 : width;
        float *part = vp + (long)job->keys_pad * c0;
        for (int n = 0; n < job->keys_pad; n++) {
            const float *value = v + n * job->v_sn + c0;
            for (int c = 0; c < width; c++) part[(long)n * width + c] = (n < job->Nk && c < valid) ? value[c] : 0.0f;
        }
    }
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(PORTABLE_ONLY)
/* ------------------------------------------------------------ AVX2 + FMA: the fast path */
#include <immintrin.h>
#define KERNEL_PATH "avx2_fma"
#define ROW_MAX_T __m256  /* step 1 keeps each row's maximum, vector-wide */

#include "cpu_exp_avx2.h"  /* exp2_nonpositive */

/* step 1: S = q k^T, tiles of 6 rows x 16 keys; Q is the block's rows, D apart; the rows' maxima
   over the first `keys` keys (the real ones) into row_max, vector-wide (reduced in step 2) */
static void scores(float *S, long stride, ROW_MAX_T row_max[ROWS], const float *Q, const float *kp, int D, int keys_pad,
                   int keys) {
    for (int r = 0; r < ROWS; r++) row_max[r] = _mm256_set1_ps(-1e30f);
    for (int j = 0; j < keys_pad; j += TILE) {
        __m256 acc[ROWS][2];
        for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        const float *k0 = kp + (long)(j / LANES) * D * LANES, *k1 = k0 + (long)D * LANES;
        for (int d = 0; d < D; d++) {
            __m256 a = _mm256_load_ps(k0 + d * LANES), c = _mm256_load_ps(k1 + d * LANES);
            for (int r = 0; r < ROWS; r++) {
                __m256 qr = _mm256_broadcast_ss(Q + r * D + d);
                acc[r][0] = _mm256_fmadd_ps(qr, a, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(qr, c, acc[r][1]);
            }
        }
        for (int r = 0; r < ROWS; r++) {
            _mm256_store_ps(S + r * stride + j, acc[r][0]);
            _mm256_store_ps(S + r * stride + j + LANES, acc[r][1]);
        }
        if (j + TILE <= keys)
            for (int r = 0; r < ROWS; r++) row_max[r] = _mm256_max_ps(row_max[r], _mm256_max_ps(acc[r][0], acc[r][1]));
        else   /* the tile with padded keys: their scores (0) must not count */
            for (int r = 0; r < ROWS; r++)
                for (int n = j; n < keys; n++) row_max[r] = _mm256_max_ps(row_max[r], _mm256_set1_ps(S[r * stride + n]));
    }
}

static inline float horizontal(__m256 x, int take_max) {
    __m128 v = take_max ? _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1))
                        : _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    __m128 w = _mm_movehl_ps(v, v);
    v = take_max ? _mm_max_ps(v, w) : _mm_add_ps(v, w);
    w = _mm_shuffle_ps(v, v, 1);
    v = take_max ? _mm_max_ss(v, w) : _mm_add_ss(v, w);
    return _mm_cvtss_f32(v);
}

/* step 2: one row's softmax numerators over its scores (in log2 units), in place (padded keys hold
   -1e30); returns 1 / their sum */
static float softmax_row(float *s, ROW_MAX_T maxima, int keys_pad) {
    __m256 row_max = _mm256_set1_ps(horizontal(maxima, 1));
    __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
    for (int n = 0; n < keys_pad; n += TILE) {
        __m256 e0 = exp2_nonpositive(_mm256_sub_ps(_mm256_load_ps(s + n), row_max));
        __m256 e1 = exp2_nonpositive(_mm256_sub_ps(_mm256_load_ps(s + n + LANES), row_max));
        sum0 = _mm256_add_ps(sum0, e0);
        sum1 = _mm256_add_ps(sum1, e1);
        _mm256_store_ps(s + n, e0);
        _mm256_store_ps(s + n + LANES, e1);
    }
    return 1.0f / horizontal(_mm256_add_ps(sum0, sum1), 0);
}

/* step 3: out = P v / l, in passes of 16 columns (two vectors; a last pass of 8 where D is not a
   multiple of 16). The accumulators are declared inside each pass: declared once for the whole
   function, GCC 12 kept them in memory, one store per FMA (half the speed). */
static void weighted_values(float *out, long o_sn, int rows, const float *P, long stride, const float *vp,
                            const float *inv_sum, int keys_pad, int cols_pad, int D) {
    for (int c0 = 0; c0 < cols_pad; c0 += TILE) {
        const float *part = vp + (long)keys_pad * c0;   /* this pass's columns, [keys_pad][width] */
        int width = cols_pad - c0 < TILE ? cols_pad - c0 : TILE;
        float tile[ROWS][TILE] __attribute__((aligned(32)));
        if (width == TILE) {
            __m256 acc[ROWS][2];
            for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
            for (int n = 0; n < keys_pad; n++) {
                __m256 v0 = _mm256_load_ps(part + n * TILE), v1 = _mm256_load_ps(part + n * TILE + LANES);
                for (int r = 0; r < ROWS; r++) {
                    __m256 pr = _mm256_broadcast_ss(P + r * stride + n);
                    acc[r][0] = _mm256_fmadd_ps(pr, v0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(pr, v1, acc[r][1]);
                }
            }
            for (int r = 0; r < ROWS; r++) {
                _mm256_store_ps(tile[r], acc[r][0]);
                _mm256_store_ps(tile[r] + LANES, acc[r][1]);
            }
        } else {
            __m256 acc[ROWS];
            for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
            for (int n = 0; n < keys_pad; n++) {
                __m256 v0 = _mm256_load_ps(part + n * LANES);
                for (int r = 0; r < ROWS; r++) acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(P + r * stride + n), v0, acc[r]);
            }
            for (int r = 0; r < ROWS; r++) _mm256_store_ps(tile[r], acc[r]);
        }
        int valid = D - c0 < width ? D - c0 : width;
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < valid; c++) out[(long)r * o_sn + c0 + c] = tile[r][c] * inv_sum[r];
    }
}

#else
/* ------------------------------------------------------------ portable C: the same arithmetic, one product at a time
   (any CPU; used by the tests where the fast path cannot run, never chosen for speed) */
#include <math.h>
#define KERNEL_PATH "portable"

#define ROW_MAX_T float   /* the portable path keeps no maxima from step 1: step 2 finds them */

static void scores(float *S, long stride, ROW_MAX_T row_max[ROWS], const float *Q, const float *kp, int D,
                   int keys_pad, int keys) {
    (void)row_max; (void)keys;
    for (int r = 0; r < ROWS; r++)
        for (int n = 0; n < keys_pad; n++) {
            float s = 0.0f;
            for (int d = 0; d < D; d++) s += Q[r * D + d] * kp[((long)(n / LANES) * D + d) * LANES + n % LANES];
            S[r * stride + n] = s;
        }
}

static float softmax_row(float *s, ROW_MAX_T maxima, int keys_pad) {
    (void)maxima;
    float row_max = -1e30f, sum = 0.0f;
    for (int n = 0; n < keys_pad; n++) row_max = s[n] > row_max ? s[n] : row_max;
    for (int n = 0; n < keys_pad; n++) {
        float x = s[n] - row_max;
        s[n] = exp2f(x < -126.0f ? -126.0f : x);
        sum += s[n];
    }
    return 1.0f / sum;
}

static void weighted_values(float *out, long o_sn, int rows, const float *P, long stride, const float *vp,
                            const float *inv_sum, int keys_pad, int cols_pad, int D) {
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < D; c++) {
            int c0 = c / TILE * TILE, width = cols_pad - c0 < TILE ? cols_pad - c0 : TILE;
            float acc = 0.0f;
            for (int n = 0; n < keys_pad; n++) acc += P[r * stride + n] * vp[(long)keys_pad * c0 + (long)n * width + c - c0];
            out[(long)r * o_sn + c] = acc * inv_sum[r];
        }
}
#endif

/* One work item (b, h, block of ROWS query rows): steps 1-3 with this thread's buffers S and Q. */
static void attend_block(const Job *job, long item, float *S, float *Q) {
    const int blocks = (job->Nq + ROWS - 1) / ROWS, keys_pad = job->keys_pad, D = job->D;
    const long stride = S_STRIDE(keys_pad);
    long bh = item / blocks;
    int row0 = (int)(item % blocks) * ROWS, b = (int)(bh / job->H), h = (int)(bh % job->H);
    int rows = job->Nq - row0 < ROWS ? job->Nq - row0 : ROWS;
    const float *q = job->q + b * job->q_sb + (long)row0 * job->q_sn + (long)h * D;
    float *out = job->out + b * job->o_sb + (long)row0 * job->o_sn + (long)h * D;
    const float *kp = job->k_packed + bh * (long)keys_pad * D;
    const float *vp = job->v_packed + bh * (long)keys_pad * job->cols_pad;
    const float q_scale = job->scale * 1.44269504088896341f;   /* scale * log2 e: step 2 takes 2^x */
    for (int r = 0; r < ROWS; r++)             /* the block's q rows, scaled; zero rows past the last */
        for (int d = 0; d < D; d++)
            Q[r * D + d] = r < rows ? q[r * job->q_sn + d] * q_scale : 0.0f;
    ROW_MAX_T row_max[ROWS];
    scores(S, stride, row_max, Q, kp, D, keys_pad, job->Nk);
    float inv_sum[ROWS];
    for (int r = 0; r < ROWS; r++) {
        float *s = S + r * stride;
        for (int n = job->Nk; n < keys_pad; n++) s[n] = -1e30f;   /* padded keys weigh (next to) nothing */
        inv_sum[r] = softmax_row(s, row_max[r], keys_pad);
    }
    weighted_values(out, job->o_sn, rows, S, stride, vp, inv_sum, keys_pad, job->cols_pad, D);
}

/* Which path this build has: "avx2_fma" or "portable". */
const char *kernel_path(void) { return KERNEL_PATH; }

int attention_fp32(const float *q, const float *k, const float *v, float *out,
                   long q_sb, long q_sn, long k_sb, long k_sn, long v_sb, long v_sn, long o_sb, long o_sn,
                   int B, int H, int Nq, int Nk, int D, float scale, int threads) {
    if (B < 0 || H < 1 || Nq < 0 || Nk < 1 || D < 1) return -2;   /* the wrapper refuses these first */
    Job job = {q, k, v, out, q_sb, q_sn, k_sb, k_sn, v_sb, v_sn, o_sb, o_sn, B, H, Nq, Nk, D,
               (Nk + TILE - 1) / TILE * TILE, (D + LANES - 1) / LANES * LANES, scale, NULL, NULL};
    const long heads = (long)B * H, items = heads * ((Nq + ROWS - 1) / ROWS);
    int status = 0;
    job.k_packed = alloc64(sizeof(float) * heads * job.keys_pad * D);
    job.v_packed = alloc64(sizeof(float) * heads * job.keys_pad * job.cols_pad);
    if (!job.k_packed || !job.v_packed) {
        free(job.k_packed);
        free(job.v_packed);
        return -1;
    }
    #pragma omp parallel num_threads(threads < 1 ? 1 : threads)
    {
        #pragma omp for schedule(static)
        for (long bh = 0; bh < heads; bh++) pack_head(&job, bh);
        float *S = alloc64(sizeof(float) * ROWS * S_STRIDE(job.keys_pad));   /* this thread's buffers */
        float *Q = alloc64(sizeof(float) * ROWS * D);
        int ok = S && Q;
        if (!ok) {
            #pragma omp atomic write
            status = -1;
        }
        #pragma omp for schedule(static)
        for (long item = 0; item < items; item++)
            if (ok) attend_block(&job, item, S, Q);
        free(S); free(Q);
    }
    free(job.k_packed);
    free(job.v_packed);
    return status;
}
