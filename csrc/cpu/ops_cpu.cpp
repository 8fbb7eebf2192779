// CPU bindings of quantkit's ops (torch stable ABI only): argument checks, output allocation, and the hand-off
// to the torch-free kernels in nearest_codeword.h and soft_assign.h. The schemas live in quantkit/ops.py.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cmath>
#include <cstdlib>
#include <tuple>
#include <vector>

#include "nearest_codeword.h"
#include "soft_assign.h"

namespace {

using quantkit::cpu::DType;
using quantkit::cpu::Matrix;
using torch::headeronly::ScalarType;
using torch::stable::Tensor;

DType dtype_of(const Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case ScalarType::Float: return DType::f32;
    case ScalarType::Double: return DType::f64;
    case ScalarType::Half: return DType::f16;
    case ScalarType::BFloat16: return DType::bf16;
    default: STD_TORCH_CHECK(false, op, ": ", name, " must be float32, float16, bfloat16 or float64");
  }
  return DType::f32;
}

Matrix as_matrix(const Tensor& t, const char* op, const char* name) {
  STD_TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be a 2-D tensor, got ", t.dim(), " dimensions");
  STD_TORCH_CHECK(t.is_cpu(), op, ": ", name, " must be a CPU tensor");
  return Matrix{t.data_ptr(), t.size(0), t.size(1), t.stride(0), t.stride(1), dtype_of(t, op, name)};
}

void check_pair(const char* op, const Matrix& z, const Matrix& codebook) {
  STD_TORCH_CHECK(codebook.cols == z.cols, op, ": codebook must have D=", z.cols, " columns to match z, got ",
                  codebook.cols);
  STD_TORCH_CHECK(codebook.rows >= 1, op, ": codebook must hold at least one codeword");
  STD_TORCH_CHECK(codebook.dtype == z.dtype, op, ": z and codebook must have the same dtype");
}

// torch's intra-op thread pool as the kernels' parallel_for (contiguous chunks, respects set_num_threads).
struct TorchParallelFor {
  template <class F>
  void operator()(int64_t begin, int64_t end, int64_t grain, const F& f) const {
    if (begin >= end) return;
    torch::stable::parallel_for(begin, end, grain, f);
  }
};

ScalarType compute_type(DType d) { return d == DType::f64 ? ScalarType::Double : ScalarType::Float; }

// ---------------------------------------------------------------------------------------------------------------

void check_isa_request(const char* op) {
  STD_TORCH_CHECK(quantkit::cpu::nearest::isa_request_valid(), op,
                  ": QUANTKIT_CPU_ISA must be avx512, avx2 or scalar (or unset for the best this CPU has), got '",
                  std::getenv("QUANTKIT_CPU_ISA"), "'");
}

std::tuple<Tensor, Tensor> nearest_codeword_cpu(const Tensor& z_t, const Tensor& codebook_t, int64_t metric,
                                                int64_t k, bool centred) {
  const char* op = "nearest_codeword";
  check_isa_request(op);
  const Matrix z = as_matrix(z_t, op, "z"), codebook = as_matrix(codebook_t, op, "codebook");
  check_pair(op, z, codebook);
  STD_TORCH_CHECK(metric >= 0 && metric <= 2, op, ": metric must be 0 (l2), 1 (cosine) or 2 (dot), got ", metric);
  STD_TORCH_CHECK(k >= 1 && k <= codebook.rows, op, ": k must be in [1, K=", codebook.rows, "], got ", k);
  const ScalarType acc = compute_type(z.dtype);
  Tensor indices = torch::stable::new_empty(z_t, {z.rows, k}, ScalarType::Long);
  Tensor distances = torch::stable::new_empty(z_t, {z.rows, k}, acc);
  const int64_t threads = torch::stable::get_num_threads();
  int status;
  if (acc == ScalarType::Double) {
    status = quantkit::cpu::nearest::nearest_codeword<double>(
        z, codebook, int(metric), int(k), threads, static_cast<int64_t*>(indices.data_ptr()),
        static_cast<double*>(distances.data_ptr()), TorchParallelFor{}, centred);
  } else {
    status = quantkit::cpu::nearest::nearest_codeword<float>(
        z, codebook, int(metric), int(k), threads, static_cast<int64_t*>(indices.data_ptr()),
        static_cast<float*>(distances.data_ptr()), TorchParallelFor{}, centred);
  }
  STD_TORCH_CHECK(status != quantkit::cpu::nearest::kZNotFinite, op,
                  ": z contains NaN or inf; quantkit rejects non-finite inputs");
  STD_TORCH_CHECK(status != quantkit::cpu::nearest::kCodebookNotFinite, op,
                  ": codebook contains NaN or inf; quantkit rejects non-finite inputs");
  return {indices, distances};
}

