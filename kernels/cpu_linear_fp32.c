/* fp32 linear layers for x86 CPUs with AVX2 and FMA: y = x w^T + b, on a weight packed once.

   Why: on a CPU whose widest vectors are AVX2 (torch's CPU capability "AVX2", e.g. AMD Zen 2),
   both of torch's fp32 GEMMs (MKL's and oneDNN's inner product on a prepacked weight) run Stable
   Diffusion's linear layers at 120-150 GFLOP/s on 2 cores of a Zen 2, where the UNet's 3x3
   convolutions reach 180: the layers are short in K (320-1280) and the libraries' blocking is
   tuned for large squares.

   Algorithm (the classic register-tile GEMM): the weight (N, K) is packed once (by the caller:
   cpu_linear.py) into panels of 16 output columns, [N/16][K][16], so that one k step of a panel
   is two vectors. y is computed in tiles of ROWS = 6 rows x 16 columns held in 12 of the 16 ymm
   registers: per k, two vector loads of the panel, 6 broadcasts of x, 12 FMAs. K is cut into
   equal chunks of at most KC, so that a panel chunk (at most 24 KiB) stays in L1 while the tile
   walks down a block of at most MC rows of x (in L2); the first chunk starts from the bias, the
   next ones add to y. Work items are (block of panels, block of rows), blocks of equal size, the
   column block outer: a thread reuses a block of w, from L3, for every block of rows, and each
   block of rows, from L2, for every panel of the block. Column blocks are as wide as WBLOCK bytes
   of w allow (160 panels at K = 320), so that x, which at 512 px (64x64 latents: M = 8192) no
   longer fits L3, is read from memory as few times as possible: with blocks of 4 panels it was
   read 40 times by a 2560-wide layer, which ran at 105 GFLOP/s instead of 150 on a Zen 2. With
   few rows (text encoder, timestep embedding) the blocks narrow until there are MIN_ITEMS items
   to share out among the threads. Rows (M % 6) and columns (N % 16) at the edges go through a
   6 x 16 scratch tile.
   Memory traffic: w read once from memory (then from L3; the first tile of a panel prefetches
   the next panel into L1, which lifts the layers with few rows, where w's traffic dominates,
   by about 5 %), x once per column block, y written once per K chunk.
   Sums are fp32 in order k = 0..K-1 per chunk, the bias first: results differ from F.linear by
   rounding only.

   Layout: x is (M, K) with unit stride along K and row stride x_sm; y is (M, N) with row stride
   y_sm; bias may be NULL. Threads: OpenMP over the work items, static schedule; the blocks do not
   depend on the thread count and every output element is computed by one thread in one fixed
   order, so the result does not either. Loaded after torch, the library shares torch's OpenMP
   runtime.

   Without AVX2 and FMA (or with -DPORTABLE_ONLY) the same loops compile as plain C: correct, slow. */

#include <string.h>

#define ROWS 6    /* rows of a register tile */
#define COLS 16   /* columns of a register tile = of a packed panel: two ymm vectors */
#ifndef KC
#define KC 384    /* longest K chunk: a panel chunk of KC x COLS floats is 24 KiB, in L1 */
#endif
#ifndef MC
#define MC 72     /* rows per work item (at most): 12 tiles; x's block of MC x KC floats is <= 108 KiB, in L2 */
#endif
#ifndef WBLOCK
#define WBLOCK (4L << 20)  /* bytes of w per work item (at most): a block of panels that stays in L3 */
#endif
#ifndef MIN_ITEMS
#define MIN_ITEMS 24       /* fewer items than this (few rows): narrower column blocks, to share out */
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(PORTABLE_ONLY)
#include <immintrin.h>
#define KERNEL_PATH "avx2_fma"

/* y[0:6, 0:16] (+)= x[0:6, 0:kc] panel[0:kc, 0:16]; start from `bias` (or 0) unless `accumulate`;
   `next` (or NULL): a panel chunk to prefetch, a cache line (one k) per step. */
