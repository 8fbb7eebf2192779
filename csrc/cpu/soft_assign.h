// Fused soft assignment on the CPU (torch-free): out = softmax(logits) @ C with logits = s (z.c + b_c) / t, where
// l2: s = 2, b_c = -|c|^2/2 (= -|z - c|^2 / t up to a per-row constant), dot: s = 1, b_c = 0.
//
// Method: SoftVQ (arXiv:2412.10958) is single-head attention with q = z, k = c, v = c, so this is the
// FlashAttention-2 recipe (Dao, arXiv:2307.08691) on the CPU. The one idea: the N x K probabilities are never
// stored. The forward keeps, per row, a running max m, a running sum l and an unnormalized output, rescaled by
// exp(m_old - m_new) as each code tile arrives, and saves only lse = m + log l. The backward recomputes
// P = exp(logits - lse) tile by tile:
//   dP = g . c,  delta = g . out,  dS = P (dP - delta),
//   grad_z = (s/t) dS @ C,  grad_t = -sum(dS * logits) / t,
//   grad_c = P^T g + (s/t) dS^T z - (s/t) colsum(dS) c   (the last term only for l2).
// grad_z / grad_t run in parallel over row panels; grad_c in parallel over code tiles, each summing over all rows
// in order, so every gradient is deterministic and independent of the thread count, with no K x D x threads
// partial buffers. Rows sit in SIMD lanes (a transposed panel of 2L rows) as in nearest_codeword.h, whose
// register-blocked score micro-kernel is reused for z.c and g.c.
#pragma once

#include <algorithm>
#include <atomic>
#include <vector>

#include "cpu_common.h"
#include "nearest_codeword.h"

namespace quantkit::cpu::soft {

enum Metric : int { kL2 = 0, kDot = 2 };
constexpr int64_t kTileCodes = 256;  // codes per tile: the probability tile is kTileCodes x 2L

// exp(x) for a vector, |error| about 1-2 ulp: x = n ln2 + r, |r| <= ln2/2, Taylor polynomial of r, scaled by 2^n
// through the exponent bits. x below the underflow limit (including -inf) gives exactly 0.
template <class S, int VB>
QK_INLINE typename Vec<S, VB>::V vexp(typename Vec<S, VB>::V x) {
  using V = typename Vec<S, VB>::V;
  using I = typename Vec<S, VB>::I;
  constexpr bool F = sizeof(S) == 4;
  const S lo = F ? S(-87.0) : S(-708.0), hi = F ? S(88.0) : S(709.0);
  const S magic = F ? S(12582912.0) : S(6755399441055744.0);  // 1.5 * 2^mantissa: rounds to an integer
  const S ln2_hi = F ? S(0.693359375) : S(6.93147180369123816490e-01);
  const S ln2_lo = F ? S(-2.12194440e-4) : S(1.90821492927058770002e-10);
  const I under = x < lo;
  x = under ? V{} + lo : x;
  x = x > hi ? V{} + hi : x;
  const V shifted = x * S(1.44269504088896340736) + magic;
  const V n = shifted - magic;
  const V r = (x - n * ln2_hi) - n * ln2_lo;
  constexpr int degree = F ? 7 : 13;
  V p = V{} + S(1);
  for (int i = degree - 1; i >= 1; --i) p = p * r * (S(1) / S(i)) + S(1);  // Horner form of sum r^i / i!
  const I e = ((I)shifted - (I)(V{} + magic)) << (F ? 23 : 52);
  const V out = (V)((I)p + e);
  return under ? V{} : out;
}

template <class S>
struct Problem {
  const Matrix* z;
  const Matrix* codebook;
  S temperature;
  S scale;       // s / t: 2 / t (l2) or 1 / t (dot)
  const S* bias;  // (K,): -|c|^2 / 2 (l2) or 0
};

// Rows per panel (2L) of the ISA the kernels run with; the drivers number panels with it.
template <class S>
inline int64_t panel_rows() {
  const char* isa = nearest::isa();
  const int vb = isa[0] == 'a' ? (isa[3] == '5' ? 64 : 32) : 16;
  return 2 * vb / int64_t(sizeof(S));
}

// Codes [t0, t1) of a tile: full blocks of J read in place (fp32/fp64 rows with unit column stride), the rest
// converted into a padded buffer whose padding codes are 0 with bias -inf.
template <class S, int kJ>
struct TileCodes {
  const S* base;
  int64_t ldc;
  const S* bias;
  int64_t t0, t1, full_end, padded_end;
  const S* packed;
  const S* packed_bias;
  int64_t D;