// ---------------------------------------------------------------------------------------------------------------

double temperature_value(const Tensor& t) {
  const char* op = "soft_assign";
  check_isa_request(op);
  STD_TORCH_CHECK(t.numel() == 1 && t.is_cpu(), op, ": temperature must be a one-element CPU tensor");
  double v;
  if (t.scalar_type() == ScalarType::Double) {
    v = *static_cast<const double*>(t.data_ptr());
  } else {
    STD_TORCH_CHECK(t.scalar_type() == ScalarType::Float, op, ": temperature must be float32 or float64");
    v = *static_cast<const float*>(t.data_ptr());
  }
  STD_TORCH_CHECK(std::isfinite(v) && v > 0, op, ": temperature must be a finite positive number, got ", v);
  return v;
}

void check_soft(const Matrix& z, const Matrix& codebook, int64_t metric) {
  check_pair("soft_assign", z, codebook);
  STD_TORCH_CHECK(metric == 0 || metric == 2, "soft_assign: metric must be 0 (l2) or 2 (dot; cosine arrives "
                  "normalized as dot), got ", metric);
}

// Kernels write float32/float64; half-precision results are converted to the caller's dtype.
Tensor to_dtype(const Tensor& t, ScalarType dtype) {
  return t.scalar_type() == dtype ? t : torch::stable::to(t, dtype);
}

std::tuple<Tensor, Tensor> soft_assign_cpu(const Tensor& z_t, const Tensor& codebook_t, const Tensor& temperature,
                                           int64_t metric) {
  const Matrix z = as_matrix(z_t, "soft_assign", "z"), codebook = as_matrix(codebook_t, "soft_assign", "codebook");
  check_soft(z, codebook, metric);
  const double t = temperature_value(temperature);
  const ScalarType acc = compute_type(z.dtype);
  Tensor out = torch::stable::new_empty(z_t, {z.rows, z.cols}, acc);
  Tensor lse = torch::stable::new_empty(z_t, {z.rows}, acc);
  const int64_t threads = torch::stable::get_num_threads();
  int status;
  if (acc == ScalarType::Double) {
    status = quantkit::cpu::soft::soft_assign_forward<double>(z, codebook, t, int(metric), threads,
                                                              static_cast<double*>(out.data_ptr()),
                                                              static_cast<double*>(lse.data_ptr()), TorchParallelFor{});
  } else {
    status = quantkit::cpu::soft::soft_assign_forward<float>(z, codebook, float(t), int(metric), threads,
                                                             static_cast<float*>(out.data_ptr()),
                                                             static_cast<float*>(lse.data_ptr()), TorchParallelFor{});
  }
  STD_TORCH_CHECK(status != quantkit::cpu::soft::kZNotFinite,
                  "soft_assign: z contains NaN or inf; quantkit rejects non-finite inputs");
  STD_TORCH_CHECK(status != quantkit::cpu::soft::kCodebookNotFinite,
                  "soft_assign: codebook contains NaN or inf; quantkit rejects non-finite inputs");
  return {to_dtype(out, z_t.scalar_type()), lse};
}

