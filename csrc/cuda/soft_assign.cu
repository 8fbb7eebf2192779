// Soft vector quantization on the GPU: out = softmax(logits) @ C with logits = -||z - c||^2 / t (l2, up to a
// per-row constant: (2 z.c - ||c||^2) / t) or z.c / t (dot), as in SoftVQ-VAE (arXiv:2412.10958).
//
// The idea to hold: this is one-head attention with q = z, k = c, v = c, so it follows FlashAttention-2
// (arXiv:2307.08691): a block owns a few rows, streams 64-code tiles, keeps a running max m, sum l and output
// accumulator per row (online softmax), and stores only lse = m + log l per row. The backward recomputes
// P = exp(logits - lse) tile by tile, in two passes so that every reduction has one owner and a fixed order:
//   rows pass   (a block per row tile, loop over code tiles): grad_z, and per-block partial sums for grad_t;
//   codes pass  (a block per code tile, loop over row tiles): grad_codebook, no atomics;
//   a last single-block sum of the grad_t partials.
// Shapes: z, out, grad_out (N, D); codebook (K, D); lse (N,); temperature a scalar.
#include <algorithm>
#include <type_traits>

#include "cuda/common.cuh"

namespace quantkit {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWide = 64;       // entries of the streamed side (codes in forward / rows pass, rows in codes pass)
constexpr int kGroups = kThreads / kWide;  // 4 thread groups share the narrow side
constexpr int kChunk = 32;      // D per shared-memory stage
constexpr int kWideLd = kChunk + 1;
constexpr size_t kAccumulatorBytes = 64 * 1024;  // per-block (narrow x D) accumulator budget

// The narrow side of a block: 16 rows (or codes), or 1 when D is too large for 16 accumulators in shared memory.
template <typename Acc> int narrow_for(int64_t dim) {
  return static_cast<size_t>(16 * dim) * sizeof(Acc) <= kAccumulatorBytes ? 16 : 1;
}

// Shared-memory layout of one block; every array is Acc.
template <int kNarrow> struct Layout {
  int64_t accum, narrow_stage, wide_stage, wide_stage2, tile, tile2, per_narrow, total;
  __host__ __device__ explicit Layout(int64_t dim) {
    accum = 0;                                       // (narrow, D)
    narrow_stage = accum + kNarrow * dim;            // (narrow, chunk)
    wide_stage = narrow_stage + kNarrow * kChunk;    // (64, chunk + 1)
    wide_stage2 = wide_stage + kWide * kWideLd;      // (64, chunk + 1)
    tile = wide_stage2 + kWide * kWideLd;            // (narrow, 64)
    tile2 = tile + kNarrow * kWide;                  // (narrow, 64)
    per_narrow = tile2 + kNarrow * kWide;            // (4, narrow): per-row / per-code scalars
    total = per_narrow + 4 * kNarrow;
  }
};

// Dot products of a (narrow x 64) tile: acc[i] = x[narrow0 + g + 4 i] . y[wide0 + j] for this thread's j = tid % 64
// and g = tid / 64, each a sequential fma chain over d (the same order in every kernel, so forward and backward see
// the same logits). Optionally also ||x||^2 (x_sq) and ||y||^2 (y_sq) in the same order. Rows past the end read 0.
template <typename T, typename Acc, int kNarrow>
__device__ void tile_dots(const T* __restrict__ x, int64_t narrow0, int64_t narrow_count, const T* __restrict__ y,
                          int64_t wide0, int64_t wide_count, int64_t dim, Acc* narrow_stage, Acc* wide_stage,
                          Acc (&acc)[(kNarrow + kGroups - 1) / kGroups], Acc (&x_sq)[(kNarrow + kGroups - 1) / kGroups],
                          Acc& y_sq) {
  constexpr int kPer = (kNarrow + kGroups - 1) / kGroups;
  const int tid = threadIdx.x, j = tid % kWide, g = tid / kWide;
#pragma unroll
  for (int i = 0; i < kPer; ++i) acc[i] = 0, x_sq[i] = 0;
  y_sq = 0;
  for (int64_t d0 = 0; d0 < dim; d0 += kChunk) {
    for (int e = tid; e < kNarrow * kChunk; e += kThreads) {
      const int r = e / kChunk, d = e % kChunk;
      const int64_t row = narrow0 + r, dd = d0 + d;
      narrow_stage[e] = row < narrow_count && dd < dim ? load_as<Acc>(x + row * dim + dd) : Acc(0);
    }
    for (int e = tid; e < kWide * kChunk; e += kThreads) {
      const int r = e / kChunk, d = e % kChunk;
      const int64_t row = wide0 + r, dd = d0 + d;
      wide_stage[r * kWideLd + d] = row < wide_count && dd < dim ? load_as<Acc>(y + row * dim + dd) : Acc(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int d = 0; d < kChunk; ++d) {
      const Acc b = wide_stage[j * kWideLd + d];
      y_sq = fma(b, b, y_sq);
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int r = g + kGroups * i;
        if (r < kNarrow) {
          const Acc a = narrow_stage[r * kChunk + d];
          acc[i] = fma(a, b, acc[i]);
          x_sq[i] = fma(a, a, x_sq[i]);
        }
      }
    }
    __syncthreads();
  }
}

// Loads one (64 x chunk) slice of rows wide0.. of y into a stage (zero past the end).
template <typename T, typename Acc>
__device__ void load_wide_chunk(const T* __restrict__ y, int64_t wide0, int64_t wide_count, int64_t d0, int64_t dim,
                                Acc* stage) {
  for (int e = threadIdx.x; e < kWide * kChunk; e += kThreads) {
    const int r = e / kChunk, d = e % kChunk;
    const int64_t row = wide0 + r, dd = d0 + d;
    stage[r * kWideLd + d] = row < wide_count && dd < dim ? load_as<Acc>(y + row * dim + dd) : Acc(0);
  }
}

// accum (narrow, D) = accum * scale[r] (1 when scale is null) + weights (narrow, 64) @ y[wide0 : wide0 + 64],
// one D chunk of y at a time through stage; each output is one sequential fma chain over the 64 entries.
template <typename T, typename Acc, int kNarrow>
__device__ void accumulate_weighted(const Acc* weights, const Acc* scale, const T* __restrict__ y, int64_t wide0,
                                    int64_t wide_count, int64_t dim, Acc* stage, Acc* accum) {
  for (int64_t d0 = 0; d0 < dim; d0 += kChunk) {
    load_wide_chunk(y, wide0, wide_count, d0, dim, stage);
    __syncthreads();
    for (int e = threadIdx.x; e < kNarrow * kChunk; e += kThreads) {
      const int r = e / kChunk, d = e % kChunk;
      if (d0 + d >= dim) continue;
      Acc sum = 0;
      for (int c = 0; c < kWide; ++c) sum = fma(weights[r * kWide + c], stage[c * kWideLd + d], sum);
      Acc& slot = accum[r * dim + d0 + d];
      slot = fma(slot, scale != nullptr ? scale[r] : Acc(1), sum);
    }
    __syncthreads();
  }
}

// logit = (z.c - ||c||^2 / 2) * 2 / t for l2, z.c / t for dot.
template <typename Acc> __device__ __forceinline__ Acc logit_of(Acc dot, Acc c_sq, int metric, Acc inv_t) {
  return metric == kL2 ? (dot - Acc(0.5) * c_sq) * (Acc(2) * inv_t) : dot * inv_t;
}

// ---- forward -----------------------------------------------------------------------------------------------

template <typename T, typename Acc, int kNarrow>
__global__ void __launch_bounds__(kThreads)
    soft_forward_kernel(const T* __restrict__ z, const T* __restrict__ codebook, const Acc* __restrict__ temperature,
                        int64_t n, int64_t num_codes, int64_t dim, int metric, T* __restrict__ out,
                        Acc* __restrict__ lse) {
  constexpr int kPer = (kNarrow + kGroups - 1) / kGroups;
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  Acc* smem = reinterpret_cast<Acc*>(smem_bytes);
  const Layout<kNarrow> L(dim);
  Acc* o = smem + L.accum;             // (narrow, D) un-normalized output
  Acc* probs = smem + L.tile;          // (narrow, 64) logits, then exp(logit - m)
  Acc* row_max = smem + L.per_narrow;  // m
  Acc* row_sum = row_max + kNarrow;    // l
  Acc* row_scale = row_sum + kNarrow;  // exp(m_old - m_new) of the current tile

  const int tid = threadIdx.x, j = tid % kWide, g = tid / kWide, lane = tid % kWarp, warp = tid / kWarp;
  const int64_t row0 = blockIdx.x * static_cast<int64_t>(kNarrow);
  const Acc inv_t = Acc(1) / *temperature;
  for (int64_t e = tid; e < kNarrow * dim; e += kThreads) o[e] = 0;
  if (tid < kNarrow) row_max[tid] = neg_inf<Acc>(), row_sum[tid] = 0;
  __syncthreads();

  for (int64_t code0 = 0; code0 < num_codes; code0 += kWide) {
    Acc acc[kPer], z_sq[kPer], c_sq;
    tile_dots<T, Acc, kNarrow>(z, row0, n, codebook, code0, num_codes, dim, smem + L.narrow_stage,
                               smem + L.wide_stage, acc, z_sq, c_sq);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int r = g + kGroups * i;
      if (r < kNarrow) probs[r * kWide + j] = code0 + j < num_codes ? logit_of(acc[i], c_sq, metric, inv_t)
                                                                    : neg_inf<Acc>();
    }
    __syncthreads();
    // Online softmax: one warp per row; the tile always holds at least one real code, so m_new is finite.
    for (int r = warp; r < kNarrow; r += kThreads / kWarp) {
      const Acc v0 = probs[r * kWide + lane], v1 = probs[r * kWide + lane + kWarp];
      const Acc m_old = row_max[r], m_new = max(m_old, warp_max(max(v0, v1)));
      const Acc p0 = exp_acc(v0 - m_new), p1 = exp_acc(v1 - m_new);
      probs[r * kWide + lane] = p0, probs[r * kWide + lane + kWarp] = p1;
      const Acc tile_sum = warp_sum(p0 + p1);
      __syncwarp();
      if (lane == 0) {
        const Acc scale = exp_acc(m_old - m_new);  // 0 on the first tile (m_old = -inf)
        row_scale[r] = scale, row_max[r] = m_new, row_sum[r] = row_sum[r] * scale + tile_sum;
      }
    }
    __syncthreads();
    // o = o * scale + P @ C_tile.
    accumulate_weighted<T, Acc, kNarrow>(probs, row_scale, codebook, code0, num_codes, dim, smem + L.wide_stage, o);
  }

