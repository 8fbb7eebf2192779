// Fused nearest-codeword search on the CPU (torch-free): the k codewords of largest score for every row of z,
// without ever holding the N x K score matrix.
//
// Method (faiss's fused small-d kernel, faiss/utils/distances_fused/avx512.cpp, generalized to any D and k):
// rank codes by a score that is larger for nearer codes and drops the per-row constant |z|^2,
//     l2: z.c - |c|^2 / 2          cosine: (z.c) / |c|          dot: z.c
// computed by a register-blocked outer product. The one idea: rows sit in SIMD lanes. A row panel of 2 x L rows
// (L = 16 floats) is stored transposed, panel[d][row], and J = 8 codewords are broadcast against it, so the 2J
// accumulators hold the scores of J codes for 2L rows. Each lane then keeps its own row's running best with one
// compare and two blends per vector, and codes reach every lane in increasing index order, so a strict ">" gives
// ties to the lowest index with no final lane reduction. Codes are packed one tile at a time, J codes interleaved
// per dimension (one contiguous stream per block, converted to the compute type); only O(K) biases and
// O(threads x tile) scratch are allocated.
//
// Loop nest per task (a task is a range of rows x a range of codes):
//   for each row chunk (packed once, L3):  for each code tile (packed, L2):  for each slice of dimensions:
//   for each row panel:  for each block of J codes: J x 2L scores in registers -> running best (k = 1) or
//   per-row sorted top-k (k > 1).
// Rows up to 256 wide are one slice; wider rows are scored in slices with the partial scores of the chunk x tile
// kept in a small buffer between slices (a GEMM's k-blocking), so a panel slice stays in L1. k = 1 with D = 8
// (the factorized-code case) gets a compile-time D, fully unrolled.
// The running state lives in the output arrays between tiles. Scores of a (row, code) pair do not depend on the
// decomposition, so the result is identical for every thread count; with few rows the driver splits K into
// segments and merges them by (score desc, index asc).
#pragma once

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "cpu_common.h"

