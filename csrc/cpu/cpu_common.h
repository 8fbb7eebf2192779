// Torch-free helpers shared by the CPU kernels: strided matrix views of any float dtype, row loaders that convert
// to the compute type, 64-byte SIMD vector types (GCC vector extensions), aligned scratch buffers and the ISA
// multiversioning macros.
//
// The one idea: every hot loop is written once as an always-inline template on GCC vector types; thin wrappers
// compiled with target("avx512f") / target("avx2,fma") / the baseline ISA instantiate it three times, and the
// binding picks one at run time with __builtin_cpu_supports. The .so therefore runs on any x86-64 (and any other
// architecture, where only the baseline wrapper exists).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>
#include <atomic>

#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors never cross a non-inlined call

#define QK_INLINE inline __attribute__((always_inline))
#define QK_FLATTEN __attribute__((flatten))
#if defined(__x86_64__) || defined(__i386__)
#define QK_X86 1
#define QK_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")))
#define QK_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define QK_X86 0
#endif

namespace quantkit::cpu {

enum class DType : int { f32, f16, bf16, f64 };

// A read-only (rows, cols) matrix with element strides, as torch hands it to the binding.
struct Matrix {
  const void* data;
  int64_t rows, cols;
  int64_t row_stride, col_stride;  // in elements
  DType dtype;
};

// ---------------------------------------------------------------------------------------------------------------
// scalar conversions (IEEE binary16 and bfloat16 -> float, exact)

QK_INLINE float bf16_to_float(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

QK_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);  // normal: rebias 15 -> 127
  } else if (man == 0) {
    u = sign;  // +-0
  } else {  // subnormal: value = man * 2^-24, exact in float
    float f = float(man) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// True when no element of x[0:n] is NaN or inf: an all-ones exponent field, tested with integer ops and an OR
// reduction, which vectorizes (a floating-point sum of x * 0 would be one serial dependency chain).
template <class S>
QK_INLINE bool all_finite(const S* __restrict__ x, int64_t n) {
  using U = std::conditional_t<sizeof(S) == 4, uint32_t, uint64_t>;
  constexpr U exponent = sizeof(S) == 4 ? U(0x7f800000u) : U(0x7ff0000000000000ull);
  U bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    U bits;
    std::memcpy(&bits, x + i, sizeof(S));
    bad |= U((bits & exponent) == exponent);
  }
  return bad == 0;
}

// Row r of m converted to S (float or double) into dst[0:cols]. Returns false when the row holds a NaN or inf
// (x * 0 is NaN exactly for non-finite x, and the sum keeps it, so the check vectorizes).
template <class S>
QK_INLINE bool load_row(const Matrix& m, int64_t r, S* __restrict__ dst) {
  const int64_t n = m.cols, cs = m.col_stride;
  switch (m.dtype) {
    case DType::f32: {
      const float* p = static_cast<const float*>(m.data) + r * m.row_stride;
      if (cs == 1) {
        for (int64_t i = 0; i < n; ++i) dst[i] = S(p[i]);
      } else {
        for (int64_t i = 0; i < n; ++i) dst[i] = S(p[i * cs]);
      }
      break;
    }
    case DType::f64: {
      const double* p = static_cast<const double*>(m.data) + r * m.row_stride;
      for (int64_t i = 0; i < n; ++i) dst[i] = S(p[i * cs]);
      break;
    }
    case DType::f16: {
      const uint16_t* p = static_cast<const uint16_t*>(m.data) + r * m.row_stride;
      for (int64_t i = 0; i < n; ++i) dst[i] = S(half_to_float(p[i * cs]));
      break;
    }
    case DType::bf16: {
      const uint16_t* p = static_cast<const uint16_t*>(m.data) + r * m.row_stride;
      for (int64_t i = 0; i < n; ++i) dst[i] = S(bf16_to_float(p[i * cs]));
      break;
    }
  }
  return all_finite(dst, n);
}

