/* W1.58A8 matrix multiplication for bitflux's cpu backend: int8 activations (per-token absmax) times
 * ternary weights stored as 2-bit codes u = w + 1 in {0, 1, 2}, exact int32 sums, fp32 epilogue.
 * docs/CPU_KERNEL.md describes the layout and the numerics; kernels/reference.py's linear_a8 is the truth.
 *
 * The weights are read where the layer keeps them, tq2 rows (output feature n: byte j holds input 4 j + i
 * at bits 2i..2i+1); the kernel keeps no copy of its own. The activations are reordered instead, after
 * each row is quantized, in the layout of one of two paths:
 * - few tokens (GEMV): the row as 4 planes, plane i holding q[4 j + i] at position j. A run of code bytes
 *   of one output, split into its 4 digit planes by shift-and-mask, meets the 4 activation planes' bytes at
 *   the same positions, summed in vector lanes;
 * - more tokens (tiles): the row with every 16-input chunk transposed as a 4 x 4 byte matrix (input
 *   16 c + 4 b + i at 16 c + 4 i + b). Per (row block, weight tile of 16 or 32 outputs), the outputs'
 *   4-byte words of each chunk are gathered side by side into 64-byte blocks in a per-thread buffer: lane n
 *   of a block, shifted by 2i and masked, holds inputs 16 c + 4 b + i (b = 0..3) of output n, which the 4
 *   activations at 16 c + 4 i multiply, so one broadcast word meets 16 outputs (the shape vpdpbusd /
 *   vpmaddubsw eat).
 *
 * Paths: generic C (any CPU), AVX2 (vpmaddubsw into int16 sums, widened before they can overflow),
 * AVX-VNNI (vpdpbusd on 256-bit registers: the AVX2 path's tiles, int32 sums directly), AVX-512 VNNI
 * (vpdpbusd on 512-bit registers). All give identical int32 sums, so identical outputs.
 */
#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define BF_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif

/* In order of preference: the best one this CPU supports is the default. */
enum { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVXVNNI = 2, ISA_AVX512VNNI = 3 };

/* AVX-VNNI (vpdpbusd on ymm, VEX-encoded: Alder Lake and later Intel cores, AMD Zen 5) needs GCC 11 or
 * clang 12 to compile and binutils 2.36 to assemble; older tools build the other paths (setup.py builds again
 * with BF_NO_AVXVNNI defined if the first build fails). */
#if defined(BF_X86) && !defined(BF_NO_AVXVNNI) && (defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11)
#define BF_AVXVNNI 1
#endif

#define PANEL 16       /* output features per block */
#define CHUNK 16       /* input features per block: one 4-byte word of each output's tq2 row */
#define BLOCK_BYTES 64 /* 16 x 16 two-bit codes */
#define ZERO_CODES 0x55 /* four codes u = 1 (w = 0): padding past the layer, against zero activations */
#define MAX_ROWS 12    /* activation rows per tile, the most any path uses (register blocking) */
#define MAX_PANELS 2   /* panels per tile, likewise */
#define TILE_LD (PANEL * MAX_PANELS)
#define GEMV_ROWS 3    /* at most this many tokens take the GEMV path (at 4 the tiles were as fast) */
#define GEMV_STEP 64   /* code bytes a GEMV step reads per output; activation planes are padded to it */
#define PARALLEL_QUANTIZE_ELEMENTS (1 << 16) /* fewer activations are quantized by one thread */
#define PARALLEL_GEMV_BYTES (1 << 16)        /* fewer code bytes are read by one thread */
/* int8 activations of a row block, kept in L2 while the weight tiles are gathered and met in turn: each
 * gather serves the whole block, so blocks are larger than the 4 row tiles that were best with a prepared
 * copy of the weights (K = 12288, 256 tokens: 19.8 ms against 22.4 at 160 KiB). */
#define L2_ACTIVATION_BYTES (320 << 10)

/* Writes the int32 sums over chunks [c0, c1) of `rows` activation rows against `panels` blocks of 16
 * outputs: c[r * TILE_LD + n] = sum_k q[r][k] * u[n][k]. a: chunk-transposed activations, rows lda apart;
 * w: gathered blocks, a panel's chunks consecutive, panels panel_stride apart. */
typedef void (*tile_fn)(const int8_t *a, int64_t lda, int rows, const uint8_t *w, int64_t panel_stride,
                        int panels, int64_t c0, int64_t c1, int32_t *c);

/* Writes c[r * (n1 - n0) + n - n0] = sum_k q[r][k] * u[n][k] for outputs [n0, n1) and `rows` (<= GEMV_ROWS)
 * activation rows, reading each output's tq2 row (ldw bytes) in place. */
typedef void (*gemv_fn)(const int8_t *a, int64_t lda, int64_t plane, int rows, const uint8_t *w, int64_t ldw,
                        int64_t n0, int64_t n1, int32_t *c);

static inline int32_t load_i32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v); /* four activations as one broadcastable word, without aliasing trouble */
    return v;
}

/* ---------------------------------------------------------------- portable C */

static void tile_generic(const int8_t *a, int64_t lda, int rows, const uint8_t *w, int64_t panel_stride,
                         int panels, int64_t c0, int64_t c1, int32_t *c) {
    for (int p = 0; p < panels; p++) {
        int32_t acc[MAX_ROWS][PANEL] = {{0}};
        for (int64_t ch = c0; ch < c1; ch++) {
            const uint8_t *block = w + p * panel_stride + ch * BLOCK_BYTES;
            for (int i = 0; i < 4; i++) {
                /* Digit plane i decoded once for all rows, [byte b][output n], so that the loop over the
                 * outputs below is one the compiler vectorizes (16-bit lanes: SSE2, NEON) */
                int16_t digits[4][PANEL];
                for (int b = 0; b < 4; b++)
                    for (int n = 0; n < PANEL; n++) digits[b][n] = (int16_t)(block[4 * n + b] >> (2 * i) & 3);
                for (int r = 0; r < rows; r++) {
                    const int8_t *x = a + r * lda + ch * CHUNK + 4 * i;
                    const int16_t x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3];
                    for (int n = 0; n < PANEL; n++) /* 4 products of at most 2 x 127: an int16 sum */
                        acc[r][n] += (int16_t)(digits[0][n] * x0 + digits[1][n] * x1 + digits[2][n] * x2 +
                                               digits[3][n] * x3);
                }
            }
        }
        for (int r = 0; r < rows; r++)
            for (int n = 0; n < PANEL; n++) c[r * TILE_LD + p * PANEL + n] = acc[r][n];
    }
}

