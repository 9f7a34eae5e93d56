/* W1.58A8 matrix multiplication for bitflux's cpu backend: int8 activations (per-token absmax) times
 * ternary weights stored as 2-bit codes u = w + 1 in {0, 1, 2}, exact int32 sums, fp32 epilogue.
 * docs/CPU_KERNEL.md describes the layout and the numerics; kernels/reference.py's linear_a8 is the truth.
 *
 * Weight layout (made once by the Python prepare()): output features in panels of 16, input features in
 * chunks of 16; a (panel, chunk) block is 64 bytes. Byte j = 4 n + r of a block holds, at bits 2i..2i+1,
 * the code of output feature n (0..15) and input feature 4 i + r of the chunk. One shift-and-mask per i
 * turns 64 bytes into 16 lanes of (one feature, 4 consecutive inputs): the shape vpdpbusd / vpmaddubsw eat.
 *
 * Paths: generic C (any CPU), AVX2 (vpmaddubsw, int16 sums widened every 256 inputs), AVX-512 VNNI
 * (vpdpbusd). All give identical int32 sums, so identical outputs.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define BF_X86 1
#include <immintrin.h>
#endif

enum { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512VNNI = 2 };

#define PANEL 16       /* output features per panel */
#define CHUNK 16       /* input features per block */
#define BLOCK_BYTES 64 /* 16 x 16 two-bit codes */
#define MAX_ROWS 12    /* activation rows per tile, the most any path uses (register blocking) */
#define MAX_PANELS 2   /* panels per tile, likewise */
#define TILE_LD (PANEL * MAX_PANELS)
#define PARALLEL_QUANTIZE_ELEMENTS (1 << 16) /* fewer activations are quantized by one thread */
/* int8 activations of a row block, kept in L2 while the weights stream by: 4 row tiles at K = 3072
 * measured best, as larger blocks lose L2 hits to the weight stream. */
#define L2_ACTIVATION_BYTES (160 << 10)

/* Writes the int32 sums over chunks [c0, c1) of `rows` activation rows against `panels` weight panels:
 * c[r * TILE_LD + n] = sum_k q[r][k] * u[n][k]. */
typedef void (*tile_fn)(const int8_t *a, int64_t lda, int rows, const uint8_t *w, int64_t panel_stride,
                        int panels, int64_t c0, int64_t c1, int32_t *c);

static inline int32_t load_i32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v); /* four activations as one broadcastable word, without aliasing trouble */
    return v;
}

/* ---------------------------------------------------------------- portable C */

static void tile_generic(const int8_t *a, int64_t lda, int rows, const uint8_t *w, int64_t panel_stride,
                         int panels, int64_t c0, int64_t c1, int32_t *c) {
    for (int r = 0; r < rows; r++)
        for (int p = 0; p < panels; p++)
            for (int n = 0; n < PANEL; n++) {
                int32_t sum = 0;
                for (int64_t ch = c0; ch < c1; ch++) {
                    const uint8_t *b = w + p * panel_stride + ch * BLOCK_BYTES + 4 * n;
                    const int8_t *x = a + r * lda + ch * CHUNK;
                    for (int i = 0; i < 4; i++)
                        for (int j = 0; j < 4; j++) sum += ((b[j] >> (2 * i)) & 3) * x[4 * i + j];
                }
                c[r * TILE_LD + p * PANEL + n] = sum;
            }
}

/* Symmetric per-row int8 as reference.quantize_activations: s = max(max|x|, 1e-12) / 127,
 * q = clamp(round_half_even(x / s), -127, 127). max|x| is taken on the float bit patterns with the sign
 * cleared, whose integer order is the float order (and a NaN stays the largest, as in torch), because an
 * integer max vectorizes where a float one would need -ffast-math. Adding and subtracting 1.5 * 2^23
 * rounds to the nearest integer, ties to even, for |v| < 2^22 (here |v| <= 127), without SSE4.1. */
static inline __attribute__((always_inline)) void quantize_row_body(const float *x, int64_t K, int64_t Kp,
                                                                     int8_t *q, float *scale) {
    uint32_t amax_bits = 0;
    for (int64_t k = 0; k < K; k++) {
        uint32_t bits;
        memcpy(&bits, x + k, sizeof bits);
        bits &= 0x7fffffffu;
        amax_bits = bits > amax_bits ? bits : amax_bits;
    }
    float amax;
    memcpy(&amax, &amax_bits, sizeof amax);
    const float s = (amax > 1e-12f ? amax : 1e-12f) / 127.0f;
    const float magic = 12582912.0f;
    for (int64_t k = 0; k < K; k++) {
        float v = (x[k] / s + magic) - magic;
        v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
        q[k] = (int8_t)v;
    }
    memset(q + K, 0, (size_t)(Kp - K));
    *scale = s;
}

