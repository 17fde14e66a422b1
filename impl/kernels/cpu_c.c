/* Kernels in C for the CPU (impl.kernels.cpu_c): the w4a8 matmul, then the decode step's RMSNorm,
   rotary, greedy argmax and attention (further down, each with its own comment).

   w4a8, int4 weights x int8 activations: the decode rows of impl.quant's int4 format.
   Weights (impl.quant, module doc): q in 0..15, w_hat[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g],
   g = k / G, G a multiple of 32. Held here as blocks of 32 columns, 16 bytes per block per row: byte j
   holds column 32b + j in its low nibble and column 32b + 16 + j in its high one (one shift and one AND
   unpack a block into 32 lanes). scale and zero per (row, group): float32, or bfloat16 as uint16.

   Activations: each row of x is quantized in blocks of 32 columns, x_hat = dx[b] * qx (qx int8 in
   -127..127, dx = max|x_b| / 127, round to nearest even), the way llama.cpp's q8_0 does. Then, exactly
   in integers per block, then in float32, with w_hat = q * scale + (zero - 8 * scale):
     y[m, n] = sum_g scale[n, g] * sum_{b in g} dx[m, b] * sum_{k in b} q[n, k] * qx[m, k]
                   + (zero[n, g] - 8 scale[n, g]) * sum_{b in g} dx[m, b] * sum_{k in b} qx[m, k]
   which is x_hat . w_hat up to float32 rounding of the sums. On AVX2 the integer block dot is
   maddubs(q, qx), unsigned by signed bytes: q <= 15 and |qx| <= 127, so the int16 pair sums (<= 3810)
   never saturate.

   Shapes: x [M, K] and y [M, N] float32 or bfloat16, packed [N, K/32, 16] uint8, scale/zero [N, K/G].
   Threads: OpenMP over blocks of rows (the runtime torch already loaded, same soname). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#define BLOCK 32
#define MAX_ROWS 8 /* rows of x per call; the Python side sends more rows to a dequantized matmul */

static inline float load_float(const void *p, int64_t i, int bf16) { /* float32 or bfloat16 element i */
  if (!bf16) return ((const float *)p)[i];
  uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

/* y[i] = v, rounded to nearest even when y is bfloat16 (as torch's .to(torch.bfloat16)). */
static inline void store_out(void *y, int64_t i, float v, int bf16) {
  if (!bf16) {
    ((float *)y)[i] = v;
    return;
  }
  uint32_t bits;
  memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) bits |= 0x00400000u; /* NaN stays a (quiet) NaN */
  else bits += 0x7fffu + ((bits >> 16) & 1u);
  ((uint16_t *)y)[i] = (uint16_t)(bits >> 16);
}

/* x [M, K] (float32, or bfloat16 as uint16) -> qx [M, K] int8, dx [M, K/32] and the block sums of qx,
   sx [M, K/32] (as float). */
static void quantize_rows(const void *x, int x_bf16, int64_t M, int64_t K, int8_t *qx, float *dx, float *sx) {
  int64_t nb = K / BLOCK;
  float xb[BLOCK];
  for (int64_t m = 0; m < M; m++) {
    for (int64_t b = 0; b < nb; b++) {
      for (int i = 0; i < BLOCK; i++) xb[i] = load_float(x, m * K + b * BLOCK + i, x_bf16);
      float amax = 0.0f;
      int finite = 1;
      for (int i = 0; i < BLOCK; i++) amax = fmaxf(amax, fabsf(xb[i])), finite &= isfinite(xb[i]);
      float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      if (!finite) d = NAN, inv = 0.0f; /* a NaN or infinity in x makes its outputs NaN, as a float matmul would */
      int32_t s = 0;
      for (int i = 0; i < BLOCK; i++) {
        int8_t v = (int8_t)lrintf(xb[i] * inv);
        qx[m * K + b * BLOCK + i] = v;
        s += v;
      }
      dx[m * nb + b] = d;
      sx[m * nb + b] = (float)s;
    }
  }
}

