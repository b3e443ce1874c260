/* CPU kernels that torch has no fused op for (see native.py, which compiles and calls them).
 *
 * Each kernel splits its rows into one contiguous range per OpenMP thread. Loaded after torch,
 * this library binds to torch's own libgomp (same soname), so it runs on torch's thread team
 * and follows torch.set_num_threads. Weights are row-major, one latent per row; indices are
 * int64, as torch's.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_float(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float out;
    memcpy(&out, &wide, sizeof out);
    return out;
}

/* fp32 → bf16 rounded to nearest even, bit for bit as torch's .to(torch.bfloat16) (NaN stays a NaN). */
static inline uint16_t float_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if (value != value) return 0x7FC0;
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

/* One candidate of a top-k selection: a value and its column. */
typedef struct {
    float value;
    int64_t index;
} entry;

static inline void swap_entries(entry *a, entry *b) {
    entry t = *a;
    *a = *b;
    *b = t;
}

/* Quickselect for select_largest: a three-way partition around a median-of-three pivot, so runs
 * of equal values cost O(n), not O(n²). Every comparison with NaN is false: NaNs land wherever,
 * but indices never leave the range. */
static void quickselect_largest(entry *e, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n;
    while (hi - lo > 1) {
        float a = e[lo].value, b = e[lo + (hi - lo) / 2].value, c = e[hi - 1].value;
        float pivot = a < b ? (b < c ? b : (a < c ? c : a)) : (a < c ? a : (b < c ? c : b));
        int64_t above = lo, i = lo, below = hi; /* [lo,above) > pivot, [above,i) == pivot, [below,hi) < pivot */
        while (i < below) {
            if (e[i].value > pivot) swap_entries(&e[i++], &e[above++]);
            else if (e[i].value < pivot) swap_entries(&e[i], &e[--below]);
            else i++;
        }
        if (k - 1 < above) hi = above;
        else if (k - 1 >= below) lo = below;
        else return; /* the k-th largest equals the pivot */
    }
}

#define RANK_MAX 256 /* selections among at most this many entries go by counted ranks */

/* select_largest for n <= RANK_MAX by sorting, branch-free: each entry's rank is the number of
 * entries before it in the order (value descending, then position; NaN counts as −∞), counted
 * with vectorised compares, and every entry moves to its rank (the ranks are a permutation). */
static void rank_sort(entry *e, int64_t n) {
    float key[RANK_MAX];
    entry sorted[RANK_MAX];
    for (int64_t i = 0; i < n; i++) key[i] = isnan(e[i].value) ? -INFINITY : e[i].value;
    for (int64_t i = 0; i < n; i++) {
        const float v = key[i];
        int32_t rank = 0;
        for (int64_t j = 0; j < i; j++) rank += key[j] >= v;
        for (int64_t j = i + 1; j < n; j++) rank += key[j] > v;
        sorted[rank] = e[i];
    }
    memcpy(e, sorted, n * sizeof(entry));
}

/* Reorder e[0:n] (k <= n) so that its k largest values come first, in no particular order, and
 * e[k-1] holds the k-th largest. */
static void select_largest(entry *e, int64_t n, int64_t k) {
    if (n <= RANK_MAX) rank_sort(e, n);
    else quickselect_largest(e, n, k);
}

/* Columns per block in the top-k scan: about m / 2k blocks, so that the k-th largest block
 * maximum is a threshold only ~1.4k entries reach; a multiple of 16 (one AVX-512 register of
 * fp32) once blocks are that wide. */
static inline int64_t block_width(int64_t m, int64_t k) {
    int64_t width = m / (2 * k);
    return width >= 16 ? width / 16 * 16 : (width > 0 ? width : 1);
}

/* Top-k of one row (length m >= k) without a pass of data-dependent branches over the row:
 *   1. the maximum of each block of columns (a vectorised pass);
 *   2. the threshold τ = the k-th largest block maximum: at least k entries reach it, so all of
 *      the top k do;
 *   3. the candidates, entries ≥ τ, collected (branch-free) from the blocks whose maximum
 *      reaches τ;
 *   4. the k largest candidates (select_largest).
 * A row with NaNs can leave fewer than k candidates; then all m entries are candidates.
 * `scratch` holds 2m entries. LOAD reads column j as fp32. */
