// Fused nearest-codeword search on the GPU: argmin_k d(z_n, c_k) without the N x K distance matrix.
//
// The idea to hold: each block owns 64 rows of z and streams the codebook through shared memory in 64-code
// tiles; the dot products of a tile go straight into a running per-row best (k == 1: per thread, in registers;
// k > 1: a sorted list spread over one warp's lanes), so memory beyond the inputs is O(K) norms, never O(N K).
// Every selection compares (score, index) pairs with one strict total order (larger score, then lower index),
// so ties go to the lowest index for any launch shape. The returned distance is recomputed directly from z and
// the chosen codeword (sum (z - c)^2, never the cancellation-prone expanded form), so it is never negative.
//
// Two modes:
//   exact  fp32 (fp64 for fp64 input) SIMT dot products, each one a sequential fma chain over d.
//   fast   (k == 1, sm_80+) bf16 tensor-core candidate scores (WMMA 16x16x16, fp32 accumulate). Every code whose
//          candidate score is within 2 delta of the row's best candidate is kept (delta bounds |bf16 score - fp32
//          score|, see fast_window), and the survivors are re-scored with the exact mode's fma chain. The exact
//          mode's winner always survives, so fast returns the exact mode's index. A row with more survivors than
//          slots is flagged and recomputed by the exact kernel.
// See the faiss / RAFT fused L2-NN notes in shared/reference/kernels.md sections 2, 5 and 7.
#include <mma.h>

#include <algorithm>
#include <climits>
#include <type_traits>

#include "cuda/common.cuh"

namespace quantkit {
namespace cuda {
namespace {

constexpr float kCosineEps = 1e-12f;  // as _COSINE_EPS in quantkit/ops.py

// ---- finite check ------------------------------------------------------------------------------------------

template <typename T>
__global__ void flag_non_finite_kernel(const T* __restrict__ x, int64_t numel, int* flag, int bit) {
  using Acc = typename AccOf<T>::type;
  bool bad = false;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    bad |= !isfinite(load_as<Acc>(x + i));
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) atomicOr(flag, bit);
}

// ---- per-code terms of the score ---------------------------------------------------------------------------

// score(z, c_k) = z.c_k - bias_k (l2, bias = ||c||^2 / 2), (z.c_k) * bias_k (cosine, bias = 1 / ||c||), z.c_k (dot).
// max_norm (optional) gets max_k ||c_k|| as float bits: the scale of the fast mode's error bound.
template <typename T, typename Acc>
__global__ void code_terms_kernel(const T* __restrict__ codebook, int64_t num_codes, int64_t dim, int metric,
                                  Acc* __restrict__ bias, int* max_norm_bits) {
  const int64_t code = blockIdx.x * static_cast<int64_t>(blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (code >= num_codes) return;
  Acc sq = 0;
  for (int64_t d = lane; d < dim; d += kWarp) {
    const Acc c = load_as<Acc>(codebook + code * dim + d);
    sq = fma(c, c, sq);
  }
  sq = warp_sum(sq);
  if (lane != 0) return;
  const Acc norm = sqrt(sq);
  bias[code] = metric == kL2 ? Acc(0.5) * sq : metric == kCosine ? Acc(1) / max(norm, Acc(kCosineEps)) : Acc(0);
  // Non-negative floats order like their bit patterns, so an integer atomicMax is an exact, order-free max.
  if (max_norm_bits != nullptr) atomicMax(max_norm_bits, __float_as_int(static_cast<float>(norm)));
}

template <typename Acc> __device__ __forceinline__ Acc apply_bias(Acc dot, Acc bias, int metric) {
  return metric == kL2 ? dot - bias : metric == kCosine ? dot * bias : dot;
}

// ---- exact kernel --------------------------------------------------------------------------------------------

// (score, index) as one 64-bit key whose unsigned minimum is the nearer() winner: the high word maps larger
// scores to smaller integers (the usual order-preserving float-to-uint map, complemented), the low word is the
// index. -0 is folded into +0 first, since nearer() treats them as equal.
__device__ __forceinline__ unsigned long long pack_key(float score, int index) {
  const unsigned bits = __float_as_uint(score == 0.0f ? 0.0f : score);
  const unsigned ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);  // ascending with the score
  return (static_cast<unsigned long long>(~ordered) << 32) | static_cast<unsigned>(index);
}

__global__ void unpack_keys_kernel(const unsigned long long* __restrict__ keys, int64_t n,
                                   int64_t* __restrict__ indices) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row < n) indices[row] = static_cast<int64_t>(keys[row] & 0xffffffffull);
}