static void tile(const float *x, long x_sm, const float *panel, int kc, float *y, long y_sm,
                 const float *bias, int accumulate, const float *next) {
    __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
    if (accumulate) {
        c00 = _mm256_loadu_ps(y + 0 * y_sm); c01 = _mm256_loadu_ps(y + 0 * y_sm + 8);
        c10 = _mm256_loadu_ps(y + 1 * y_sm); c11 = _mm256_loadu_ps(y + 1 * y_sm + 8);
        c20 = _mm256_loadu_ps(y + 2 * y_sm); c21 = _mm256_loadu_ps(y + 2 * y_sm + 8);
        c30 = _mm256_loadu_ps(y + 3 * y_sm); c31 = _mm256_loadu_ps(y + 3 * y_sm + 8);
        c40 = _mm256_loadu_ps(y + 4 * y_sm); c41 = _mm256_loadu_ps(y + 4 * y_sm + 8);
        c50 = _mm256_loadu_ps(y + 5 * y_sm); c51 = _mm256_loadu_ps(y + 5 * y_sm + 8);
    } else {
        __m256 b0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
        __m256 b1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
        c00 = c10 = c20 = c30 = c40 = c50 = b0;
        c01 = c11 = c21 = c31 = c41 = c51 = b1;
    }
    const float *x0 = x, *x1 = x + x_sm, *x2 = x + 2 * x_sm, *x3 = x + 3 * x_sm, *x4 = x + 4 * x_sm,
                *x5 = x + 5 * x_sm;
    for (int k = 0; k < kc; k++) {
        __m256 w0 = _mm256_loadu_ps(panel + k * COLS), w1 = _mm256_loadu_ps(panel + k * COLS + 8), a;
        if (next) _mm_prefetch((const char *)(next + k * COLS), _MM_HINT_T0);
        a = _mm256_broadcast_ss(x0 + k); c00 = _mm256_fmadd_ps(a, w0, c00); c01 = _mm256_fmadd_ps(a, w1, c01);
        a = _mm256_broadcast_ss(x1 + k); c10 = _mm256_fmadd_ps(a, w0, c10); c11 = _mm256_fmadd_ps(a, w1, c11);
        a = _mm256_broadcast_ss(x2 + k); c20 = _mm256_fmadd_ps(a, w0, c20); c21 = _mm256_fmadd_ps(a, w1, c21);
        a = _mm256_broadcast_ss(x3 + k); c30 = _mm256_fmadd_ps(a, w0, c30); c31 = _mm256_fmadd_ps(a, w1, c31);
        a = _mm256_broadcast_ss(x4 + k); c40 = _mm256_fmadd_ps(a, w0, c40); c41 = _mm256_fmadd_ps(a, w1, c41);
        a = _mm256_broadcast_ss(x5 + k); c50 = _mm256_fmadd_ps(a, w0, c50); c51 = _mm256_fmadd_ps(a, w1, c51);
    }
    _mm256_storeu_ps(y + 0 * y_sm, c00); _mm256_storeu_ps(y + 0 * y_sm + 8, c01);
    _mm256_storeu_ps(y + 1 * y_sm, c10); _mm256_storeu_ps(y + 1 * y_sm + 8, c11);
    _mm256_storeu_ps(y + 2 * y_sm, c20); _mm256_storeu_ps(y + 2 * y_sm + 8, c21);
    _mm256_storeu_ps(y + 3 * y_sm, c30); _mm256_storeu_ps(y + 3 * y_sm + 8, c31);
    _mm256_storeu_ps(y + 4 * y_sm, c40); _mm256_storeu_ps(y + 4 * y_sm + 8, c41);
    _mm256_storeu_ps(y + 5 * y_sm, c50); _mm256_storeu_ps(y + 5 * y_sm + 8, c51);
}
#else
#define KERNEL_PATH "portable"

static void tile(const float *x, long x_sm, const float *panel, int kc, float *y, long y_sm,
                 const float *bias, int accumulate, const float *next) {
    (void)next;
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < COLS; c++) {
            float sum = accumulate ? y[r * y_sm + c] : (bias ? bias[c] : 0.0f);
            for (int k = 0; k < kc; k++) sum += x[r * x_sm + k] * panel[k * COLS + c];
            y[r * y_sm + c] = sum;
        }
}
#endif

const char *kernel_path(void) { return KERNEL_PATH; }

