// CUDA kernels of quantkit's ops, registered with the dispatcher through torch's stable C ABI.
//
// This file is host C++ (compiled by c++, not nvcc) and deliberately thin: it validates arguments, makes inputs
// contiguous, allocates outputs and scratch through torch (so they come from the caching allocator), picks the
// current stream, and calls the torch-free launchers in launchers.h. The op schemas, fake kernels and autograd
// live in quantkit/ops.py; this file only adds `CUDA` implementations.
//
// The current stream: a CUDA build of torch exports aoti_torch_get_current_cuda_stream (libtorch_cuda; setup.py
// defines QUANTKIT_CUDA_STREAM_SHIM and links it); the CPU wheel only has the device-generic stream shim, whose
// native handle is a torch 2.13 feature. Both give the cudaStream_t torch itself launches on.
//
// Mode switch: QUANTKIT_CUDA_NEAREST=fast makes nearest_codeword (k == 1, float32/16/bf16) use bf16 tensor-core
// candidate scores re-ranked in float32 (same answer as exact, see nearest.cu); anything else means exact.
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>
#ifdef QUANTKIT_CUDA_STREAM_SHIM
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#endif

#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda/launchers.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
namespace qk = quantkit::cuda;

// Bits of the device-side error flag.
constexpr int kBadZ = 1, kBadCodebook = 2, kBadTemperature = 4;

cudaStream_t current_stream(int32_t device) {
#if defined(QUANTKIT_CUDA_STREAM_SHIM)
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(device, &stream) == AOTI_TORCH_SUCCESS,
                  "quantkit: could not get the current CUDA stream of device ", device);
  return static_cast<cudaStream_t>(stream);
#elif TORCH_FEATURE_VERSION >= TORCH_VERSION_2_13_0
  return static_cast<cudaStream_t>(torch::stable::accelerator::getCurrentStream(device).nativeHandle());
#else
#error "quantkit's CUDA binding needs a CUDA build of torch (QUANTKIT_CUDA_STREAM_SHIM) or torch >= 2.13"
#endif
}

void check_cuda(cudaError_t err, const char* op) {
  STD_TORCH_CHECK(err == cudaSuccess, "quantkit::", op, ": CUDA error: ", cudaGetErrorString(err));
}

const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Double: return "float64";
    default: return "a non-floating dtype";
  }
}

qk::DType kernel_dtype(const char* op, const char* name, const Tensor& t) {
  switch (t.scalar_type()) {
    case ScalarType::Float: return qk::DType::kFloat32;
    case ScalarType::Half: return qk::DType::kFloat16;
    case ScalarType::BFloat16: return qk::DType::kBFloat16;
    case ScalarType::Double: return qk::DType::kFloat64;
    default:
      STD_TORCH_CHECK(false, op, ": ", name, " must be float32, float16, bfloat16 or float64, got ",
                      dtype_name(t.scalar_type()));
  }
  return qk::DType::kFloat32;  // unreachable
}

ScalarType acc_type(qk::DType dtype) { return dtype == qk::DType::kFloat64 ? ScalarType::Double : ScalarType::Float; }

// Shapes, devices and dtypes of the (z, codebook) pair; returns their common kernel dtype.
qk::DType check_pair(const char* op, const Tensor& z, const Tensor& codebook) {
  STD_TORCH_CHECK(z.is_cuda() && codebook.is_cuda(), op, ": z and codebook must both be CUDA tensors");
  STD_TORCH_CHECK(z.get_device_index() == codebook.get_device_index(), op,
                  ": z and codebook must be on the same device, got cuda:", z.get_device_index(), " and cuda:",
                  codebook.get_device_index());
  STD_TORCH_CHECK(z.dim() == 2, op, ": z must have shape (N, D), got ", z.dim(), " dimensions");
  STD_TORCH_CHECK(codebook.dim() == 2, op, ": codebook must have shape (K, D), got ", codebook.dim(), " dimensions");
  STD_TORCH_CHECK(codebook.size(1) == z.size(1), op, ": codebook must have D=", z.size(1),
                  " columns to match z, got ", codebook.size(1));
  STD_TORCH_CHECK(codebook.size(0) >= 1, op, ": codebook must hold at least one codeword");
  const qk::DType dtype = kernel_dtype(op, "z", z);
  kernel_dtype(op, "codebook", codebook);
  STD_TORCH_CHECK(z.scalar_type() == codebook.scalar_type(), op, ": z and codebook must have the same dtype, got ",
                  dtype_name(z.scalar_type()), " and ", dtype_name(codebook.scalar_type()));
  return dtype;
}