#ifdef __AVX2__
static inline __m256i unpack_block(const uint8_t *p) { /* 16 bytes -> 32 uint8 lanes, q in 0..15 */
  __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
  both = _mm256_srlv_epi32(both, _mm256_set_epi32(4, 4, 4, 4, 0, 0, 0, 0)); /* high lane: the high nibbles */
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

/* Output rows [n, n + R) for every row of x. xz [M, K/G] = sum over the group's blocks of dx * sx: the
   zero term's input sums, the same for every n. R and M are compile-time constants in each instance, so
   the R x M accumulators stay in registers and are independent chains: one chain would wait on the
   float multiply-add's latency every block (measured 3x slower than R = 4 at M = 1). */
static inline __attribute__((always_inline)) void tile_dot(const uint8_t *packed, const void *scale,
                                                           const void *zero, int64_t n, int64_t K, int64_t G,
                                                           int bf16, const int8_t *qx, const float *dx,
                                                           const float *xz, const int R, const int M, void *y,
                                                           int64_t N, int y_bf16) {
  int64_t nb = K / BLOCK, per_group = G / BLOCK, ng = K / G;
#ifdef __AVX2__
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[4][MAX_ROWS];
  float zsum[4][MAX_ROWS];
  for (int r = 0; r < R; r++)
    for (int m = 0; m < M; m++) acc[r][m] = _mm256_setzero_ps(), zsum[r][m] = 0.0f;
  for (int64_t g = 0; g < ng; g++) {
    __m256 acc_g[4][MAX_ROWS];
    for (int r = 0; r < R; r++)
      for (int m = 0; m < M; m++) acc_g[r][m] = _mm256_setzero_ps();
    for (int64_t b = g * per_group; b < (g + 1) * per_group; b++) {
      __m256i w[4];
      for (int r = 0; r < R; r++) w[r] = unpack_block(packed + ((n + r) * nb + b) * 16);
      for (int m = 0; m < M; m++) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)(qx + m * K + b * BLOCK));
        __m256 d = _mm256_broadcast_ss(dx + m * nb + b);
        for (int r = 0; r < R; r++) {
          __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(w[r], xv), ones);
          acc_g[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), d, acc_g[r][m]);
        }
      }
    }
    for (int r = 0; r < R; r++) {
      float sc = load_float(scale, (n + r) * ng + g, bf16), z = load_float(zero, (n + r) * ng + g, bf16) - 8.0f * sc;
      __m256 s = _mm256_set1_ps(sc);
      for (int m = 0; m < M; m++) {
        acc[r][m] = _mm256_fmadd_ps(acc_g[r][m], s, acc[r][m]);
        zsum[r][m] += z * xz[m * ng + g];
      }
    }
  }
  for (int r = 0; r < R; r++)
    for (int m = 0; m < M; m++) store_out(y, m * N + n + r, hsum(acc[r][m]) + zsum[r][m], y_bf16);
#else
  for (int r = 0; r < R; r++) {
    const uint8_t *wrow = packed + (n + r) * nb * 16;
    for (int m = 0; m < M; m++) {
      float total = 0.0f;
      for (int64_t g = 0; g < ng; g++) {
        float dot_g = 0.0f;
        for (int64_t b = g * per_group; b < (g + 1) * per_group; b++) {
          const uint8_t *p = wrow + b * 16;
          const int8_t *xb = qx + m * K + b * BLOCK;
          int32_t dot = 0;
          for (int i = 0; i < 16; i++) dot += (p[i] & 15) * xb[i] + (p[i] >> 4) * xb[16 + i];
          dot_g += dx[m * nb + b] * (float)dot;
        }
        float sc = load_float(scale, (n + r) * ng + g, bf16), z = load_float(zero, (n + r) * ng + g, bf16) - 8.0f * sc;
        total += sc * dot_g + z * xz[m * ng + g];
      }
      store_out(y, m * N + n + r, total, y_bf16);
    }
  }
#endif
}

/* Output rows [n0, n1): tiles of R rows (R x M accumulators: 4 at M = 1, 2 at M = 2, M beyond), the
   remainder one row at a time. */
#define ROWS_DOT_FOR(MM, RR)                                                                                       \
  static void rows_dot_##MM(const uint8_t *packed, const void *scale, const void *zero, int64_t n0, int64_t n1,  \
                            int64_t K, int64_t G, int bf16, const int8_t *qx, const float *dx, const float *xz,  \
                            void *y, int64_t N, int y_bf16) {                                                    \
    int64_t n = n0;                                                                                               \
    for (; n + RR <= n1; n += RR) tile_dot(packed, scale, zero, n, K, G, bf16, qx, dx, xz, RR, MM, y, N, y_bf16); \
    for (; n < n1; n++) tile_dot(packed, scale, zero, n, K, G, bf16, qx, dx, xz, 1, MM, y, N, y_bf16);            \
  }
