// Quantizes float32 rows with ggml's own quantizers (ggml_quantize_chunk: the reference
// quantizers, or the importance-weighted ones when an importance vector is given), so that tests
// can compare lowbit's GGUF block packers with ggml byte for byte. Built by
// scripts/build_llama_cpp.sh against the llama.cpp tree it builds.
//
//   ggml-quantize TYPE ROWS COLS IN.f32 OUT.bin [IMPORTANCE.f32]
//   TYPE: a ggml type name (q4_0, q4_K, ...); IMPORTANCE: COLS float32 values (imatrix means)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "ggml.h"

static bool read_all(const char * path, void * dst, size_t bytes) {
    FILE * f = fopen(path, "rb");
    if (!f) return false;
    const bool ok = fread(dst, 1, bytes, f) == bytes && fgetc(f) == EOF;
    fclose(f);
    return ok;
}

int main(int argc, char ** argv) {
    if (argc != 6 && argc != 7) {
        fprintf(stderr, "usage: %s TYPE ROWS COLS IN.f32 OUT.bin [IMPORTANCE.f32]\n", argv[0]);
        return 2;
    }
    int type = -1;
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        const char * name = ggml_type_name((enum ggml_type) t);
        if (name && strcmp(name, argv[1]) == 0) type = t;
    }
    if (type < 0) { fprintf(stderr, "ggml-quantize: unknown type %s\n", argv[1]); return 2; }
    const int64_t rows = atoll(argv[2]), cols = atoll(argv[3]);
    if (rows <= 0 || cols <= 0 || cols % ggml_blck_size((enum ggml_type) type) != 0) {
        fprintf(stderr, "ggml-quantize: bad shape %lld x %lld for %s\n", (long long) rows, (long long) cols, argv[1]);
        return 2;
    }
    std::vector<float> src(rows * cols), importance;
    if (!read_all(argv[4], src.data(), src.size() * sizeof(float))) {
        fprintf(stderr, "ggml-quantize: %s is not %lld float32 values\n", argv[4], (long long) (rows * cols));
        return 2;
    }
    if (argc == 7) {
        importance.resize(cols);
        if (!read_all(argv[6], importance.data(), cols * sizeof(float))) {
            fprintf(stderr, "ggml-quantize: %s is not %lld float32 values\n", argv[6], (long long) cols);
            return 2;
        }
    }
    const size_t row_bytes = ggml_row_size((enum ggml_type) type, cols);
    std::vector<unsigned char> dst(rows * row_bytes);
    ggml_quantize_chunk((enum ggml_type) type, src.data(), dst.data(), 0, rows, cols,
                        importance.empty() ? nullptr : importance.data());
    FILE * f = fopen(argv[5], "wb");
    if (!f || fwrite(dst.data(), 1, dst.size(), f) != dst.size() || fclose(f) != 0) {
        fprintf(stderr, "ggml-quantize: cannot write %s\n", argv[5]);
        return 1;
    }
    return 0;
}