  for (int64_t e = tid; e < kNarrow * dim; e += kThreads) {
    const int64_t r = e / dim, row = row0 + r;
    if (row < n) out[row * dim + e % dim] = store_as<T, Acc>(o[e] / row_sum[r]);
  }
  if (tid < kNarrow && row0 + tid < n) lse[row0 + tid] = row_max[tid] + log_acc(row_sum[tid]);
}

// ---- backward ----------------------------------------------------------------------------------------------
//
// With P = softmax(logits), dP = grad_out @ C^T, delta_n = grad_out_n . out_n and G = P * (dP - delta)
// (the gradient w.r.t. the logits), s = d logit / d (z.c) = 2 / t (l2) or 1 / t (dot):
//   grad_z = s G @ C
//   grad_C = P^T @ grad_out + s G^T @ z  - (l2 only) s colsum(G) * C
//   grad_t = -sum(G * logits) / t

// Rows pass: grad_z, delta (to workspace, for the codes pass) and one grad_t partial per block.
template <typename T, typename Acc, int kNarrow>
__global__ void __launch_bounds__(kThreads)
    soft_backward_rows_kernel(const T* __restrict__ grad_out, const T* __restrict__ z, const T* __restrict__ codebook,
                              const Acc* __restrict__ temperature, const T* __restrict__ out,
                              const Acc* __restrict__ lse, int64_t n, int64_t num_codes, int64_t dim, int metric,
                              Acc* __restrict__ delta_out, Acc* __restrict__ grad_t_partials, T* __restrict__ grad_z) {
  constexpr int kPer = (kNarrow + kGroups - 1) / kGroups;
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  Acc* smem = reinterpret_cast<Acc*>(smem_bytes);
  const Layout<kNarrow> L(dim);
  Acc* gz = smem + L.accum;               // (narrow, D)
  Acc* grad_logits = smem + L.tile;       // (narrow, 64)
  Acc* row_delta = smem + L.per_narrow;   // (narrow,)
  Acc* row_lse = row_delta + kNarrow;     // (narrow,)
  Acc* reduce = smem + L.tile2;           // (kThreads,) for the grad_t block sum (tile2 is unused otherwise)

  const int tid = threadIdx.x, j = tid % kWide, g = tid / kWide, lane = tid % kWarp, warp = tid / kWarp;
  const int64_t row0 = blockIdx.x * static_cast<int64_t>(kNarrow);
  const Acc inv_t = Acc(1) / *temperature, slope = (metric == kL2 ? Acc(2) : Acc(1)) * inv_t;
  for (int64_t e = tid; e < kNarrow * dim; e += kThreads) gz[e] = 0;
  for (int r = warp; r < kNarrow; r += kThreads / kWarp) {
    const int64_t row = row0 + r;
    Acc dot = 0;
    if (row < n)
      for (int64_t d = lane; d < dim; d += kWarp)
        dot = fma(load_as<Acc>(grad_out + row * dim + d), load_as<Acc>(out + row * dim + d), dot);
    dot = warp_sum(dot);
    if (lane == 0) {
      row_delta[r] = dot, row_lse[r] = row < n ? lse[row] : Acc(0);
      if (row < n) delta_out[row] = dot;
    }
  }
  __syncthreads();

  Acc grad_t_part = 0;
  for (int64_t code0 = 0; code0 < num_codes; code0 += kWide) {
    Acc zc[kPer], gc[kPer], unused[kPer], c_sq, c_sq2;
    tile_dots<T, Acc, kNarrow>(z, row0, n, codebook, code0, num_codes, dim, smem + L.narrow_stage,
                               smem + L.wide_stage, zc, unused, c_sq);
    tile_dots<T, Acc, kNarrow>(grad_out, row0, n, codebook, code0, num_codes, dim, smem + L.narrow_stage,
                               smem + L.wide_stage, gc, unused, c_sq2);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int r = g + kGroups * i;
      if (r >= kNarrow) continue;
      Acc gl = 0;
      if (code0 + j < num_codes && row0 + r < n) {
        const Acc logit = logit_of(zc[i], c_sq, metric, inv_t);
        gl = exp_acc(logit - row_lse[r]) * (gc[i] - row_delta[r]);
        grad_t_part = fma(gl, logit, grad_t_part);
      }
      grad_logits[r * kWide + j] = gl;
    }
    __syncthreads();
    accumulate_weighted<T, Acc, kNarrow>(grad_logits, nullptr, codebook, code0, num_codes, dim, smem + L.wide_stage,
                                         gz);  // gz += G @ C_tile
  }

  for (int64_t e = tid; e < kNarrow * dim; e += kThreads) {
    const int64_t row = row0 + e / dim;
    if (row < n) grad_z[row * dim + e % dim] = store_as<T, Acc>(slope * gz[e]);
  }
  // Block sum of the grad_t partials in a fixed tree (tile2 holds kNarrow * 64 >= 64 values; use 64 lanes of it
  // after a first fold of the 256 threads by warp sums).
  const Acc warp_part = warp_sum(grad_t_part);
  if (lane == 0) reduce[warp] = warp_part;
  __syncthreads();
  if (tid == 0) {
    Acc total = 0;
    for (int w = 0; w < kThreads / kWarp; ++w) total += reduce[w];
    grad_t_partials[blockIdx.x] = total;
  }
}