// Four consecutive shared-memory values (16-byte aligned): one vector load for float32.
template <typename Acc> __device__ __forceinline__ void load4(const Acc* p, Acc (&v)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = p[i];
}
template <> __device__ __forceinline__ void load4<float>(const float* p, float (&v)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
}

constexpr int kThreads = 256;
constexpr int kTileRows = 64;   // BM: rows of z per block
constexpr int kTileCodes = 64;  // BN: codewords per tile (== BM: the stage buffers share one layout)
constexpr int kTileDim = 16;    // BD: depth of one shared-memory stage
constexpr int kListRows = kTileRows / (kThreads / kWarp);  // rows per warp in the k > 1 epilogue (8)

// Thread (ty, tx) of the 16 x 16 grid owns rows 4 ty + i and codes 4 tx + j of a tile (a 4 x 4 micro-tile, read
// from shared memory as one 16-byte vector per operand for float32).
// k == 1: it keeps the best code of each of its rows over its codes; 16 lanes then reduce. k > 1: the scores of a
// tile go to shared memory and warp w merges rows w * 8 .. w * 8 + 7 into sorted lists, lane j holding the row's
// j-th nearest code. only_rows (optional, (n,) int): compute everything but write only the flagged rows (the fast
// mode's fallback); blocks without a flagged row exit at once.
// Split codebook (k == 1, float32 scores, few row blocks): blockIdx.y scans codes [y * split_len, (y + 1) * split_len)
// and merges its per-row best into split_keys[row] with a 64-bit atomicMin of pack_key(score, index), which is
// order-independent, so the result does not depend on which block finishes first.
template <typename T, typename Acc, bool kMulti>
__global__ void __launch_bounds__(kThreads)
    nearest_exact_kernel(const T* __restrict__ z, const T* __restrict__ codebook, const Acc* __restrict__ bias,
                         int metric, int64_t n, int num_codes, int64_t dim, int k, const int* __restrict__ only_rows,
                         int split_len, unsigned long long* __restrict__ split_keys, int64_t* __restrict__ indices) {
  // Stage buffers (zs, cs) and the k > 1 score tile are never live at once: they share storage. Rows are padded by
  // four elements: the transposing stores (consecutive threads walk d) conflict at most 2-way, and every row start
  // stays 16-byte aligned for the vector loads.
  constexpr int kLd = kTileRows + 4;  // == kTileCodes + 4
  constexpr int kStage = 2 * kTileDim * kLd;
  constexpr int kScores = kMulti ? kTileRows * kLd : 0;
  __shared__ __align__(16) Acc smem[kStage > kScores ? kStage : kScores];
  Acc(*zs)[kLd] = reinterpret_cast<Acc(*)[kLd]>(smem);                     // (BD, BM + 4)
  Acc(*cs)[kLd] = reinterpret_cast<Acc(*)[kLd]>(smem + kTileDim * kLd);    // (BD, BN + 4)
  Acc(*scores)[kLd] = reinterpret_cast<Acc(*)[kLd]>(smem);                 // (BM, BN + 4)

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16, lane = tid % kWarp, warp = tid / kWarp;
  const int64_t row0 = blockIdx.x * static_cast<int64_t>(kTileRows);
  if (only_rows != nullptr) {
    const bool flagged = tid < kTileRows && row0 + tid < n && only_rows[row0 + tid] != 0;
    if (!__syncthreads_or(flagged)) return;
  }

  Acc best_score[4];
  int best_index[4];
  Acc list_score[kListRows];  // k > 1: this lane's entry of each of the warp's rows
  int list_index[kListRows];
#pragma unroll
  for (int i = 0; i < 4; ++i) best_score[i] = neg_inf<Acc>(), best_index[i] = INT_MAX;
#pragma unroll
  for (int r = 0; r < kListRows; ++r) list_score[r] = neg_inf<Acc>(), list_index[r] = INT_MAX;

  const int code_begin = blockIdx.y * split_len;
  const int code_end = split_len < num_codes - code_begin ? code_begin + split_len : num_codes;
  for (int code0 = code_begin; code0 < code_end; code0 += kTileCodes) {  // split_len is a multiple of the tile
    Acc acc[4][4] = {};
    for (int64_t d0 = 0; d0 < dim; d0 += kTileDim) {
#pragma unroll
      for (int l = 0; l < kTileDim * kTileRows / kThreads; ++l) {
        const int e = tid + kThreads * l, d = e % kTileDim, r = e / kTileDim;
        const int64_t row = row0 + r, code = code0 + r, dd = d0 + d;
        zs[d][r] = row < n && dd < dim ? load_as<Acc>(z + row * dim + dd) : Acc(0);
        cs[d][r] = code < num_codes && dd < dim ? load_as<Acc>(codebook + code * dim + dd) : Acc(0);
      }
      __syncthreads();
#pragma unroll
      for (int d = 0; d < kTileDim; ++d) {
        Acc a[4], b[4];
        load4(&zs[d][4 * ty], a);
        load4(&cs[d][4 * tx], b);
        // Explicit fma, in d order: the fast mode's re-rank reproduces these scores bit for bit.
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }

#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int code = code0 + 4 * tx + j;
      const Acc code_bias = code < num_codes ? bias[code] : Acc(0);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const Acc s = apply_bias(acc[i][j], code_bias, metric);
        if constexpr (kMulti) {
          scores[4 * ty + i][4 * tx + j] = code < num_codes ? s : neg_inf<Acc>();
        } else if (code < num_codes && nearer(s, code, best_score[i], best_index[i])) {
          best_score[i] = s, best_index[i] = code;
        }
      }
    }

    if constexpr (kMulti) {
      __syncthreads();
#pragma unroll
      for (int r = 0; r < kListRows; ++r) {
        const int local_row = warp * kListRows + r;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int col = lane + kWarp * half, code = code0 + col;
          const Acc s = scores[local_row][col];
          Acc worst_score = __shfl_sync(0xffffffffu, list_score[r], k - 1);
          int worst_index = __shfl_sync(0xffffffffu, list_index[r], k - 1);
          bool want = code < num_codes && nearer(s, code, worst_score, worst_index);
          unsigned pending = __ballot_sync(0xffffffffu, want);
          while (pending != 0) {  // insert candidates one at a time, lowest lane first
            const int src = __ffs(pending) - 1;
            const Acc cand_score = __shfl_sync(0xffffffffu, s, src);
            const int cand_index = __shfl_sync(0xffffffffu, code, src);
            const bool ahead = lane < k && nearer(list_score[r], list_index[r], cand_score, cand_index);
            const int pos = __popc(__ballot_sync(0xffffffffu, ahead));  // < k: the candidate beat entry k - 1
            const Acc up_score = __shfl_up_sync(0xffffffffu, list_score[r], 1);
            const int up_index = __shfl_up_sync(0xffffffffu, list_index[r], 1);
            if (lane == pos) list_score[r] = cand_score, list_index[r] = cand_index;
            if (lane > pos) list_score[r] = up_score, list_index[r] = up_index;
            worst_score = __shfl_sync(0xffffffffu, list_score[r], k - 1);
            worst_index = __shfl_sync(0xffffffffu, list_index[r], k - 1);
            want = want && nearer(s, code, worst_score, worst_index);
            pending &= ~(1u << src) & __ballot_sync(0xffffffffu, want);
          }
        }
      }
      __syncthreads();  // the next tile's stage buffers overwrite the scores
    }
  }

  if constexpr (kMulti) {
#pragma unroll
    for (int r = 0; r < kListRows; ++r) {
      const int64_t row = row0 + warp * kListRows + r;
      const bool write = row < n && (only_rows == nullptr || only_rows[row] != 0);
      if (write && lane < k) indices[row * k + lane] = list_index[r];
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int offset = 8; offset > 0; offset >>= 1) {  // the 16 lanes of one ty, in a fixed tree
        const Acc other_score = __shfl_xor_sync(0xffffffffu, best_score[i], offset);
        const int other_index = __shfl_xor_sync(0xffffffffu, best_index[i], offset);
        if (nearer(other_score, other_index, best_score[i], best_index[i]))
          best_score[i] = other_score, best_index[i] = other_index;
      }
      const int64_t row = row0 + 4 * ty + i;
      if (tx != 0 || row >= n || (only_rows != nullptr && only_rows[row] == 0)) continue;
      if constexpr (std::is_same<Acc, float>::value) {
        if (split_keys != nullptr) {
          atomicMin(split_keys + row, pack_key(best_score[i], best_index[i]));
          continue;
        }
      }
      indices[row] = best_index[i];
    }
  }
}

