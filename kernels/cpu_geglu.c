/* The gated GELU of SD's feed-forward blocks (GEGLU, Shazeer 2020) in fp32 or bf16 on the CPU, in one pass:

       out[m, j] = y[m, j] * gelu(y[m, inner + j]),   gelu(g) = g/2 (1 + erf(g / sqrt 2))

   where y (M, 2 inner) is the output of the block's input projection: its first half the hidden
   values, its second half the gates.

   Why: torch computes F.gelu over the gates into a new tensor, then the product into another:
   y's gates read once, gelu written and read back, y's hidden values read, the product written,
   and its vectorised erf is the cost of the pass. Here each row is read once and the product
   written once: on 2 cores of a Zen 2, 2048 x 1280 (SD 1.5's first level at batch 2) 4.0-4.5 ms
   -> 2.1 ms, 512 x 2560 1.4-1.8 -> 0.8-1.0 ms, 128 x 5120 0.6-0.7 -> 0.4 ms; a 256-px UNet call
   34 ms shorter at batch 2 (1.5 %), 23 ms at batch 1.

   bf16 (geglu_bf16, for CPUs with AVX512-BF16): the same formula in 16 fp32 lanes between a
   widening load and VCVTNEPS2BF16, rounding where torch's bf16 hidden * F.gelu(gate) rounds (gelu
   to bf16, then the product, to nearest even): torch's values but where two erf formulas put a gelu
   on either side of a rounding boundary (none of 2.1e7 values differed from torch's vectorised pass).
   On 2 cores of a Zen 4: 2048 x 1280 1.53 -> 0.95 ms, 512 x 2560 0.71 -> 0.45, 128 x 5120 0.36 ->
   0.24; 13.1 -> 8.2 ms per 256-px UNet call at batch 2 (0.5 %). An eight-lane AVX2 version of it,
   with the conversions done in integer instructions, was slower than torch (0.79x-0.94x): none.

   erf: Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7 for a >= 0:
       erf(a) = 1 - t (A1 + t (A2 + t (A3 + t (A4 + t A5)))) exp(-a^2),   t = 1 / (1 + P a)
   and erf(-a) = -erf(a), the formula of torch's own vectorised erf; t from the CPU's reciprocal
   estimate (12 bits) and one Newton step (about 1e-7 relative). Measured against float64 the
   outputs are as close as torch's fp32 hidden * F.gelu(gate) (about 5e-8 of the largest value).
   exp(-a^2): the softmax's (cpu_exp_avx2.h, about 2e-7 relative); below -87 it stays at e^-87,
   where the term it multiplies no longer changes erf in fp32.

   Layout: y rows of stride y_sm, out rows of stride out_sm, unit stride along a row. Threads:
   OpenMP over blocks of rows; every element is computed by the same vector formula (row tails by
   masked loads and stores), so the result depends neither on the thread count nor on alignment.
   Without AVX2 and FMA for fp32, AVX512-BF16 for bf16 (or with -DPORTABLE_ONLY), a plain C loop with
   the same formula and roundings (`kernel_path`, `kernel_path_bf16` say which). */

#include <math.h>
#include <stdint.h>

#define A1 0.254829592f
#define A2 (-0.284496736f)
#define A3 1.421413741f
#define A4 (-1.453152027f)
#define A5 1.061405429f
#define P 0.3275911f
#define SQRT1_2 0.70710678118654752f
#define ROWS_PER_ITEM 16

/* ------------------------------------------------------------ scalar: the portable paths, one element at a time */

static inline float gelu1(float gate) {
    float z = gate * SQRT1_2, a = fabsf(z);
    float t = 1.0f / (1.0f + P * a);
    float q = (((A5 * t + A4) * t + A3) * t + A2) * t + A1;
    float erf_a = 1.0f - q * t * expf(-a * a);
    return 0.5f * gate * (1.0f + copysignf(erf_a, z));
}

static inline float widen1(uint16_t x) { union { uint32_t u; float f; } v = {(uint32_t)x << 16}; return v.f; }

static inline uint16_t round1(float f) {   /* to nearest even; NaN stays a quiet NaN */
    union { float f; uint32_t u; } v = {f};
    if (f != f) return 0x7FC0;
    return (uint16_t)((v.u + 0x7FFF + ((v.u >> 16) & 1)) >> 16);
}

/* ------------------------------------------------------------ fp32 */
#if defined(__AVX2__) && defined(__FMA__) && !defined(PORTABLE_ONLY)
#include <immintrin.h>
#define KERNEL_PATH "avx2_fma"

#include "cpu_exp_avx2.h"  /* exp_nonpositive */

/* gelu(gate), eight lanes */
static inline __m256 gelu8(__m256 gate) {
    __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 z = _mm256_mul_ps(gate, _mm256_set1_ps(SQRT1_2));
    __m256 a = _mm256_andnot_ps(sign, z);                                   /* |z| */
    __m256 d = _mm256_fmadd_ps(_mm256_set1_ps(P), a, _mm256_set1_ps(1.0f));
    __m256 t = _mm256_rcp_ps(d);                                            /* 1 / d to 12 bits, */
    t = _mm256_mul_ps(t, _mm256_fnmadd_ps(d, t, _mm256_set1_ps(2.0f)));      /* one Newton step: 23 */
    __m256 q = _mm256_fmadd_ps(_mm256_set1_ps(A5), t, _mm256_set1_ps(A4));
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(A3));
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(A2));
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(A1));
    __m256 e = exp_nonpositive(_mm256_xor_ps(sign, _mm256_mul_ps(a, a)));  /* exp(-a^2) */
    __m256 erf_a = _mm256_fnmadd_ps(_mm256_mul_ps(q, t), e, _mm256_set1_ps(1.0f));
    __m256 erf_z = _mm256_or_ps(erf_a, _mm256_and_ps(sign, z));              /* odd: erf's sign is z's */
    __m256 half_gate = _mm256_mul_ps(gate, _mm256_set1_ps(0.5f));
    return _mm256_fmadd_ps(half_gate, erf_z, half_gate);
}

