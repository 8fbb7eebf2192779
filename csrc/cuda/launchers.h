// Torch-free entry points of quantkit's CUDA kernels: raw device pointers in, cudaError_t out.
//
// Included by the kernels (nvcc) and by the stable-ABI binding ops_cuda.cpp (host c++), so it must stay free of
// device code and of torch. All pointers are device pointers to contiguous row-major arrays; every launcher
// enqueues on `stream` and returns the first CUDA error it saw (cudaSuccess otherwise).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace quantkit {
namespace cuda {

// Element type of z / codebook (the op's common dtype). Accumulation is float32, or float64 for kFloat64.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Metric codes, as in quantkit/ops.py METRICS.
constexpr int kL2 = 0, kCosine = 1, kDot = 2;

// The exact kernel keeps each row's k best in one warp's registers (one entry per lane).
constexpr int kMaxK = 32;

// ---- input checks -----------------------------------------------------------------------------------------

// Sets *flag |= bit (device int) when x (numel elements of dtype) holds a NaN or an inf.
cudaError_t flag_non_finite(DType dtype, const void* x, int64_t numel, int* flag, int bit, cudaStream_t stream);

// Sets *flag |= bit unless the scalar temperature (float32, or float64 for kFloat64) is finite and positive.
cudaError_t flag_bad_temperature(DType dtype, const void* temperature, int* flag, int bit, cudaStream_t stream);

// Copies the device int *flag to *host and waits for the stream (the one host sync of an op).
cudaError_t read_flag(const int* flag, int* host, cudaStream_t stream);

// ---- nearest_codeword --------------------------------------------------------------------------------------

// Bytes of scratch nearest_codeword needs (per-code norms, and the fast mode's per-row fallback flags).
size_t nearest_codeword_workspace_bytes(DType dtype, int64_t n, int64_t num_codes, bool fast);

// indices: (n, k) int64, best first, ties to the lowest index.
// distances: (n, k) float32 (float64 for kFloat64), recomputed directly from z and the chosen codeword.
// fast: k == 1 only (ignored otherwise, and for float64): bf16 tensor-core candidate scores, re-ranked in float32.
cudaError_t nearest_codeword(DType dtype, const void* z, const void* codebook, int64_t n, int64_t num_codes,
                             int64_t dim, int metric, int k, bool fast, void* workspace, int64_t* indices,
                             void* distances, cudaStream_t stream);

// ---- soft_assign -------------------------------------------------------------------------------------------

// The largest D the soft_assign kernels accept for dtype (their per-block accumulator lives in shared memory).
int64_t soft_assign_max_dim(DType dtype);

// out: (n, dim) in dtype, lse: (n,) float32 (float64 for kFloat64). temperature: device scalar of the accumulation
// type. metric: kL2, else dot (cosine is rewritten to dot over normalized inputs by the Python wrapper).
cudaError_t soft_assign_forward(DType dtype, const void* z, const void* codebook, const void* temperature, int64_t n,
                                int64_t num_codes, int64_t dim, int metric, void* out, void* lse,
                                cudaStream_t stream);

size_t soft_assign_backward_workspace_bytes(DType dtype, int64_t n);

// grad_out, z, out: (n, dim) dtype; codebook: (num_codes, dim) dtype; temperature, lse: accumulation type.
// grad_z (n, dim) and grad_codebook (num_codes, dim) in dtype; grad_temperature: scalar of the accumulation type.
// Every reduction runs in a fixed order (no floating-point atomics), so the result is bitwise reproducible.
cudaError_t soft_assign_backward(DType dtype, const void* grad_out, const void* z, const void* codebook,
                                 const void* temperature, const void* out, const void* lse, int64_t n,
                                 int64_t num_codes, int64_t dim, int metric, void* workspace, void* grad_z,
                                 void* grad_codebook, void* grad_temperature, cudaStream_t stream);

}  // namespace cuda
}  // namespace quantkit