static void quantize_row_generic(const float *x, int64_t K, int64_t Kp, int8_t *q, float *scale) {
    quantize_row_body(x, K, Kp, q, scale);
}

/* ---------------------------------------------------------------- x86 SIMD */
#ifdef BF_X86

#pragma GCC push_options
#pragma GCC target("avx2,fma")

static void quantize_row_avx2(const float *x, int64_t K, int64_t Kp, int8_t *q, float *scale) {
    quantize_row_body(x, K, Kp, q, scale);
}

/* vpmaddubsw gives u0 q0 + u1 q1 in [-508, 508] per int16 lane; 64 of them fit int16 exactly, so the
 * int16 sums are widened (vpmaddwd by 1) into c every 16 chunks = 64 instructions per lane. */
#define AVX2_FLUSH_CHUNKS 16

static inline __attribute__((always_inline)) void tile_avx2_fixed(const int8_t *a, int64_t lda,
                                                                  const uint8_t *w, int64_t c0, int64_t c1,
                                                                  int32_t *c, const int R) {
    const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i acc[MAX_ROWS][2];
    for (int r = 0; r < R; r++) {
        _mm256_storeu_si256((__m256i *)(c + r * TILE_LD), _mm256_setzero_si256());
        _mm256_storeu_si256((__m256i *)(c + r * TILE_LD + 8), _mm256_setzero_si256());
    }
    for (int64_t start = c0; start < c1; start += AVX2_FLUSH_CHUNKS) {
        const int64_t stop = start + AVX2_FLUSH_CHUNKS < c1 ? start + AVX2_FLUSH_CHUNKS : c1;
#pragma GCC unroll 16
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
        for (int64_t ch = start; ch < stop; ch++) {
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)(w + ch * BLOCK_BYTES));
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(w + ch * BLOCK_BYTES + 32));
            const int8_t *x = a + ch * CHUNK;
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                const __m256i u0 = _mm256_and_si256(_mm256_srli_epi16(v0, 2 * i), mask);
                const __m256i u1 = _mm256_and_si256(_mm256_srli_epi16(v1, 2 * i), mask);
#pragma GCC unroll 16
                for (int r = 0; r < R; r++) {
                    const __m256i b = _mm256_set1_epi32(load_i32(x + r * lda + 4 * i));
                    acc[r][0] = _mm256_add_epi16(acc[r][0], _mm256_maddubs_epi16(u0, b));
                    acc[r][1] = _mm256_add_epi16(acc[r][1], _mm256_maddubs_epi16(u1, b));
                }
            }
        }
#pragma GCC unroll 16
        for (int r = 0; r < R; r++)
            for (int h = 0; h < 2; h++) {
                __m256i *dst = (__m256i *)(c + r * TILE_LD + 8 * h);
                _mm256_storeu_si256(dst, _mm256_add_epi32(_mm256_loadu_si256(dst),
                                                          _mm256_madd_epi16(acc[r][h], ones)));
            }
    }
}

static void tile_avx2(const int8_t *a, int64_t lda, int rows, const uint8_t *w, int64_t panel_stride,
                      int panels, int64_t c0, int64_t c1, int32_t *c) {
    for (int p = 0; p < panels; p++) {
        const uint8_t *wp = w + p * panel_stride;
        int32_t *cp = c + p * PANEL;
        for (int r0 = 0; r0 < rows; r0 += 6) { /* 6 rows x 2 halves = 12 of the 16 ymm registers */
            const int8_t *ar = a + r0 * lda;
            int32_t *cr = cp + r0 * TILE_LD;
            switch (rows - r0 < 6 ? rows - r0 : 6) {
                case 1: tile_avx2_fixed(ar, lda, wp, c0, c1, cr, 1); break;
                case 2: tile_avx2_fixed(ar, lda, wp, c0, c1, cr, 2); break;
                case 3: tile_avx2_fixed(ar, lda, wp, c0, c1, cr, 3); break;
                case 4: tile_avx2_fixed(ar, lda, wp, c0, c1, cr, 4); break;
                case 5: tile_avx2_fixed(ar, lda, wp, c0, c1, cr, 5); break;
                default: tile_avx2_fixed(ar, lda, wp, c0, c1, cr, 6); break;
            }
        }
    }
}

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vnni")

static void quantize_row_avx512(const float *x, int64_t K, int64_t Kp, int8_t *q, float *scale) {
    quantize_row_body(x, K, Kp, q, scale);
}

