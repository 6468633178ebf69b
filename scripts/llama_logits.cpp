// Prints the logits llama.cpp computes for a sequence of token ids, so that tests can compare a
// GGUF file lowbit wrote with lowbit's own model: llama.cpp's tools print text or perplexity, not
// logits. Built against the llama.cpp tree by scripts/build_llama_cpp.sh.
//
//   llama-logits MODEL.gguf ID ID ID ...   > logits.f32   (n_tokens x n_vocab, float32, row-major)
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "llama.h"

static void quiet(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.gguf TOKEN_ID [TOKEN_ID ...]\n", argv[0]);
        return 2;
    }
    std::vector<llama_token> tokens;
    for (int i = 2; i < argc; ++i) tokens.push_back((llama_token) atoi(argv[i]));
    const int n = (int) tokens.size();

    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params model_params = llama_model_default_params();
    model_params.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(argv[1], model_params);
    if (!model) { fprintf(stderr, "llama-logits: cannot load %s\n", argv[1]); return 1; }

    llama_context_params ctx_params = llama_context_default_params();
    ctx_params.n_ctx = n;
    ctx_params.n_batch = n;
    ctx_params.n_ubatch = n;
    ctx_params.no_perf = true;
    llama_context * ctx = llama_init_from_model(model, ctx_params);
    if (!ctx) { fprintf(stderr, "llama-logits: cannot create a context\n"); return 1; }

    llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; ++i) {
        batch.token[i] = tokens[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = true;
    }
    batch.n_tokens = n;
    if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "llama-logits: decode failed\n"); return 1; }

    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    for (int i = 0; i < n; ++i) fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, stdout);

    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
