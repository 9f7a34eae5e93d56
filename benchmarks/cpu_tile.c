/* The C kernel's inner tile alone, hot in L1, one thread: multiply-adds per second for each ISA path this CPU
 * runs, at the tile shape the driver uses (docs/CPU_KERNEL.md) over K = 3072. The ceiling the GEMM's other
 * parts (quantizing, gathering, the epilogue, output page faults) are measured against; cpu_linear.py times
 * whole layers.
 *
 *     gcc -O3 -std=c11 -fopenmp -ffp-contract=off benchmarks/cpu_tile.c -o /tmp/cpu_tile && /tmp/cpu_tile [seconds]
 *
 * (the flags setup.py builds the library with). The kernel source is included, so its static tiles are
 * timed as compiled there. */
#include "../src/bitflux/kernels/cpu/ternary_gemm.c"

#include <stdio.h>
#include <time.h>

static double seconds_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

int main(int argc, char **argv) {
    const double budget = argc > 1 ? atof(argv[1]) : 1.0; /* seconds per path */
    static const char *names[] = {"generic", "avx2", "avxvnni", "avx512vnni"};
    const int64_t Kc = 3072 / CHUNK, lda = Kc * CHUNK;
    int8_t *a = aligned_alloc(64, (size_t)(MAX_ROWS * lda));
    uint8_t *w = aligned_alloc(64, (size_t)(MAX_PANELS * Kc * BLOCK_BYTES));
    for (int64_t i = 0; i < MAX_ROWS * lda; i++) a[i] = (int8_t)((i * 7) % 255 - 127);
    for (int64_t i = 0; i < MAX_PANELS * Kc * BLOCK_BYTES; i++) /* four codes u in {0, 1, 2} a byte */
        w[i] = (uint8_t)(i % 3 | (i + 1) % 3 << 2 | (i / 3 + 2) % 3 << 4 | (i / 9) % 3 << 6);
    int32_t c[MAX_ROWS * TILE_LD];
    for (int isa = ISA_GENERIC; isa <= ISA_AVX512VNNI; isa++) {
        isa_kernels k;
        if (!bf_isa_built(isa) || select_isa(isa, &k)) continue;
        const double multiply_adds = (double)k.rows * k.panels * PANEL * Kc * CHUNK; /* per call */
        long calls = 0;
        const double start = seconds_now();
        double elapsed = 0;
        while (elapsed < budget) {
            for (int i = 0; i < 100; i++, calls++) {
                k.tile(a, lda, k.rows, w, Kc * BLOCK_BYTES, k.panels, 0, Kc, c);
                __asm__ volatile("" : : "r"(c) : "memory"); /* the sums are used */
            }
            elapsed = seconds_now() - start;
        }
        printf("%-10s tile %2d rows x %2d outputs: %7.1f G multiply-adds/s, %6.2f ns per 16-input chunk\n",
               names[isa], k.rows, k.panels * PANEL, calls * multiply_adds / elapsed * 1e-9, elapsed / calls / Kc * 1e9);
    }
    free(a), free(w);
    return 0;
}
