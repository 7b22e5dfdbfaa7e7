/* Fused bf16 attention for x86 CPUs with AVX512-BF16: out = softmax(q k^T * scale) v, per head.

   Why: at Stable Diffusion's head dims (40, 64, 80, 160) torch's CPU scaled_dot_product_attention
   reaches 14-25 % of a native-bf16 machine's peak, while the UNet's convolutions and linear
   layers reach 85-90 %; its pieces done apart (bmm, softmax, bmm) are each as slow as the whole.
   This kernel does the two products with VDPBF16PS (32 bf16 products summed into 16 fp32 lanes
   per instruction) in register tiles, and the softmax in between on a row block held in L1/L2.

   Algorithm, per (batch, head) and block of ROWS = 8 query rows:
     1. S = q k^T           ROWS x Nk in fp32: tiles of 8 rows x 32 keys, 16 accumulators, keys in
                            the lanes, head-dim pairs in the VNNI pairs (k packed once per head)
     2. P = exp((S - max_row) * scale), l = sum_row P    (exact softmax: the whole row is in the
                            buffer, no online rescaling; exp as 2^x, one FMA per score to its
                            argument), P rounded to bf16 in key pairs
     3. out = (P v) / l     tiles of 8 rows x 48 columns, 24 accumulators, columns in the lanes,
                            key pairs in the VNNI pairs (v packed once per head); at head dim 40
                            the third vector is 256 bits wide (8 columns, no padding multiplied)
   Memory traffic: q, k, v read once (k and v once more to pack them, into buffers of their own
   size), out written once; S and P (8 rows: 48 bytes per key) stay in the core's caches.
   Accumulation is fp32 throughout; the result is rounded to bf16 once, like torch's.

   Layout: q, k, v, out are (B, N, H * D) bf16 with unit stride along D and head h at offset h * D
   (what a linear projection gives); `*_sb` and `*_sn` are the batch and token strides in elements.
   Threads: OpenMP, static schedule over the heads (packing) and the work items (b, h, row block).
   Built with -fopenmp after torch is loaded, the library shares torch's OpenMP runtime (libgomp.so.1),
   so its threads are the ones torch's own ops just used, not new ones competing with them for the
   cores. Every output element is computed by one thread in one fixed order, so the result does not
   depend on the thread count. Returns 0, -1 when a buffer cannot be allocated, -2 for impossible sizes.

   Without AVX512-BF16 (or with -DPORTABLE_ONLY) the same steps compile as plain C: correct, slow. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 8       /* query rows per tile */
#define KEYS 32      /* keys per tile of step 1: two vectors of 16 lanes */
#define COLS 48      /* output columns per pass of step 3: three vectors of 16 lanes */

typedef uint16_t bf16;

typedef struct {
    const bf16 *q, *k, *v;
    bf16 *out;
    long q_sb, q_sn, k_sb, k_sn, v_sb, v_sn, o_sb, o_sn;
    int B, H, Nq, Nk, D;
    int pairs;       /* ceil(D / 2): head-dim pairs of step 1 */
    int keys_pad;    /* Nk rounded up to KEYS */
    int cols_pad;    /* D rounded up to 16 */
    float scale;
    uint32_t *k_packed;  /* [B*H][keys_pad / 16][pairs][16] pairs of bf16 */
    uint32_t *v_packed;  /* [B*H][keys_pad / 2][cols_pad] pairs of bf16 (two keys) */
} Job;

static inline uint32_t pair(bf16 lo, bf16 hi) { return (uint32_t)lo | ((uint32_t)hi << 16); }