namespace quantkit::cpu::nearest {

enum Metric : int { kL2 = 0, kCosine = 1, kDot = 2 };
// Blocking (measured on Zen 3: 32 KiB L1, 512 KiB L2 per core): a code tile, packed so that each block of J codes
// is one contiguous stream, stays in L2 while every panel of a row chunk is scored against it; a panel (read from
// L3) serves a whole tile. Rows wider than kMaxSliceD are scored in slices of dimensions, the partial scores of
// the panel x tile kept in a small buffer between slices, so that one panel slice stays in L1 (a GEMM's
// k-blocking). Packing a tile costs about as much as scoring it against one row, so tasks get at least
// kMinTaskRows rows when there are enough; otherwise about kTasksPerThread tasks per thread, handed out
// dynamically so that a thread slowed by other load takes fewer.
constexpr int64_t kTileBytes = 192 << 10;  // the packed code tile (L2)
constexpr int64_t kChunkBytes = 4 << 20;   // the packed row chunk (L3)
constexpr int64_t kMaxSliceD = 256;
constexpr int64_t kMinTaskRows = 1024;
constexpr int64_t kTasksPerThread = 8;
constexpr double kCosineEps = 1e-12;        // matches quantkit.ops._COSINE_EPS

template <class S>
struct Workspace {
  Scratch<S> panels, tile, row;
  Scratch<S> partial;  // sliced mode: partial scores of one panel x tile, between slices
  Scratch<double> wide_row;  // a row on its way into the centred frame
};

// The codebook-centred frame (the why is in quantkit/ops.py): rows and codes are ranked as f(x) - m, where f is the
// identity (l2) or the scaling to unit norm (cosine) and m a (D,) centre near the codebook. The packing loops apply
// it while they convert, in double with one rounding to S, so no centred copy of z or the codebook is ever made.
//
// l2 in float32 shifts by the centre rounded to float (x - m_f is one correctly rounded subtraction, and a centre
// off by an ulp is as good a centre): one vector op per element. Cosine scales in double before it centres (a unit
// vector rounded to float would carry an error of u against a spread that can be 1e-4).
struct Frame {
  const double* centre;   // (D,)
  const float* centre_f;  // (D,) the centre rounded to float
  bool unit;              // cosine: scale to unit norm before centring
};

// 1 / max(|x|, eps) in double: the scale that puts a row on the unit sphere, as the cosine metric defines it.
QK_INLINE double inverse_norm(const double* x, int64_t n) {
  double sq = 0;
  for (int64_t d = 0; d < n; ++d) sq += x[d] * x[d];
  return 1.0 / std::max(std::sqrt(sq), kCosineEps);
}

// Row r of m moved into the frame and rounded to S; false when the row holds a NaN or inf. For cosine the raw row
// is left in wide (in double).
template <class S>
QK_INLINE bool load_frame_row(const Matrix& m, int64_t r, const Frame& f, double* __restrict__ wide,
                              S* __restrict__ dst) {
  if (!f.unit) {
    const bool ok = load_row<S>(m, r, dst);
    const S* __restrict__ centre = sizeof(S) == 4 ? reinterpret_cast<const S*>(f.centre_f)
                                                  : reinterpret_cast<const S*>(f.centre);
    for (int64_t d = 0; d < m.cols; ++d) dst[d] -= centre[d];
    return ok;
  }
  const bool ok = load_row<double>(m, r, wide);
  const double scale = inverse_norm(wide, m.cols);
  for (int64_t d = 0; d < m.cols; ++d) dst[d] = S(wide[d] * scale - f.centre[d]);
  return ok;
}

// One task: rows [r0, r1) against codes [c0, c1). best/best_idx are (r1 - r0, k) row-major running state.
template <class S>
struct Task {
  const Matrix* z;
  const Matrix* codebook;
  const S* bias;   // (K,) additive score term: -|c|^2/2 (l2), 0 (dot, cosine)
  const S* scale;  // (K,) 1/|c| for cosine, else nullptr
  int k;
  int64_t r0, r1, c0, c1;
  S* best;
  int64_t* best_idx;
  Workspace<S>* ws;
  std::atomic<int>* bad;  // bit 1: z holds NaN/inf
  const Frame* frame;     // nullptr: rank the raw vectors
};

// ---------------------------------------------------------------------------------------------------------------
// micro-kernel: acc[j][h] += panel[d0:d1] . codes[j][d0:d1] for J codes and the 2L rows of one panel. The panel
// is stored d-major (a slice of dimensions is contiguous); code j's element d is codes[j * j_stride + d * d_stride]
// (a packed tile block: j_stride 1, d_stride J).

template <class S, class Isa>
QK_INLINE void accumulate_block(const S* __restrict__ panel, const S* __restrict__ codes, int64_t j_stride,
                                int64_t d_stride, int64_t d0, int64_t d1,
                                typename Vec<S, Isa::VB>::V (&acc)[Isa::J][2]) {
  using V = typename Vec<S, Isa::VB>::V;
  constexpr int L = Vec<S, Isa::VB>::L, kJ = Isa::J;
  for (int64_t d = d0; d < d1; ++d) {
    const V z0 = vload<V>(panel + d * 2 * L), z1 = vload<V>(panel + d * 2 * L + L);
#pragma GCC unroll 8
    for (int j = 0; j < kJ; ++j) {
      const S c = codes[j * j_stride + d * d_stride];
      acc[j][0] += z0 * c;
      acc[j][1] += z1 * c;
    }
  }
}

// Pack rows [r0, r1) of z, transposed, into panels of 2L rows: panels[p][d][i] = z[r0 + p*2L + i][d] (0-padded),
// moved into the frame when there is one.
template <class S, int R>
QK_INLINE bool pack_rows(const Matrix& z, int64_t r0, int64_t r1, const Frame* frame, S* __restrict__ panels,
                         S* __restrict__ row, double* __restrict__ wide) {
  const int64_t D = z.cols, npan = (r1 - r0 + R - 1) / R;
  bool ok = true;
  std::memset(panels, 0, sizeof(S) * npan * D * R);
  for (int64_t r = r0; r < r1; ++r) {
    ok &= frame ? load_frame_row<S>(z, r, *frame, wide, row) : load_row<S>(z, r, row);
    S* dst = panels + ((r - r0) / R) * D * R + (r - r0) % R;
    for (int64_t d = 0; d < D; ++d) dst[d * R] = row[d];
  }
  return ok;
}

// Packs codes [c0, c1) block by block, interleaved: out[b][d][j] = code c0 + b*J + j, element d (converted to S).
// Padding codes (up to a multiple of J) are zeros with bias -inf, so they are never chosen.
template <class S, int kJ>
QK_INLINE void pack_codes(const Task<S>& t, int64_t c0, int64_t c1, S* __restrict__ out, S* __restrict__ bias,
                          S* __restrict__ scale, S* __restrict__ row, double* __restrict__ wide) {
  const Matrix& cb = *t.codebook;
  const int64_t D = t.z->cols, padded = (c1 - c0 + kJ - 1) / kJ * kJ;
  const bool direct = !t.frame && cb.col_stride == 1 && cb.dtype == (sizeof(S) == 4 ? DType::f32 : DType::f64);
  for (int64_t c = c0; c < c0 + padded; ++c) {
    S* dst = out + (c - c0) / kJ * D * kJ + (c - c0) % kJ;
    if (c < c1) {
      const S* src = direct ? static_cast<const S*>(cb.data) + c * cb.row_stride : row;
      // finiteness was checked when the biases were computed
      if (t.frame) load_frame_row<S>(cb, c, *t.frame, wide, row);
      else if (!direct) load_row<S>(cb, c, row);
      for (int64_t d = 0; d < D; ++d) dst[d * kJ] = src[d];
      bias[c - c0] = t.bias[c];
      scale[c - c0] = t.scale ? t.scale[c] : S(1);
    } else {
      for (int64_t d = 0; d < D; ++d) dst[d * kJ] = S(0);
      bias[c - c0] = -std::numeric_limits<S>::infinity();
      scale[c - c0] = S(1);
    }
  }
}

// Inserts (s, j) into the descending list best[0:k] unless it does not beat the k-th; equal scores keep the
// earlier (lower-index) entry first, because codes arrive in increasing index order.
template <class S>
QK_INLINE void topk_insert(S* best, int64_t* idx, int k, S s, int64_t j) {
  if (!(s > best[k - 1])) return;
  int pos = k - 1;
  while (pos > 0 && best[pos - 1] < s) {
    best[pos] = best[pos - 1];
    idx[pos] = idx[pos - 1];
    --pos;
  }
  best[pos] = s;
  idx[pos] = j;
}

// ---------------------------------------------------------------------------------------------------------------
// one task

template <class S, bool TOP1, class Isa, int FIXED_D>
QK_INLINE void run_task_impl(const Task<S>& t) {
  using V = typename Vec<S, Isa::VB>::V;
  using I = typename Vec<S, Isa::VB>::I;
  using Lane = std::remove_reference_t<decltype(I{}[0])>;
  constexpr int L = Vec<S, Isa::VB>::L, R = 2 * L, kJ = Isa::J;
  const int64_t D = FIXED_D ? FIXED_D : t.z->cols, k = t.k;
  const int64_t slices = (D + kMaxSliceD - 1) / kMaxSliceD, slice = (D + slices - 1) / slices;
  const int64_t rows_per_chunk = std::max<int64_t>(R, kChunkBytes / int64_t(sizeof(S) * D) / R * R);
  const int64_t codes_per_tile = std::max<int64_t>(kJ, kTileBytes / int64_t(sizeof(S) * D) / kJ * kJ);
  Workspace<S>& ws = *t.ws;
  S* panels = ws.panels.get(size_t(std::min(rows_per_chunk, (t.r1 - t.r0 + R - 1) / R * R)) * D);
  S* row = ws.row.get(size_t(D));
  double* wide = t.frame ? ws.wide_row.get(size_t(D)) : nullptr;
  S* tile = ws.tile.get(size_t(codes_per_tile) * (D + 2));
  S* tile_bias = tile + codes_per_tile * D;
  S* tile_scale = tile_bias + codes_per_tile;
  S* partial = slices > 1 ? ws.partial.get(size_t(codes_per_tile) * R) : nullptr;  // one panel x tile
  alignas(64) S spill[kJ][R];
  alignas(64) S lane_best[R];
  alignas(64) Lane lane_idx[R];

  for (int64_t q = t.r0; q < t.r1; ++q)
    for (int64_t i = 0; i < k; ++i) {
      t.best[(q - t.r0) * k + i] = -std::numeric_limits<S>::infinity();
      t.best_idx[(q - t.r0) * k + i] = t.c0;
    }

  for (int64_t rc0 = t.r0; rc0 < t.r1; rc0 += rows_per_chunk) {
    const int64_t rc1 = std::min(t.r1, rc0 + rows_per_chunk);
    if (!pack_rows<S, R>(*t.z, rc0, rc1, t.frame, panels, row, wide)) t.bad->fetch_or(1);
    for (int64_t t0 = t.c0; t0 < t.c1; t0 += codes_per_tile) {
      const int64_t t1 = std::min(t.c1, t0 + codes_per_tile);
      pack_codes<S, kJ>(t, t0, t1, tile, tile_bias, tile_scale, row, wide);
      for (int64_t p0 = rc0; p0 < rc1; p0 += R) {
        const S* panel = panels + ((p0 - rc0) / R) * D * R;
        const int64_t nrows = std::min<int64_t>(R, rc1 - p0);
        S* best = t.best + (p0 - t.r0) * k;
        int64_t* best_idx = t.best_idx + (p0 - t.r0) * k;
        V b0, b1;
        I i0, i1;
        if constexpr (TOP1) {
          for (int i = 0; i < R; ++i) {
            lane_best[i] = i < nrows ? best[i] : -std::numeric_limits<S>::infinity();
            lane_idx[i] = Lane(i < nrows ? best_idx[i] : 0);
          }
          b0 = vload<V>(lane_best), b1 = vload<V>(lane_best + L);
          i0 = vload<I>(lane_idx), i1 = vload<I>(lane_idx + L);
        }
        for (int64_t d0 = 0; d0 < D; d0 += slice) {
          const int64_t d1 = std::min(D, d0 + slice);
          const bool first = d0 == 0, last = d1 == D;
          for (int64_t j0 = t0; j0 < t1; j0 += kJ) {
            const S* codes = tile + (j0 - t0) * D;  // block (j0 - t0) / J, interleaved
            const S* bias = tile_bias + (j0 - t0);
            const S* scale = t.scale ? tile_scale + (j0 - t0) : nullptr;
            S* block_partial = partial ? partial + (j0 - t0) * R : nullptr;
            V acc[kJ][2];
#pragma GCC unroll 8
            for (int j = 0; j < kJ; ++j) {
              if (first) {
                acc[j][0] = acc[j][1] = bias[j] - V{};  // x - 0 == x: a plain broadcast
              } else {
                acc[j][0] = vload<V>(block_partial + j * R), acc[j][1] = vload<V>(block_partial + j * R + L);
              }
            }
            accumulate_block<S, Isa>(panel, codes, 1, kJ, d0, d1, acc);
            if (!last) {
#pragma GCC unroll 8
              for (int j = 0; j < kJ; ++j) vstore(block_partial + j * R, acc[j][0]), vstore(block_partial + j * R + L, acc[j][1]);
              continue;
            }
            if (scale) {  // cosine: z.c / |c|
#pragma GCC unroll 8
              for (int j = 0; j < kJ; ++j) acc[j][0] *= scale[j], acc[j][1] *= scale[j];
            }
            if constexpr (TOP1) {
              // Fast reject: after the first few blocks a row rarely improves, so test the block's per-lane max
              // and run the exact in-order compare/blend only when some lane would improve.
              V top0 = acc[0][0], top1 = acc[0][1];
#pragma GCC unroll 8
              for (int j = 1; j < kJ; ++j) {
                top0 = acc[j][0] > top0 ? acc[j][0] : top0;
                top1 = acc[j][1] > top1 ? acc[j][1] : top1;
              }
              if (!any_lane<I>((top0 > b0) | (top1 > b1))) continue;
#pragma GCC unroll 8
              for (int j = 0; j < kJ; ++j) {
                const I jv = I{} + Lane(j0 + j);
                const I m0 = acc[j][0] > b0, m1 = acc[j][1] > b1;
                b0 = m0 ? acc[j][0] : b0;
                i0 = m0 ? jv : i0;
                b1 = m1 ? acc[j][1] : b1;
                i1 = m1 ? jv : i1;
              }
            } else {
              for (int j = 0; j < kJ; ++j) {
                vstore(spill[j], acc[j][0]);
                vstore(spill[j] + L, acc[j][1]);
              }
              const int jn = int(std::min<int64_t>(kJ, t1 - j0));
              for (int i = 0; i < nrows; ++i)
                for (int j = 0; j < jn; ++j) topk_insert<S>(best + i * k, best_idx + i * k, int(k), spill[j][i], j0 + j);
            }
          }
        }
        if constexpr (TOP1) {
          vstore(lane_best, b0), vstore(lane_best + L, b1);
          vstore(lane_idx, i0), vstore(lane_idx + L, i1);
          for (int i = 0; i < nrows; ++i) {
            best[i] = lane_best[i];
            best_idx[i] = lane_idx[i];
          }
        }
      }
    }
  }
}

template <class S, class Isa>
QK_INLINE void run_task(const Task<S>& t) {
  if (t.k != 1) return run_task_impl<S, false, Isa, 0>(t);
  if (t.z->cols == 8) return run_task_impl<S, true, Isa, 8>(t);
  run_task_impl<S, true, Isa, 0>(t);
}

// The hot loop compiled three times; the driver calls the best one this CPU supports.
#if QK_X86
QK_TARGET_AVX512 QK_FLATTEN inline void run_task_avx512(const Task<float>& t) { run_task<float, IsaAvx512>(t); }
QK_TARGET_AVX512 QK_FLATTEN inline void run_task_avx512(const Task<double>& t) { run_task<double, IsaAvx512>(t); }
QK_TARGET_AVX2 QK_FLATTEN inline void run_task_avx2(const Task<float>& t) { run_task<float, IsaAvx2>(t); }
QK_TARGET_AVX2 QK_FLATTEN inline void run_task_avx2(const Task<double>& t) { run_task<double, IsaAvx2>(t); }
#endif
inline void run_task_baseline(const Task<float>& t) { run_task<float, IsaBaseline>(t); }
inline void run_task_baseline(const Task<double>& t) { run_task<double, IsaBaseline>(t); }

// Which instruction set the kernels use: "avx512", "avx2" or "baseline" (the portable build, no AVX), the best
// this CPU supports, capped by the environment variable QUANTKIT_CPU_ISA=avx512|avx2|scalar (read on every call,
// so one process can measure every path; "baseline" is accepted for "scalar"). An unknown value is an error.
inline const char* isa() {
  const char* cap = std::getenv("QUANTKIT_CPU_ISA");
  const std::string want = cap && *cap ? cap : "avx512";
#if QK_X86
  static const bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                                 __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (want == "avx512" && has_avx512) return "avx512";
  if (want != "scalar" && want != "baseline" && has_avx2) return "avx2";
#endif
  return "baseline";
}

// False when QUANTKIT_CPU_ISA holds something other than avx512, avx2, scalar or baseline (the bindings refuse it).
inline bool isa_request_valid() {
  const char* cap = std::getenv("QUANTKIT_CPU_ISA");
  if (!cap || !*cap) return true;
  const std::string want = cap;
  return want == "avx512" || want == "avx2" || want == "scalar" || want == "baseline";
}

template <class S>
inline void dispatch_task(const Task<S>& t) {
  const char* which = isa();
#if QK_X86
  if (which[0] == 'a' && which[3] == '5') return run_task_avx512(t);
  if (which[0] == 'a') return run_task_avx2(t);
#endif
  (void)which;
  run_task_baseline(t);
}

// ---------------------------------------------------------------------------------------------------------------
// few rows: codes streamed straight from the codebook, D in the SIMD lanes
//
// With a handful of rows (a sampler asks for one token at a time) a packed tile costs as much to build as to score
// and a 2L-row panel leaves most lanes empty. Each task then reads its codes row-major from the codebook and scores
// each against every row in one pass. l2 uses the direct form sum (z - c)^2, which has no cancellation whatever
// the common offset (z - c is exact for nearby values), so it needs no frame; dot is plain; cosine moves each code
// into the centred unit-sphere frame in double, where that costs nothing in precision.

constexpr int64_t kFewRows = 16;  // rows below which the few-rows path runs
constexpr int64_t kFewGroup = 8;   // rows scored per pass over the codes (their accumulators stay in registers)

struct FewTask {
  const Matrix* codebook;
  const void* rows;    // (n, D) row-major: raw rows in S (l2, dot), rows in the cosine frame in double
  const Frame* frame;  // cosine: the frame (nullptr: raw cosine)
  int metric, k;
  int64_t c0, c1;      // codes of this task
  double* best;        // (n, k) running best scores, descending
  int64_t* best_idx;   // (n, k)
  double* code;        // (D,) scratch
  std::atomic<int>* bad;  // bit 2: the codebook holds NaN/inf
};

// Sum of a vector's lanes as a tree (log2 L dependent adds, not L).
template <class V>
QK_INLINE double lane_sum(const V& v) {
  constexpr int L = sizeof(V) / sizeof(v[0]);
  using T = std::remove_cv_t<std::remove_reference_t<decltype(v[0])>>;
  alignas(64) T a[L];
  vstore(a, v);
#pragma GCC unroll 4
  for (int w = L / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) a[i] += a[i + w];
  return double(a[0]);
}

enum FewMode : int { kFewL2 = 0, kFewDot = 1, kFewCosineFrame = 2, kFewCosineRaw = 3 };

// Scores of codes [c0, c1) against NR rows, in T (S for l2 and dot, double for cosine).
template <class Isa, int NR, int MODE, class T>
QK_INLINE void run_few_impl(const FewTask& t) {
  using V = typename Vec<T, Isa::VB>::V;
  constexpr int L = Vec<T, Isa::VB>::L;
  using F = typename Vec<float, L * 4>::V;  // L floats (converted to double lanes when T is double)
  const Matrix& cb = *t.codebook;
  const int64_t D = cb.cols, Dv = D / L * L;
  const T* rows = static_cast<const T*>(t.rows);
  const double* m = t.frame ? t.frame->centre : nullptr;
  const bool direct = cb.dtype == DType::f32 && cb.col_stride == 1;  // read in place, else converted by load_row
  T* buffer = reinterpret_cast<T*>(t.code);
  V probe{};  // x * 0 per lane: NaN exactly where a code element is not finite
  for (int64_t c = t.c0; c < t.c1; ++c) {
    const float* src = direct ? static_cast<const float*>(cb.data) + c * cb.row_stride : nullptr;
    if (!direct && !load_row<T>(cb, c, buffer)) {
      t.bad->fetch_or(2);
      continue;
    }
    auto load = [&](int64_t d) -> V {
      if constexpr (sizeof(T) == 4) {
        return direct ? vload<V>(src + d) : vload<V>(buffer + d);
      } else {
        return direct ? __builtin_convertvector(vload<F>(src + d), V) : vload<V>(buffer + d);
      }
    };
    auto at = [&](int64_t d) -> T { return direct ? T(src[d]) : buffer[d]; };
    T scale = 1;
    if constexpr (MODE == kFewCosineFrame) {
      V sq{};
      for (int64_t d = 0; d < Dv; d += L) sq += load(d) * load(d);
      double total = lane_sum(sq);
      for (int64_t d = Dv; d < D; ++d) total += double(at(d)) * double(at(d));
      scale = T(1.0 / std::max(std::sqrt(total), kCosineEps));
    }
    V acc[NR], extra{};  // extra: cosine frame m.v, raw cosine |c|^2
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) acc[r] = V{};
    for (int64_t d = 0; d < Dv; d += L) {
      V v = load(d);
      probe += v * T(0);
      if constexpr (MODE == kFewCosineFrame) {
        const V mv = vload<V>(m + d);
        v = v * scale - mv;
        extra += mv * v;
      } else if constexpr (MODE == kFewCosineRaw) {
        extra += v * v;
      }
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) {
        const V x = vload<V>(rows + r * D + d);
        if constexpr (MODE == kFewL2) {
          const V diff = x - v;
          acc[r] += diff * diff;
        } else {
          acc[r] += x * v;
        }
      }
    }
    double ds[NR], extra_sum = lane_sum(extra);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) ds[r] = lane_sum(acc[r]);
    for (int64_t d = Dv; d < D; ++d) {
      double v = double(at(d));
      if (!std::isfinite(v)) t.bad->fetch_or(2);
      if constexpr (MODE == kFewCosineFrame) {
        v = v * double(scale) - m[d];
        extra_sum += m[d] * v;
      } else if constexpr (MODE == kFewCosineRaw) {
        extra_sum += v * v;
      }
      for (int r = 0; r < NR; ++r) {
        const double x = double(rows[r * D + d]);
        ds[r] += MODE == kFewL2 ? (x - v) * (x - v) : x * v;
      }
    }
    for (int r = 0; r < NR; ++r) {
      double score = ds[r];  // larger is nearer
      if constexpr (MODE == kFewL2) score = -score;
      if constexpr (MODE == kFewCosineFrame) score += extra_sum;
      if constexpr (MODE == kFewCosineRaw) score /= std::max(std::sqrt(extra_sum), kCosineEps);
      topk_insert<double>(t.best + r * t.k, t.best_idx + r * t.k, t.k, score, c);
    }
  }
  if (lane_sum(probe) != 0.0) t.bad->fetch_or(2);
}

