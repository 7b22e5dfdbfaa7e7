/* e^x and 2^x for x <= 0 in eight fp32 lanes (AVX2 + FMA), shared by the C kernels that need them
   (cpu_attention_fp32.c: the softmax, 2^x; cpu_geglu.c: erf, e^x). Include after <immintrin.h>. */

#ifndef DIFFEDIT_CPU_EXP_AVX2_H
#define DIFFEDIT_CPU_EXP_AVX2_H

/* e^x for x <= 0: 2^n * e^r with |r| <= ln2 / 2, degree-6 Taylor (rel. err. ~2e-7); 2^n built in the
   exponent bits (x >= -87 keeps n + 127 >= 1, a normal number). */
static inline __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

/* 2^x for x <= 0: 2^n * 2^r with n = round(x) and r = x - n (exact), |r| <= 1/2; 2^r = e^(r ln2) by
   its degree-6 Taylor polynomial in r (coefficients ln2^i / i!; rel. err. ~1.2e-7, as above); 2^n
   built in the exponent bits (x >= -126 keeps n + 127 >= 1, a normal number). One multiply and one
   FMA fewer than exp_nonpositive: the softmax feeds it scores already in log2 units. */
static inline __m256 exp2_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-126.0f));
    __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_sub_ps(x, n);
    __m256 p = _mm256_set1_ps(1.54035304e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.33335581e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(9.61812911e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.55041087e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(2.40226507e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(6.93147181e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

#endif