/* aligned_alloc wants a size that is a multiple of the alignment */
static void *alloc64(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

/* One row of D bf16 as ceil(D / 2) pairs (dst[i], stride `step`), the last one zero-padded when D is
   odd. Two adjacent bf16 are one pair as they lie in memory (x86 is little-endian): a 4-byte copy. */
static inline void row_pairs(uint32_t *dst, long step, const bf16 *src, int D) {
    for (int p = 0; p < D / 2; p++) memcpy(dst + p * step, src + 2 * p, sizeof(uint32_t));
    if (D % 2) dst[(D / 2) * step] = pair(src[D - 1], 0);
}

/* Pack k and v of head bh into the VNNI layouts of steps 1 and 3 (zero padding). Branch-free inner
   loops (the compiler vectorises v's): packing took 14 % of SD 1's 32x32 self-attention before. */
static void pack_head(const Job *job, long bh) {
    int b = (int)(bh / job->H), h = (int)(bh % job->H), D = job->D, pairs = job->pairs, cols = job->cols_pad;
    const bf16 *k = job->k + b * job->k_sb + (long)h * D, *v = job->v + b * job->v_sb + (long)h * D;
    uint32_t *kp = job->k_packed + bh * (long)job->keys_pad * pairs;
    uint32_t *vp = job->v_packed + bh * (long)(job->keys_pad / 2) * cols;
    for (int n = 0; n < job->keys_pad; n++) {         /* key n: lane n % 16 of block n / 16, pair by pair */
        uint32_t *dst = kp + (long)(n / 16) * pairs * 16 + n % 16;
        if (n < job->Nk) row_pairs(dst, 16, k + n * job->k_sn, D);
        else for (int p = 0; p < pairs; p++) dst[p * 16] = 0;
    }
    for (int n2 = 0; n2 < job->keys_pad / 2; n2++) {  /* keys 2 n2 and 2 n2 + 1, column by column */
        const bf16 *even = v + 2L * n2 * job->v_sn;
        uint32_t *dst = vp + (long)n2 * cols;
        if (2 * n2 + 1 < job->Nk) {
            const bf16 *odd = even + job->v_sn;
            for (int c = 0; c < D; c++) dst[c] = pair(even[c], odd[c]);
        } else if (2 * n2 < job->Nk) {
            for (int c = 0; c < D; c++) dst[c] = pair(even[c], 0);
        } else {
            for (int c = 0; c < D; c++) dst[c] = 0;
        }
        for (int c = D; c < cols; c++) dst[c] = 0;
    }
}

static inline float bf16_to_float(uint32_t bits16) {
    union { uint32_t u; float f; } x = {bits16 << 16};
    return x.f;
}

static inline bf16 float_to_bf16(float f) {   /* round to nearest even, like VCVTNEPS2BF16 */
    union { float f; uint32_t u; } x = {f};
    return (bf16)((x.u + 0x7FFF + ((x.u >> 16) & 1)) >> 16);
}

#if defined(__AVX512BF16__) && defined(__AVX512VL__) && !defined(PORTABLE_ONLY)
/* ------------------------------------------------------------ AVX512-BF16: the fast path */
#include <immintrin.h>
#define KERNEL_PATH "avx512_bf16"

/* 2^t for t <= 0: 2^n * 2^r with n = round(t), |r| <= 1/2; 2^r by a degree-5 polynomial fitted on
   Chebyshev nodes (relative error 2.2e-7 in fp32 arithmetic). t is clamped at -126 so that no result
   is subnormal (a padded key's 2^-126 meets a zero row of v and adds 1e-38 to a sum of at least 1). */
static inline __m512 exp2_nonpositive(__m512 t) {
    t = _mm512_max_ps(t, _mm512_set1_ps(-126.0f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.32669707e-3f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.67545994e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.55074252e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.40221217e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.93146944e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.00000012f));
    return _mm512_scalef_ps(p, n);
}

/* step 1: S = q k^T, tiles of 8 rows x 32 keys */
static void scores(float *S, const uint32_t *Q, const uint32_t *kp, int pairs, int keys_pad) {
    for (int j = 0; j < keys_pad; j += KEYS) {
        __m512 acc[ROWS][2];
        for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        const uint32_t *k0 = kp + (long)(j / 16) * pairs * 16, *k1 = k0 + pairs * 16;
        for (int p = 0; p < pairs; p++) {
            __m512bh a = (__m512bh)_mm512_load_si512(k0 + p * 16), c = (__m512bh)_mm512_load_si512(k1 + p * 16);
            for (int r = 0; r < ROWS; r++) {
                __m512bh qr = (__m512bh)_mm512_set1_epi32((int)Q[r * pairs + p]);
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qr, a);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qr, c);
            }
        }
        for (int r = 0; r < ROWS; r++) {
            _mm512_store_ps(S + (long)r * keys_pad + j, acc[r][0]);
            _mm512_store_ps(S + (long)r * keys_pad + j + 16, acc[r][1]);
        }
    }
}