#define DEFINE_TOPK_ROW(name, type, LOAD)                                                          \
    static void name(const type *row, int64_t m, int64_t k, float *values, int64_t *indices,       \
                     int64_t offset, entry *scratch) {                                             \
        int64_t width = block_width(m, k), n_blocks = (m + width - 1) / width;                     \
        entry *maxima = scratch, *candidates = scratch + n_blocks;                                 \
        for (int64_t b = 0; b < n_blocks; b++) {                                                   \
            int64_t end = (b + 1) * width < m ? (b + 1) * width : m;                               \
            float block_max = -INFINITY; /* NaN never wins a comparison: maxima are never NaN */  \
            for (int64_t j = b * width; j < end; j++) {                                            \
                float v = LOAD(row[j]);                                                            \
                block_max = v > block_max ? v : block_max;                                         \
            }                                                                                      \
            maxima[b] = (entry){block_max, b};                                                     \
        }                                                                                          \
        float threshold = -INFINITY;                                                               \
        if (n_blocks > k) {                                                                        \
            select_largest(maxima, n_blocks, k);                                                   \
            threshold = maxima[k - 1].value;                                                       \
        }                                                                                          \
        int64_t n = 0;                                                                             \
        for (int64_t b = 0; b < n_blocks; b++) {                                                   \
            if (!(maxima[b].value >= threshold)) continue;                                         \
            int64_t start = maxima[b].index * width, end = start + width < m ? start + width : m;  \
            for (int64_t j = start; j < end; j++) {                                                \
                float v = LOAD(row[j]);                                                            \
                candidates[n] = (entry){v, j};                                                     \
                n += v >= threshold;                                                               \
            }                                                                                      \
        }                                                                                          \
        if (n < k)                                                                                 \
            for (n = 0; n < m; n++) candidates[n] = (entry){LOAD(row[n]), n};                      \
        select_largest(candidates, n, k);                                                          \
        for (int64_t i = 0; i < k; i++) {                                                          \
            values[i] = candidates[i].value;                                                       \
            indices[i] = candidates[i].index + offset;                                             \
        }                                                                                          \
    }

#define AS_FLOAT(x) (x)
DEFINE_TOPK_ROW(topk_row_f32, float, AS_FLOAT)
DEFINE_TOPK_ROW(topk_row_bf16, uint16_t, bf16_to_float)

/* The calling thread's share [*begin, *end) of n rows. */
static inline void thread_rows(int64_t n, int64_t *begin, int64_t *end) {
    int64_t thread = omp_get_thread_num(), threads = omp_get_num_threads();
    *begin = n * thread / threads;
    *end = n * (thread + 1) / threads;
}

/* values, indices: [n_rows, k], from pre: [n_rows, m]; row r's indices are shifted by
 * offsets[r] (NULL: no shift), which turns an expert's local latent ids into global ones.
 * Returns -1 if scratch memory could not be allocated, else 0. */
#define DEFINE_TOPK(name, type, row_kernel)                                                        \
    int name(const type *pre, int64_t n_rows, int64_t m, int64_t k, const int64_t *offsets,        \
             float *values, int64_t *indices) {                                                    \
        int failed = 0;                                                                            \
        _Pragma("omp parallel reduction(|: failed)") {                                             \
            int64_t begin, end;                                                                    \
            thread_rows(n_rows, &begin, &end);                                                     \
            entry *scratch = malloc(2 * m * sizeof(entry));                                        \
            failed = scratch == NULL;                                                              \
            for (int64_t r = begin; scratch && r < end; r++)                                       \
                row_kernel(pre + r * m, m, k, values + r * k, indices + r * k,                     \
                           offsets ? offsets[r] : 0, scratch);                                     \
            free(scratch);                                                                         \
        }                                                                                          \
        return -failed;                                                                            \
    }

DEFINE_TOPK(topk_f32, float, topk_row_f32)
DEFINE_TOPK(topk_bf16, uint16_t, topk_row_bf16) /* values returned exactly, as fp32 */

/* 16 floats, loaded and stored unaligned; the compiler maps it to one AVX-512 register or two AVX ones. */
typedef float vec16 __attribute__((vector_size(64), aligned(4)));
#define BLOCK 12 /* vec16 accumulators a token's sum keeps in registers: 192 columns at a time */