ROWS_DOT_FOR(1, 4)
ROWS_DOT_FOR(2, 2)
ROWS_DOT_FOR(3, 1)
ROWS_DOT_FOR(4, 1)
ROWS_DOT_FOR(5, 1)
ROWS_DOT_FOR(6, 1)
ROWS_DOT_FOR(7, 1)
ROWS_DOT_FOR(8, 1)
typedef void (*rows_dot_fn)(const uint8_t *, const void *, const void *, int64_t, int64_t, int64_t, int64_t, int,
                            const int8_t *, const float *, const float *, void *, int64_t, int);
static const rows_dot_fn ROWS_DOT[MAX_ROWS + 1] = {0,           rows_dot_1, rows_dot_2, rows_dot_3, rows_dot_4,
                                                   rows_dot_5, rows_dot_6, rows_dot_7, rows_dot_8};

/* y [M, N] = x_hat [M, K] . w_hat [N, K]^T. x and y float32, or bfloat16 (x_bf16, y_bf16: read and
   written as uint16, so a bfloat16 model needs no conversion around the call). Returns 0, or -1 when
   the shapes are out of contract. */
int w4a8_matmul(const void *x, int x_bf16, int64_t M, int64_t K, const uint8_t *packed, const void *scale,
                const void *zero, int64_t N, int64_t G, int bf16, void *y, int y_bf16) {
  if (M < 1 || M > MAX_ROWS || K % BLOCK || G % BLOCK || K % G) return -1;
  int64_t nb = K / BLOCK, ng = K / G, per_group = G / BLOCK;
  int8_t *qx = malloc((size_t)(M * K));
  float *dx = malloc(sizeof(float) * (size_t)(M * nb)), *sx = malloc(sizeof(float) * (size_t)(M * nb));
  float *xz = calloc((size_t)(M * ng), sizeof(float));
  if (!qx || !dx || !sx || !xz) {
    free(qx), free(dx), free(sx), free(xz);
    return -1;
  }
  quantize_rows(x, x_bf16, M, K, qx, dx, sx);
  for (int64_t m = 0; m < M; m++)
    for (int64_t b = 0; b < nb; b++) xz[m * ng + b / per_group] += dx[m * nb + b] * sx[m * nb + b];
  rows_dot_fn dot = ROWS_DOT[M];
  const int64_t chunk = 64; /* rows per task: whole cache lines of y, few tasks per thread */
#pragma omp parallel for schedule(static)
  for (int64_t n0 = 0; n0 < N; n0 += chunk)
    dot(packed, scale, zero, n0, n0 + chunk < N ? n0 + chunk : N, K, G, bf16, qx, dx, xz, y, N, y_bf16);
  free(qx), free(dx), free(sx), free(xz);
  return 0;
}

/* w_hat rows [n0, n1) as float32 [n1 - n0, K] (the prefill path: dequantize a slab, then a float GEMM). */
void w4_dequantize(const uint8_t *packed, const void *scale, const void *zero, int64_t n0, int64_t n1, int64_t K,
                   int64_t G, int bf16, float *w) {
  int64_t nb = K / BLOCK, ng = K / G;
  w -= n0 * K; /* w holds rows n0 .. n1 - 1 */
#pragma omp parallel for schedule(static)
  for (int64_t n = n0; n < n1; n++) {
    for (int64_t b = 0; b < nb; b++) {
      const uint8_t *p = packed + (n * nb + b) * 16;
      int64_t g = b * BLOCK / G;
      float s = load_float(scale, n * ng + g, bf16), z = load_float(zero, n * ng + g, bf16);
      float *out = w + n * K + b * BLOCK;
      for (int i = 0; i < 16; i++) {
        out[i] = (float)((p[i] & 15) - 8) * s + z;
        out[16 + i] = (float)((p[i] >> 4) - 8) * s + z;
      }
    }
  }
}

/* ---- the decode step's elementwise neighbours, at the rounding points of impl.kernels' torch fallbacks.
   Each processes rows in parallel only when there are many (a decode row costs less than waking the
   threads). x and y are float32, or bfloat16 as uint16 (bf16 = 1). */

