// llama.cpp tap for the qwen25vl conformance harness: one process per request row.
// usage: tap TEXT.gguf MMPROJ.gguf PROMPT_FILE OUT_DIR N_PREDICT EOS_IDS(comma) [IMAGE...]
// The prompt carries mtmd's media marker once per image. Everything is evaluated with llama.cpp's own
// tokenizer (mtmd_tokenize), image preprocessing and vision encoder (mtmd, clip) and decoder; the eval
// callbacks (llama_context_params.cb_eval for the decoder, mtmd_context_params.cb_eval for clip) copy every
// named tensor of the prompt pass to OUT_DIR/tap.safetensors (f32), alongside the token ids, the decoder
// positions, each image's encoder output as the decoder receives it, each image's preprocessed pixels
// (where this llama.cpp tree has mtmd's preprocessor header), and the greedy tokens with their top 5.
// N_PREDICT -1: tokenize and preprocess only (no model evaluation).
#include "llama.h"
#include "mtmd.h"
#include "mtmd-helper.h"
#include "ggml.h"
#include "ggml-backend.h"
#if __has_include("mtmd-image.h")
// mtmd's own image preprocessor (an internal header of the tree the tap is built against): the pixels that
// mtmd_tokenize computes and keeps private, recomputed by the same code so that they can be written out
#include "clip.h"
#include "clip-impl.h"
#include "mtmd-image.h"
#define TAP_PIXELS 1
#endif

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <algorithm>
#include <map>
#include <sstream>
#include <string>
#include <vector>

struct captured {
    std::vector<int64_t> shape;  // ggml order reversed: outermost first, as safetensors
    std::vector<float> data;
};

struct tap_state {
    std::map<std::string, captured> tensors;
    std::map<std::string, int> seen;  // a name evaluated twice (one call per chunk) gets a #N suffix
    bool recording = true;
};

// NAME for the first of a kind, NAME#1, NAME#2, ... after it: the callback's naming of repeated evaluations
static std::string nth(const std::string & name, int k) {
    return k == 0 ? name : name + "#" + std::to_string(k);
}

static bool on_eval(struct ggml_tensor * t, bool ask, void * user_data) {
    auto * st = (tap_state *) user_data;
    if (ask) {
        // only the graph's named results: ggml's own view/reshape copies and unnamed node_N are layout noise
        const std::string name = t->name;
        return st->recording && !name.empty() && t->type == GGML_TYPE_F32 && name.find(" (") == std::string::npos &&
               name.rfind("node_", 0) != 0;
    }
    if (!st->recording || t->type != GGML_TYPE_F32 || !ggml_is_contiguous(t)) {
        return true;
    }
    std::string name = t->name;
    name = nth(name, st->seen[name]++);
    captured c;
    for (int d = GGML_MAX_DIMS - 1; d >= 0; --d) {
        if (t->ne[d] != 1 || !c.shape.empty() || d == 0) {
            c.shape.push_back(t->ne[d]);
        }
    }
    c.data.resize(ggml_nelements(t));
    ggml_backend_tensor_get(t, c.data.data(), 0, ggml_nbytes(t));
    st->tensors[name] = std::move(c);
    return true;
}

static std::string json_escape(const std::string & s) {
    std::string o;
    for (char ch : s) {
        if (ch == '"' || ch == '\\') {
            o += '\\';
        }
        o += ch;
    }
    return o;
}

// safetensors: 8-byte little-endian header length, JSON header, raw little-endian data
static bool write_safetensors(const std::string & path, const std::map<std::string, captured> & f32s,
                              const std::map<std::string, std::vector<int32_t>> & i32s) {
    std::ostringstream h;
    h << "{";
    size_t off = 0;
    bool first = true;
    auto entry = [&](const std::string & name, const char * dtype, const std::vector<int64_t> & shape, size_t nbytes) {
        h << (first ? "" : ",") << "\"" << json_escape(name) << "\":{\"dtype\":\"" << dtype << "\",\"shape\":[";
        for (size_t i = 0; i < shape.size(); ++i) {
            h << (i ? "," : "") << shape[i];
        }
        h << "],\"data_offsets\":[" << off << "," << off + nbytes << "]}";
        off += nbytes;
        first = false;
    };
    for (auto & kv : f32s) {
        entry(kv.first, "F32", kv.second.shape, kv.second.data.size() * 4);
    }
    for (auto & kv : i32s) {
        entry(kv.first, "I32", {(int64_t) kv.second.size()}, kv.second.size() * 4);
    }
    h << "}";
    std::string header = h.str();
    while (header.size() % 8) {
        header += ' ';
    }
    std::string tmp = path + ".partial";
    std::ofstream out(tmp, std::ios::binary);
    uint64_t hl = header.size();
    out.write((const char *) &hl, 8);
    out.write(header.data(), header.size());
    for (auto & kv : f32s) {
        out.write((const char *) kv.second.data.data(), kv.second.data.size() * 4);
    }
    for (auto & kv : i32s) {
        out.write((const char *) kv.second.data(), kv.second.size() * 4);
    }
    out.close();
    if (!out) {
        return false;
    }
    return std::rename(tmp.c_str(), path.c_str()) == 0;  // nothing written half-way
}