#if defined(__AVX512F__)
#include <immintrin.h>
/* A non-temporal store of 16 floats to a 64-byte aligned address: the line is written without
 * being read first, for outputs that are read again only much later (weight gradients: 0.5 ms
 * less per [16384, 576] gradient here). Ordered for other threads by STREAM_FENCE. */
#define CAN_STREAM(ptr) ((((uintptr_t)(ptr)) & 63) == 0)
#define STREAM_STORE(ptr, v) _mm512_stream_ps((ptr), (__m512)(v))
#define STREAM_FENCE() _mm_sfence()
#else
#define CAN_STREAM(ptr) 0
#define STREAM_STORE(ptr, v) (*(vec16 *)(ptr) = (v))
#define STREAM_FENCE() ((void)0)
#endif

/* o = b + Σ_j z[j] W[rows[j]] over k rows of d floats (b NULL: zero), 192 columns at a time in
 * registers (rather than k read-modify-writes of o: 1.6x faster at d = 576, k = 32); with stream,
 * o is written with non-temporal stores where aligned (the caller fences). */
static void gather_rows(float *o, const float *b, const float *z, const int64_t *rows, const float *W,
                        int64_t k, int64_t d, int stream) {
    int64_t c0 = 0;
    for (; c0 + 16 * BLOCK <= d; c0 += 16 * BLOCK) {
        vec16 acc[BLOCK];
        for (int q = 0; q < BLOCK; q++) acc[q] = b ? *(const vec16 *)(b + c0 + 16 * q) : (vec16){0};
        for (int64_t j = 0; j < k; j++) {
            const float *w = W + rows[j] * d + c0;
            for (int q = 0; q < BLOCK; q++) acc[q] += z[j] * *(const vec16 *)(w + 16 * q);
        }
        if (stream && CAN_STREAM(o + c0))
            for (int q = 0; q < BLOCK; q++) STREAM_STORE(o + c0 + 16 * q, acc[q]);
        else
            for (int q = 0; q < BLOCK; q++) *(vec16 *)(o + c0 + 16 * q) = acc[q];
    }
    for (; c0 < d; c0++) {
        float acc = b ? b[c0] : 0;
        for (int64_t j = 0; j < k; j++) acc += z[j] * W[rows[j] * d + c0];
        o[c0] = acc;
    }
}

static inline float sum16(vec16 v) {
    float total = 0;
    for (int q = 0; q < 16; q++) total += v[q];
    return total;
}

/* out[j] = W[rows[j]] · r for j < k, four rows per pass over r (four independent sums). */
static void row_dots(float *out, const float *r, const int64_t *rows, const float *W, int64_t k, int64_t d) {
    const int64_t d16 = d / 16 * 16;
    int64_t j = 0;
    for (; j + 4 <= k; j += 4) {
        const float *w0 = W + rows[j] * d, *w1 = W + rows[j + 1] * d, *w2 = W + rows[j + 2] * d,
                    *w3 = W + rows[j + 3] * d;
        vec16 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        for (int64_t c = 0; c < d16; c += 16) {
            const vec16 rc = *(const vec16 *)(r + c);
            s0 += rc * *(const vec16 *)(w0 + c);
            s1 += rc * *(const vec16 *)(w1 + c);
            s2 += rc * *(const vec16 *)(w2 + c);
            s3 += rc * *(const vec16 *)(w3 + c);
        }
        float t0 = sum16(s0), t1 = sum16(s1), t2 = sum16(s2), t3 = sum16(s3);
        for (int64_t c = d16; c < d; c++) {
            t0 += r[c] * w0[c];
            t1 += r[c] * w1[c];
            t2 += r[c] * w2[c];
            t3 += r[c] * w3[c];
        }
        out[j] = t0, out[j + 1] = t1, out[j + 2] = t2, out[j + 3] = t3;
    }
    for (; j < k; j++) {
        const float *w = W + rows[j] * d;
        float dot = 0;
        for (int64_t c = 0; c < d; c++) dot += r[c] * w[c];
        out[j] = dot;
    }
}