static void gemv_generic(const int8_t *a, int64_t lda, int64_t plane, int rows, const uint8_t *w, int64_t ldw,
                         int64_t n0, int64_t n1, int32_t *c) {
    for (int64_t n = n0; n < n1; n++)
        for (int r = 0; r < rows; r++) {
            const uint8_t *u = w + n * ldw;
            const int8_t *x = a + r * lda;
            int32_t sum = 0;
            for (int64_t j = 0; j < ldw; j++)
                for (int i = 0; i < 4; i++) sum += ((u[j] >> (2 * i)) & 3) * x[i * plane + j];
            c[r * (n1 - n0) + n - n0] = sum;
        }
}

/* Symmetric per-row int8 as reference.quantize_activations: s = max(max|x|, 1e-12) / 127,
 * q = clamp(round_half_even(x / s), -127, 127), in input order, zero from K to row_bytes. max|x| is taken on
 * the float bit patterns with the sign cleared, whose integer order is the float order (and a NaN stays the
 * largest, as in torch), because an integer max vectorizes where a float one would need -ffast-math. Adding
 * and subtracting 1.5 * 2^23 rounds to the nearest integer, ties to even, for |v| < 2^22 (here
 * |v| <= 127), without SSE4.1. */
static inline __attribute__((always_inline)) void quantize_row_body(const float *x, int64_t K, int64_t row_bytes,
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
    const float s = (amax > 1e-12f || amax != amax ? amax : 1e-12f) / 127.0f;
    /* A NaN or an infinity in the row: its outputs are NaN (the scale NaN, or inf times codes of 0), its codes
     * defined (x / s would be inf / inf = NaN, whose conversion to int8 is undefined). */
    if (!(s <= FLT_MAX)) {
        memset(q, 0, (size_t)row_bytes);
        *scale = s;
        return;
    }
    const float magic = 12582912.0f;
    for (int64_t k = 0; k < K; k++) {
        float v = (x[k] / s + magic) - magic;
        v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
        q[k] = (int8_t)v;
    }
    memset(q + K, 0, (size_t)(row_bytes - K));
    *scale = s;
}

/* The tiles' activation layout: each 16-input chunk transposed as a 4 x 4 matrix (input 16 c + 4 b + i to
 * 16 c + 4 i + b), so that the 4 activations a tile broadcasts against digit i of a block's words lie side
 * by side. In place, over `bytes` (a multiple of 16). */
static void transpose_chunks_generic(int8_t *q, int64_t bytes) {
    for (int64_t c = 0; c < bytes; c += CHUNK) {
        int8_t chunk[CHUNK];
        memcpy(chunk, q + c, CHUNK);
        for (int i = 0; i < 4; i++)
            for (int b = 0; b < 4; b++) q[c + 4 * i + b] = chunk[4 * b + i];
    }
}

/* The GEMV's activation layout: plane i (`plane` bytes, zero past the row) holds input 4 j + i at j. */
static void to_planes(const int8_t *natural, int64_t bytes, int64_t plane, int8_t *q) {
    memset(q, 0, (size_t)(4 * plane));
    for (int64_t k = 0; k < bytes; k++) q[(k & 3) * plane + (k >> 2)] = natural[k];
}

static void quantize_row_generic(const float *x, int64_t K, int64_t row_bytes, int8_t *q, float *scale) {
    quantize_row_body(x, K, row_bytes, q, scale);
}

/* Gathers the blocks of `panels` panels from panel p0 on, all Kc chunks: block (p, ch) byte 4 n + b = byte
 * 4 ch + b of output 16 (p0 + p) + n's row. Outputs past N and bytes past a row's end (the last chunk of a K
 * that is not a multiple of 16) are zero codes, which meet zero activations. */
typedef void (*gather_fn)(const uint8_t *w, int64_t ldw, int64_t N, int64_t p0, int panels, int64_t Kc,
                          uint8_t *blocks);

/* The words of chunks [first, Kc) of one output (all of them zero codes past N), byte by byte. */
static void gather_words(const uint8_t *w, int64_t ldw, int64_t N, int64_t row, int64_t first, int64_t Kc,
                         uint8_t *dst) {
    for (int64_t ch = first; ch < Kc; ch++)
        for (int64_t b = 0; b < 4; b++)
            dst[ch * BLOCK_BYTES + b] = row < N && 4 * ch + b < ldw ? w[row * ldw + 4 * ch + b] : ZERO_CODES;
}

static void gather_generic(const uint8_t *w, int64_t ldw, int64_t N, int64_t p0, int panels, int64_t Kc,
                           uint8_t *blocks) {
    for (int p = 0; p < panels; p++)
        for (int n = 0; n < PANEL; n++)
            gather_words(w, ldw, N, (p0 + p) * PANEL + n, 0, Kc, blocks + p * Kc * BLOCK_BYTES + 4 * n);
}

/* tq1 -> tq2 codes, for a layer held in tq1 (5 base-3 digits a byte, 20 % fewer bytes): the kernels read
 * tq2, so bf_linear widens a tq1 layer's rows as it goes instead of the layer keeping a tq2 copy. A tq1 byte's
 * 5 digits are 10 consecutive bits of tq2's stream of 2-bit digits, so every 4 tq1 bytes become 5 tq2 bytes:
 * here by table and shifts, 16 at a time by SIMD arithmetic on AVX2 and up (widen_avx2). A widened row has
 * ceil(K / 4) bytes, codes past K as 1 (w = 0), as formats.pack pads them. */
static void tq1_digit_table(uint16_t digits[256]) {
    /* byte -> its digits floor(b / 3^p) mod 3 at bits 2p (bytes > 242 as formats.unpack reads them) */
    for (int b = 0; b < 256; b++) {
        int v = b, bits = 0;
        for (int p = 0; p < 5; p++, v /= 3) bits |= (v % 3) << (2 * p);
        digits[b] = (uint16_t)bits;
    }
}

typedef void (*widen_fn)(const uint8_t *s, int64_t K, const uint16_t *digits, uint8_t *d);

/* A row from tq1 byte j on (a multiple of 4; the bytes before it done). */
static void tq1_row_from(const uint8_t *s, int64_t K, const uint16_t *digits, uint8_t *d, int64_t j) {
    const int64_t in_bytes = (K + 4) / 5, out_bytes = (K + 3) / 4;
    const uint16_t ones = 0x155; /* five digits 1: past the tq1 row's end */
    int64_t o = j / 4 * 5;
    for (; j + 4 <= in_bytes && o + 8 <= out_bytes; j += 4, o += 5) { /* 8-byte stores, 3 rewritten next */
        uint64_t v = digits[s[j]] | (uint64_t)digits[s[j + 1]] << 10 | (uint64_t)digits[s[j + 2]] << 20
                     | (uint64_t)digits[s[j + 3]] << 30;
        for (int i = 0; i < 8; i++, v >>= 8) d[o + i] = (uint8_t)v; /* one store, little-endian or not */
    }
    uint32_t stream = 0; /* the row's last codes (up to 28), through a bit stream */
    int bits = 0;
    for (; o < out_bytes; o++) {
        for (; bits < 8; bits += 10, j++) stream |= (uint32_t)(j < in_bytes ? digits[s[j]] : ones) << bits;
        d[o] = (uint8_t)stream;
        stream >>= 8, bits -= 8;
    }
    if (K % 4) { /* codes past K in the last byte */
        const uint8_t kept = (uint8_t)((1u << (2 * (K % 4))) - 1);
        d[out_bytes - 1] = (uint8_t)((d[out_bytes - 1] & kept) | (ZERO_CODES & ~kept));
    }
}