int main(int argc, char ** argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: %s TEXT.gguf MMPROJ.gguf PROMPT_FILE OUT_DIR N_PREDICT EOS_IDS [IMAGE...]\n", argv[0]);
        return 2;
    }
    const std::string text_gguf = argv[1], mmproj_gguf = argv[2], prompt_file = argv[3], out_dir = argv[4];
    const int n_predict = atoi(argv[5]);
    std::vector<llama_token> eos;
    {
        std::stringstream ss(argv[6]);
        std::string item;
        while (std::getline(ss, item, ',')) {
            if (!item.empty()) {
                eos.push_back(atoi(item.c_str()));
            }
        }
    }
    std::ifstream pf(prompt_file, std::ios::binary);
    if (!pf) {
        fprintf(stderr, "tap: prompt file %s cannot be read\n", prompt_file.c_str());
        return 2;
    }
    std::string prompt((std::istreambuf_iterator<char>(pf)), std::istreambuf_iterator<char>());

    llama_backend_init();
    tap_state text_tap, vision_tap;

    llama_model_params mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(text_gguf.c_str(), mp);
    if (!model) {
        fprintf(stderr, "tap: text model %s failed to load\n", text_gguf.c_str());
        return 3;
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 4096;
    cp.n_batch = 4096;
    cp.n_ubatch = 4096;  // one prompt pass: each named tensor seen once per chunk
    // QWEN25VL_TAP_BATCH=N: the prompt decoded N tokens at a time (n_batch = n_ubatch = N), text and image
    // chunks alike, the way a smaller batch setting runs it (state.chunked; the generated tokens are read)
    if (getenv("QWEN25VL_TAP_BATCH")) {
        const int n = atoi(getenv("QWEN25VL_TAP_BATCH"));
        if (n < 1) {
            fprintf(stderr, "tap: QWEN25VL_TAP_BATCH must be a positive integer\n");
            return 2;
        }
        cp.n_batch = cp.n_ubatch = n;
    }
    cp.n_threads = cp.n_threads_batch = 2;
    // QWEN25VL_TAP_F32=1: float32 KV cache and no flash attention (llama.cpp's defaults are a float16 KV cache
    // and flash attention where the backend has it, which rounds K and V to float16)
    const bool all_f32 = getenv("QWEN25VL_TAP_F32") && std::string(getenv("QWEN25VL_TAP_F32")) == "1";
    if (all_f32) {
        cp.type_k = cp.type_v = GGML_TYPE_F32;
        cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    }
    cp.cb_eval = on_eval;
    cp.cb_eval_user_data = &text_tap;
    llama_context * lctx = llama_init_from_model(model, cp);

    mtmd_context_params vp = mtmd_context_params_default();
    vp.use_gpu = false;
    vp.n_threads = 2;
    vp.warmup = false;
    vp.print_timings = false;
    if (all_f32) {
        vp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    }
    vp.cb_eval = on_eval;
    vp.cb_eval_user_data = &vision_tap;
    mtmd_context * mctx = mtmd_init_from_file(mmproj_gguf.c_str(), model, vp);
    if (!mctx) {
        fprintf(stderr, "tap: vision projector %s failed to load\n", mmproj_gguf.c_str());
        return 3;
    }

    std::vector<mtmd_bitmap *> bitmaps;
    for (int i = 7; i < argc; ++i) {
        auto w = mtmd_helper_bitmap_init_from_file(mctx, argv[i], false, mtmd_helper_init_opt_default());
        if (!w.bitmap) {
            fprintf(stderr, "tap: image %s cannot be decoded\n", argv[i]);
            return 2;
        }
        bitmaps.push_back(w.bitmap);
    }
#ifdef TAP_PIXELS
    {
        // the same preprocessor class mtmd_init_from_file picks for Qwen2-VL/2.5-VL projectors, on a second
        // clip context loaded without its weights
        clip_context_params cparams{};
        cparams.use_gpu = false;
        cparams.flash_attn_type = CLIP_FLASH_ATTN_TYPE_AUTO;
        cparams.image_min_tokens = vp.image_min_tokens;
        cparams.image_max_tokens = vp.image_max_tokens;
        cparams.warmup = false;
        cparams.no_alloc = true;
        clip_init_result cr = clip_init(mmproj_gguf.c_str(), cparams);
        if (!cr.ctx_v) {
            fprintf(stderr, "tap: vision projector %s failed to load for preprocessing\n", mmproj_gguf.c_str());
            return 3;
        }
        mtmd_image_preprocessor_dyn_size pre(cr.ctx_v);
        for (size_t k = 0; k < bitmaps.size(); ++k) {
            const int nx = mtmd_bitmap_get_nx(bitmaps[k]), ny = mtmd_bitmap_get_ny(bitmaps[k]);
            const unsigned char * d = mtmd_bitmap_get_data(bitmaps[k]);
            clip_image_u8 img;
            img.set_size({nx, ny}, false);
            img.cpy_buf(std::vector<uint8_t>(d, d + (size_t) nx * ny * 3));
            mtmd_image_preproc_out out = pre.preprocess(img);
            if (out.entries.size() != 1) {
                fprintf(stderr, "tap: image %zu preprocessed into %zu entries, expected 1\n", k, out.entries.size());
                return 4;
            }
            const clip_image_f32 & e = out.entries[0];
            captured c;
            c.shape = {e.ny(), e.nx(), 3};  // normalized, RGB interleaved per pixel
            c.data = e.get_ro_buf();
            vision_tap.tensors[nth("pixels", (int) k)] = std::move(c);
        }
        clip_free(cr.ctx_v);
        if (cr.ctx_a) {
            clip_free(cr.ctx_a);
        }
    }
#endif
    mtmd_input_text txt = {prompt.c_str(), prompt.size(), false, true};
    mtmd_input_chunks * chunks = mtmd_input_chunks_init();
    int32_t rc = mtmd_tokenize(mctx, chunks, &txt, (const mtmd_bitmap **) bitmaps.data(), bitmaps.size());
    if (rc != 0) {
        fprintf(stderr, "tap: mtmd_tokenize failed (%d): %zu images for the markers in the prompt\n", rc, bitmaps.size());
        return 2;
    }

    // token ids as llama.cpp sees them; an image chunk has no ids, so its positions carry -1
    std::map<std::string, std::vector<int32_t>> ints;
    std::vector<int32_t> & ids = ints["input_ids"];
    std::vector<int32_t> & pos = ints["positions_thw"];  // per token: t, y, x (llama.cpp's 4th section is 0)
    llama_pos p = 0;
    for (size_t i = 0; i < mtmd_input_chunks_size(chunks); ++i) {
        const mtmd_input_chunk * ch = mtmd_input_chunks_get(chunks, i);
        if (mtmd_input_chunk_get_type(ch) == MTMD_INPUT_CHUNK_TYPE_TEXT) {
            size_t n = 0;
            const llama_token * t = mtmd_input_chunk_get_tokens_text(ch, &n);
            for (size_t k = 0; k < n; ++k) {
                ids.push_back(t[k]);
                pos.insert(pos.end(), {p, p, p});
                ++p;
            }
        } else {
            const mtmd_image_tokens * it = mtmd_input_chunk_get_tokens_image(ch);
            size_t n = mtmd_image_tokens_get_n_tokens(it);
            std::vector<mtmd_decoder_pos> dp(n);
            mtmd_helper_image_get_decoder_pos(it, p, dp.data());
            for (size_t k = 0; k < n; ++k) {
                ids.push_back(-1);
                pos.insert(pos.end(), {(int32_t) dp[k].t, (int32_t) dp[k].y, (int32_t) dp[k].x});
            }
            p += mtmd_input_chunk_get_n_pos(ch);
        }
    }

    if (n_predict < 0) {  // tokenize and preprocess only
        text_tap.recording = vision_tap.recording = false;
    }
    // every prompt token an output while the prompt is evaluated: llama.cpp otherwise computes its last layer,
    // final norm and logits at the last position only (the graph keeps only the output rows before that layer).
    // An embeddings context outputs every token (llama_batch_allocr overrides the batch's output flags), so
    // l_out-(n-1), result_norm and result_output are captured for the whole prompt; generation runs as usual.
    // QWEN25VL_TAP_LAST_ONLY=1 keeps llama.cpp's own last-position graph (the decode path a user runs).
    const bool last_only = getenv("QWEN25VL_TAP_LAST_ONLY") && std::string(getenv("QWEN25VL_TAP_LAST_ONLY")) == "1";
    llama_set_embeddings(lctx, !last_only);
    // one chunk at a time (what mtmd_helper_eval_chunks does), so that each image's encoder output can be
    // kept: it is what the decoder receives at the image's positions
    const size_t n_chunks = mtmd_input_chunks_size(chunks);
    const int n_embd = llama_model_n_embd(model);
    llama_pos n_past = 0;
    int n_images = 0;
    for (size_t i = 0; i < n_chunks && n_predict >= 0; ++i) {
        const mtmd_input_chunk * ch = mtmd_input_chunks_get(chunks, i);
        const bool last = i + 1 == n_chunks;
        llama_pos next = n_past;
        int32_t r = 0;
        if (mtmd_input_chunk_get_type(ch) == MTMD_INPUT_CHUNK_TYPE_TEXT) {
            r = mtmd_helper_eval_chunk_single(mctx, lctx, ch, n_past, 0, cp.n_batch, last, &next);
        } else {
            r = mtmd_encode_chunk(mctx, ch);
            if (r == 0) {
                float * embd = mtmd_get_output_embd(mctx);
                const size_t n = mtmd_input_chunk_get_n_tokens(ch);
                captured c;
                c.shape = {(int64_t) n, n_embd};
                c.data.assign(embd, embd + n * n_embd);
                vision_tap.tensors[nth("mm_embd", n_images++)] = std::move(c);
                r = mtmd_helper_decode_image_chunk(mctx, lctx, ch, embd, n_past, 0, cp.n_batch, &next, nullptr, nullptr);
            }
        }
        if (r != 0) {
            fprintf(stderr, "tap: evaluating prompt chunk %zu failed (%d)\n", i, r);
            return 4;
        }
        n_past = next;
    }
    text_tap.recording = false;
    vision_tap.recording = false;
    llama_set_embeddings(lctx, false);

    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    std::vector<int32_t> & gen = ints["generated"];
    std::vector<int32_t> & topk = ints["generated_top5"];  // per step, the 5 largest logits' ids, largest first
    if (n_predict > 0) {
        const float * logits = llama_get_logits_ith(lctx, -1);
        captured last;
        last.shape = {n_vocab};
        last.data.assign(logits, logits + n_vocab);
        text_tap.tensors["last_logits"] = std::move(last);
    }
    std::vector<int32_t> order(n_vocab);
    for (int s = 0; s < n_predict; ++s) {
        const float * lg = llama_get_logits_ith(lctx, -1);
        for (int v = 0; v < n_vocab; ++v) {
            order[v] = v;
        }
        // largest first, the lower id first among equals (argmax's first maximal index)
        std::partial_sort(order.begin(), order.begin() + 5, order.end(),
                          [lg](int32_t a, int32_t b) { return lg[a] > lg[b] || (lg[a] == lg[b] && a < b); });
        topk.insert(topk.end(), order.begin(), order.begin() + 5);
        const int best = order[0];
        gen.push_back(best);
        bool stop = false;
        for (auto e : eos) {
            stop = stop || e == best;
        }
        if (stop || s + 1 == n_predict) {
            break;
        }
        llama_token tok = best;
        llama_batch b = llama_batch_get_one(&tok, 1);
        if (llama_decode(lctx, b) != 0) {
            fprintf(stderr, "tap: decode step %d failed\n", s);
            return 4;
        }
    }

    std::map<std::string, captured> all;
    for (auto & kv : text_tap.tensors) {
        all["text." + kv.first] = std::move(kv.second);
    }
    for (auto & kv : vision_tap.tensors) {
        all["vision." + kv.first] = std::move(kv.second);
    }
    if (!write_safetensors(out_dir + "/tap.safetensors", all, ints)) {
        fprintf(stderr, "tap: %s/tap.safetensors cannot be written\n", out_dir.c_str());
        return 5;
    }
    mtmd_input_chunks_free(chunks);
    for (auto * b : bitmaps) {
        mtmd_bitmap_free(b);
    }
    mtmd_free(mctx);
    llama_free(lctx);
    llama_model_free(model);
    return 0;
}