/* step 2: one row's softmax numerators as bf16 key pairs; returns 1 / their fp32 sum.
   e^((s - max) * scale) = 2^(s * c - max * c) with c = scale * log2(e): one FMA per score. */
static float softmax_row(const float *s, uint32_t *p, int keys_pad, float scale) {
    __m512 m = _mm512_set1_ps(-1e30f);
    for (int n = 0; n < keys_pad; n += 16) m = _mm512_max_ps(m, _mm512_load_ps(s + n));
    const float c = scale * 1.44269504f;
    __m512 c_row_max = _mm512_set1_ps(c * _mm512_reduce_max_ps(m)), cs = _mm512_set1_ps(c);
    __m512 sum = _mm512_setzero_ps();
    for (int n = 0; n < keys_pad; n += 32) {
        __m512 e0 = exp2_nonpositive(_mm512_fmsub_ps(_mm512_load_ps(s + n), cs, c_row_max));
        __m512 e1 = exp2_nonpositive(_mm512_fmsub_ps(_mm512_load_ps(s + n + 16), cs, c_row_max));
        sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
        _mm512_store_si512(p + n / 2, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));  /* keys n..n+31 in order */
    }
    return 1.0f / _mm512_reduce_add_ps(sum);
}

/* step 3: out = P v / l for the columns [c0, c0 + 16 * vecs), vecs <= 3: 8 rows x 48 columns.
   When the third vector would hold at most 8 real columns (head dim 40: columns 32-39) it is a
   256-bit one (HALF), which multiplies half the zero padding: a sixth less work at SD 1's first level.
   Inlined into the two variants below, so that HALF is a constant there. */
static inline __attribute__((always_inline)) void weighted_values_tile(
        bf16 *out, long o_sn, int rows, const uint32_t *P, const uint32_t *vp, const float *inv_sum,
        int keys_pad, int cols_pad, int c0, int vecs, int D, const int HALF) {
    __m512 acc[ROWS][3];
    __m256 acc_half[ROWS];
    for (int r = 0; r < ROWS; r++) {
        acc[r][0] = acc[r][1] = acc[r][2] = _mm512_setzero_ps();
        acc_half[r] = _mm256_setzero_ps();
    }
    for (int n2 = 0; n2 < keys_pad / 2; n2++) {
        const uint32_t *row = vp + (long)n2 * cols_pad + c0;
        __m512bh v0 = (__m512bh)_mm512_loadu_si512(row), v1 = v0, v2 = v0;
        __m256bh v2_half = (__m256bh)_mm256_setzero_si256();
        if (vecs > 1) v1 = (__m512bh)_mm512_loadu_si512(row + 16);
        if (HALF) v2_half = (__m256bh)_mm256_loadu_si256((const __m256i *)(row + 32));
        else if (vecs > 2) v2 = (__m512bh)_mm512_loadu_si512(row + 32);
        for (int r = 0; r < ROWS; r++) {
            __m512bh pr = (__m512bh)_mm512_set1_epi32((int)P[(long)r * (keys_pad / 2) + n2]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], pr, v0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], pr, v1);   /* unused lanes when vecs < 3: not stored */
            if (HALF)   /* the low 8 lanes of the same broadcast */
                acc_half[r] = _mm256_dpbf16_ps(acc_half[r], (__m256bh)_mm512_castsi512_si256((__m512i)pr), v2_half);
            else acc[r][2] = _mm512_dpbf16_ps(acc[r][2], pr, v2);
        }
    }
    for (int r = 0; r < rows; r++) {
        if (HALF) acc[r][2] = _mm512_castps256_ps512(acc_half[r]);   /* lanes 8-15 undefined: never stored */
        for (int i = 0; i < vecs && c0 + 16 * i < D; i++) {
            int c = c0 + 16 * i;
            __mmask16 keep = D - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - c)) - 1);
            __m256bh o = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][i], _mm512_set1_ps(inv_sum[r])));
            _mm256_mask_storeu_epi16(out + (long)r * o_sn + c, keep, (__m256i)o);
        }
    }
}