/* out[t, j] = W[indices[t, j]] · x[t] for t < n_tokens, j < k (the decoder's value gradient, an
 * SDDMM on the code's pattern). */
void gather_dot(const float *x, const float *W, const int64_t *indices, int64_t n_tokens, int64_t k, int64_t d,
                float *out) {
#pragma omp parallel
    {
        int64_t begin, end;
        thread_rows(n_tokens, &begin, &end);
        for (int64_t t = begin; t < end; t++) row_dots(out + t * k, x + t * d, indices + t * k, W, k, d);
    }
}

/* sum += partial, one thread at a time, then partial is freed (NULL: nothing to add). For
 * per-thread [d] partial sums inside a parallel region. */
static void add_partial(float *sum, float *partial, int64_t d) {
    if (partial != NULL) {
#pragma omp critical
        for (int64_t c = 0; c < d; c++) sum[c] += partial[c];
    }
    free(partial);
}

/* The entries of a [T, k] pattern grouped by row (a counting sort): row i's entries are
 * weight/token[start[i] : start[i + 1]], token being the entry's row of the [T, d] operand. */
typedef struct {
    int64_t *start, *token;
    float *weight;
} buckets;

static void free_buckets(buckets *bk) {
    free(bk->start);
    free(bk->token);
    free(bk->weight);
}

/* Fills *bk for rows/weights ([n_entries], k per token) over n_rows rows; -1 if memory ran out. */
static int bucket_entries(buckets *bk, const int64_t *rows, const float *weights, int64_t n_entries, int64_t k,
                          int64_t n_rows) {
    bk->start = calloc(n_rows + 1, sizeof(int64_t));
    bk->token = malloc(n_entries * sizeof(int64_t));
    bk->weight = malloc(n_entries * sizeof(float));
    if (bk->start == NULL || bk->token == NULL || bk->weight == NULL) {
        free_buckets(bk);
        return -1;
    }
    int64_t *start = bk->start;
    for (int64_t e = 0; e < n_entries; e++) start[rows[e] + 1]++;
    for (int64_t i = 0; i < n_rows; i++) start[i + 1] += start[i];
    for (int64_t e = 0; e < n_entries; e++) {
        const int64_t at = start[rows[e]]++;
        bk->weight[at] = weights[e];
        bk->token[at] = e / k;
    }
    for (int64_t i = n_rows; i > 0; i--) start[i] = start[i - 1]; /* undo the fill's advance */
    start[0] = 0;
    return 0;
}

/* out[i] = Σ_{(t, j): rows[t, j] = i} weights[t, j] · inputs[t] for every i < n_rows, i.e. Sᵀ inputs
 * for the sparse [T, n_rows] matrix S holding `weights` at `rows` (a weight gradient). With W
 * non-NULL also W_sum = Σ_i c_i W[W_rows ? W_rows[i] : i], c_i = Σ_{(t, j): rows[t, j] = i} weights[t, j]
 * (an encoder bias gradient: each W row read once, not once per entry). The entries are bucketed
 * by row with a counting sort, then each thread sums the buckets of its share of rows (rows no
 * entry names are zeroed). Returns -1 if memory ran out, else 0. */
int transposed_product(const int64_t *rows, const float *weights, const float *inputs, int64_t n_tokens, int64_t k,
                       int64_t d, int64_t n_rows, float *out, const float *W, const int64_t *W_rows, float *W_sum) {
    buckets bk;
    if (bucket_entries(&bk, rows, weights, n_tokens * k, k, n_rows)) return -1;
    const int64_t *bucket_start = bk.start, *token = bk.token;
    const float *weight = bk.weight;
    int failed = 0;
    if (W != NULL) memset(W_sum, 0, d * sizeof(float));
#pragma omp parallel reduction(|: failed)
    {
        int64_t begin, end;
        thread_rows(n_rows, &begin, &end);
        float *partial = W != NULL ? calloc(d, sizeof(float)) : NULL;
        failed = W != NULL && partial == NULL;
        for (int64_t i = begin; !failed && i < end; i++)
            gather_rows(out + i * d, NULL, weight + bucket_start[i], token + bucket_start[i], inputs,
                        bucket_start[i + 1] - bucket_start[i], d, 1);
        for (int64_t i = begin; partial != NULL && i < end; i++) { /* W's rows in order: a streaming read */
            float c = 0;
            for (int64_t b = bucket_start[i]; b < bucket_start[i + 1]; b++) c += weight[b];
            const float *w = W + (W_rows ? W_rows[i] : i) * d;
            for (int64_t col = 0; col < d; col++) partial[col] += c * w[col];
        }
        add_partial(W_sum, partial, d);
        STREAM_FENCE();
    }
    free_buckets(&bk);
    return -failed;
}