// ---- fast kernel (bf16 tensor cores + exact re-rank) ---------------------------------------------------------

constexpr int kFastThreads = 128;  // 4 warps, each a 32 x 32 quarter of the 64 x 64 tile
constexpr int kFastTile = 64;
constexpr int kFastDim = 16;   // WMMA k for bf16
constexpr int kFastLd = 24;    // padded leading dimension (bf16 elements) of the stage tiles
constexpr int kScoreLd = 68;   // padded leading dimension (floats) of the score tile
constexpr int kSlots = 8;      // candidate slots per thread; two threads per row

// Half-width of the candidate window. |bf16 score - exact fp32 score| <= delta, with
// delta = (input rounding 2 * 2^-9 + fp32 accumulation of both sums ~ 2 (D + 16) 2^-24, doubled for safety)
//         * sum |z_d c_d|,  and sum |z_d c_d| <= ||z|| ||c|| <= ||z|| max ||c|| (cosine: ||c|| / ||c|| <= 1).
__device__ __forceinline__ float fast_window(float z_norm, float code_scale, int64_t dim) {
  const float unit = 0x1p-7f + static_cast<float>(dim + 32) * 0x1p-21f;
  return 2.0f * unit * z_norm * code_scale;  // 2 delta: best candidate minus a survivor
}