static void weighted_values(bf16 *out, long o_sn, int rows, const uint32_t *P, const uint32_t *vp, const float *inv_sum,
                            int keys_pad, int cols_pad, int c0, int vecs, int D) {
    if (vecs == 3 && D - c0 <= 40)
        weighted_values_tile(out, o_sn, rows, P, vp, inv_sum, keys_pad, cols_pad, c0, vecs, D, 1);
    else
        weighted_values_tile(out, o_sn, rows, P, vp, inv_sum, keys_pad, cols_pad, c0, vecs, D, 0);
}

#else
/* ------------------------------------------------------------ portable C: the same arithmetic, one product at a time
   (any CPU; used by the tests where the fast path cannot run, never chosen for speed) */
#include <math.h>
#define KERNEL_PATH "portable"

static void scores(float *S, const uint32_t *Q, const uint32_t *kp, int pairs, int keys_pad) {
    for (int r = 0; r < ROWS; r++)
        for (int n = 0; n < keys_pad; n++) {
            float s = 0.0f;
            for (int p = 0; p < pairs; p++) {
                uint32_t q = Q[r * pairs + p], k = kp[((long)(n / 16) * pairs + p) * 16 + n % 16];
                s += bf16_to_float(q & 0xFFFF) * bf16_to_float(k & 0xFFFF) + bf16_to_float(q >> 16) * bf16_to_float(k >> 16);
            }
            S[(long)r * keys_pad + n] = s;
        }
}

static float softmax_row(const float *s, uint32_t *p, int keys_pad, float scale) {
    float row_max = -1e30f, sum = 0.0f;
    for (int n = 0; n < keys_pad; n++) row_max = s[n] > row_max ? s[n] : row_max;
    for (int n = 0; n < keys_pad; n += 2) {
        float e0 = expf((s[n] - row_max) * scale), e1 = expf((s[n + 1] - row_max) * scale);
        sum += e0 + e1;
        p[n / 2] = pair(float_to_bf16(e0), float_to_bf16(e1));
    }
    return 1.0f / sum;
}

static void weighted_values(bf16 *out, long o_sn, int rows, const uint32_t *P, const uint32_t *vp, const float *inv_sum,
                            int keys_pad, int cols_pad, int c0, int vecs, int D) {
    for (int r = 0; r < rows; r++)
        for (int c = c0; c < c0 + 16 * vecs && c < D; c++) {
            float acc = 0.0f;
            for (int n2 = 0; n2 < keys_pad / 2; n2++) {
                uint32_t pr = P[(long)r * (keys_pad / 2) + n2], v = vp[(long)n2 * cols_pad + c];
                acc += bf16_to_float(pr & 0xFFFF) * bf16_to_float(v & 0xFFFF) + bf16_to_float(pr >> 16) * bf16_to_float(v >> 16);
            }
            out[(long)r * o_sn + c] = float_to_bf16(acc * inv_sum[r]);
        }
}
#endif