// Codes pass: grad_codebook for a tile of codes, looping over all rows in order.
template <typename T, typename Acc, int kNarrow>
__global__ void __launch_bounds__(kThreads)
    soft_backward_codes_kernel(const T* __restrict__ grad_out, const T* __restrict__ z,
                               const T* __restrict__ codebook, const Acc* __restrict__ temperature,
                               const Acc* __restrict__ lse, const Acc* __restrict__ delta, int64_t n,
                               int64_t num_codes, int64_t dim, int metric, T* __restrict__ grad_codebook) {
  constexpr int kPer = (kNarrow + kGroups - 1) / kGroups;
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  Acc* smem = reinterpret_cast<Acc*>(smem_bytes);
  const Layout<kNarrow> L(dim);
  Acc* gc_acc = smem + L.accum;        // (narrow, D)
  Acc* probs = smem + L.tile;          // (narrow, 64) P^T tile
  Acc* grad_logits = smem + L.tile2;   // (narrow, 64) G^T tile
  Acc* col_sum = smem + L.per_narrow;  // (narrow,) sum over rows of G

  const int tid = threadIdx.x, j = tid % kWide, g = tid / kWide, lane = tid % kWarp, warp = tid / kWarp;
  const int64_t code0 = blockIdx.x * static_cast<int64_t>(kNarrow);
  const Acc inv_t = Acc(1) / *temperature, slope = (metric == kL2 ? Acc(2) : Acc(1)) * inv_t;
  for (int64_t e = tid; e < kNarrow * dim; e += kThreads) gc_acc[e] = 0;
  if (tid < kNarrow) col_sum[tid] = 0;
  __syncthreads();

  for (int64_t row0 = 0; row0 < n; row0 += kWide) {
    Acc cz[kPer], cg[kPer], c_sq[kPer], unused[kPer], z_sq;
    tile_dots<T, Acc, kNarrow>(codebook, code0, num_codes, z, row0, n, dim, smem + L.narrow_stage,
                               smem + L.wide_stage, cz, c_sq, z_sq);
    tile_dots<T, Acc, kNarrow>(codebook, code0, num_codes, grad_out, row0, n, dim, smem + L.narrow_stage,
                               smem + L.wide_stage, cg, unused, z_sq);
    const int64_t row = row0 + j;
    const Acc row_lse = row < n ? lse[row] : Acc(0), row_delta = row < n ? delta[row] : Acc(0);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int r = g + kGroups * i;
      if (r >= kNarrow) continue;
      Acc p = 0, gl = 0;
      if (row < n && code0 + r < num_codes) {
        p = exp_acc(logit_of(cz[i], c_sq[i], metric, inv_t) - row_lse);
        gl = p * (cg[i] - row_delta);
      }
      probs[r * kWide + j] = p, grad_logits[r * kWide + j] = gl;
    }
    __syncthreads();
    for (int r = warp; r < kNarrow; r += kThreads / kWarp) {
      const Acc s = warp_sum(grad_logits[r * kWide + lane] + grad_logits[r * kWide + lane + kWarp]);
      if (lane == 0) col_sum[r] += s;
    }
    // grad_C += P^T @ grad_out + slope * G^T @ z, one D chunk at a time.
    Acc* z_stage = smem + L.wide_stage;
    Acc* g_stage = smem + L.wide_stage2;
    for (int64_t d0 = 0; d0 < dim; d0 += kChunk) {
      load_wide_chunk(z, row0, n, d0, dim, z_stage);
      load_wide_chunk(grad_out, row0, n, d0, dim, g_stage);
      __syncthreads();
      for (int e = tid; e < kNarrow * kChunk; e += kThreads) {
        const int r = e / kChunk, d = e % kChunk;
        if (d0 + d >= dim) continue;
        Acc from_p = 0, from_g = 0;
        for (int c = 0; c < kWide; ++c) {
          from_p = fma(probs[r * kWide + c], g_stage[c * kWideLd + d], from_p);
          from_g = fma(grad_logits[r * kWide + c], z_stage[c * kWideLd + d], from_g);
        }
        gc_acc[r * dim + d0 + d] += from_p + slope * from_g;
      }
      __syncthreads();
    }
    __syncthreads();  // col_sum's readers are done before the next tile rewrites G (matters when D == 0)
  }

  for (int64_t e = tid; e < kNarrow * dim; e += kThreads) {
    const int64_t r = e / dim, code = code0 + r;
    if (code >= num_codes) continue;
    Acc v = gc_acc[e];
    if (metric == kL2) v -= slope * col_sum[r] * load_as<Acc>(codebook + code * dim + e % dim);
    grad_codebook[code * dim + e % dim] = store_as<T, Acc>(v);
  }
}