template <class Isa, class S, int NR>
QK_INLINE void run_few_rows(const FewTask& t) {
  if (t.metric == kL2) return run_few_impl<Isa, NR, kFewL2, S>(t);
  if (t.metric == kDot) return run_few_impl<Isa, NR, kFewDot, S>(t);
  if (t.frame) return run_few_impl<Isa, NR, kFewCosineFrame, double>(t);
  run_few_impl<Isa, NR, kFewCosineRaw, double>(t);
}

template <class Isa, class S>
QK_INLINE void run_few(const FewTask& t, int64_t n) {
  // A row shorter than one vector would fall entirely to the scalar tail: narrower vectors keep it in the lanes
  // (the code is still compiled for, and runs with, the wider ISA's instructions).
  if constexpr (Isa::VB > 16) {
    const int64_t row_bytes = t.codebook->cols * int64_t(sizeof(S));
    if (row_bytes < Isa::VB) {
      if constexpr (Isa::VB == 64) {
        if (row_bytes >= 32) return run_few<IsaAvx2, S>(t, n);
      }
      return run_few<IsaBaseline, S>(t, n);
    }
  }
  switch (n) {
    case 1: return run_few_rows<Isa, S, 1>(t);
    case 2: return run_few_rows<Isa, S, 2>(t);
    case 3: return run_few_rows<Isa, S, 3>(t);
    case 4: return run_few_rows<Isa, S, 4>(t);
    case 5: return run_few_rows<Isa, S, 5>(t);
    case 6: return run_few_rows<Isa, S, 6>(t);
    case 7: return run_few_rows<Isa, S, 7>(t);
    default: return run_few_rows<Isa, S, 8>(t);
  }
}