#define PARALLEL_ELEMENTS 65536 /* below this many elements a call stays on one thread */

/* spec.norms.rms_norm: y = w * round(x * rsqrt(mean(x^2) + eps)), statistics in float32 (summed in
   double: closer to float64 than a float32 sum, within float32 rounding of it). x, y [R, C], w [C]. */
void rms_norm_rows(const void *x, const void *w, void *y, int64_t R, int64_t C, float eps, int bf16) {
#pragma omp parallel for schedule(static) if (R * C >= PARALLEL_ELEMENTS)
  for (int64_t r = 0; r < R; r++) {
    double ss = 0.0;
    for (int64_t c = 0; c < C; c++) {
      float v = load_float(x, r * C + c, bf16);
      ss += (double)v * v;
    }
    float inv = 1.0f / sqrtf((float)(ss / (double)C) + eps);
    for (int64_t c = 0; c < C; c++) {
      float h = load_float(x, r * C + c, bf16) * inv;
      if (bf16) { /* the cast to the input dtype comes before the weight multiply (spec.norms) */
        uint16_t hb;
        store_out(&hb, 0, h, 1);
        h = load_float(&hb, 0, 1);
      }
      store_out(y, r * C + c, load_float(w, c, bf16) * h, bf16);
    }
  }
}

/* impl.kernels.rotary.rotary_torch, in place: heads [0, n_rot) of x [T, H, D] (strides st, sh; unit
   stride on D) rotated by cos, sin float32 [T, D/2] (unit stride on D/2, row stride sc):
   (x1, x2) -> (x1 c - x2 s, x2 c + x1 s), each product and sum rounded in float32, then to the dtype. */
void rotary_rows(void *x, const float *cos, const float *sin, int64_t T, int64_t n_rot, int64_t D, int64_t st,
                 int64_t sh, int64_t sc, int bf16) {
  int64_t h2 = D / 2;
#pragma omp parallel for schedule(static) if (T * n_rot * D >= PARALLEL_ELEMENTS)
  for (int64_t t = 0; t < T; t++) {
    for (int64_t h = 0; h < n_rot; h++) {
      int64_t base = t * st + h * sh;
      for (int64_t i = 0; i < h2; i++) {
        float c = cos[t * sc + i], s = sin[t * sc + i];
        float x1 = load_float(x, base + i, bf16), x2 = load_float(x, base + h2 + i, bf16);
        float a = x1 * c, b = x2 * s, e = x2 * c, f = x1 * s;
        store_out(x, base + i, a - b, bf16);
        store_out(x, base + h2 + i, e + f, bf16);
      }
    }
  }
}

/* The greedy pick: out[r] = the first index of the largest x[r, :] (torch's max(-1).indices); a NaN counts
   as the largest (torch propagates it), the first NaN is taken. x [R, V]. Two passes over a row that
   the lm_head has just written (in cache): the maximum, vectorized, then its first position. */
void argmax_rows(const void *x, int64_t R, int64_t V, int bf16, int64_t *out) {
  for (int64_t r = 0; r < R; r++) {
    int64_t i = 0, first_nan = -1;
    float best = -INFINITY;
#ifdef __AVX2__
    __m256 vbest = _mm256_set1_ps(-INFINITY);
    __m256 vnan = _mm256_setzero_ps();
    for (; i + 8 <= V; i += 8) {
      __m256 v;
      if (bf16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + r * V + i));
        v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      } else {
        v = _mm256_loadu_ps((const float *)x + r * V + i);
      }
      vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      vbest = _mm256_max_ps(vbest, v);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, vbest);
    for (int l = 0; l < 8; l++) best = lanes[l] > best ? lanes[l] : best;
    if (_mm256_movemask_ps(vnan)) first_nan = 0; /* somewhere in the vector part: found below */
#endif
    for (; i < V; i++) {
      float v = load_float(x, r * V + i, bf16);
      if (v != v && first_nan < 0) first_nan = 0;
      best = v > best ? v : best;
    }
    int64_t pick = 0;
    for (int64_t j = 0; j < V; j++) {
      float v = load_float(x, r * V + j, bf16);
      if (first_nan >= 0 ? v != v : v == best) {
        pick = j;
        break;
      }
    }
    out[r] = pick;
  }
}