// grad_t = -sum(partials) / t, summed by one block in a fixed order.
template <typename Acc>
__global__ void soft_grad_temperature_kernel(const Acc* __restrict__ partials, int64_t count,
                                             const Acc* __restrict__ temperature, Acc* __restrict__ grad_t) {
  __shared__ Acc warp_parts[kThreads / kWarp];
  Acc sum = 0;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) sum += partials[i];
  sum = warp_sum(sum);
  if (threadIdx.x % kWarp == 0) warp_parts[threadIdx.x / kWarp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    Acc total = 0;
    for (int w = 0; w < kThreads / kWarp; ++w) total += warp_parts[w];
    *grad_t = -total / *temperature;
  }
}

// Sets *flag |= bit unless the temperature is finite and positive.
template <typename Acc> __global__ void flag_bad_temperature_kernel(const Acc* temperature, int* flag, int bit) {
  const Acc t = *temperature;
  if (!(isfinite(t) && t > Acc(0))) atomicOr(flag, bit);
}

template <typename Kernel> cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T, typename Acc, int kNarrow>
cudaError_t forward_impl(const T* z, const T* codebook, const Acc* temperature, int64_t n, int64_t num_codes,
                         int64_t dim, int metric, T* out, Acc* lse, cudaStream_t stream) {
  const size_t smem = Layout<kNarrow>(dim).total * sizeof(Acc);
  auto kernel = soft_forward_kernel<T, Acc, kNarrow>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<ceil_div(n, kNarrow), kThreads, smem, stream>>>(z, codebook, temperature, n, num_codes, dim, metric, out,
                                                            lse);
  return cudaGetLastError();
}