#if QK_X86
template <class S>
QK_TARGET_AVX512 QK_FLATTEN inline void run_few_avx512(const FewTask& t, int64_t n) { run_few<IsaAvx512, S>(t, n); }
template <class S>
QK_TARGET_AVX2 QK_FLATTEN inline void run_few_avx2(const FewTask& t, int64_t n) { run_few<IsaAvx2, S>(t, n); }
#endif
template <class S>
inline void run_few_baseline(const FewTask& t, int64_t n) { run_few<IsaBaseline, S>(t, n); }

template <class S>
inline void dispatch_few(const FewTask& t, int64_t n) {
  const char* which = isa();
#if QK_X86
  if (which[0] == 'a' && which[3] == '5') return run_few_avx512<S>(t, n);
  if (which[0] == 'a') return run_few_avx2<S>(t, n);
#endif
  (void)which;
  run_few_baseline<S>(t, n);
}

// ---------------------------------------------------------------------------------------------------------------
// driver

// Direct distance between row z and codeword c (double accumulation): what the op returns.
inline double direct_distance(const double* z, const double* c, int64_t D, int metric) {
  double acc = 0, zz = 0, cc = 0;
  for (int64_t d = 0; d < D; ++d) {
    if (metric == kL2) {
      const double diff = z[d] - c[d];
      acc += diff * diff;
    } else {
      acc += z[d] * c[d];
      zz += z[d] * z[d];
      cc += c[d] * c[d];
    }
  }
  if (metric == kL2) return acc;
  if (metric == kDot) return -acc;
  return 1.0 - acc / (std::max(std::sqrt(zz), kCosineEps) * std::max(std::sqrt(cc), kCosineEps));
}