template <typename T>
__global__ void __launch_bounds__(kFastThreads)
    nearest_fast_kernel(const T* __restrict__ z, const T* __restrict__ codebook, const float* __restrict__ bias,
                        const int* __restrict__ max_norm_bits, int metric, int64_t n, int num_codes, int64_t dim,
                        int* __restrict__ fallback, int64_t* __restrict__ indices) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  __shared__ __align__(32) __nv_bfloat16 zs[kFastTile][kFastLd];  // (BM, BD) row-major
  __shared__ __align__(32) __nv_bfloat16 cs[kFastTile][kFastLd];  // (BN, BD): C^T column-major
  __shared__ __align__(32) float scores[kFastTile][kScoreLd];     // (BM, BN)

  const int tid = threadIdx.x, warp = tid / kWarp, warp_row = warp / 2, warp_col = warp % 2;
  const int local_row = tid / 2, half = tid % 2;  // epilogue: two threads per row, 32 codes each
  const int64_t row0 = blockIdx.x * static_cast<int64_t>(kFastTile), row = row0 + local_row;

  float z_sq = 0.0f;  // ||z||^2 for the window, split over the thread pair
  if (row < n)
    for (int64_t d = half; d < dim; d += 2) {
      const float v = load_as<float>(z + row * dim + d);
      z_sq = fmaf(v, v, z_sq);
    }
  z_sq += __shfl_xor_sync(0xffffffffu, z_sq, 1);
  const float code_scale = metric == kCosine ? 1.0f : __int_as_float(*max_norm_bits);
  const float window = fast_window(sqrtf(z_sq), code_scale, dim);

  float best = -INFINITY;  // best candidate (bf16) score seen by this thread
  float slot_score[kSlots];
  int slot_index[kSlots];