static void widen_generic(const uint8_t *s, int64_t K, const uint16_t *digits, uint8_t *d) {
    tq1_row_from(s, K, digits, d, 0);
}

/* ---------------------------------------------------------------- x86 SIMD */
#ifdef BF_X86

#pragma GCC push_options
#pragma GCC target("avx2,fma")

static void quantize_row_avx2(const float *x, int64_t K, int64_t row_bytes, int8_t *q, float *scale) {
    quantize_row_body(x, K, row_bytes, q, scale);
}

/* One vpshufb a chunk: byte 4 i + b of the result is byte 4 b + i of the source. */
static void transpose_chunks_avx2(int8_t *q, int64_t bytes) {
    const __m128i order = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (int64_t c = 0; c < bytes; c += CHUNK)
        _mm_storeu_si128((__m128i *)(q + c), _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(q + c)), order));
}

/* The 256-bit tiles' loop over chunks [FROM, TO) of a panel (both paths': only the product instruction
 * differs): each block's two halves (outputs 0-7, 8-15) split into digit planes by shift and mask, each plane
 * against the 4 activations of each of the R rows it meets, broadcast; ACCUMULATE(acc, codes, activations)
 * adds their products into acc[r][half]. Uses the enclosing function's a, lda, w, R, mask and acc. */
#define TILE_256_CHUNKS(FROM, TO, ACCUMULATE)                                                     \
    for (int64_t ch = (FROM); ch < (TO); ch++) {                                                  \
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)(w + ch * BLOCK_BYTES));           \
        const __m256i v1 = _mm256_loadu_si256((const __m256i *)(w + ch * BLOCK_BYTES + 32));      \
        const int8_t *x = a + ch * CHUNK;                                                         \
        _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) {                                     \
            const __m256i u0 = _mm256_and_si256(_mm256_srli_epi16(v0, 2 * i), mask);             \
            const __m256i u1 = _mm256_and_si256(_mm256_srli_epi16(v1, 2 * i), mask);             \
            _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) {                                \
                const __m256i b = _mm256_set1_epi32(load_i32(x + r * lda + 4 * i));               \
                ACCUMULATE(acc[r][0], u0, b);                                                     \
                ACCUMULATE(acc[r][1], u1, b);                                                     \
            }                                                                                     \
        }                                                                                         \
    }

/* One product and its sum as one asm statement: written as intrinsics, GCC 12 reassociates each accumulator's
 * chain of int16 adds (they are associative) into trees of products that outlive the 16 ymm registers, and
 * spilled 6-12 accumulators per chunk (the 6-row tile took 1.2-1.3x this time on an AVX2-only Zen 3). Both
 * assembler dialects ({AT&T|Intel}), so that a build with -masm=intel in CFLAGS still assembles. */
#define MADDUBS_INTO_INT16(acc, u, b)                                                             \
    do {                                                                                          \
        __m256i product_;                                                                         \
        __asm__("{vpmaddubsw %[acts], %[codes_u], %[product]|vpmaddubsw %[product], %[codes_u], %[acts]}" \
                "\n\t{vpaddw %[product], %[sums], %[sums]|vpaddw %[sums], %[sums], %[product]}"     \
                : [sums] "+x"(acc), [product] "=&x"(product_)                                      \
                : [codes_u] "x"(u), [acts] "x"(b));                                             \
    } while (0)

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
        TILE_256_CHUNKS(start, stop, MADDUBS_INTO_INT16)
#pragma GCC unroll 16
        for (int r = 0; r < R; r++)
            for (int h = 0; h < 2; h++) {
                __m256i *dst = (__m256i *)(c + r * TILE_LD + 8 * h);
                _mm256_storeu_si256(dst, _mm256_add_epi32(_mm256_loadu_si256(dst),
                                                          _mm256_madd_epi16(acc[r][h], ones)));
            }
    }
}

/* A tile of `rows` rows as row tiles of 6 (6 rows x 2 halves = 12 of the 16 ymm registers accumulate), each
 * by FIXED with its row count a constant. */
#define SIX_ROW_TILES(FIXED)                                                                      \
    for (int p = 0; p < panels; p++) {                                                            \
        const uint8_t *wp = w + p * panel_stride;                                                 \
        int32_t *cp = c + p * PANEL;                                                              \
        for (int r0 = 0; r0 < rows; r0 += 6) {                                                    \
            const int8_t *ar = a + r0 * lda;                                                      \
            int32_t *cr = cp + r0 * TILE_LD;                                                      \
            switch (rows - r0 < 6 ? rows - r0 : 6) {                                              \
                case 1: FIXED(ar, lda, wp, c0, c1, cr, 1); break;                                 \
                case 2: FIXED(ar, lda, wp, c0, c1, cr, 2); break;                                 \
                case 3: FIXED(ar, lda, wp, c0, c1, cr, 3); break;                                 \
                case 4: FIXED(ar, lda, wp, c0, c1, cr, 4); break;                                 \
                case 5: FIXED(ar, lda, wp, c0, c1, cr, 5); break;                                 \
                default: FIXED(ar, lda, wp, c0, c1, cr, 6); break;                                \
            }                                                                                     \
        }                                                                                         \
    }

static void tile_avx2(const int8_t *a, int64_t lda, int rows, const uint8_t *w, int64_t panel_stride,
                      int panels, int64_t c0, int64_t c1, int32_t *c) {
    SIX_ROW_TILES(tile_avx2_fixed)
}

/* The 32 code bytes of a GEMV step from byte j of a row of ldw bytes; the last step from a zero-padded copy
 * (rows end anywhere). */
static inline __attribute__((always_inline)) __m256i gemv_step_codes(const uint8_t *u, int64_t j, int64_t ldw) {
    if (j + 32 <= ldw) return _mm256_loadu_si256((const __m256i *)(u + j));
    uint8_t tail[32] = {0};
    memcpy(tail, u + j, (size_t)(ldw - j));
    return _mm256_loadu_si256((const __m256i *)tail);
}