/* The sparse decoder with its squared error, per token t while its rows are in cache:
 *   x̂_t = b + Σ_j z[t, j] W[i_tj],  r_t = x̂_t − x_t,  and with P non-NULL P[t, j] = W[i_tj] · r_t
 * (the value gradient of ‖r_t‖², up to a factor 2, without a second gather from memory).
 * Writes residual ([T, d]) and out_scale · x̂_t to row out_rows[t] of x_hat (row t if out_rows is
 * NULL: tokens processed in one order, e.g. grouped by expert, reconstructed in another);
 * *squares = Σ_t ‖r_t‖², residual_sum[c] = Σ_t r_t[c]. Returns -1 if memory ran out, else 0. */
int decode_residual(const float *z, const int64_t *indices, const float *W, const float *b, const float *x,
                    int64_t n_tokens, int64_t k, int64_t d, float *x_hat, const int64_t *out_rows, float out_scale,
                    float *residual, float *P, double *squares, float *residual_sum) {
    int failed = 0;
    double total = 0;
    memset(residual_sum, 0, d * sizeof(float));
#pragma omp parallel reduction(+: total) reduction(|: failed)
    {
        int64_t begin, end;
        thread_rows(n_tokens, &begin, &end);
        float *partial = calloc(d, sizeof(float));
        failed = partial == NULL;
        for (int64_t t = begin; partial && t < end; t++) {
            float *o = x_hat + (out_rows ? out_rows[t] : t) * d, *r = residual + t * d;
            const float *xt = x + t * d;
            gather_rows(o, b, z + t * k, indices + t * k, W, k, d, 0);
            float squared = 0;
#pragma omp simd reduction(+: squared)
            for (int64_t c = 0; c < d; c++) {
                r[c] = o[c] - xt[c];
                squared += r[c] * r[c];
                partial[c] += r[c];
                o[c] *= out_scale;
            }
            total += squared;
            if (P != NULL) row_dots(P + t * k, r, indices + t * k, W, k, d);
        }
        add_partial(residual_sum, partial, d);
    }
    *squares = total;
    return -failed;
}

/* splitmix64's finaliser: a bijection of 64-bit words whose output bits each depend on every input bit. */
static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* fp32 → bf16 with stochastic rounding: the 16 bits bf16 drops are added to a uniform 16-bit
 * noise u = mix64(key) >> 48 and the sum truncated, so |x| rounds up with probability
 * (dropped bits) / 2^16 and E[round(x)] = x (sign-magnitude: the same holds for negative x).
 * The noise is a hash of `key`, never a generator's state, so the result depends on the key
 * only (NaN stays a NaN). */
static inline uint16_t float_to_bf16_stochastic(float value, uint64_t key) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if (value != value) return 0x7FC0;
    return (uint16_t)((bits + (uint32_t)(mix64(key) >> 48)) >> 16);
}

/* How Adam's moments are stored: fp32 as they are, or bf16, read exactly and written with
 * stochastic rounding keyed by (step, flat element index, moment) as key = seed + 2·index + moment,
 * seed = mix64(step). */
#define AS_STORED(x, key) (x)
#define STOCHASTIC_BF16(x, key) float_to_bf16_stochastic((x), (key))

/* Compilers may contract a·b + c into one fused multiply-add (GCC does by default); the
 * bf16-moment kernel rounds every product and sum on its own instead, as torch's separate
 * tensor ops do, so that the plain-torch path (optim.py) gives the same bits. The attribute
 * tells GCC, the pragma (at the start of the row's body) clang and the C standard. */
#define SEPARATE_ROUNDING __attribute__((optimize("fp-contract=off")))
#define SEPARATE_ROUNDING_HERE _Pragma("STDC FP_CONTRACT OFF")