static inline __attribute__((always_inline)) void tile_avx512_fixed(const int8_t *a, int64_t lda,
                                                                    const uint8_t *w, int64_t panel_stride,
                                                                    int64_t c0, int64_t c1, int32_t *c,
                                                                    const int R, const int P) {
    const __m512i mask = _mm512_set1_epi8(3);
    __m512i acc[MAX_ROWS][MAX_PANELS];
#pragma GCC unroll 16
    for (int r = 0; r < R; r++)
        for (int p = 0; p < P; p++) acc[r][p] = _mm512_setzero_si512();
    for (int64_t ch = c0; ch < c1; ch++) {
        __m512i v[MAX_PANELS];
        for (int p = 0; p < P; p++)
            v[p] = _mm512_loadu_si512((const void *)(w + p * panel_stride + ch * BLOCK_BYTES));
        const int8_t *x = a + ch * CHUNK;
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) {
            __m512i u[MAX_PANELS];
            for (int p = 0; p < P; p++) u[p] = _mm512_and_si512(_mm512_srli_epi16(v[p], 2 * i), mask);
#pragma GCC unroll 16
            for (int r = 0; r < R; r++) {
                const __m512i b = _mm512_set1_epi32(load_i32(x + r * lda + 4 * i));
                for (int p = 0; p < P; p++) acc[r][p] = _mm512_dpbusd_epi32(acc[r][p], u[p], b);
            }
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; r++)
        for (int p = 0; p < P; p++) _mm512_storeu_si512((void *)(c + r * TILE_LD + p * PANEL), acc[r][p]);
}

#define AVX512_ROWS 12 /* 12 rows x 2 panels = 24 of the 32 zmm registers accumulate */
#define AVX512_CASE(R)                                                                            \
    case R:                                                                                       \
        if (panels == 2) tile_avx512_fixed(a, lda, w, panel_stride, c0, c1, c, R, 2);             \
        else tile_avx512_fixed(a, lda, w, panel_stride, c0, c1, c, R, 1);                         \
        break;

static void tile_avx512(const int8_t *a, int64_t lda, int rows, const uint8_t *w, int64_t panel_stride,
                        int panels, int64_t c0, int64_t c1, int32_t *c) {
    switch (rows) {
        AVX512_CASE(1) AVX512_CASE(2) AVX512_CASE(3) AVX512_CASE(4) AVX512_CASE(5) AVX512_CASE(6)
        AVX512_CASE(7) AVX512_CASE(8) AVX512_CASE(9) AVX512_CASE(10) AVX512_CASE(11) AVX512_CASE(12)
    }
}

#pragma GCC pop_options
#endif /* BF_X86 */

/* ---------------------------------------------------------------- dispatch and driver */

typedef void (*quantize_fn)(const float *x, int64_t K, int64_t Kp, int8_t *q, float *scale);

typedef struct {
    tile_fn tile;
    quantize_fn quantize;
    int rows, panels; /* the tile shape `tile` is fastest at */
} isa_kernels;

int bf_isa_supported(int isa) {
    if (isa == ISA_GENERIC) return 1;
#ifdef BF_X86
    __builtin_cpu_init();
    if (isa == ISA_AVX2) return __builtin_cpu_supports("avx2");
    if (isa == ISA_AVX512VNNI)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vnni");
#endif
    return 0;
}

static int select_isa(int isa, isa_kernels *k) {
    if (!bf_isa_supported(isa)) return -1;
    *k = (isa_kernels){tile_generic, quantize_row_generic, 4, 1};
#ifdef BF_X86
    if (isa == ISA_AVX2) *k = (isa_kernels){tile_avx2, quantize_row_avx2, 6, 1};
    if (isa == ISA_AVX512VNNI) *k = (isa_kernels){tile_avx512, quantize_row_avx512, AVX512_ROWS, 2};
#endif
    return 0;
}

/* One tile of the output: rows [m0, m0 + rows) x panels [p0, p0 + panels). Per scale group, the int32
 * sums minus the activation sums (w = u - 1) times the weight scale are added in fp32 in the order
 * reference.linear_a8 uses, then times the activation scale, plus the bias: bit-identical to it. */