static inline __attribute__((always_inline)) int32_t sum_lanes(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* One output's code bytes, 32 a step, against R activation rows; int16 lanes widened every 16 steps (4
 * products of at most 508 a step). */
static inline __attribute__((always_inline)) void gemv_avx2_fixed(const int8_t *a, int64_t lda, int64_t plane,
                                                                  const uint8_t *u, int64_t ldw, int32_t *c,
                                                                  int64_t ldc, const int R) {
    const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i acc[GEMV_ROWS], acc16[GEMV_ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_si256();
    for (int64_t start = 0; start < ldw; start += 16 * 32) {
        const int64_t stop = start + 16 * 32 < ldw ? start + 16 * 32 : ldw;
        for (int r = 0; r < R; r++) acc16[r] = _mm256_setzero_si256();
        for (int64_t j = start; j < stop; j += 32) {
            const __m256i v = gemv_step_codes(u, j, ldw);
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                const __m256i d = _mm256_and_si256(_mm256_srli_epi16(v, 2 * i), mask);
                for (int r = 0; r < R; r++)
                    acc16[r] = _mm256_add_epi16(acc16[r], _mm256_maddubs_epi16(
                        d, _mm256_loadu_si256((const __m256i *)(a + r * lda + i * plane + j))));
            }
        }
        for (int r = 0; r < R; r++) acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(acc16[r], ones));
    }
    for (int r = 0; r < R; r++) c[r * ldc] = sum_lanes(acc[r]);
}

/* Each output of [n0, n1) by FIXED with the row count a constant. */
#define GEMV_OUTPUTS(FIXED)                                                                       \
    for (int64_t n = n0; n < n1; n++) {                                                           \
        const uint8_t *u = w + n * ldw;                                                           \
        int32_t *cn = c + n - n0;                                                                 \
        switch (rows) {                                                                           \
            case 1: FIXED(a, lda, plane, u, ldw, cn, n1 - n0, 1); break;                          \
            case 2: FIXED(a, lda, plane, u, ldw, cn, n1 - n0, 2); break;                          \
            default: FIXED(a, lda, plane, u, ldw, cn, n1 - n0, 3); break; /* GEMV_ROWS */         \
        }                                                                                         \
    }

static void gemv_avx2(const int8_t *a, int64_t lda, int64_t plane, int rows, const uint8_t *w, int64_t ldw,
                      int64_t n0, int64_t n1, int32_t *c) {
    GEMV_OUTPUTS(gemv_avx2_fixed)
}

/* tq1 -> tq2, 16 tq1 bytes (80 codes) a step: each byte's five digits as 10 bits, computed as b + q1 + 4 q2 +
 * 16 q3 + 64 q4 - 768 q5 with q_p = floor(b / 3^p) (that is sum_p (q_p - 3 q_(p+1)) 4^p; 16-bit multiply-high
 * by ceil(2^16 / 3^p) is exact for bytes), pairs joined into 20 bits a dword by vpmaddwd, pairs of those into
 * 40 bits a qword, and each qword's 5 bytes moved together: 20 bytes out, by two overlapping 16-byte stores
 * (the 6 past them rewritten by the next step or the scalar tail). */
static void widen_avx2(const uint8_t *s, int64_t K, const uint16_t *digits, uint8_t *d) {
    const int64_t in_bytes = (K + 4) / 5, out_bytes = (K + 3) / 4;
    const __m256i third = _mm256_set1_epi16(21846), ninth = _mm256_set1_epi16(7282);
    const __m256i q3_of = _mm256_set1_epi16(2428), q4_of = _mm256_set1_epi16(810), q5_of = _mm256_set1_epi16(270);
    const __m256i join = _mm256_set1_epi32(1 | 1024 << 16), low = _mm256_set1_epi64x(0xFFFFF);
    const __m256i high = _mm256_set1_epi64x(0xFFFFFLL << 20), three_fourths = _mm256_set1_epi16(768);
    const __m256i five_of_eight = _mm256_setr_epi8(0, 1, 2, 3, 4, 8, 9, 10, 11, 12, -1, -1, -1, -1, -1, -1,
                                                   0, 1, 2, 3, 4, 8, 9, 10, 11, 12, -1, -1, -1, -1, -1, -1);
    int64_t j = 0;
    for (; j + 16 <= in_bytes && j / 4 * 5 + 26 <= out_bytes; j += 16) {
        const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(s + j)));
        __m256i bits = _mm256_add_epi16(b, _mm256_mulhi_epu16(b, third));
        bits = _mm256_add_epi16(bits, _mm256_slli_epi16(_mm256_mulhi_epu16(b, ninth), 2));
        bits = _mm256_add_epi16(bits, _mm256_slli_epi16(_mm256_mulhi_epu16(b, q3_of), 4));
        bits = _mm256_add_epi16(bits, _mm256_slli_epi16(_mm256_mulhi_epu16(b, q4_of), 6));
        bits = _mm256_sub_epi16(bits, _mm256_mullo_epi16(_mm256_mulhi_epu16(b, q5_of), three_fourths));
        const __m256i pairs = _mm256_madd_epi16(bits, join);
        const __m256i quads = _mm256_or_si256(_mm256_and_si256(pairs, low),
                                              _mm256_and_si256(_mm256_srli_epi64(pairs, 12), high));
        const __m256i packed = _mm256_shuffle_epi8(quads, five_of_eight);
        uint8_t *o = d + j / 4 * 5;
        _mm_storeu_si128((__m128i *)o, _mm256_castsi256_si128(packed));
        _mm_storeu_si128((__m128i *)(o + 10), _mm256_extracti128_si256(packed, 1));
    }
    tq1_row_from(s, K, digits, d, j);
}

/* 8 rows' words of 8 chunks (a row's 32 bytes a register) transposed into 8 blocks' half (`half`: outputs
 * 0-7 or 8-15): 32-bit, then 64-bit unpacks transpose each 128-bit lane's 4 x 4 words; 128-bit permutes
 * join the lanes. */