  QK_INLINE const S* codes(int64_t j0, int64_t* ld) const {
    if (j0 < full_end) {
      *ld = ldc;
      return base + j0 * ldc;
    }
    *ld = D;
    return packed + (j0 - full_end) * D;
  }
  QK_INLINE const S* code_bias(int64_t j0) const { return j0 < full_end ? bias + j0 : packed_bias + (j0 - full_end); }
};

template <class S, int kJ>
QK_INLINE TileCodes<S, kJ> load_tile(const Problem<S>& p, int64_t t0, int64_t t1, Scratch<S>& buf) {
  const Matrix& cb = *p.codebook;
  const int64_t D = cb.cols;
  const bool direct = cb.col_stride == 1 && cb.dtype == (sizeof(S) == 4 ? DType::f32 : DType::f64);
  TileCodes<S, kJ> tc{static_cast<const S*>(cb.data), cb.row_stride, p.bias, t0, t1, 0, 0, nullptr, nullptr, D};
  tc.full_end = direct ? t0 + (t1 - t0) / kJ * kJ : t0;
  tc.padded_end = t0 + (t1 - t0 + kJ - 1) / kJ * kJ;
  const int64_t n = tc.padded_end - tc.full_end;
  if (n > 0) {
    S* packed = buf.get(size_t(n * D + n));
    S* packed_bias = packed + n * D;
    for (int64_t c = tc.full_end; c < tc.padded_end; ++c) {
      S* dst = packed + (c - tc.full_end) * D;
      if (c < t1) {
        load_row<S>(cb, c, dst);
        packed_bias[c - tc.full_end] = p.bias[c];
      } else {
        std::fill(dst, dst + D, S(0));
        packed_bias[c - tc.full_end] = -std::numeric_limits<S>::infinity();
      }
    }
    tc.packed = packed, tc.packed_bias = packed_bias;
  }
  return tc;
}

// st[j] (2L lanes) = scale * (bias_j + panel . c_j) for every code of the tile (padding codes -> -inf).
template <class S, class Isa>
QK_INLINE void tile_scores(const TileCodes<S, Isa::J>& tc, const S* panel, const S* bias_or_null, S scale, int64_t D,
                           S* st) {
  using V = typename Vec<S, Isa::VB>::V;
  constexpr int L = Vec<S, Isa::VB>::L, kJ = Isa::J;
  for (int64_t j0 = tc.t0; j0 < tc.padded_end; j0 += kJ) {
    int64_t ld;
    const S* codes = tc.codes(j0, &ld);
    const S* bias = bias_or_null ? tc.code_bias(j0) : nullptr;
    V acc[kJ][2];
    for (int j = 0; j < kJ; ++j) acc[j][0] = acc[j][1] = bias ? bias[j] - V{} : V{};  // x - 0 == x: a broadcast
    nearest::accumulate_block<S, Isa>(panel, codes, ld, 1, 0, D, acc);
    for (int j = 0; j < kJ; ++j) {
      vstore(st + (j0 - tc.t0 + j) * 2 * L, acc[j][0] * scale);
      vstore(st + (j0 - tc.t0 + j) * 2 * L + L, acc[j][1] * scale);
    }
  }
}

// acc_t[d] (2L lanes) += sum_j w[j] * c_j[d] over the tile's codes: the P @ V product with rows in lanes.
template <class S, class Isa, int DB>
QK_INLINE void weighted_codes_cols(const TileCodes<S, Isa::J>& tc, const S* w, int64_t d0, S* acc_t) {
  using V = typename Vec<S, Isa::VB>::V;
  constexpr int L = Vec<S, Isa::VB>::L, kJ = Isa::J;
  V acc[DB][2];
  for (int dd = 0; dd < DB; ++dd) {
    acc[dd][0] = vload<V>(acc_t + (d0 + dd) * 2 * L);
    acc[dd][1] = vload<V>(acc_t + (d0 + dd) * 2 * L + L);
  }
  for (int64_t j0 = tc.t0; j0 < tc.padded_end; j0 += kJ) {
    int64_t ld;
    const S* codes = tc.codes(j0, &ld);
    for (int j = 0; j < kJ; ++j) {
      const V w0 = vload<V>(w + (j0 - tc.t0 + j) * 2 * L), w1 = vload<V>(w + (j0 - tc.t0 + j) * 2 * L + L);
#pragma GCC unroll 8
      for (int dd = 0; dd < DB; ++dd) {
        const S c = codes[j * ld + d0 + dd];
        acc[dd][0] += w0 * c;
        acc[dd][1] += w1 * c;
      }
    }
  }
  for (int dd = 0; dd < DB; ++dd) {
    vstore(acc_t + (d0 + dd) * 2 * L, acc[dd][0]);
    vstore(acc_t + (d0 + dd) * 2 * L + L, acc[dd][1]);
  }
}

template <class S, class Isa>
QK_INLINE void weighted_codes(const TileCodes<S, Isa::J>& tc, const S* w, int64_t D, S* acc_t) {
  int64_t d0 = 0;
  for (; d0 + 8 <= D; d0 += 8) weighted_codes_cols<S, Isa, 8>(tc, w, d0, acc_t);
  for (; d0 < D; ++d0) weighted_codes_cols<S, Isa, 1>(tc, w, d0, acc_t);
}

// Per-thread scratch: transposed panels (D x 2L) and tiles (kTileCodes x 2L).
template <class S>
struct Workspace {
  Scratch<S> zt, gt, acc_t, st, dpt, row, rows_z, rows_g, tile, grad_tile;
};

// Loads rows [p0, p0 + 2L) of m transposed into panel; optionally also row-major into rows (2L x D).
template <class S, int R>
QK_INLINE bool load_panel(const Matrix& m, int64_t p0, int64_t n, S* panel, S* row, S* rows = nullptr) {
  const bool ok = nearest::pack_rows<S, R>(m, p0, std::min(p0 + R, n), nullptr, panel, row, nullptr);
  if (rows) {
    const int64_t D = m.cols;
    for (int i = 0; i < R; ++i)
      for (int64_t d = 0; d < D; ++d) rows[i * D + d] = panel[d * R + i];
  }
  return ok;
}

// Per-row lanes of delta = g . out and of lse (padding rows: lse = +inf, so their probabilities are 0).
template <class S, int R>
QK_INLINE void row_terms(const Matrix& grad_out, const Matrix& out, const S* lse, int64_t p0, int64_t n, S* row_g,
                         S* row_o, S* delta_l, S* lse_l) {
  const int64_t D = out.cols;
  for (int i = 0; i < R; ++i) {
    const int64_t r = p0 + i;
    if (r < n) {
      load_row<S>(grad_out, r, row_g);
      load_row<S>(out, r, row_o);
      S dl = 0;
      for (int64_t d = 0; d < D; ++d) dl += row_g[d] * row_o[d];
      delta_l[i] = dl, lse_l[i] = lse[r];
    } else {
      delta_l[i] = 0, lse_l[i] = std::numeric_limits<S>::infinity();
    }
  }
}

// P and dS for one tile: st holds logits on entry and P on exit; dpt holds g.c on entry and dS on exit.
// Returns, per lane, sum over the tile's real codes of dS * logits (for grad_t).
template <class S, class Isa>
QK_INLINE typename Vec<S, Isa::VB>::V probs_and_dlogits(int64_t ncodes, const S* lse_l, const S* delta_l, S* st,
                                                        S* dpt) {
  using V = typename Vec<S, Isa::VB>::V;
  constexpr int L = Vec<S, Isa::VB>::L;
  V gt0{}, gt1{};
  const V lse0 = vload<V>(lse_l), lse1 = vload<V>(lse_l + L), dl0 = vload<V>(delta_l), dl1 = vload<V>(delta_l + L);
  for (int64_t j = 0; j < ncodes; ++j) {
    S* s = st + j * 2 * L;
    S* dp = dpt + j * 2 * L;
    const V x0 = vload<V>(s), x1 = vload<V>(s + L);
    const V p0 = vexp<S, Isa::VB>(x0 - lse0), p1 = vexp<S, Isa::VB>(x1 - lse1);
    const V ds0 = p0 * (vload<V>(dp) - dl0), ds1 = p1 * (vload<V>(dp + L) - dl1);
    gt0 += ds0 * x0, gt1 += ds1 * x1;
    vstore(s, p0), vstore(s + L, p1), vstore(dp, ds0), vstore(dp + L, ds1);
  }
  return gt0 + gt1;
}

// ---------------------------------------------------------------------------------------------------------------
// forward: rows [b, e) of panels; out (N x D) and lse (N) in S

template <class S, class Isa>
QK_INLINE void forward_panels(const Problem<S>& p, int64_t pan_b, int64_t pan_e, S* out, S* lse, Workspace<S>& ws,
                              std::atomic<int>* bad) {
  using V = typename Vec<S, Isa::VB>::V;
  constexpr int L = Vec<S, Isa::VB>::L, R = 2 * L, kJ = Isa::J;
  const int64_t N = p.z->rows, K = p.codebook->rows, D = p.z->cols;
  S* zt = ws.zt.get(size_t(D * R));
  S* acc_t = ws.acc_t.get(size_t(D * R));
  S* st = ws.st.get(size_t((kTileCodes + kJ) * R));
  S* row = ws.row.get(size_t(D));
  alignas(64) S lanes[2][R];
  for (int64_t pan = pan_b; pan < pan_e; ++pan) {
    const int64_t p0 = pan * R;
    if (!load_panel<S, R>(*p.z, p0, N, zt, row)) bad->fetch_or(1);
    std::fill(acc_t, acc_t + D * R, S(0));
    V m0 = V{} - std::numeric_limits<S>::infinity(), m1 = m0, l0{}, l1{};
    for (int64_t t0 = 0; t0 < K; t0 += kTileCodes) {
      const auto tc = load_tile<S, kJ>(p, t0, std::min(K, t0 + kTileCodes), ws.tile);
      const int64_t nc = tc.padded_end - t0;
      tile_scores<S, Isa>(tc, zt, p.bias, p.scale, D, st);
      V mt0 = m0, mt1 = m1;
      for (int64_t j = 0; j < nc; ++j) {
        const V x0 = vload<V>(st + j * R), x1 = vload<V>(st + j * R + L);
        mt0 = x0 > mt0 ? x0 : mt0, mt1 = x1 > mt1 ? x1 : mt1;
      }
      const V a0 = vexp<S, Isa::VB>(m0 - mt0), a1 = vexp<S, Isa::VB>(m1 - mt1);  // rescale of the old terms
      V s0{}, s1{};
      for (int64_t j = 0; j < nc; ++j) {
        const V e0 = vexp<S, Isa::VB>(vload<V>(st + j * R) - mt0), e1 = vexp<S, Isa::VB>(vload<V>(st + j * R + L) - mt1);
        s0 += e0, s1 += e1;
        vstore(st + j * R, e0), vstore(st + j * R + L, e1);
      }
      l0 = l0 * a0 + s0, l1 = l1 * a1 + s1;
      m0 = mt0, m1 = mt1;
      for (int64_t d = 0; d < D; ++d) {
        vstore(acc_t + d * R, vload<V>(acc_t + d * R) * a0);
        vstore(acc_t + d * R + L, vload<V>(acc_t + d * R + L) * a1);
      }
      weighted_codes<S, Isa>(tc, st, D, acc_t);
    }
    vstore(lanes[0], l0), vstore(lanes[0] + L, l1), vstore(lanes[1], m0), vstore(lanes[1] + L, m1);
    for (int i = 0; i < R && p0 + i < N; ++i) {
      const S inv = S(1) / lanes[0][i];
      for (int64_t d = 0; d < D; ++d) out[(p0 + i) * D + d] = acc_t[d * R + i] * inv;
      lse[p0 + i] = lanes[1][i] + std::log(lanes[0][i]);
    }
  }
}

// backward part 1: grad_z (N x D) and per-panel partial sums of dS * logits, over panels [b, e)
template <class S, class Isa>
QK_INLINE void backward_rows(const Problem<S>& p, const Matrix& grad_out, const Matrix& out, const S* lse,
                             int64_t pan_b, int64_t pan_e, S* grad_z, S* grad_t_partial, Workspace<S>& ws) {
  using V = typename Vec<S, Isa::VB>::V;
  constexpr int L = Vec<S, Isa::VB>::L, R = 2 * L, kJ = Isa::J;
  const int64_t N = p.z->rows, K = p.codebook->rows, D = p.z->cols;
  S* zt = ws.zt.get(size_t(D * R));
  S* gt = ws.gt.get(size_t(D * R));
  S* acc_t = ws.acc_t.get(size_t(D * R));
  S* st = ws.st.get(size_t((kTileCodes + kJ) * R));
  S* dpt = ws.dpt.get(size_t((kTileCodes + kJ) * R));
  S* row = ws.row.get(size_t(2 * D));
  alignas(64) S delta_l[R], lse_l[R], lanes[R];
  for (int64_t pan = pan_b; pan < pan_e; ++pan) {
    const int64_t p0 = pan * R;
    load_panel<S, R>(*p.z, p0, N, zt, row);
    load_panel<S, R>(grad_out, p0, N, gt, row);
    row_terms<S, R>(grad_out, out, lse, p0, N, row, row + D, delta_l, lse_l);
    std::fill(acc_t, acc_t + D * R, S(0));
    V gsum{};
    for (int64_t t0 = 0; t0 < K; t0 += kTileCodes) {
      const int64_t t1 = std::min(K, t0 + kTileCodes);
      const auto tc = load_tile<S, kJ>(p, t0, t1, ws.tile);
      tile_scores<S, Isa>(tc, zt, p.bias, p.scale, D, st);
      tile_scores<S, Isa>(tc, gt, nullptr, S(1), D, dpt);
      gsum += probs_and_dlogits<S, Isa>(t1 - t0, lse_l, delta_l, st, dpt);
      for (int64_t j = t1 - t0; j < tc.padded_end - t0; ++j) std::fill(dpt + j * R, dpt + (j + 1) * R, S(0));
      weighted_codes<S, Isa>(tc, dpt, D, acc_t);
    }
    vstore(lanes, gsum);
    S part = 0;
    for (int i = 0; i < L; ++i) part += lanes[i];
    grad_t_partial[pan] = part;
    for (int i = 0; i < R && p0 + i < N; ++i)
      for (int64_t d = 0; d < D; ++d) grad_z[(p0 + i) * D + d] = acc_t[d * R + i] * p.scale;
  }
}

// backward part 2: grad_codebook rows [t0, t1) (a tile), summing over every row panel in order
template <class S, class Isa>
QK_INLINE void backward_codes(const Problem<S>& p, const Matrix& grad_out, const Matrix& out, const S* lse,
                              int64_t t0, int64_t t1, bool l2, S* grad_c, Workspace<S>& ws) {
  constexpr int L = Vec<S, Isa::VB>::L, R = 2 * L, kJ = Isa::J;
  const int64_t N = p.z->rows, D = p.z->cols, n = t1 - t0;
  S* zt = ws.zt.get(size_t(D * R));
  S* gt = ws.gt.get(size_t(D * R));
  S* st = ws.st.get(size_t((kTileCodes + kJ) * R));
  S* dpt = ws.dpt.get(size_t((kTileCodes + kJ) * R));
  S* row = ws.row.get(size_t(2 * D));
  S* rows_z = ws.rows_z.get(size_t(R * D));
  S* rows_g = ws.rows_g.get(size_t(R * D));
  S* acc = ws.grad_tile.get(size_t(n * D + n));  // (n, D) gradient rows, then (n,) column sums of dS
  S* colsum = acc + n * D;
  std::fill(acc, acc + n * D + n, S(0));
  alignas(64) S delta_l[R], lse_l[R];
  const auto tc = load_tile<S, kJ>(p, t0, t1, ws.tile);
  for (int64_t p0 = 0; p0 < N; p0 += R) {
    load_panel<S, R>(*p.z, p0, N, zt, row, rows_z);
    load_panel<S, R>(grad_out, p0, N, gt, row, rows_g);
    row_terms<S, R>(grad_out, out, lse, p0, N, row, row + D, delta_l, lse_l);
    tile_scores<S, Isa>(tc, zt, p.bias, p.scale, D, st);
    tile_scores<S, Isa>(tc, gt, nullptr, S(1), D, dpt);
    probs_and_dlogits<S, Isa>(n, lse_l, delta_l, st, dpt);
    const int nrows = int(std::min<int64_t>(R, N - p0));
    for (int64_t j = 0; j < n; ++j) {
      S* __restrict__ a = acc + j * D;
      for (int i = 0; i < nrows; ++i) {
        const S wp = st[j * R + i], wu = dpt[j * R + i] * p.scale;
        const S* __restrict__ g = rows_g + i * D;
        const S* __restrict__ zr = rows_z + i * D;
        for (int64_t d = 0; d < D; ++d) a[d] += wp * g[d] + wu * zr[d];
        colsum[j] += wu;
      }
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    int64_t ld;
    const S* c = tc.codes(t0 + j / kJ * kJ, &ld) + (j % kJ) * ld;
    for (int64_t d = 0; d < D; ++d) grad_c[(t0 + j) * D + d] = l2 ? acc[j * D + d] - colsum[j] * c[d] : acc[j * D + d];
  }
}

// ---------------------------------------------------------------------------------------------------------------
// ISA wrappers (see cpu_common.h) and drivers

#define QK_SOFT_WRAPPERS(SUFFIX, ATTR, ISA)                                                                        \
  template <class S>                                                                                             \
  ATTR inline void forward_##SUFFIX(const Problem<S>& p, int64_t b, int64_t e, S* out, S* lse, Workspace<S>& ws, \
                                    std::atomic<int>* bad) {                                                     \
    forward_panels<S, ISA>(p, b, e, out, lse, ws, bad);                                                          \
  }                                                                                                              \
  template <class S>                                                                                             \
  ATTR inline void backward_rows_##SUFFIX(const Problem<S>& p, const Matrix& g, const Matrix& o, const S* lse,   \
                                          int64_t b, int64_t e, S* gz, S* gt, Workspace<S>& ws) {                \
    backward_rows<S, ISA>(p, g, o, lse, b, e, gz, gt, ws);                                                       \
  }                                                                                                              \
  template <class S>                                                                                             \
  ATTR inline void backward_codes_##SUFFIX(const Problem<S>& p, const Matrix& g, const Matrix& o, const S* lse,  \
                                           int64_t t0, int64_t t1, bool l2, S* gc, Workspace<S>& ws) {           \
    backward_codes<S, ISA>(p, g, o, lse, t0, t1, l2, gc, ws);                                                    \
  }