#pragma unroll
  for (int s = 0; s < kSlots; ++s) slot_score[s] = -INFINITY, slot_index[s] = -1;
  bool overflow = false;

  for (int code0 = 0; code0 < num_codes; code0 += kFastTile) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    for (int64_t d0 = 0; d0 < dim; d0 += kFastDim) {
#pragma unroll
      for (int l = 0; l < kFastTile * kFastDim / kFastThreads; ++l) {
        const int e = tid + kFastThreads * l, d = e % kFastDim, r = e / kFastDim;
        const int64_t zr = row0 + r, cr = code0 + r, dd = d0 + d;
        zs[r][d] = __float2bfloat16_rn(zr < n && dd < dim ? load_as<float>(z + zr * dim + dd) : 0.0f);
        cs[r][d] = __float2bfloat16_rn(cr < num_codes && dd < dim ? load_as<float>(codebook + cr * dim + dd) : 0.0f);
      }
      __syncthreads();
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(a[i], &zs[32 * warp_row + 16 * i][0], kFastLd);
        wmma::load_matrix_sync(b[i], &cs[32 * warp_col + 16 * i][0], kFastLd);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&scores[32 * warp_row + 16 * i][32 * warp_col + 16 * j], acc[i][j], kScoreLd,
                                wmma::mem_row_major);
    __syncthreads();

    for (int c = 0; c < kFastTile / 2; ++c) {
      const int col = half * (kFastTile / 2) + c, code = code0 + col;
      if (code >= num_codes) break;
      const float s = apply_bias(scores[local_row][col], bias[code], metric);
      if (s > best) {
        best = s;
#pragma unroll
        for (int t = 0; t < kSlots; ++t)
          if (slot_index[t] >= 0 && slot_score[t] < best - window) slot_index[t] = -1;
      }
      if (s >= best - window) {
        bool placed = false;
#pragma unroll
        for (int t = 0; t < kSlots; ++t)
          if (!placed && slot_index[t] < 0) slot_score[t] = s, slot_index[t] = code, placed = true;
        overflow |= !placed;
      }
    }
    __syncthreads();  // the next tile's store_matrix_sync overwrites the scores
  }

  // Re-rank the survivors with the exact kernel's arithmetic (sequential fp32 fma over d, then the bias).
  best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, 1));
  float exact_best = -INFINITY;
  int exact_index = INT_MAX;
  if (row < n) {
#pragma unroll
    for (int t = 0; t < kSlots; ++t) {
      if (slot_index[t] < 0 || slot_score[t] < best - window) continue;
      const int code = slot_index[t];
      float dot = 0.0f;
      for (int64_t d = 0; d < dim; ++d)
        dot = fmaf(load_as<float>(z + row * dim + d), load_as<float>(codebook + code * dim + d), dot);
      const float s = apply_bias(dot, bias[code], metric);
      if (nearer(s, code, exact_best, exact_index)) exact_best = s, exact_index = code;
    }
  }
  const float other_best = __shfl_xor_sync(0xffffffffu, exact_best, 1);
  const int other_index = __shfl_xor_sync(0xffffffffu, exact_index, 1);
  if (nearer(other_best, other_index, exact_best, exact_index)) exact_best = other_best, exact_index = other_index;
  overflow |= __shfl_xor_sync(0xffffffffu, static_cast<int>(overflow), 1) != 0;
  if (half == 0 && row < n) {
    indices[row] = exact_index;
    if (overflow) fallback[row] = 1;
  }
