// pack_codes / unpack_codes: the packed format of cloq_engine/formats.py, bit for bit.
//
// Codes are K-major [K, N]; K is padded with zero codes to Kp (a multiple of 32).
// 2 and 4 bits: code k sits at bit bits * (k % per_word) of word row k / per_word (GPTQ order).
// 3 bits: rows [0, Kp/16) are a 2-bit plane of the low bits, rows [Kp/16, 3Kp/32) a 1-bit plane
// of the high bit.
#include <ATen/Parallel.h>

#include <atomic>

#include "cloq.h"

namespace cloq {
namespace {

constexpr int64_t kAlign = 32;

void check_bits(int64_t bits) {
  TORCH_CHECK_VALUE(bits == 2 || bits == 3 || bits == 4, "`bits` must be one of (2, 3, 4); got ", bits);
}

int64_t padded_k(int64_t k) { return (k + kAlign - 1) / kAlign * kAlign; }

// Packs bit field (code >> src_shift) & (2**width - 1) of codes [K, N] into `out` rows
// [Kp * width / 32, N]. Returns false if any code lies outside [0, limit) (checked when limit > 0).
template <typename code_t>
bool pack_plane(const code_t* codes, int64_t K, int64_t N, int width, int src_shift, int64_t limit,
                uint32_t* out) {
  const int per_word = 32 / width;
  const int64_t rows = padded_k(K) / per_word;
  const uint32_t mask = (1u << width) - 1u;
  std::atomic<bool> ok{true};
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    bool bad = false;
    for (int64_t r = r0; r < r1; ++r) {
      uint32_t* o = out + r * N;
      for (int64_t n = 0; n < N; ++n) o[n] = 0;
      for (int j = 0; j < per_word; ++j) {
        const int64_t k = r * per_word + j;
        if (k >= K) break;
        const code_t* c = codes + k * N;
        const int sh = width * j;
        if (limit > 0) {
          for (int64_t n = 0; n < N; ++n) bad |= (c[n] < 0) | (static_cast<int64_t>(c[n]) >= limit);
        }
        for (int64_t n = 0; n < N; ++n) o[n] |= ((static_cast<uint32_t>(c[n]) >> src_shift) & mask) << sh;
      }
    }
    if (bad) ok.store(false);
  });
  return ok.load();
}

}  // namespace

torch::Tensor pack_codes(const torch::Tensor& codes_in, int64_t bits) {
  check_bits(bits);
  TORCH_CHECK_VALUE(codes_in.dim() == 2, "codes must be 2-D [K, N]; got ", codes_in.dim(), " dims");
  TORCH_CHECK_VALUE(codes_in.device().is_cpu(), "codes must be a CPU tensor");
  auto st = codes_in.scalar_type();
  TORCH_CHECK_VALUE(at::isIntegralType(st, /*includeBool=*/false), "codes must be an integer tensor; got ", st);
  auto codes = codes_in.contiguous();
  const int64_t K = codes.size(0), N = codes.size(1);
  const int64_t Kp = padded_k(K);
  auto out = torch::empty({Kp * bits / 32, N}, codes.options().dtype(torch::kInt32));
  auto* o = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  const int64_t limit = int64_t(1) << bits;
  bool ok = true;
  AT_DISPATCH_INTEGRAL_TYPES(st, "pack_codes", [&] {
    const auto* c = codes.data_ptr<scalar_t>();
    if (bits == 3) {
      ok = pack_plane<scalar_t>(c, K, N, 2, 0, limit, o);
      pack_plane<scalar_t>(c, K, N, 1, 2, 0, o + (Kp / 16) * N);
    } else {
      ok = pack_plane<scalar_t>(c, K, N, static_cast<int>(bits), 0, limit, o);
    }
  });
  TORCH_CHECK_VALUE(ok, "codes must lie in [0, ", limit, ") for ", bits, " bits");
  return out;
}

torch::Tensor unpack_codes(const torch::Tensor& qweight_in, int64_t bits, int64_t in_features) {
  check_bits(bits);
  TORCH_CHECK_VALUE(qweight_in.scalar_type() == torch::kInt32, "qweight must be int32; got ", qweight_in.scalar_type());
  TORCH_CHECK_VALUE(qweight_in.dim() == 2, "qweight must be 2-D; got ", qweight_in.dim(), " dims");
  TORCH_CHECK_VALUE(qweight_in.device().is_cpu(), "qweight must be a CPU tensor");
  TORCH_CHECK_VALUE(in_features >= 0, "in_features must be >= 0; got ", in_features);
  const int64_t Kp = padded_k(in_features);
  TORCH_CHECK_VALUE(qweight_in.size(0) == Kp * bits / 32, "qweight has ", qweight_in.size(0), " rows; ", bits,
                    "-bit codes for in_features=", in_features, " need ", Kp * bits / 32);
  auto qweight = qweight_in.contiguous();
  const int64_t K = in_features, N = qweight.size(1);
  auto out = torch::empty({K, N}, qweight.options().dtype(torch::kInt64));
  const auto* q = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  int64_t* o = out.data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1));
  at::parallel_for(0, K, grain, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      int64_t* ok = o + k * N;
      if (bits == 3) {
        const uint32_t* lo = q + (k / 16) * N;
        const uint32_t* hi = q + (Kp / 16 + k / 32) * N;
        const int sl = 2 * (k % 16), sh = k % 32;
        for (int64_t n = 0; n < N; ++n) ok[n] = ((lo[n] >> sl) & 3u) | (((hi[n] >> sh) & 1u) << 2);
      } else {
        const int per_word = 32 / static_cast<int>(bits);
        const uint32_t mask = (1u << bits) - 1u;
        const uint32_t* w = q + (k / per_word) * N;
        const int s = static_cast<int>(bits) * (k % per_word);
        for (int64_t n = 0; n < N; ++n) ok[n] = (w[n] >> s) & mask;
      }
    }
  });
  return out;
}

}  // namespace cloq