/* One row of Adam (see adam_rows), in place, the moments held as `type`: each is loaded as fp32,
 * updated, used for the step and stored back (STORE, with the key of its first element `key`);
 * low (if not NULL) gets the updated row in bf16. */
#define DEFINE_ADAM_ROW(name, type, LOAD, STORE, ATTRIBUTE, PRAGMA)                               \
    ATTRIBUTE static inline void name(float *p, type *m, type *v, const float *g, int64_t d,      \
                                      float step_size, float beta1, float beta2, float eps,      \
                                      float bias_correction2_sqrt, float grad_scale, int unit_norm,\
                                      uint16_t *low, uint64_t key) {                              \
        PRAGMA                                                                                     \
        float along = 0, squares = 0;                                                              \
        if (unit_norm) {                                                                           \
            _Pragma("omp simd reduction(+: along)")                                                \
            for (int64_t j = 0; j < d; j++) along += g[j] * p[j];                                  \
        }                                                                                          \
        _Pragma("omp simd reduction(+: squares)")                                                  \
        for (int64_t j = 0; j < d; j++) {                                                          \
            const float gj = grad_scale * (g[j] - along * p[j]); /* along = 0 without unit_norm */ \
            const float mj = beta1 * LOAD(m[j]) + (1 - beta1) * gj;                                \
            const float vj = beta2 * LOAD(v[j]) + (1 - beta2) * gj * gj;                           \
            p[j] -= step_size * mj / (sqrtf(vj) / bias_correction2_sqrt + eps);                    \
            squares += p[j] * p[j];                                                                \
            m[j] = STORE(mj, key + 2 * (uint64_t)j);                                               \
            v[j] = STORE(vj, key + 2 * (uint64_t)j + 1);                                           \
        }                                                                                          \
        if (unit_norm) {                                                                           \
            const float norm = sqrtf(squares) > 1e-12f ? sqrtf(squares) : 1e-12f;                 \
            for (int64_t j = 0; j < d; j++) p[j] /= norm;                                          \
        }                                                                                          \
        if (low != NULL)                                                                           \
            for (int64_t j = 0; j < d; j++) low[j] = float_to_bf16(p[j]);                          \
    }

/* Adam on rows r = rows[i], i < n (rows NULL: r = i) of param/exp_avg/exp_avg_sq ([*, d]) with
 * gradient rows grad_scale · grad[i] ([n, d]; the scale of a clipped gradient norm, 1: none), in
 * place and in one pass, in torch's fused-Adam arithmetic:
 *   m ← β1 m + (1 − β1) g,  v ← β2 v + (1 − β2) g²,  θ ← θ − (lr / c1) m / (sqrt(v) / sqrt(c2) + ε)
 * with bias corrections c1 = 1 − β1^t and c2 = 1 − β2^t (t = step). With unit_norm the rows are
 * unit-norm decoder rows kept on the sphere, all while the row is in cache: the gradient's
 * component along the row is removed first (g ← g − (g · θ) θ) and the updated row is
 * renormalised after (θ ← θ / max(‖θ‖, 1e-12)). With low non-NULL, a bf16 copy of param
 * ([*, d]) gets the updated rows too (a selection matmul's weights, kept current without a cast
 * of the whole matrix). adam_rows keeps fp32 moments (step and key_rows unused), adam_rows_bf16
 * bf16 ones: element (r, j)'s rounding is keyed by step and its flat index R·d + j, with
 * R = key_rows[r] (key_rows NULL: R = r), the row's index in the whole matrix where param holds
 * only some of its rows (an expert-parallel rank's). */