#endif
}

// ---- returned distances ------------------------------------------------------------------------------------

// One warp per (row, j): the distance to the chosen codeword, computed directly (never negative for l2).
template <typename T, typename Acc>
__global__ void distances_kernel(const T* __restrict__ z, const T* __restrict__ codebook,
                                 const int64_t* __restrict__ indices, int64_t n, int k, int64_t dim, int metric,
                                 Acc* __restrict__ distances) {
  const int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (item >= n * k) return;
  const T* zr = z + (item / k) * dim;
  const T* cr = codebook + indices[item] * dim;
  Acc diff_sq = 0, dot = 0, z_sq = 0, c_sq = 0;
  for (int64_t d = lane; d < dim; d += kWarp) {
    const Acc a = load_as<Acc>(zr + d), b = load_as<Acc>(cr + d), diff = a - b;
    diff_sq = fma(diff, diff, diff_sq), dot = fma(a, b, dot), z_sq = fma(a, a, z_sq), c_sq = fma(b, b, c_sq);
  }
  diff_sq = warp_sum(diff_sq), dot = warp_sum(dot), z_sq = warp_sum(z_sq), c_sq = warp_sum(c_sq);
  if (lane != 0) return;
  const Acc eps = kCosineEps;
  distances[item] = metric == kL2    ? diff_sq
                    : metric == kDot ? -dot
                                     : Acc(1) - dot / (max(sqrt(z_sq), eps) * max(sqrt(c_sq), eps));
}

// ---- workspace ---------------------------------------------------------------------------------------------

constexpr size_t kAlign = 256;
size_t align_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// [bias (K,) | max_norm (1) | fallback flags (N,) int or split keys (N,) u64]
struct NearestWorkspace {
  size_t bias_bytes, max_norm_offset, rows_offset, total;
  NearestWorkspace(DType dtype, int64_t n, int64_t num_codes) {
    bias_bytes = align_up(static_cast<size_t>(num_codes) * (dtype == DType::kFloat64 ? 8 : 4));
    max_norm_offset = bias_bytes;
    rows_offset = max_norm_offset + kAlign;
    total = rows_offset + align_up(static_cast<size_t>(n) * sizeof(unsigned long long));
  }
};

// How many codebook segments a k == 1 float32 search splits into: enough blocks for two waves of 256-thread
// blocks over the SMs when the rows alone give fewer, and at least 4 code tiles per segment.
int codebook_splits(int64_t row_blocks, int64_t num_codes) {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return 1;
  const int64_t want = (2 * static_cast<int64_t>(sms) + row_blocks - 1) / row_blocks;
  const int64_t most = num_codes / (4 * kTileCodes);
  return static_cast<int>(std::max<int64_t>(1, std::min(want, most)));
}

bool device_has_bf16_mma() {
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  return major >= 8;
}

}  // namespace

// ---- launchers ---------------------------------------------------------------------------------------------

cudaError_t flag_non_finite(DType dtype, const void* x, int64_t numel, int* flag, int bit, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(numel, 256), 1024));
    flag_non_finite_kernel<T><<<blocks, 256, 0, stream>>>(static_cast<const T*>(x), numel, flag, bit);
    return cudaGetLastError();
  });
}

cudaError_t read_flag(const int* flag, int* host, cudaStream_t stream) {
  cudaError_t err = cudaMemcpyAsync(host, flag, sizeof(int), cudaMemcpyDeviceToHost, stream);
  return err != cudaSuccess ? err : cudaStreamSynchronize(stream);
}