template <typename T, typename Acc, int kNarrow>
cudaError_t backward_impl(const T* grad_out, const T* z, const T* codebook, const Acc* temperature, const T* out,
                          const Acc* lse, int64_t n, int64_t num_codes, int64_t dim, int metric, Acc* delta,
                          Acc* partials, T* grad_z, T* grad_codebook, Acc* grad_t, cudaStream_t stream) {
  const size_t smem = Layout<kNarrow>(dim).total * sizeof(Acc);
  const unsigned row_blocks = ceil_div(n, kNarrow);
  cudaError_t err = cudaSuccess;
  if (n > 0) {
    auto rows = soft_backward_rows_kernel<T, Acc, kNarrow>;
    if ((err = allow_smem(rows, smem)) != cudaSuccess) return err;
    rows<<<row_blocks, kThreads, smem, stream>>>(grad_out, z, codebook, temperature, out, lse, n, num_codes, dim,
                                                 metric, delta, partials, grad_z);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  auto codes = soft_backward_codes_kernel<T, Acc, kNarrow>;
  if ((err = allow_smem(codes, smem)) != cudaSuccess) return err;
  codes<<<ceil_div(num_codes, kNarrow), kThreads, smem, stream>>>(grad_out, z, codebook, temperature, lse, delta, n,
                                                                  num_codes, dim, metric, grad_codebook);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  soft_grad_temperature_kernel<Acc><<<1, kThreads, 0, stream>>>(partials, n > 0 ? row_blocks : 0, temperature,
                                                                 grad_t);
  return cudaGetLastError();
}

size_t acc_size(DType dtype) { return dtype == DType::kFloat64 ? sizeof(double) : sizeof(float); }

}  // namespace