#define DEFINE_ADAM_ROWS(name, row_kernel, type, LOAD, STORE, ATTRIBUTE, PRAGMA)                  \
    DEFINE_ADAM_ROW(row_kernel, type, LOAD, STORE, ATTRIBUTE, PRAGMA)                              \
    ATTRIBUTE void name(float *param, type *exp_avg, type *exp_avg_sq, const float *grad,          \
                        const int64_t *rows, int64_t n, int64_t d, float lr, float beta1,          \
                        float beta2, float eps, float bias_correction1,                            \
                        float bias_correction2_sqrt, float grad_scale, int unit_norm, uint16_t *low,\
                        int64_t step,                                                              \
                        const int64_t *key_rows) {                                                 \
        const uint64_t seed = mix64((uint64_t)step);                                               \
        _Pragma("omp parallel") {                                                                  \
            int64_t begin, end;                                                                    \
            thread_rows(n, &begin, &end);                                                          \
            for (int64_t i = begin; i < end; i++) {                                                \
                const int64_t r = rows ? rows[i] : i;                                              \
                row_kernel(param + r * d, exp_avg + r * d, exp_avg_sq + r * d, grad + i * d, d,    \
                           lr / bias_correction1, beta1, beta2, eps, bias_correction2_sqrt,        \
                           grad_scale, unit_norm, low ? low + r * d : NULL,                        \
                           seed + 2 * (uint64_t)((key_rows ? key_rows[r] : r) * d));               \
            }                                                                                      \
        }                                                                                          \
    }

DEFINE_ADAM_ROWS(adam_rows, adam_row, float, AS_FLOAT, AS_STORED, , )
DEFINE_ADAM_ROWS(adam_rows_bf16, adam_row_bf16, uint16_t, bf16_to_float, STOCHASTIC_BF16, SEPARATE_ROUNDING,
                 SEPARATE_ROUNDING_HERE)

/* Fortran BLAS sgemm, column-major, LP64 ints: C = α op(A) op(B) + β C (MKL's SGEMM). */
typedef void (*sgemm_fn)(const char *transa, const char *transb, const int *m, const int *n, const int *k,
                         const float *alpha, const float *a, const int *lda, const float *b, const int *ldb,
                         const float *beta, float *c, const int *ldc);

/* Expert selection fused with its matmul. Tokens x ([T, d], grouped by expert: expert e owns rows
 * [starts[e], starts[e+1])) are cut into tiles of at most `tile` tokens of one expert. A thread
 * takes a tile, multiplies it by its expert's encoder rows W[e·m, (e+1)·m) into its own
 * [tile, m] buffer (`sgemm` runs single-threaded inside the parallel region) and takes each
 * row's top-k from that buffer while it is still in cache; indices are global latent ids
 * (e·m + column). Tiles are handed out dynamically, so uneven experts balance across threads.
 * Returns -1 if memory could not be allocated, else 0. */
int grouped_select(sgemm_fn sgemm, const float *x, const float *W, const int64_t *starts, int64_t n_experts,
                   int64_t d, int64_t m, int64_t k, int64_t tile, float *values, int64_t *indices) {
    int64_t n_tiles = 0;
    for (int64_t e = 0; e < n_experts; e++) n_tiles += (starts[e + 1] - starts[e] + tile - 1) / tile;
    int64_t *tile_expert = malloc((n_tiles + 1) * sizeof(int64_t)), *tile_start = malloc((n_tiles + 1) * sizeof(int64_t));
    int failed = tile_expert == NULL || tile_start == NULL;
    for (int64_t e = 0, t = 0; !failed && e < n_experts; e++)
        for (int64_t row = starts[e]; row < starts[e + 1]; row += tile, t++) {
            tile_expert[t] = e;
            tile_start[t] = row;
        }
    if (!failed) {
#pragma omp parallel reduction(|: failed)
        {
            float *buffer = malloc(tile * m * sizeof(float));
            entry *scratch = malloc(2 * m * sizeof(entry));
            failed = buffer == NULL || scratch == NULL;
#pragma omp for schedule(dynamic)
            for (int64_t t = 0; t < n_tiles; t++) {
                if (failed) continue;
                int64_t e = tile_expert[t], row = tile_start[t];
                int64_t end = row + tile < starts[e + 1] ? row + tile : starts[e + 1];
                const int gm = (int)m, gn = (int)(end - row), gk = (int)d;
                const float one = 1, zero = 0;
                sgemm("T", "N", &gm, &gn, &gk, &one, W + e * m * d, &gk, x + row * d, &gk, &zero, buffer, &gm);
                for (int64_t r = row; r < end; r++)
                    topk_row_f32(buffer + (r - row) * m, m, k, values + r * k, indices + r * k, e * m, scratch);
            }
            free(buffer);
            free(scratch);
        }
    }
    free(tile_expert);
    free(tile_start);
    return -failed;
}