static inline __attribute__((always_inline)) void transpose_8x8(const __m256i row[8], uint8_t *dst, int half) {
    __m256i t[8], v[8];
    for (int r = 0; r < 8; r += 2) {
        t[r] = _mm256_unpacklo_epi32(row[r], row[r + 1]);
        t[r + 1] = _mm256_unpackhi_epi32(row[r], row[r + 1]);
    }
    for (int g = 0; g < 2; g++) { /* v[4 g + j]: rows 4 g .. 4 g + 3 of column 4 L + j in lane L */
        v[4 * g + 0] = _mm256_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        v[4 * g + 1] = _mm256_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        v[4 * g + 2] = _mm256_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        v[4 * g + 3] = _mm256_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    for (int j = 0; j < 4; j++) {
        _mm256_storeu_si256((__m256i *)(dst + j * BLOCK_BYTES + 32 * half),
                            _mm256_permute2x128_si256(v[j], v[4 + j], 0x20));
        _mm256_storeu_si256((__m256i *)(dst + (4 + j) * BLOCK_BYTES + 32 * half),
                            _mm256_permute2x128_si256(v[j], v[4 + j], 0x31));
    }
}

/* Runs of 8 chunks: 16 rows' 32 bytes loaded and transposed in registers, as two 8 x 8; the chunks left
 * whole in every row: word by word (the AVX2 gather instructions are slow on many CPUs). */
static void gather_avx2(const uint8_t *w, int64_t ldw, int64_t N, int64_t p0, int panels, int64_t Kc,
                        uint8_t *blocks) {
    const int64_t full = ldw / 4 < Kc ? ldw / 4 : Kc, runs = full / 8;
    const __m256i zero_codes = _mm256_set1_epi8(ZERO_CODES);
    for (int p = 0; p < panels; p++) {
        const int64_t row0 = (p0 + p) * PANEL;
        const int valid = (int)(N - row0 < PANEL ? N - row0 : PANEL);
        const uint8_t *src = w + row0 * ldw;
        uint8_t *dst = blocks + p * Kc * BLOCK_BYTES;
        for (int64_t run = 0; run < runs; run++)
            for (int half = 0; half < 2; half++) {
                __m256i row[8];
                for (int n = 0; n < 8; n++)
                    row[n] = 8 * half + n < valid
                                 ? _mm256_loadu_si256((const __m256i *)(src + (8 * half + n) * ldw + 32 * run))
                                 : zero_codes;
                transpose_8x8(row, dst + 8 * run * BLOCK_BYTES, half);
            }
        for (int n = 0; n < PANEL; n++)
            gather_words(w, ldw, N, row0 + n, 8 * runs, Kc, dst + 4 * n);
    }
}

#pragma GCC pop_options

#ifdef BF_AVXVNNI
#pragma GCC push_options
#pragma GCC target("avx2,fma,avxvnni")

#define DPBUSD_INTO_INT32(acc, u, b) (acc) = _mm256_dpbusd_avx_epi32((acc), (u), (b))

/* The AVX2 tile with vpdpbusd: 4 products a lane summed straight into int32, so no int16 sums to widen, and
 * one instruction where AVX2 takes two (vpmaddubsw + vpaddw). (12 rows against one half of a panel at a
 * time, decoding each digit plane for twice the rows, was as fast from 256 tokens and 1.15x slower at 16.) */
static inline __attribute__((always_inline)) void tile_avxvnni_fixed(const int8_t *a, int64_t lda,
                                                                     const uint8_t *w, int64_t c0, int64_t c1,
                                                                     int32_t *c, const int R) {
    const __m256i mask = _mm256_set1_epi8(3);
    __m256i acc[MAX_ROWS][2];
#pragma GCC unroll 16
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    TILE_256_CHUNKS(c0, c1, DPBUSD_INTO_INT32)
#pragma GCC unroll 16
    for (int r = 0; r < R; r++) {
        _mm256_storeu_si256((__m256i *)(c + r * TILE_LD), acc[r][0]);
        _mm256_storeu_si256((__m256i *)(c + r * TILE_LD + 8), acc[r][1]);
    }
}

static void tile_avxvnni(const int8_t *a, int64_t lda, int rows, const uint8_t *w, int64_t panel_stride,
                         int panels, int64_t c0, int64_t c1, int32_t *c) {
    SIX_ROW_TILES(tile_avxvnni_fixed)
}

/* The AVX2 GEMV with vpdpbusd, one accumulator per (row, digit plane) as AVX-512's, so that vpdpbusd's
 * latency overlaps. */
static inline __attribute__((always_inline)) void gemv_avxvnni_fixed(const int8_t *a, int64_t lda, int64_t plane,
                                                                     const uint8_t *u, int64_t ldw, int32_t *c,
                                                                     int64_t ldc, const int R) {
    const __m256i mask = _mm256_set1_epi8(3);
    __m256i acc[GEMV_ROWS][4];
    for (int r = 0; r < R; r++)
        for (int i = 0; i < 4; i++) acc[r][i] = _mm256_setzero_si256();
    for (int64_t j = 0; j < ldw; j += 32) {
        const __m256i v = gemv_step_codes(u, j, ldw);
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) {
            const __m256i d = _mm256_and_si256(_mm256_srli_epi16(v, 2 * i), mask);
            for (int r = 0; r < R; r++)
                acc[r][i] = _mm256_dpbusd_avx_epi32(
                    acc[r][i], d, _mm256_loadu_si256((const __m256i *)(a + r * lda + i * plane + j)));
        }
    }
    for (int r = 0; r < R; r++)
        c[r * ldc] = sum_lanes(_mm256_add_epi32(_mm256_add_epi32(acc[r][0], acc[r][1]),
                                                _mm256_add_epi32(acc[r][2], acc[r][3])));
}

static void gemv_avxvnni(const int8_t *a, int64_t lda, int64_t plane, int rows, const uint8_t *w, int64_t ldw,
                         int64_t n0, int64_t n1, int32_t *c) {
    GEMV_OUTPUTS(gemv_avxvnni_fixed)
}

#pragma GCC pop_options
#endif /* BF_AVXVNNI */

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vnni")

static void quantize_row_avx512(const float *x, int64_t K, int64_t row_bytes, int8_t *q, float *scale) {
    quantize_row_body(x, K, row_bytes, q, scale);
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

/* One output's code bytes, 64 a step (the last one a masked load: rows end anywhere), against R activation
 * rows; one accumulator per (row, digit plane), so that vpdpbusd's latency overlaps. */
static inline __attribute__((always_inline)) void gemv_avx512_fixed(const int8_t *a, int64_t lda, int64_t plane,
                                                                    const uint8_t *u, int64_t ldw, int32_t *c,
                                                                    int64_t ldc, const int R) {
    const __m512i mask = _mm512_set1_epi8(3);
    __m512i acc[GEMV_ROWS][4];
    for (int r = 0; r < R; r++)
        for (int i = 0; i < 4; i++) acc[r][i] = _mm512_setzero_si512();
    for (int64_t j = 0; j < ldw; j += GEMV_STEP) {
        const __mmask64 valid = j + GEMV_STEP <= ldw ? ~0ULL : (1ULL << (ldw - j)) - 1;
        const __m512i v = _mm512_maskz_loadu_epi8(valid, u + j);
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) {
            const __m512i d = _mm512_and_si512(_mm512_srli_epi16(v, 2 * i), mask);
            for (int r = 0; r < R; r++)
                acc[r][i] = _mm512_dpbusd_epi32(acc[r][i], d, _mm512_loadu_si512(
                    (const void *)(a + r * lda + i * plane + j)));
        }
    }
    for (int r = 0; r < R; r++)
        c[r * ldc] = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(acc[r][0], acc[r][1]),
                                                              _mm512_add_epi32(acc[r][2], acc[r][3])));
}