// ---------------------------------------------------------------------------------------------------------------
// SIMD types: one VB-byte vector of S (VB = 64 for AVX-512, 32 for AVX2, 16 for the baseline ISA, so the
// accumulators of a register block fit that ISA's register file) and the matching integer lane mask / index type.

template <class S, int VB>
struct Vec {
  typedef S V __attribute__((vector_size(VB)));
  typedef decltype(V{} > V{}) I;  // int32 lanes for float, int64 lanes for double
  static constexpr int L = VB / sizeof(S);
};

// Instruction-set variant of a kernel: vector bytes and codes per register block.
// Codes per AVX-512 register block (2 x J accumulators of 32 zmm); 12 measured within noise of 8 here.
#ifndef QK_AVX512_CODES
#define QK_AVX512_CODES 8
#endif
struct IsaAvx512 { static constexpr int VB = 64, J = QK_AVX512_CODES; };
// Codes per AVX2 register block (2 x J of 16 ymm); 4 measured best on Zen 3 (5 equal, 6 and 8 spill).
#ifndef QK_AVX2_CODES
#define QK_AVX2_CODES 4
#endif
struct IsaAvx2 { static constexpr int VB = 32, J = QK_AVX2_CODES; };
struct IsaBaseline { static constexpr int VB = 16, J = 4; };

template <class T>
QK_INLINE T vload(const void* p) {  // unaligned-safe vector load
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

template <class T>
QK_INLINE void vstore(void* p, const T& v) {
  std::memcpy(p, &v, sizeof(T));
}

// True when any lane of an integer mask vector is set (portable: OR of its 64-bit words).
#if QK_X86
// The sign bits of 8 float lanes in one instruction (vmovmskps); plain inline, so it is only ever inlined into the
// AVX2 / AVX-512 wrappers, which are `flatten`ed (an always_inline AVX helper cannot be inlined into the generic
// templates in between).
typedef float F8x __attribute__((vector_size(32)));
#pragma GCC push_options
#pragma GCC target("avx")
inline int movemask_avx(F8x v) { return __builtin_ia32_movmskps256(v); }
#pragma GCC pop_options
#endif

// True when any lane of an integer mask vector is set (a set lane is all ones).
template <class I>
QK_INLINE bool any_lane(const I& mask) {
#if QK_X86
  if constexpr (sizeof(I) == 32) return movemask_avx((F8x)mask) != 0;
#endif
  uint64_t words[sizeof(I) / 8];
  std::memcpy(words, &mask, sizeof(I));
  uint64_t acc = 0;
  for (size_t i = 0; i < sizeof(I) / 8; ++i) acc |= words[i];
  return acc != 0;
}

// ---------------------------------------------------------------------------------------------------------------
// 64-byte aligned scratch (thread-local tiles; never sized by N x K).

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

template <class T>
struct Scratch {
  std::unique_ptr<T[], FreeDeleter> ptr;
  T* get(size_t count) {
    if (count > size) {
      size_t bytes = ((count * sizeof(T) + 63) / 64) * 64;
      ptr.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
      if (!ptr) throw std::bad_alloc();
      size = count;
    }
    return ptr.get();
  }
  size_t size = 0;
};

// Squared norm of every codeword from its S-converted values (double sums), in parallel: the O(K) per-code terms
// both kernels need. Returns false when the codebook holds a NaN or inf.
template <class S, class ParallelFor>
bool codeword_sq_norms(const Matrix& codebook, std::vector<double>& sq, ParallelFor&& parallel_for) {
  const int64_t K = codebook.rows, D = codebook.cols;
  sq.assign(size_t(K), 0.0);
  std::atomic<int> bad{0};
  parallel_for(0, K, 1024, [&](int64_t b, int64_t e) {
    std::vector<S> row(static_cast<size_t>(D));
    for (int64_t c = b; c < e; ++c) {
      if (!load_row<S>(codebook, c, row.data())) bad.fetch_or(1);
      double acc = 0;
      for (int64_t d = 0; d < D; ++d) acc += double(row[d]) * double(row[d]);
      sq[c] = acc;
    }
  });
  return bad.load() == 0;
}

}  // namespace quantkit::cpu