/* One work item: rows [m0, m1) x panels [p0, p1), all of K in `chunks` equal chunks. */
static void work_item(const float *x, long x_sm, const float *packed, const float *bias, float *y, long y_sm,
                      int K, int N, int chunks, int m0, int m1, int p0, int p1) {
    float xs[ROWS * KC], ys[ROWS * COLS], bs[COLS];
    int step = (K + chunks - 1) / chunks;
    for (int k0 = 0; k0 < K; k0 += step) {
        int kc = K - k0 < step ? K - k0 : step, first = k0 == 0;
        for (int p = p0; p < p1; p++) {
            const float *panel = packed + ((long)p * K + k0) * COLS;
            int n0 = p * COLS, cols = N - n0 < COLS ? N - n0 : COLS;
            const float *b = NULL;
            if (bias && first) {
                if (cols == COLS) b = bias + n0;
                else { memset(bs, 0, sizeof bs); memcpy(bs, bias + n0, cols * sizeof(float)); b = bs; }
            }
            for (int m = m0; m < m1; m += ROWS) {
                int rows = m1 - m < ROWS ? m1 - m : ROWS;
                const float *next = (m == m0 && p + 1 < p1) ? panel + (long)K * COLS : NULL;
                if (rows == ROWS && cols == COLS) {
                    tile(x + m * x_sm + k0, x_sm, panel, kc, y + m * y_sm + n0, y_sm, b, !first, next);
                    continue;
                }
                /* edge tile: through zero-padded scratch rows and columns */
                memset(xs, 0, sizeof xs);
                memset(ys, 0, sizeof ys);
                for (int r = 0; r < rows; r++) {
                    memcpy(xs + r * KC, x + (m + r) * x_sm + k0, kc * sizeof(float));
                    if (!first) memcpy(ys + r * COLS, y + (m + r) * y_sm + n0, cols * sizeof(float));
                }
                tile(xs, KC, panel, kc, ys, COLS, b, !first, next);
                for (int r = 0; r < rows; r++) memcpy(y + (m + r) * y_sm + n0, ys + r * COLS, cols * sizeof(float));
            }
        }
    }
}

int linear_fp32(const float *x, long x_sm, const float *packed, const float *bias, float *y, long y_sm,
                int M, int K, int N, int threads) {
    if (M < 0 || K < 0 || N < 0) return -2;
    if (M == 0 || K == 0 || N == 0) return 0;   /* nothing to sum (the caller fills the bias) */
    /* blocks of equal size (rows: a multiple of ROWS), so that the threads get equal shares */
    int panels = (N + COLS - 1) / COLS, chunks = (K + KC - 1) / KC;
    /* column blocks as wide as WBLOCK bytes of w allow; narrower where that leaves under MIN_ITEMS items */
    long panel_bytes = (long)K * COLS * (long)sizeof(float);
    long per_block = WBLOCK / panel_bytes > 0 ? WBLOCK / panel_bytes : 1;
    int row_blocks = (M + MC - 1) / MC, col_blocks = (int)((panels + per_block - 1) / per_block);
    if (row_blocks * col_blocks < MIN_ITEMS) {
        int wanted = (MIN_ITEMS + row_blocks - 1) / row_blocks;
        col_blocks = wanted < panels ? wanted : panels;
    }
    int block_rows = ((M + row_blocks - 1) / row_blocks + ROWS - 1) / ROWS * ROWS;
    int block_panels = (panels + col_blocks - 1) / col_blocks;
    row_blocks = (M + block_rows - 1) / block_rows;
    col_blocks = (panels + block_panels - 1) / block_panels;
    /* column block outer, row block inner: a block of w is reused, from L2, by every row block */
    #pragma omp parallel for schedule(static) num_threads(threads < 1 ? 1 : threads)
    for (long item = 0; item < (long)row_blocks * col_blocks; item++) {
        int j = (int)(item / row_blocks), i = (int)(item % row_blocks);
        int m0 = i * block_rows, m1 = m0 + block_rows < M ? m0 + block_rows : M;
        int p0 = j * block_panels, p1 = p0 + block_panels < panels ? p0 + block_panels : panels;
        work_item(x, x_sm, packed, bias, y, y_sm, K, N, chunks, m0, m1, p0, p1);
    }
    return 0;
}