#if QK_X86
QK_SOFT_WRAPPERS(avx512, QK_TARGET_AVX512, IsaAvx512)
QK_SOFT_WRAPPERS(avx2, QK_TARGET_AVX2, IsaAvx2)
#endif
QK_SOFT_WRAPPERS(baseline, , IsaBaseline)
#undef QK_SOFT_WRAPPERS

#if QK_X86
#define QK_SOFT_DISPATCH(FN, ...)                                        \
  do {                                                                   \
    const char* isa = nearest::isa();                                    \
    if (isa[0] == 'a' && isa[3] == '5') FN##_avx512<S>(__VA_ARGS__);    \
    else if (isa[0] == 'a') FN##_avx2<S>(__VA_ARGS__);                  \
    else FN##_baseline<S>(__VA_ARGS__);                                  \
  } while (0)
#else
#define QK_SOFT_DISPATCH(FN, ...) FN##_baseline<S>(__VA_ARGS__)
#endif

// (K,) bias of the logits; returns false when the codebook holds NaN/inf.
template <class S, class ParallelFor>
bool code_bias(const Matrix& codebook, int metric, std::vector<S>& bias, ParallelFor&& parallel_for) {
  std::vector<double> sq;
  if (!codeword_sq_norms<S>(codebook, sq, parallel_for)) return false;
  bias.assign(sq.size(), S(0));
  if (metric == kL2)
    for (size_t c = 0; c < sq.size(); ++c) bias[c] = S(-0.5 * sq[c]);
  return true;
}