// Raises (naming the argument) when z / codebook / temperature hold NaN or inf, or the temperature is not positive.
// This is the op's one host synchronization.
void check_values(const char* op, qk::DType dtype, const Tensor& z, const Tensor& codebook, const Tensor* temperature,
                  cudaStream_t stream) {
  Tensor flag = torch::stable::new_zeros(z, {1}, ScalarType::Int);
  int* flag_ptr = static_cast<int*>(flag.data_ptr());
  check_cuda(qk::flag_non_finite(dtype, z.data_ptr(), z.numel(), flag_ptr, kBadZ, stream), op);
  check_cuda(qk::flag_non_finite(dtype, codebook.data_ptr(), codebook.numel(), flag_ptr, kBadCodebook, stream), op);
  if (temperature != nullptr)
    check_cuda(qk::flag_bad_temperature(dtype, temperature->data_ptr(), flag_ptr, kBadTemperature, stream), op);
  int bad = 0;
  check_cuda(qk::read_flag(flag_ptr, &bad, stream), op);
  STD_TORCH_CHECK(!(bad & kBadZ), op, ": z contains NaN or inf; quantkit rejects non-finite inputs");
  STD_TORCH_CHECK(!(bad & kBadCodebook), op, ": codebook contains NaN or inf; quantkit rejects non-finite inputs");
  STD_TORCH_CHECK(!(bad & kBadTemperature), op, ": temperature must be a finite positive number");
}

bool nearest_fast_mode() {
  const char* mode = std::getenv("QUANTKIT_CUDA_NEAREST");
  return mode != nullptr && std::strcmp(mode, "fast") == 0;
}

// ---- nearest_codeword ------------------------------------------------------------------------------------------

// centred: the CUDA kernel ranks the inputs as given; quantkit.ops moves them into the centred frame on the device
// before the call (a copy at HBM bandwidth), so centred=True reaching this binding is a caller error.
std::tuple<Tensor, Tensor> nearest_codeword_cuda(const Tensor& z_in, const Tensor& codebook_in, int64_t metric,
                                                 int64_t k, bool centred) {
  const char* op = "nearest_codeword";
  STD_TORCH_CHECK(!centred, op, ": the CUDA kernel takes inputs already in the centred frame (centred=False)");
  const qk::DType dtype = check_pair(op, z_in, codebook_in);
  STD_TORCH_CHECK(metric >= 0 && metric <= 2, op, ": metric must be 0 (l2), 1 (cosine) or 2 (dot), got ", metric);
  const int64_t n = z_in.size(0), num_codes = codebook_in.size(0), dim = z_in.size(1);
  STD_TORCH_CHECK(k >= 1 && k <= num_codes, op, ": k must be in [1, K=", num_codes, "], got ", k);
  STD_TORCH_CHECK(k <= qk::kMaxK, op, ": the CUDA kernel supports k <= ", qk::kMaxK, ", got k=", k,
                  " (run with k <= 32, or on CPU)");
  STD_TORCH_CHECK(num_codes <= INT32_MAX, op, ": the CUDA kernel supports K < 2^31 codewords, got ", num_codes);

  torch::stable::accelerator::DeviceGuard guard(z_in.get_device_index());
  const Tensor z = torch::stable::contiguous(z_in);  // (N, D)
  const Tensor codebook = torch::stable::contiguous(codebook_in);  // (K, D)
  Tensor indices = torch::stable::new_empty(z, {n, k}, ScalarType::Long);  // (N, k)
  Tensor distances = torch::stable::new_empty(z, {n, k}, acc_type(dtype));  // (N, k)
  if (n == 0) return {indices, distances};

  const cudaStream_t stream = current_stream(z.get_device_index());
  check_values(op, dtype, z, codebook, nullptr, stream);
  const bool fast = nearest_fast_mode();
  const size_t bytes = qk::nearest_codeword_workspace_bytes(dtype, n, num_codes, fast);
  Tensor workspace = torch::stable::new_empty(z, {static_cast<int64_t>(bytes)}, ScalarType::Byte);
  check_cuda(qk::nearest_codeword(dtype, z.data_ptr(), codebook.data_ptr(), n, num_codes, dim, static_cast<int>(metric),
                                  static_cast<int>(k), fast, workspace.data_ptr(),
                                  static_cast<int64_t*>(indices.data_ptr()), distances.data_ptr(), stream),
             op);
  return {indices, distances};
}

// ---- soft_assign -----------------------------------------------------------------------------------------------

void check_temperature(const char* op, qk::DType dtype, const Tensor& z, const Tensor& temperature) {
  STD_TORCH_CHECK(temperature.numel() == 1, op, ": temperature must be a scalar");
  STD_TORCH_CHECK(temperature.is_cuda() && temperature.get_device_index() == z.get_device_index(), op,
                  ": temperature must be on z's device");
  STD_TORCH_CHECK(temperature.scalar_type() == acc_type(dtype), op, ": temperature must be ",
                  dtype == qk::DType::kFloat64 ? "float64" : "float32", " for ", dtype_name(z.scalar_type()),
                  " inputs, got ", dtype_name(temperature.scalar_type()));
}