cudaError_t flag_bad_temperature(DType dtype, const void* temperature, int* flag, int bit, cudaStream_t stream) {
  if (dtype == DType::kFloat64)
    flag_bad_temperature_kernel<double><<<1, 1, 0, stream>>>(static_cast<const double*>(temperature), flag, bit);
  else
    flag_bad_temperature_kernel<float><<<1, 1, 0, stream>>>(static_cast<const float*>(temperature), flag, bit);
  return cudaGetLastError();
}

int64_t soft_assign_max_dim(DType dtype) { return static_cast<int64_t>(kAccumulatorBytes / acc_size(dtype)); }

cudaError_t soft_assign_forward(DType dtype, const void* z, const void* codebook, const void* temperature, int64_t n,
                                int64_t num_codes, int64_t dim, int metric, void* out, void* lse,
                                cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (num_codes < 1 || dim > soft_assign_max_dim(dtype)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename AccOf<T>::type;
    const auto* zp = static_cast<const T*>(z);
    const auto* cp = static_cast<const T*>(codebook);
    const auto* tp = static_cast<const Acc*>(temperature);
    if (narrow_for<Acc>(dim) == 16)
      return forward_impl<T, Acc, 16>(zp, cp, tp, n, num_codes, dim, metric, static_cast<T*>(out),
                                      static_cast<Acc*>(lse), stream);
    return forward_impl<T, Acc, 1>(zp, cp, tp, n, num_codes, dim, metric, static_cast<T*>(out),
                                   static_cast<Acc*>(lse), stream);
  });
}