/* Decode attention, one query per row (impl.attention.decode_attention's semantics): q [B, N, D], the
   caches [B, K, T, D] (strides sb, sk, st; unit on D), an additive bias [B, T] (0 or -inf; a key with
   -inf is skipped, never read), out [B, N, D]. The N / K query heads of kv head k are heads k*G ..
   k*G+G-1. Scores q.k / sqrt(D) + bias, the softmax and the weighted sum of v in float32, the output
   rounded once to the dtype. A row whose keys are all masked gives NaN, as SDPA does. One task per
   (row, kv head): 2 tasks for 3B at batch 1, which is what 2 cores want. */
static inline float dot_row(const float *a, const void *b, int64_t off, int64_t D, int bf16) {
  float s = 0.0f;
#ifdef __AVX2__
  if (D % 8 == 0) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      __m256 bv = bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(
                             _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)b + off + d))), 16))
                       : _mm256_loadu_ps((const float *)b + off + d);
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), bv, acc);
    }
    return hsum(acc);
  }
#endif
  for (int64_t d = 0; d < D; d++) s += a[d] * load_float(b, off + d, bf16);
  return s;
}

static inline void axpy_row(float *acc, float p, const void *b, int64_t off, int64_t D, int bf16) {
#ifdef __AVX2__
  if (D % 8 == 0) {
    __m256 pv = _mm256_set1_ps(p);
    for (int64_t d = 0; d < D; d += 8) {
      __m256 bv = bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(
                             _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)b + off + d))), 16))
                       : _mm256_loadu_ps((const float *)b + off + d);
      _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(pv, bv, _mm256_loadu_ps(acc + d)));
    }
    return;
  }
#endif
  for (int64_t d = 0; d < D; d++) acc[d] += p * load_float(b, off + d, bf16);
}

int decode_attention_rows(const void *q, const void *k, const void *v, const void *bias, void *out, int64_t B,
                          int64_t N, int64_t K, int64_t T, int64_t D, int64_t sb, int64_t sk, int64_t st, int bf16) {
  if (K < 1 || N % K || N / K > 64) return -1;
  int64_t G = N / K;
  float scale = 1.0f / sqrtf((float)D);
  int failed = 0;
#pragma omp parallel for schedule(static) if (B * K > 1)
  for (int64_t task = 0; task < B * K; task++) {
    int64_t b = task / K, kh = task % K;
    float *qf = malloc(sizeof(float) * (size_t)(G * D)), *acc = calloc((size_t)(G * D), sizeof(float));
    float *sc = malloc(sizeof(float) * (size_t)(G * T));
    if (!qf || !acc || !sc) {
      free(qf), free(acc), free(sc);
      failed = 1;
      continue;
    }
    for (int64_t g = 0; g < G; g++)
      for (int64_t d = 0; d < D; d++) qf[g * D + d] = load_float(q, (b * N + kh * G + g) * D + d, bf16);
    float m[64], l[64]; /* G <= 64: every released config has G <= 7 */
    for (int64_t g = 0; g < G; g++) m[g] = -INFINITY, l[g] = 0.0f;
    int64_t base = b * sb + kh * sk;
    for (int64_t t = 0; t < T; t++) {
      float bt = load_float(bias, b * T + t, bf16);
      for (int64_t g = 0; g < G; g++) {
        float s = bt == -INFINITY ? -INFINITY : dot_row(qf + g * D, k, base + t * st, D, bf16) * scale + bt;
        sc[g * T + t] = s;
        m[g] = s > m[g] ? s : m[g];
      }
    }
    for (int64_t g = 0; g < G; g++) {
      for (int64_t t = 0; t < T; t++) {
        if (sc[g * T + t] == -INFINITY) continue;
        float p = expf(sc[g * T + t] - m[g]);
        l[g] += p;
        axpy_row(acc + g * D, p, v, base + t * st, D, bf16);
      }
      float inv = 1.0f / l[g]; /* all keys masked: 1 / 0 * 0 -> NaN below, as SDPA gives */
      for (int64_t d = 0; d < D; d++)
        store_out(out, (b * N + kh * G + g) * D + d, l[g] > 0.0f ? acc[g * D + d] * inv : NAN, bf16);
    }
    free(qf), free(acc), free(sc);
  }
  return failed ? -1 : 0;
}