enum Status : int { kOk = 0, kZNotFinite = 1, kCodebookNotFinite = 2 };

// out: (N, D), lse: (N,), both S, contiguous.
template <class S, class ParallelFor>
int soft_assign_forward(const Matrix& z, const Matrix& codebook, S temperature, int metric, int64_t threads,
                        S* out, S* lse, ParallelFor&& parallel_for) {
  std::vector<S> bias;
  if (!code_bias<S>(codebook, metric, bias, parallel_for)) return kCodebookNotFinite;
  const Problem<S> p{&z, &codebook, temperature, (metric == kL2 ? S(2) : S(1)) / temperature, bias.data()};
  const int64_t panels = (z.rows + panel_rows<S>() - 1) / panel_rows<S>();
  std::atomic<int> bad{0};
  (void)threads;
  parallel_for(0, panels, 1, [&](int64_t b, int64_t e) {
    Workspace<S> ws;
    QK_SOFT_DISPATCH(forward, p, b, e, out, lse, ws, &bad);
  });
  return bad.load() ? kZNotFinite : kOk;
}

// grad_z: (N, D), grad_codebook: (K, D), both S contiguous; returns grad_temperature through *grad_t.
template <class S, class ParallelFor>
int soft_assign_backward(const Matrix& grad_out, const Matrix& z, const Matrix& codebook, S temperature,
                         const Matrix& out, const S* lse, int metric, int64_t threads, S* grad_z, S* grad_codebook,
                         S* grad_t, ParallelFor&& parallel_for) {
  std::vector<S> bias;
  if (!code_bias<S>(codebook, metric, bias, parallel_for)) return kCodebookNotFinite;
  const Problem<S> p{&z, &codebook, temperature, (metric == kL2 ? S(2) : S(1)) / temperature, bias.data()};
  const int64_t N = z.rows, K = codebook.rows;
  const int64_t panels = (N + panel_rows<S>() - 1) / panel_rows<S>();
  std::vector<S> partial(size_t(panels), S(0));
  parallel_for(0, panels, 1, [&](int64_t b, int64_t e) {
    Workspace<S> ws;
    QK_SOFT_DISPATCH(backward_rows, p, grad_out, out, lse, b, e, grad_z, partial.data(), ws);
  });
  S total = 0;
  for (const S v : partial) total += v;
  *grad_t = -total / temperature;
  const int64_t tiles = (K + kTileCodes - 1) / kTileCodes;
  (void)threads;
  parallel_for(0, tiles, 1, [&](int64_t b, int64_t e) {
    Workspace<S> ws;
    for (int64_t t = b; t < e; ++t)
      QK_SOFT_DISPATCH(backward_codes, p, grad_out, out, lse, t * kTileCodes, std::min(K, (t + 1) * kTileCodes),
                       metric == kL2, grad_codebook, ws);
  });
  return kOk;
}

#undef QK_SOFT_DISPATCH

}  // namespace quantkit::cpu::soft