size_t soft_assign_backward_workspace_bytes(DType dtype, int64_t n) {
  // delta (n,) then the grad_t partials (at most n, one per row block).
  return static_cast<size_t>(2 * std::max<int64_t>(n, 1)) * acc_size(dtype);
}

cudaError_t soft_assign_backward(DType dtype, const void* grad_out, const void* z, const void* codebook,
                                 const void* temperature, const void* out, const void* lse, int64_t n,
                                 int64_t num_codes, int64_t dim, int metric, void* workspace, void* grad_z,
                                 void* grad_codebook, void* grad_temperature, cudaStream_t stream) {
  if (num_codes < 1 || dim > soft_assign_max_dim(dtype)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename AccOf<T>::type;
    Acc* delta = static_cast<Acc*>(workspace);
    Acc* partials = delta + std::max<int64_t>(n, 1);
    auto run = [&](auto narrow) {
      constexpr int kNarrow = decltype(narrow)::value;
      return backward_impl<T, Acc, kNarrow>(
          static_cast<const T*>(grad_out), static_cast<const T*>(z), static_cast<const T*>(codebook),
          static_cast<const Acc*>(temperature), static_cast<const T*>(out), static_cast<const Acc*>(lse), n,
          num_codes, dim, metric, delta, partials, static_cast<T*>(grad_z), static_cast<T*>(grad_codebook),
          static_cast<Acc*>(grad_temperature), stream);
    };
    if (narrow_for<Acc>(dim) == 16) return run(std::integral_constant<int, 16>{});
    return run(std::integral_constant<int, 1>{});
  });
}

}  // namespace cuda
}  // namespace quantkit
