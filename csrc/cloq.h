// Shared declarations of the cloq_engine._C CPU ops (see cloq_engine/formats.py for the format).
#pragma once

#include <torch/extension.h>

#include <optional>

namespace cloq {

// formats.py: codes [K, N] (K-major) <-> int32 words [Kp * bits / 32, N].
torch::Tensor pack_codes(const torch::Tensor& codes, int64_t bits);
torch::Tensor unpack_codes(const torch::Tensor& qweight, int64_t bits, int64_t in_features);

// Dequantized rows [k0, k1) of W^T, i.e. a [k1 - k0, N] block (K-major), in `dtype`.
torch::Tensor dequantize_kn(const torch::Tensor& qweight, const torch::Tensor& scales,
                            const std::optional<torch::Tensor>& zeros,
                            const std::optional<torch::Tensor>& codebook, int64_t bits,
                            int64_t group_size, int64_t in_features, int64_t k0, int64_t k1,
                            torch::ScalarType dtype);

// y [M, N] += x [M, K] @ W^T.  `block_k` > 0: dequantize K blocks into a buffer and use addmm;
// block_k == 0: fused dequant-dot kernel (for small M).
void qmm_(torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& qweight,
          const torch::Tensor& scales, const std::optional<torch::Tensor>& zeros,
          const std::optional<torch::Tensor>& codebook, int64_t bits, int64_t group_size,
          int64_t block_k);

// dx [M, K] += dy [M, N] @ W, same blocking rule.
void qmm_t_(torch::Tensor& dx, const torch::Tensor& dy, const torch::Tensor& qweight,
            const torch::Tensor& scales, const std::optional<torch::Tensor>& zeros,
            const std::optional<torch::Tensor>& codebook, int64_t bits, int64_t group_size,
            int64_t block_k);

// Name of the instruction set the fused kernels were dispatched to on this CPU.
std::string kernel_isa();

}  // namespace cloq