// Error codes returned by nearest_codeword.
enum Status : int { kOk = 0, kZNotFinite = 1, kCodebookNotFinite = 2 };

// Per-code additive terms in the frame, from the same rounded values c' the tiles will hold: l2 -|c'|^2 / 2; cosine
// -|c'|^2 / 2 + (|v|^2 - 1) / 2 with v = c / |c|, since u.v = u'.c' + m.v + (a per-row constant) and
// m.v = (|v|^2 - |c'|^2) / 2 + (a constant) up to the rounding of c'. (Kept small on purpose: m.c' itself is of the
// order of the spread and its float rounding alone would exceed the ranking tolerance; the second term is ~1e-16
// for unit v and -1/2 for a zero codeword, whose cosine with anything is 0.) False when the codebook holds NaN/inf.
template <class S, class ParallelFor>
bool frame_code_bias(const Matrix& codebook, const Frame& frame, std::vector<S>& bias, ParallelFor&& parallel_for) {
  const int64_t K = codebook.rows, D = codebook.cols;
  bias.assign(size_t(K), S(0));
  std::atomic<int> bad{0};
  parallel_for(0, K, 1024, [&](int64_t b, int64_t e) {
    std::vector<double> wide(static_cast<size_t>(D));
    std::vector<S> row(static_cast<size_t>(D));
    for (int64_t c = b; c < e; ++c) {
      if (!load_frame_row<S>(codebook, c, frame, wide.data(), row.data())) bad.fetch_or(1);
      double sq = 0;
      for (int64_t d = 0; d < D; ++d) sq += double(row[d]) * double(row[d]);
      double unit_excess = 0;  // (|v|^2 - 1) / 2, from the raw codeword in double
      if (frame.unit) {
        const double scale = inverse_norm(wide.data(), D);  // load_frame_row left the raw row in wide
        double v_sq = 0;
        for (int64_t d = 0; d < D; ++d) v_sq += (wide[d] * scale) * (wide[d] * scale);
        unit_excess = 0.5 * (v_sq - 1.0);
      }
      bias[c] = S(std::max(-0.5 * sq + unit_excess, -double(std::numeric_limits<S>::max())));
    }
  });
  return bad.load() == 0;
}