void check_soft_dim(const char* op, qk::DType dtype, int64_t dim) {
  STD_TORCH_CHECK(dim <= qk::soft_assign_max_dim(dtype), op, ": the CUDA kernel supports D <= ",
                  qk::soft_assign_max_dim(dtype), " for this dtype, got D=", dim);
}

std::tuple<Tensor, Tensor> soft_assign_cuda(const Tensor& z_in, const Tensor& codebook_in, const Tensor& temperature_in,
                                            int64_t metric) {
  const char* op = "soft_assign";
  const qk::DType dtype = check_pair(op, z_in, codebook_in);
  check_temperature(op, dtype, z_in, temperature_in);
  const int64_t n = z_in.size(0), num_codes = codebook_in.size(0), dim = z_in.size(1);
  check_soft_dim(op, dtype, dim);

  torch::stable::accelerator::DeviceGuard guard(z_in.get_device_index());
  const Tensor z = torch::stable::contiguous(z_in);                      // (N, D)
  const Tensor codebook = torch::stable::contiguous(codebook_in);        // (K, D)
  const Tensor temperature = torch::stable::contiguous(temperature_in);  // scalar
  Tensor out = torch::stable::new_empty(z, {n, dim});                     // (N, D), z's dtype
  Tensor lse = torch::stable::new_empty(z, {n}, acc_type(dtype));         // (N,)
  if (n == 0) return {out, lse};

  const cudaStream_t stream = current_stream(z.get_device_index());
  check_values(op, dtype, z, codebook, &temperature, stream);
  check_cuda(qk::soft_assign_forward(dtype, z.data_ptr(), codebook.data_ptr(), temperature.data_ptr(), n, num_codes,
                                     dim, static_cast<int>(metric), out.data_ptr(), lse.data_ptr(), stream),
             op);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> soft_assign_backward_cuda(const Tensor& grad_out_in, const Tensor& z_in,
                                                             const Tensor& codebook_in, const Tensor& temperature_in,
                                                             const Tensor& out_in, const Tensor& lse_in,
                                                             int64_t metric) {
  const char* op = "soft_assign_backward";
  const qk::DType dtype = check_pair(op, z_in, codebook_in);
  check_temperature(op, dtype, z_in, temperature_in);
  const int64_t n = z_in.size(0), num_codes = codebook_in.size(0), dim = z_in.size(1);
  check_soft_dim(op, dtype, dim);
  for (const Tensor* t : {&grad_out_in, &out_in}) {
    STD_TORCH_CHECK(t->is_cuda() && t->dim() == 2 && t->size(0) == n && t->size(1) == dim &&
                        t->scalar_type() == z_in.scalar_type(),
                    op, ": grad_out and out must be (N, D) CUDA tensors with z's dtype");
  }
  STD_TORCH_CHECK(lse_in.is_cuda() && lse_in.dim() == 1 && lse_in.size(0) == n &&
                      lse_in.scalar_type() == acc_type(dtype),
                  op, ": lse must be the (N,) tensor soft_assign returned");

  torch::stable::accelerator::DeviceGuard guard(z_in.get_device_index());
  const Tensor grad_out = torch::stable::contiguous(grad_out_in);
  const Tensor z = torch::stable::contiguous(z_in);
  const Tensor codebook = torch::stable::contiguous(codebook_in);
  const Tensor temperature = torch::stable::contiguous(temperature_in);
  const Tensor out = torch::stable::contiguous(out_in);
  const Tensor lse = torch::stable::contiguous(lse_in);
  Tensor grad_z = torch::stable::new_empty(z, {n, dim});                       // (N, D)
  Tensor grad_codebook = torch::stable::new_empty(codebook, {num_codes, dim});  // (K, D)
  Tensor grad_temperature = torch::stable::empty_like(temperature_in);         // temperature's shape

  const cudaStream_t stream = current_stream(z.get_device_index());
  const size_t bytes = qk::soft_assign_backward_workspace_bytes(dtype, n);
  Tensor workspace = torch::stable::new_empty(z, {static_cast<int64_t>(bytes)}, ScalarType::Byte);
  check_cuda(qk::soft_assign_backward(dtype, grad_out.data_ptr(), z.data_ptr(), codebook.data_ptr(),
                                      temperature.data_ptr(), out.data_ptr(), lse.data_ptr(), n, num_codes, dim,
                                      static_cast<int>(metric), workspace.data_ptr(), grad_z.data_ptr(),
                                      grad_codebook.data_ptr(), grad_temperature.data_ptr(), stream),
             op);
  return {grad_z, grad_codebook, grad_temperature};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(quantkit, CUDA, m) {
  m.impl("nearest_codeword", TORCH_BOX(&nearest_codeword_cuda));
  m.impl("soft_assign", TORCH_BOX(&soft_assign_cuda));
  m.impl("soft_assign_backward", TORCH_BOX(&soft_assign_backward_cuda));
}