static void gemv_avx512(const int8_t *a, int64_t lda, int64_t plane, int rows, const uint8_t *w, int64_t ldw,
                        int64_t n0, int64_t n1, int32_t *c) {
    GEMV_OUTPUTS(gemv_avx512_fixed)
}

/* 16 rows' words of 16 chunks (a row's 64 bytes a register) transposed into 16 blocks' 16 words: 32-bit,
 * then 64-bit unpacks transpose each 128-bit lane's 4 x 4 words; 128-bit shuffles gather the lanes. */
static inline __attribute__((always_inline)) void transpose_16x16(const __m512i row[16], uint8_t *dst) {
    __m512i t[16], v[16];
    for (int r = 0; r < 16; r += 2) {
        t[r] = _mm512_unpacklo_epi32(row[r], row[r + 1]);
        t[r + 1] = _mm512_unpackhi_epi32(row[r], row[r + 1]);
    }
    for (int g = 0; g < 4; g++) { /* v[4 g + j]: rows 4 g .. 4 g + 3 of column 4 L + j in lane L */
        v[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        v[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        v[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        v[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    for (int j = 0; j < 4; j++) {
        const __m512i ab_lo = _mm512_shuffle_i32x4(v[j], v[4 + j], 0x44);
        const __m512i cd_lo = _mm512_shuffle_i32x4(v[8 + j], v[12 + j], 0x44);
        const __m512i ab_hi = _mm512_shuffle_i32x4(v[j], v[4 + j], 0xee);
        const __m512i cd_hi = _mm512_shuffle_i32x4(v[8 + j], v[12 + j], 0xee);
        _mm512_storeu_si512((void *)(dst + (0 + j) * BLOCK_BYTES), _mm512_shuffle_i32x4(ab_lo, cd_lo, 0x88));
        _mm512_storeu_si512((void *)(dst + (4 + j) * BLOCK_BYTES), _mm512_shuffle_i32x4(ab_lo, cd_lo, 0xdd));
        _mm512_storeu_si512((void *)(dst + (8 + j) * BLOCK_BYTES), _mm512_shuffle_i32x4(ab_hi, cd_hi, 0x88));
        _mm512_storeu_si512((void *)(dst + (12 + j) * BLOCK_BYTES), _mm512_shuffle_i32x4(ab_hi, cd_hi, 0xdd));
    }
}

/* Runs of 16 chunks: 16 rows' 64 bytes loaded and transposed in registers; the rest word by word. */
static void gather_avx512(const uint8_t *w, int64_t ldw, int64_t N, int64_t p0, int panels, int64_t Kc,
                          uint8_t *blocks) {
    const int64_t full = ldw / 4 < Kc ? ldw / 4 : Kc, runs = full / 16;
    const __m512i zero_codes = _mm512_set1_epi8(ZERO_CODES);
    for (int p = 0; p < panels; p++) {
        const int64_t row0 = (p0 + p) * PANEL;
        const int valid = (int)(N - row0 < PANEL ? N - row0 : PANEL);
        const uint8_t *src = w + row0 * ldw;
        uint8_t *dst = blocks + p * Kc * BLOCK_BYTES;
        for (int64_t run = 0; run < runs; run++) {
            __m512i row[16];
            for (int n = 0; n < 16; n++)
                row[n] = n < valid ? _mm512_loadu_si512((const void *)(src + n * ldw + 64 * run)) : zero_codes;
            transpose_16x16(row, dst + 16 * run * BLOCK_BYTES);
        }
        for (int n = 0; n < PANEL; n++)
            gather_words(w, ldw, N, row0 + n, 16 * runs, Kc, dst + 4 * n);
    }
}

#pragma GCC pop_options
#endif /* BF_X86 */

/* ---------------------------------------------------------------- dispatch and driver */

typedef void (*quantize_fn)(const float *x, int64_t K, int64_t row_bytes, int8_t *q, float *scale);
typedef void (*transpose_fn)(int8_t *q, int64_t bytes);

typedef struct {
    tile_fn tile;
    gemv_fn gemv;
    gather_fn gather;
    quantize_fn quantize;
    transpose_fn transpose_chunks;
    widen_fn widen;
    int rows, panels; /* the tile shape `tile` is fastest at */
} isa_kernels;

/* The exported functions' signatures, as _library.py binds them: bumped with any change, so that a library
 * built from older source (an editable install not rebuilt) is refused instead of called with the wrong
 * arguments. 2: bf_linear's tq1 flag, bf_tq1_to_tq2's ISA. 3: ISA numbers (AVX-VNNI is 2). */
#define BF_ABI_VERSION 3

int bf_abi_version(void) { return BF_ABI_VERSION; }

/* Whether this build has the ISA's path (bf_isa_supported: and this CPU can run it). */
int bf_isa_built(int isa) {
#ifdef BF_X86
    if (isa == ISA_AVX2 || isa == ISA_AVX512VNNI) return 1;
#endif
#ifdef BF_AVXVNNI
    if (isa == ISA_AVXVNNI) return 1;
#endif
    return isa == ISA_GENERIC;
}

int bf_isa_supported(int isa) {
    if (isa == ISA_GENERIC) return 1;
#ifdef BF_X86
    __builtin_cpu_init();
    if (isa == ISA_AVX2) return __builtin_cpu_supports("avx2");
#ifdef BF_AVXVNNI
    if (isa == ISA_AVXVNNI) { /* CPUID leaf 7, subleaf 1, EAX bit 4 (older compilers' cpu_supports lack it) */
        unsigned int subleaves, eax, ebx, ecx, edx;
        return __builtin_cpu_supports("avx2") && __get_cpuid_count(7, 0, &subleaves, &ebx, &ecx, &edx) &&
               subleaves >= 1 && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && (eax >> 4 & 1);
    }
#endif
    if (isa == ISA_AVX512VNNI)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vnni");
#endif
    return 0;
}

static int select_isa(int isa, isa_kernels *k) {
    if (!bf_isa_supported(isa)) return -1;
    *k = (isa_kernels){tile_generic, gemv_generic, gather_generic, quantize_row_generic, transpose_chunks_generic,
                          widen_generic, 4, 1};
#ifdef BF_X86
    if (isa == ISA_AVX2) *k = (isa_kernels){tile_avx2, gemv_avx2, gather_avx2, quantize_row_avx2,
                                          transpose_chunks_avx2, widen_avx2, 6, 1};
#ifdef BF_AVXVNNI
    if (isa == ISA_AVXVNNI) *k = (isa_kernels){tile_avxvnni, gemv_avxvnni, gather_avx2, quantize_row_avx2,
                                             transpose_chunks_avx2, widen_avx2, 6, 1};
#endif
    if (isa == ISA_AVX512VNNI) *k = (isa_kernels){tile_avx512, gemv_avx512, gather_avx512, quantize_row_avx512,
                                                transpose_chunks_avx2, widen_avx2, AVX512_ROWS, 2};
#endif
    return 0;
}

/* The epilogue of one output: per scale group, the int32 sums minus the activation sums (w = u - 1) times
 * the weight scale, added in fp32 in the order reference.linear_a8 uses, then times the activation scale,
 * plus the bias: bit-identical to it. */
static inline float finish(float f, float act_scale, const float *bias, int64_t n) {
    const float v = f * act_scale;
    return bias ? v + bias[n] : v;
}

/* One tile of the output: rows [m0, m0 + rows) x the gathered panels [p0, p0 + panels). */
static void compute_tile(tile_fn tile, const int8_t *q, int64_t ldq, const float *act_scale,
                         const int32_t *act_sums, int64_t m0, int rows, const uint8_t *blocks, int64_t Kc,
                         int64_t p0, int panels, int64_t N, const float *scales, int64_t groups,
                         int64_t group_chunks, const float *bias, float *out) {
    int32_t c[MAX_ROWS * TILE_LD];
    float f[MAX_ROWS * TILE_LD] = {0};
    const int cols = panels * PANEL;
    for (int64_t g = 0; g < groups; g++) {
        const int64_t c0 = g * group_chunks, c1 = c0 + group_chunks < Kc ? c0 + group_chunks : Kc;
        tile(q + m0 * ldq, ldq, rows, blocks, Kc * BLOCK_BYTES, panels, c0, c1, c);
        const float *ws = scales + p0 * PANEL * groups + g; /* output n's scale: ws[n * groups] */
        for (int r = 0; r < rows; r++) {
            const int32_t sum = act_sums[(m0 + r) * groups + g];
            float *fr = f + r * TILE_LD;
            const int32_t *cr = c + r * TILE_LD;
            for (int n = 0; n < cols; n++) { /* one group: no zero added first (as the reference: -0 stays -0) */
                const float part = (float)(cr[n] - sum) * ws[n * groups];
                fr[n] = groups == 1 ? part : fr[n] + part;
            }
        }
    }
    for (int r = 0; r < rows; r++) {
        float *y = out + (m0 + r) * N + p0 * PANEL;
        const int64_t valid = N - p0 * PANEL < cols ? N - p0 * PANEL : cols;
        for (int64_t n = 0; n < valid; n++)
            y[n] = finish(f[r * TILE_LD + n], act_scale[m0 + r], bias, p0 * PANEL + n);
    }
}

/* Rows [n0, n1) of a tq1 layer (rows lds apart) into tq2 rows from dst on, ldd apart. */
static void tq1_rows_to_tq2(widen_fn widen, const uint8_t *src, int64_t lds, int64_t n0, int64_t n1, int64_t K,
                            const uint16_t *digits, uint8_t *dst, int64_t ldd) {
    for (int64_t n = n0; n < n1; n++) widen(src + n * lds, K, digits, dst + (n - n0) * ldd);
}

/* The whole layer widened, its rows shared out to the threads (bf_linear's transient for many tokens). */
static void tq1_layer_to_tq2(widen_fn widen, const uint8_t *src, int64_t lds, int64_t N, int64_t K,
                             const uint16_t *digits, uint8_t *dst, int64_t ldd, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (N * ((K + 4) / 5) >= PARALLEL_GEMV_BYTES)
    for (int64_t n = 0; n < N; n++) widen(src + n * lds, K, digits, dst + n * ldd);
}

/* tq1_layer_to_tq2 on its own, for the tests to compare with formats.convert on each ISA. Returns 0, or -1
 * if the ISA is not supported here. */
int bf_tq1_to_tq2(const uint8_t *src, int64_t lds, int64_t N, int64_t K, uint8_t *dst, int64_t ldd,
                  int threads, int isa) {
    isa_kernels k;
    if (select_isa(isa, &k)) return -1;
    if (N <= 0 || K <= 0) return 0;
    uint16_t digits[256];
    tq1_digit_table(digits);
    tq1_layer_to_tq2(k.widen, src, lds, N, K, digits, dst, ldd, threads < 1 ? 1 : threads);
    return 0;
}

/* out (M, N) fp32 = W1.58A8 linear of x (M, K) fp32 rows `ldx` apart. w: the layer's codes, N rows of ldw
 * bytes, tq2 (ldw >= ceil(K / 4)) or, with tq1, tq1 (ldw >= ceil(K / 5)), widened to tq2 as they are read: a
 * panel or weight tile at a time into a per-thread buffer (L1/L2), where the whole layer would be written
 * to memory and read back (at one token, by table, the whole-layer widening took 4-5x the GEMV's time); only
 * when row blocks would widen each tile more than once (many tokens) is the layer widened first, into a
 * transient. scales (ceil(N / 16) * 16, groups) fp32, group_chunks 16-input chunks per group; bias (N) or
 * NULL. Returns 0, or -1 if the ISA is not supported here, -2 if out of memory. */
int bf_linear(const float *x, int64_t M, int64_t K, int64_t ldx, const uint8_t *w, int64_t ldw, int tq1,
              int64_t N, const float *scales, int64_t groups, int64_t group_chunks, const float *bias, float *out,
              int threads, int isa) {
    isa_kernels k;
    if (select_isa(isa, &k)) return -1;
    if (M <= 0) return 0;
    const int64_t Kc = (K + CHUNK - 1) / CHUNK, panels = (N + PANEL - 1) / PANEL;
    const int gemv = M <= GEMV_ROWS && groups == 1;
    uint16_t digits[256];
    if (tq1) tq1_digit_table(digits);
    const int64_t ldt = tq1 ? (K + 3) / 4 : ldw; /* the tq2 rows the kernels read */
    /* The GEMV's planes hold 4 activations per chunk, padded for its last (masked) step of code bytes; the
     * tiles read whole chunks. */
    const int64_t row_codes = ldt > 4 * Kc ? ldt : 4 * Kc; /* code bytes a GEMV step may read a row */
    const int64_t plane = gemv ? (row_codes + GEMV_STEP - 1) / GEMV_STEP * GEMV_STEP : 0;
    const int64_t ldq = gemv ? 4 * plane : Kc * CHUNK;
    /* MAX_ROWS rows more than M: GCC 12 -O3 vectorizes tile_generic's loop over a tile's rows, each iteration
     * loading the words of the 3 rows after it too, past the last tile's end (values unused); the padding keeps
     * those loads inside the buffer (they faulted where it ended at an unmapped page, as in a thread's heap). */
    const size_t q_bytes = (size_t)(((M + MAX_ROWS) * ldq + 63) / 64 * 64); /* C11: a multiple of the alignment */
    int8_t *q = aligned_alloc(64, q_bytes);
    int8_t *natural = gemv ? malloc((size_t)(M * Kc * CHUNK)) : NULL; /* the GEMV's rows before the planes */
    float *act_scale = malloc(sizeof(float) * (size_t)M);
    int32_t *act_sums = malloc(sizeof(int32_t) * (size_t)(M * groups));
    if (!q || (gemv && !natural) || !act_scale || !act_sums) {
        free(q), free(natural), free(act_scale), free(act_sums);
        return -2;
    }
    if (threads < 1) threads = 1;

    /* Small inputs are quantized by this thread alone: the time a second thread takes to join a parallel
     * region (milliseconds when other processes hold the cores) would dwarf the work. */
#pragma omp parallel for num_threads(threads) schedule(static) if (M * K >= PARALLEL_QUANTIZE_ELEMENTS)
    for (int64_t m = 0; m < M; m++) {
        int8_t *qm = q + m * ldq;
        if (gemv) {
            k.quantize(x + m * ldx, K, Kc * CHUNK, natural + m * Kc * CHUNK, act_scale + m);
            to_planes(natural + m * Kc * CHUNK, Kc * CHUNK, plane, qm);
        } else {
            k.quantize(x + m * ldx, K, ldq, qm, act_scale + m);
            k.transpose_chunks(qm, ldq);
        }
        for (int64_t g = 0; g < groups; g++) { /* chunks stay whole in either layout; one group: the row */
            const int64_t start = groups == 1 ? 0 : g * group_chunks * CHUNK;
            const int64_t stop = groups == 1 ? ldq : (g + 1) * group_chunks * CHUNK;
            int32_t s = 0;
            for (int64_t j = start; j < stop && j < ldq; j++) s += qm[j];
            act_sums[m * groups + g] = s;
        }
    }

    int status = 0;
    if (gemv) {
        /* Few tokens: each output's codes are read once, in place; runs of 16 outputs, 4 runs a task. */
#pragma omp parallel num_threads(threads) if (N * ldw >= PARALLEL_GEMV_BYTES)
        {
            uint8_t *widened = tq1 ? malloc((size_t)(PANEL * ldt)) : NULL; /* a tq1 panel's tq2 rows */
            if (tq1 && !widened) {
#pragma omp atomic write
                status = -2;
            }
#pragma omp for schedule(dynamic, 4)
            for (int64_t p = 0; p < panels; p++) {
                if (tq1 && !widened) continue;
                const int64_t n0 = p * PANEL, n1 = n0 + PANEL < N ? n0 + PANEL : N;
                int32_t c[GEMV_ROWS * PANEL];
                if (tq1) {
                    tq1_rows_to_tq2(k.widen, w, ldw, n0, n1, K, digits, widened, ldt);
                    k.gemv(q, ldq, plane, (int)M, widened, ldt, 0, n1 - n0, c);
                } else {
                    k.gemv(q, ldq, plane, (int)M, w, ldw, n0, n1, c);
                }
                for (int64_t m = 0; m < M; m++)
                    for (int64_t n = n0; n < n1; n++) {
                        const float f = (float)(c[m * (n1 - n0) + n - n0] - act_sums[m]) * scales[n];
                        out[m * N + n] = finish(f, act_scale[m], bias, n);
                    }
            }
            free(widened);
        }
    } else {
        /* Rows go in blocks whose activations stay in L2; a block is shared out to the threads by weight tile,
         * whose blocks are gathered once into the thread's buffer and meet all of the block's row tiles
         * there. Dynamic scheduling evens out cores slowed by other processes. */
        int64_t block_rows = L2_ACTIVATION_BYTES / ldq / k.rows * k.rows;
        block_rows = block_rows < k.rows ? k.rows : block_rows;
        const int64_t m_blocks = (M + block_rows - 1) / block_rows, n_tiles = (panels + k.panels - 1) / k.panels;
        /* tq1: each tile is widened where it is gathered, unless several row blocks would gather it */
        const int tile_widening = tq1 && m_blocks == 1;
        uint8_t *transient = tq1 && !tile_widening ? malloc((size_t)(N * ldt)) : NULL;
        if (tq1 && !tile_widening) {
            if (!transient) {
                free(q), free(natural), free(act_scale), free(act_sums);
                return -2;
            }
            tq1_layer_to_tq2(k.widen, w, ldw, N, K, digits, transient, ldt, threads);
        }
        const uint8_t *codes = transient ? transient : w;
        const int64_t ldc = transient ? ldt : ldw;
#pragma omp parallel num_threads(threads)
        {
            uint8_t *blocks = aligned_alloc(64, (size_t)(k.panels * Kc * BLOCK_BYTES));
            uint8_t *widened = tile_widening ? malloc((size_t)(k.panels * PANEL * ldt)) : NULL;
            if (!blocks || (tile_widening && !widened)) {
#pragma omp atomic write
                status = -2;
            }
#pragma omp for collapse(2) schedule(dynamic)
            for (int64_t mb = 0; mb < m_blocks; mb++)
                for (int64_t nt = 0; nt < n_tiles; nt++) {
                    if (!blocks || (tile_widening && !widened)) continue;
                    const int64_t p0 = nt * k.panels, m_end = (mb + 1) * block_rows < M ? (mb + 1) * block_rows : M;
                    const int np = (int)(panels - p0 < k.panels ? panels - p0 : k.panels);
                    if (tile_widening) { /* the tile's rows, then gathered as a layer of that many rows */
                        const int64_t n0 = p0 * PANEL, n1 = n0 + np * PANEL < N ? n0 + np * PANEL : N;
                        tq1_rows_to_tq2(k.widen, w, ldw, n0, n1, K, digits, widened, ldt);
                        k.gather(widened, ldt, n1 - n0, 0, np, Kc, blocks);
                    } else {
                        k.gather(codes, ldc, N, p0, np, Kc, blocks);
                    }
                    for (int64_t m0 = mb * block_rows; m0 < m_end; m0 += k.rows) {
                        const int rows = (int)(m_end - m0 < k.rows ? m_end - m0 : k.rows);
                        compute_tile(k.tile, q, ldq, act_scale, act_sums, m0, rows, blocks, Kc, p0, np, N,
                                     scales, groups, group_chunks, bias, out);
                    }
                }
            free(blocks), free(widened);
        }
        free(transient);
    }

    free(q), free(natural), free(act_scale), free(act_sums);
    return status;
}