// The few-rows driver: rows loaded once (cosine: moved into the frame, in double), K split into one segment per
// thread, segments merged in index order (ties stay with the lower index), distances measured directly.
template <class S, class ParallelFor>
int few_rows(const Matrix& z, const Matrix& codebook, int metric, int k, int64_t threads, int64_t* indices,
             S* distances, ParallelFor&& parallel_for, const Frame* frame) {
  const int64_t N = z.rows, K = codebook.rows, D = z.cols;
  if (N == 0) {  // nothing to score, but a non-finite codebook is still an error
    std::vector<double> sq;
    return codeword_sq_norms<S>(codebook, sq, parallel_for) ? kOk : kCodebookNotFinite;
  }
  // l2 and dot score raw rows in S; cosine scores rows moved into the frame (or raw), in double.
  const bool cosine = metric == kCosine;
  std::vector<S> rows_s(cosine ? 0 : static_cast<size_t>(N * D));
  std::vector<double> rows_d(cosine ? static_cast<size_t>(N * D) : 0), wide(static_cast<size_t>(D));
  for (int64_t r = 0; r < N; ++r) {
    const bool ok = !cosine ? load_row<S>(z, r, rows_s.data() + r * D)
                    : frame ? load_frame_row<double>(z, r, *frame, wide.data(), rows_d.data() + r * D)
                            : load_row<double>(z, r, rows_d.data() + r * D);
    if (!ok) return kZNotFinite;
  }
  const int64_t segments = std::max<int64_t>(1, std::min(threads, K / std::max<int64_t>(512, k)));
  const int64_t per_segment = (K + segments - 1) / segments;
  std::vector<double> best(size_t(segments * N * k), -std::numeric_limits<double>::infinity());
  std::vector<int64_t> best_idx(best.size(), 0);
  std::atomic<int> bad{0};
  parallel_for(0, segments, 1, [&](int64_t b, int64_t e) {
    std::vector<double> code(static_cast<size_t>(D));
    for (int64_t seg = b; seg < e; ++seg)
      for (int64_t g0 = 0; g0 < N; g0 += kFewGroup) {
        const int64_t at = (seg * N + g0) * k;
        const void* rows = cosine ? static_cast<const void*>(rows_d.data() + g0 * D)
                                  : static_cast<const void*>(rows_s.data() + g0 * D);
        FewTask t{&codebook, rows, cosine ? frame : nullptr, metric, k, std::min(K, seg * per_segment),
                  std::min(K, (seg + 1) * per_segment), best.data() + at, best_idx.data() + at, code.data(), &bad};
        dispatch_few<S>(t, std::min(kFewGroup, N - g0));
      }
  });
  if (bad.load() & 2) return kCodebookNotFinite;
  std::vector<double> zrow(static_cast<size_t>(D)), crow(static_cast<size_t>(D));
  std::vector<double> merged(static_cast<size_t>(k));
  for (int64_t r = 0; r < N; ++r) {
    std::fill(merged.begin(), merged.end(), -std::numeric_limits<double>::infinity());
    int64_t* idx = indices + r * k;
    for (int64_t seg = 0; seg < segments; ++seg)
      for (int64_t i = 0; i < k; ++i) {
        const int64_t at = (seg * N + r) * k + i;
        topk_insert<double>(merged.data(), idx, int(k), best[at], best_idx[at]);
      }
    load_row<double>(z, r, zrow.data());
    for (int64_t i = 0; i < k; ++i) {
      load_row<double>(codebook, idx[i], crow.data());
      distances[r * k + i] = S(direct_distance(zrow.data(), crow.data(), D, metric));
    }
  }
  return kOk;
}