static void compute_tile(tile_fn tile, const int8_t *q, int64_t Kp, const float *act_scale,
                         const int32_t *act_sums, int64_t m0, int rows, const uint8_t *w, int64_t panel_stride,
                         int64_t p0, int panels, int64_t N, int64_t Kc, const float *scales, int64_t groups,
                         int64_t group_chunks, const float *bias, float *out) {
    int32_t c[MAX_ROWS * TILE_LD];
    float f[MAX_ROWS * TILE_LD] = {0};
    const int cols = panels * PANEL;
    for (int64_t g = 0; g < groups; g++) {
        const int64_t c0 = g * group_chunks, c1 = c0 + group_chunks < Kc ? c0 + group_chunks : Kc;
        tile(q + m0 * Kp, Kp, rows, w + p0 * panel_stride, panel_stride, panels, c0, c1, c);
        for (int r = 0; r < rows; r++) {
            const int32_t sum = act_sums[(m0 + r) * groups + g];
            for (int n = 0; n < cols; n++) {
                const float ws = scales[(p0 * PANEL + n) * groups + g];
                f[r * TILE_LD + n] = f[r * TILE_LD + n] + (float)(c[r * TILE_LD + n] - sum) * ws;
            }
        }
    }
    for (int r = 0; r < rows; r++) {
        float *y = out + (m0 + r) * N + p0 * PANEL;
        const int64_t valid = N - p0 * PANEL < cols ? N - p0 * PANEL : cols;
        for (int64_t n = 0; n < valid; n++) {
            const float v = f[r * TILE_LD + n] * act_scale[m0 + r];
            y[n] = bias ? v + bias[p0 * PANEL + n] : v;
        }
    }
}

/* out (M, N) fp32 = W1.58A8 linear of x (M, K) fp32 rows `ldx` apart. w: prepared blocks, ceil(N / 16)
 * panels of Kc = ceil(K / 16) blocks; scales (panels * 16, groups) fp32, group_chunks blocks per group;
 * bias (N) or NULL. Returns 0, or -1 if the ISA is not supported here, -2 if out of memory. */
int bf_linear(const float *x, int64_t M, int64_t K, int64_t ldx, const uint8_t *w, int64_t N, int64_t Kc,
              const float *scales, int64_t groups, int64_t group_chunks, const float *bias, float *out,
              int threads, int isa) {
    isa_kernels k;
    if (select_isa(isa, &k)) return -1;
    if (M <= 0) return 0;
    const int64_t Kp = Kc * CHUNK, panels = (N + PANEL - 1) / PANEL, panel_stride = Kc * BLOCK_BYTES;
    int8_t *q = aligned_alloc(64, (size_t)((M * Kp + 63) / 64 * 64)); /* C11: a multiple of the alignment */
    float *act_scale = malloc(sizeof(float) * (size_t)M);
    int32_t *act_sums = malloc(sizeof(int32_t) * (size_t)(M * groups));
    if (!q || !act_scale || !act_sums) {
        free(q), free(act_scale), free(act_sums);
        return -2;
    }
    if (threads < 1) threads = 1;

    /* Small inputs are quantized by this thread alone: the time a second thread takes to join a parallel
     * region (milliseconds when other processes hold the cores) would dwarf the work. */
#pragma omp parallel for num_threads(threads) schedule(static) if (M * K >= PARALLEL_QUANTIZE_ELEMENTS)
    for (int64_t m = 0; m < M; m++) {
        k.quantize(x + m * ldx, K, Kp, q + m * Kp, act_scale + m);
        for (int64_t g = 0; g < groups; g++) {
            int32_t s = 0;
            for (int64_t i = g * group_chunks * CHUNK; i < (g + 1) * group_chunks * CHUNK && i < Kp; i++)
                s += q[m * Kp + i];
            act_sums[m * groups + g] = s;
        }
    }

    /* Rows go in blocks whose activations stay in L2; a block is shared out to the threads by weight tile
     * (so each weight tile is read once per block and meets all of the block's row tiles while in L1).
     * Dynamic scheduling evens out cores slowed by other processes. */
    int64_t block_rows = L2_ACTIVATION_BYTES / Kp / k.rows * k.rows;
    block_rows = block_rows < k.rows ? k.rows : block_rows;
    const int64_t m_blocks = (M + block_rows - 1) / block_rows, n_tiles = (panels + k.panels - 1) / k.panels;
#pragma omp parallel for collapse(2) num_threads(threads) schedule(dynamic)
    for (int64_t mb = 0; mb < m_blocks; mb++)
        for (int64_t nt = 0; nt < n_tiles; nt++) {
            const int64_t p0 = nt * k.panels, m_end = (mb + 1) * block_rows < M ? (mb + 1) * block_rows : M;
            const int np = (int)(panels - p0 < k.panels ? panels - p0 : k.panels);
            for (int64_t m0 = mb * block_rows; m0 < m_end; m0 += k.rows) {
                const int rows = (int)(m_end - m0 < k.rows ? m_end - m0 : k.rows);
                compute_tile(k.tile, q, Kp, act_scale, act_sums, m0, rows, w, panel_stride, p0, np, N, Kc,
                             scales, groups, group_chunks, bias, out);
            }
        }

    free(q), free(act_scale), free(act_sums);
    return 0;
}