template <class S>
std::tuple<Tensor, Tensor, Tensor> soft_backward_typed(const Tensor& grad_out_t, const Tensor& z_t,
                                                       const Tensor& codebook_t, const Tensor& temperature,
                                                       const Tensor& out_t, const Tensor& lse_t, int64_t metric,
                                                       ScalarType acc) {
  const char* op = "soft_assign_backward";
  check_isa_request(op);
  const Matrix z = as_matrix(z_t, op, "z"), codebook = as_matrix(codebook_t, op, "codebook");
  const Matrix grad_out = as_matrix(grad_out_t, op, "grad_out"), out = as_matrix(out_t, op, "out");
  check_soft(z, codebook, metric);
  STD_TORCH_CHECK(grad_out.rows == z.rows && grad_out.cols == z.cols && out.rows == z.rows && out.cols == z.cols,
                  op, ": grad_out and out must have the shape of z");
  STD_TORCH_CHECK(lse_t.dim() == 1 && lse_t.size(0) == z.rows && lse_t.scalar_type() == acc, op,
                  ": lse must be the (N,) float32/float64 tensor returned by soft_assign");
  const Tensor lse = torch::stable::contiguous(lse_t);
  const double t = temperature_value(temperature);
  Tensor grad_z = torch::stable::new_empty(z_t, {z.rows, z.cols}, acc);
  Tensor grad_c = torch::stable::new_empty(z_t, {codebook.rows, codebook.cols}, acc);
  S grad_t = 0;
  const int status = quantkit::cpu::soft::soft_assign_backward<S>(
      grad_out, z, codebook, S(t), out, static_cast<const S*>(lse.data_ptr()), int(metric),
      torch::stable::get_num_threads(), static_cast<S*>(grad_z.data_ptr()), static_cast<S*>(grad_c.data_ptr()),
      &grad_t, TorchParallelFor{});
  STD_TORCH_CHECK(status == 0, op, ": codebook contains NaN or inf");
  Tensor grad_temp = torch::stable::new_empty(temperature, std::vector<int64_t>{}, temperature.scalar_type());
  if (temperature.scalar_type() == ScalarType::Double) {
    *static_cast<double*>(grad_temp.data_ptr()) = double(grad_t);
  } else {
    *static_cast<float*>(grad_temp.data_ptr()) = float(grad_t);
  }
  return {to_dtype(grad_z, z_t.scalar_type()), to_dtype(grad_c, codebook_t.scalar_type()), grad_temp};
}

std::tuple<Tensor, Tensor, Tensor> soft_assign_backward_cpu(const Tensor& grad_out, const Tensor& z,
                                                            const Tensor& codebook, const Tensor& temperature,
                                                            const Tensor& out, const Tensor& lse, int64_t metric) {
  const ScalarType acc = compute_type(dtype_of(z, "soft_assign_backward", "z"));
  if (acc == ScalarType::Double)
    return soft_backward_typed<double>(grad_out, z, codebook, temperature, out, lse, metric, acc);
  return soft_backward_typed<float>(grad_out, z, codebook, temperature, out, lse, metric, acc);
}

// Which instruction set the CPU kernels run with now: 2 (AVX-512), 1 (AVX2 + FMA) or 0 (the portable build).
int64_t cpu_isa() {
  check_isa_request("cpu_isa");
  const char* isa = quantkit::cpu::nearest::isa();
  return isa[0] == 'a' ? (isa[3] == '5' ? 2 : 1) : 0;
}

}  // namespace

// No tensor arguments, so no backend to dispatch on: registered for every key through CompositeExplicitAutograd.
STABLE_TORCH_LIBRARY_IMPL(quantkit, CompositeExplicitAutograd, m) { m.impl("cpu_isa", TORCH_BOX(&cpu_isa)); }

STABLE_TORCH_LIBRARY_IMPL(quantkit, CPU, m) {
  m.impl("nearest_codeword", TORCH_BOX(&nearest_codeword_cpu));
  m.impl("soft_assign", TORCH_BOX(&soft_assign_cpu));
  m.impl("soft_assign_backward", TORCH_BOX(&soft_assign_backward_cpu));
}