// The frame's centre, as quantkit.ops._codebook_centre defines it: the float64 mean of up to 256 codewords at
// evenly spaced indices (rows 0, s, 2s, ... with s = K / 256), scaled to unit norm first for cosine.
inline std::vector<double> codebook_centre(const Matrix& codebook, bool unit) {
  const int64_t K = codebook.rows, D = codebook.cols, take = std::min<int64_t>(K, 256);
  const int64_t stride = std::max<int64_t>(1, K / take);
  std::vector<double> centre(static_cast<size_t>(D), 0.0), row(static_cast<size_t>(D));
  for (int64_t i = 0; i < take; ++i) {
    load_row<double>(codebook, i * stride, row.data());  // a NaN here is reported by the bias pass
    const double scale = unit ? inverse_norm(row.data(), D) : 1.0;
    for (int64_t d = 0; d < D; ++d) centre[d] += row[d] * scale;
  }
  for (int64_t d = 0; d < D; ++d) centre[d] /= double(take);
  return centre;
}

// indices/distances: (N, k) row-major outputs. parallel_for(begin, end, grain, fn(begin, end)) runs fn over
// [begin, end) in contiguous chunks, one per thread; threads is how many it uses. centred: rank l2 and cosine in
// the codebook-centred frame (else the raw vectors); the returned distances never depend on it.
template <class S, class ParallelFor>
int nearest_codeword_on(const Matrix& z, const Matrix& codebook, int metric, int k, int64_t threads,
                        int64_t* indices, S* distances, ParallelFor&& parallel_for, bool centred) {
  const int64_t N = z.rows, K = codebook.rows, D = z.cols;
  constexpr int64_t R = 32;  // rows per panel, as a unit of work split (a multiple of every ISA's 2L)

  // The few-rows path ranks l2 by the direct form, which needs no frame.
  const bool framed = centred && metric != kDot && !(N <= kFewRows && metric == kL2);
  const std::vector<double> centre = framed ? codebook_centre(codebook, metric == kCosine) : std::vector<double>();
  const std::vector<float> centre_f(centre.begin(), centre.end());
  const Frame frame_value{centre.data(), centre_f.data(), metric == kCosine};
  const Frame* frame = framed ? &frame_value : nullptr;
  if (N <= kFewRows) return few_rows<S>(z, codebook, metric, k, threads, indices, distances, parallel_for, frame);

  // O(K) per-code terms (and the codebook's finiteness check), computed once and shared by all threads.
  std::vector<S> bias, scale;
  if (frame) {
    if (!frame_code_bias<S>(codebook, *frame, bias, parallel_for)) return kCodebookNotFinite;
  } else {
    std::vector<double> sq;
    if (!codeword_sq_norms<S>(codebook, sq, parallel_for)) return kCodebookNotFinite;
    bias.assign(size_t(K), S(0));
    scale.resize(metric == kCosine ? size_t(K) : 0);
    for (int64_t c = 0; c < K; ++c) {
      if (metric == kL2) bias[c] = S(std::max(-0.5 * sq[c], -double(std::numeric_limits<S>::max())));
      if (metric == kCosine) scale[c] = S(1.0 / std::max(std::sqrt(sq[c]), kCosineEps));
    }
  }
  const bool scaled = metric == kCosine && !frame;
  std::atomic<int> bad{0};

  // Rows split into tasks of whole panels, about 8 per thread, handed out through an atomic counter (dynamic
  // scheduling: a thread slowed by other load takes fewer tasks). With fewer panels than threads, K is split
  // into segments instead, and each (rows, segment) task keeps its own top-k.
  const int64_t panels = (N + R - 1) / R;
  int64_t segments = panels >= threads ? 1 : (threads + panels - 1) / panels;
  segments = std::max<int64_t>(1, std::min(segments, K / std::max<int64_t>(512, k)));  // each holds >= k codes
  const int64_t task_panels = std::max(panels / (kTasksPerThread * threads), std::min(kMinTaskRows / R, panels / threads));
  const int64_t rows_per_task = segments > 1 ? panels * R : std::max<int64_t>(1, task_panels) * R;
  const int64_t row_tasks = (N + rows_per_task - 1) / rows_per_task;
  const int64_t codes_per_segment = (K + segments - 1) / segments;
  std::vector<S> seg_best(segments > 1 ? size_t(segments * N * k) : 0);
  std::vector<int64_t> seg_idx(seg_best.size());
  std::atomic<int64_t> next_task{0};

  parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Workspace<S> ws;
    for (int64_t task = next_task.fetch_add(1); task < row_tasks * segments; task = next_task.fetch_add(1)) {
      const int64_t chunk = task / segments, seg = task % segments;
      Task<S> t{&z, &codebook, bias.data(), scaled ? scale.data() : nullptr, k, 0, 0, 0, 0,
                nullptr, nullptr, &ws, &bad, frame};
      t.r0 = std::min(N, chunk * rows_per_task), t.r1 = std::min(N, t.r0 + rows_per_task);
      t.c0 = std::min(K, seg * codes_per_segment), t.c1 = std::min(K, t.c0 + codes_per_segment);
      if (t.r0 >= t.r1 || t.c0 >= t.c1) continue;
      if (segments == 1) {
        t.best = distances + t.r0 * k, t.best_idx = indices + t.r0 * k;
      } else {
        t.best = seg_best.data() + (seg * N + t.r0) * k, t.best_idx = seg_idx.data() + (seg * N + t.r0) * k;
      }
      dispatch_task<S>(t);
    }
  });
  if (bad.load() & 1) return kZNotFinite;

  // Merge segments in index order (ties stay with the lower index), then recompute the distances directly.
  parallel_for(0, N, 64, [&](int64_t b, int64_t e) {
    std::vector<double> zrow(static_cast<size_t>(D)), crow(static_cast<size_t>(D));
    for (int64_t r = b; r < e; ++r) {
      S* best = distances + r * k;
      int64_t* idx = indices + r * k;
      if (segments > 1) {
        std::fill(best, best + k, -std::numeric_limits<S>::infinity());
        for (int64_t seg = 0; seg < segments; ++seg)
          for (int64_t i = 0; i < k; ++i) {
            const int64_t at = (seg * N + r) * k + i;
            topk_insert<S>(best, idx, int(k), seg_best[at], seg_idx[at]);
          }
      }
      load_row<double>(z, r, zrow.data());
      for (int64_t i = 0; i < k; ++i) {
        load_row<double>(codebook, idx[i], crow.data());
        best[i] = S(direct_distance(zrow.data(), crow.data(), D, metric));
      }
    }
  });
  return kOk;
}

// Waking a thread pool costs tens of microseconds (milliseconds when the other cores are busy), more than a small
// search: each thread gets at least kMinWorkPerThread multiply-adds, and a call that fits in one runs on the
// caller's thread without touching the pool (a sampler asking for one token at a time pays no threading cost).
constexpr int64_t kMinWorkPerThread = int64_t(1) << 23;  // ~0.2-0.5 ms of one core

struct SerialFor {
  template <class F>
  void operator()(int64_t begin, int64_t end, int64_t, const F& f) const {
    if (begin < end) f(begin, end);
  }
};

template <class S, class ParallelFor>
int nearest_codeword(const Matrix& z, const Matrix& codebook, int metric, int k, int64_t threads,
                     int64_t* indices, S* distances, ParallelFor&& parallel_for, bool centred = false) {
  const double work = double(z.rows) * double(codebook.rows) * double(z.cols);
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, int64_t(work / double(kMinWorkPerThread))));
  if (threads == 1) return nearest_codeword_on<S>(z, codebook, metric, k, 1, indices, distances, SerialFor{}, centred);
  return nearest_codeword_on<S>(z, codebook, metric, k, threads, indices, distances, parallel_for, centred);
}

}  // namespace quantkit::cpu::nearest