/* One work item (b, h, block of ROWS query rows): steps 1-3 with this thread's buffers S, P, Q. */
static void attend_block(const Job *job, long item, float *S, uint32_t *P, uint32_t *Q) {
    const int blocks = (job->Nq + ROWS - 1) / ROWS, pairs = job->pairs, keys_pad = job->keys_pad, D = job->D;
    long bh = item / blocks;
    int row0 = (int)(item % blocks) * ROWS, b = (int)(bh / job->H), h = (int)(bh % job->H);
    int rows = job->Nq - row0 < ROWS ? job->Nq - row0 : ROWS;
    const bf16 *q = job->q + b * job->q_sb + (long)row0 * job->q_sn + (long)h * D;
    bf16 *out = job->out + b * job->o_sb + (long)row0 * job->o_sn + (long)h * D;
    const uint32_t *kp = job->k_packed + bh * (long)keys_pad * pairs;
    const uint32_t *vp = job->v_packed + bh * (long)(keys_pad / 2) * job->cols_pad;
    for (int r = 0; r < ROWS; r++) {           /* the block's q rows as head-dim pairs, zero padded */
        if (r < rows) row_pairs(Q + r * pairs, 1, q + r * job->q_sn, D);
        else memset(Q + r * pairs, 0, sizeof(uint32_t) * pairs);
    }
    scores(S, Q, kp, pairs, keys_pad);
    float inv_sum[ROWS];
    for (int r = 0; r < ROWS; r++) {
        float *s = S + (long)r * keys_pad;
        for (int n = job->Nk; n < keys_pad; n++) s[n] = -1e30f;   /* padded keys weigh nothing */
        inv_sum[r] = softmax_row(s, P + (long)r * (keys_pad / 2), keys_pad, job->scale);
    }
    for (int c0 = 0; c0 < job->cols_pad; c0 += COLS) {
        int vecs = (job->cols_pad - c0) / 16 < 3 ? (job->cols_pad - c0) / 16 : 3;
        weighted_values(out, job->o_sn, rows, P, vp, inv_sum, keys_pad, job->cols_pad, c0, vecs, D);
    }
}

/* Which path this build has: "avx512_bf16" or "portable". */
const char *kernel_path(void) { return KERNEL_PATH; }

int attention_bf16(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *out,
                   long q_sb, long q_sn, long k_sb, long k_sn, long v_sb, long v_sn, long o_sb, long o_sn,
                   int B, int H, int Nq, int Nk, int D, float scale, int threads) {
    if (B < 0 || H < 1 || Nq < 0 || Nk < 1 || D < 1) return -2;   /* the wrapper refuses these first */
    Job job = {q, k, v, out, q_sb, q_sn, k_sb, k_sn, v_sb, v_sn, o_sb, o_sn, B, H, Nq, Nk, D,
               (D + 1) / 2, (Nk + KEYS - 1) / KEYS * KEYS, (D + 15) / 16 * 16, scale, NULL, NULL};
    const long heads = (long)B * H, items = heads * ((Nq + ROWS - 1) / ROWS);
    int status = 0;
    job.k_packed = alloc64(sizeof(uint32_t) * heads * job.keys_pad * job.pairs);
    job.v_packed = alloc64(sizeof(uint32_t) * heads * (job.keys_pad / 2) * job.cols_pad);
    if (!job.k_packed || !job.v_packed) {
        free(job.k_packed);
        free(job.v_packed);
        return -1;
    }
    #pragma omp parallel num_threads(threads < 1 ? 1 : threads)
    {
        #pragma omp for schedule(static)
        for (long bh = 0; bh < heads; bh++) pack_head(&job, bh);
        float *S = alloc64(sizeof(float) * ROWS * job.keys_pad);                  /* this thread's buffers */
        uint32_t *P = alloc64(sizeof(uint32_t) * ROWS * (job.keys_pad / 2));
        uint32_t *Q = alloc64(sizeof(uint32_t) * ROWS * job.pairs);
        int ok = S && P && Q;
        if (!ok) {
            #pragma omp atomic write
            status = -1;
        }
        #pragma omp for schedule(static)
        for (long item = 0; item < items; item++)
            if (ok) attend_block(&job, item, S, P, Q);
        free(S); free(P); free(Q);
    }
    free(job.k_packed);
    free(job.v_packed);
    return status;
}