size_t nearest_codeword_workspace_bytes(DType dtype, int64_t n, int64_t num_codes, bool /*fast*/) {
  return NearestWorkspace(dtype, n, num_codes).total;
}

cudaError_t nearest_codeword(DType dtype, const void* z, const void* codebook, int64_t n, int64_t num_codes,
                             int64_t dim, int metric, int k, bool fast, void* workspace, int64_t* indices,
                             void* distances, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (k < 1 || k > kMaxK || k > num_codes || num_codes > INT_MAX) return cudaErrorInvalidValue;
  const NearestWorkspace layout(dtype, n, num_codes);
  char* ws = static_cast<char*>(workspace);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename AccOf<T>::type;
    const T* zp = static_cast<const T*>(z);
    const T* cp = static_cast<const T*>(codebook);
    Acc* bias = reinterpret_cast<Acc*>(ws);
    const int codes = static_cast<int>(num_codes);
    const unsigned blocks = ceil_div(n, kTileRows);
    const bool use_fast = fast && k == 1 && !std::is_same<T, double>::value && device_has_bf16_mma();
    int* max_norm_bits = use_fast ? reinterpret_cast<int*>(ws + layout.max_norm_offset) : nullptr;
    int* fallback = use_fast ? reinterpret_cast<int*>(ws + layout.rows_offset) : nullptr;
    cudaError_t err = cudaSuccess;
    if (use_fast) {
      err = cudaMemsetAsync(ws + layout.max_norm_offset, 0, layout.total - layout.max_norm_offset, stream);  // + flags
      if (err != cudaSuccess) return err;
    }
    code_terms_kernel<T, Acc><<<ceil_div(num_codes, 8), 256, 0, stream>>>(cp, num_codes, dim, metric, bias,
                                                                           max_norm_bits);
    if (use_fast) {
      if constexpr (!std::is_same<T, double>::value) {
        nearest_fast_kernel<T><<<ceil_div(n, kFastTile), kFastThreads, 0, stream>>>(
            zp, cp, reinterpret_cast<const float*>(bias), max_norm_bits, metric, n, codes, dim, fallback, indices);
      }
      nearest_exact_kernel<T, Acc, false><<<blocks, kThreads, 0, stream>>>(zp, cp, bias, metric, n, codes, dim, 1,
                                                                            fallback, codes, nullptr, indices);
    } else if (k == 1) {
      const int splits = std::is_same<Acc, float>::value ? codebook_splits(blocks, num_codes) : 1;
      const int tiles = static_cast<int>(ceil_div(num_codes, kTileCodes));
      const int split_len = static_cast<int>(ceil_div(tiles, splits)) * kTileCodes;
      const int used_splits = static_cast<int>(ceil_div(num_codes, split_len));
      unsigned long long* keys = nullptr;
      if (used_splits > 1) {
        keys = reinterpret_cast<unsigned long long*>(ws + layout.rows_offset);
        if ((err = cudaMemsetAsync(keys, 0xff, n * sizeof(unsigned long long), stream)) != cudaSuccess) return err;
      }
      nearest_exact_kernel<T, Acc, false><<<dim3(blocks, used_splits), kThreads, 0, stream>>>(
          zp, cp, bias, metric, n, codes, dim, 1, nullptr, split_len, keys, indices);
      if (keys != nullptr) unpack_keys_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(keys, n, indices);
    } else {
      nearest_exact_kernel<T, Acc, true><<<blocks, kThreads, 0, stream>>>(zp, cp, bias, metric, n, codes, dim, k,
                                                                           nullptr, codes, nullptr, indices);
    }
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    distances_kernel<T, Acc><<<ceil_div(n * k, 8), 256, 0, stream>>>(zp, cp, indices, n, k, dim, metric,
                                                                      static_cast<Acc*>(distances));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace quantkit