/* hidden * gelu(gate), eight lanes */
static inline __m256 geglu8(__m256 hidden, __m256 gate) { return _mm256_mul_ps(hidden, gelu8(gate)); }

static void geglu_row(const float *y, float *out, long inner) {
    long j = 0;
    for (; j + 8 <= inner; j += 8)
        _mm256_storeu_ps(out + j, geglu8(_mm256_loadu_ps(y + j), _mm256_loadu_ps(y + inner + j)));
    if (j < inner) {  /* the tail: the same formula on masked lanes */
        __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(inner - j)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256 r = geglu8(_mm256_maskload_ps(y + j, mask), _mm256_maskload_ps(y + inner + j, mask));
        _mm256_maskstore_ps(out + j, mask, r);
    }
}

#else
#define KERNEL_PATH "portable"

static void geglu_row(const float *y, float *out, long inner) {
    for (long j = 0; j < inner; j++)
        out[j] = y[j] * gelu1(y[inner + j]);
}
#endif

/* ------------------------------------------------------------ bf16: rounded where torch rounds */
#if defined(__AVX512BF16__) && defined(__AVX512VL__) && !defined(PORTABLE_ONLY)
#include <immintrin.h>
#define BF16_PATH "avx512_bf16"

/* With AVX512-BF16 (CPUs with native bf16, where diffedit runs it): sixteen lanes, the conversions
   in one instruction each (VCVTNEPS2BF16 rounds to nearest even, as round1 does); the same formula
   as gelu8 and gelu1, so the same values (up to the last bit of exp and of the reciprocal). */
static inline __m512 exp_nonpositive16(__m512 x) {   /* exp_nonpositive of cpu_exp_avx2.h, 16 lanes */
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    __m512i two_n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(two_n));
}

static inline __m512 gelu16(__m512 gate) {   /* gelu8, 16 lanes */
    __m512 z = _mm512_mul_ps(gate, _mm512_set1_ps(SQRT1_2));
    __m512 a = _mm512_abs_ps(z);
    __m512 d = _mm512_fmadd_ps(_mm512_set1_ps(P), a, _mm512_set1_ps(1.0f));
    __m512 t = _mm512_rcp14_ps(d);
    t = _mm512_mul_ps(t, _mm512_fnmadd_ps(d, t, _mm512_set1_ps(2.0f)));
    __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(A5), t, _mm512_set1_ps(A4));
    q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(A3));
    q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(A2));
    q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(A1));
    __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)));
    __m512 erf_a = _mm512_fnmadd_ps(_mm512_mul_ps(q, t), e, _mm512_set1_ps(1.0f));
    __m512 erf_z = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(erf_a),
                       _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32((int)0x80000000))));
    __m512 half_gate = _mm512_mul_ps(gate, _mm512_set1_ps(0.5f));
    return _mm512_fmadd_ps(half_gate, erf_z, half_gate);
}

static inline __m512 widen16(__m256i x) {   /* sixteen bf16 -> fp32 (a bf16 is the high half of an fp32) */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}

static void geglu_row_bf16(const uint16_t *y, uint16_t *out, long inner) {
    for (long j = 0; j < inner; j += 16) {   /* the tail on masked lanes */
        __mmask16 lanes = inner - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (inner - j)) - 1);
        __m512 hidden = widen16(_mm256_maskz_loadu_epi16(lanes, y + j));
        __m512 gate = widen16(_mm256_maskz_loadu_epi16(lanes, y + inner + j));
        __m512 gelu = widen16((__m256i)_mm512_cvtneps_pbh(gelu16(gate)));
        _mm256_mask_storeu_epi16(out + j, lanes, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(hidden, gelu)));
    }
}
#else
#define BF16_PATH "portable"

static void geglu_row_bf16(const uint16_t *y, uint16_t *out, long inner) {
    for (long j = 0; j < inner; j++)
        out[j] = round1(widen1(y[j]) * widen1(round1(gelu1(widen1(y[inner + j])))));
}
#endif

/* Which paths this build has: fp32 "avx2_fma" or "portable", bf16 "avx512_bf16" or "portable". */
const char *kernel_path(void) { return KERNEL_PATH; }
const char *kernel_path_bf16(void) { return BF16_PATH; }

/* rows of y (stride y_sm) -> rows of out (stride out_sm), in blocks of ROWS_PER_ITEM rows over the threads */
#define FOR_ROW_BLOCKS(ROW_CALL)                                                                \
    long items = (rows + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM;                                    \
    _Pragma("omp parallel for schedule(static) num_threads(threads < 1 ? 1 : threads)")        \
    for (long item = 0; item < items; item++) {                                                 \
        long end = (item + 1) * ROWS_PER_ITEM < rows ? (item + 1) * ROWS_PER_ITEM : rows;       \
        for (long m = item * ROWS_PER_ITEM; m < end; m++)                                       \
            ROW_CALL(y + m * y_sm, out + m * out_sm, inner);                                    \
    }

void geglu_fp32(const float *y, long y_sm, float *out, long out_sm, long rows, long inner, int threads) {
    FOR_ROW_BLOCKS(geglu_row)
}

void geglu_bf16(const uint16_t *y, long y_sm, uint16_t *out, long out_sm, long rows, long inner, int threads) {
    FOR_ROW_BLOCKS(geglu_row_bf16)
}
