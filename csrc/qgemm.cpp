// Dequantize and dequant-matmul ops of the cpp backend (cloq_engine/backends/cpp_backend.py).
//
// Two ways to multiply by the packed weight without ever holding a dense W:
//  * blocked (large M): dequantize `block_k` rows of W^T into a small buffer, then addmm
//    (y += x[:, kblk] @ W^T[kblk, :], dx[:, kblk] += dy @ W^T[kblk, :]^T);
//  * fused (small M): each thread dequantizes one row segment of W^T at a time into registers /
//    L1 and accumulates directly, so the weight is read from memory once in packed form.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cloq.h"

namespace cloq {

// A view of one packed weight: codes, per-group scale / zero (already in T), codebook or null.
template <typename T>
struct WView {
  const uint32_t* q;
  const T* s;
  const T* z;   // null for NF4
  const T* cb;  // 16 levels for NF4, else null
  int64_t K, Kp, N, gs;
  int bits;
};

namespace kern_base {
#include "qgemm_kernels.inc"
}  // namespace kern_base

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define CLOQ_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace kern_avx2 {
#include "qgemm_kernels.inc"
}  // namespace kern_avx2
#pragma GCC pop_options
#endif

namespace {

bool cpu_has_avx2() {
#ifdef CLOQ_HAVE_AVX2
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool g_use_avx2 = cpu_has_avx2();

// The owning tensors behind a WView (converted scales / zeros / codebook) and the view itself.
template <typename T>
struct Weight {
  torch::Tensor q, s, z, cb;
  WView<T> view;
};

template <typename T>
Weight<T> make_weight(const torch::Tensor& qweight, const torch::Tensor& scales,
                      const std::optional<torch::Tensor>& zeros, const std::optional<torch::Tensor>& codebook,
                      int64_t bits, int64_t group_size, int64_t in_features) {
  TORCH_CHECK_VALUE(bits == 2 || bits == 3 || bits == 4, "`bits` must be one of (2, 3, 4); got ", bits);
  TORCH_CHECK_VALUE(qweight.scalar_type() == torch::kInt32 && qweight.dim() == 2,
                    "qweight must be a 2-D int32 tensor");
  TORCH_CHECK_VALUE(qweight.device().is_cpu(), "qweight must be a CPU tensor");
  const int64_t K = in_features, Kp = (K + 31) / 32 * 32, N = qweight.size(1);
  TORCH_CHECK_VALUE(K > 0, "in_features must be positive; got ", K);
  TORCH_CHECK_VALUE(qweight.size(0) == Kp * bits / 32, "qweight has ", qweight.size(0), " rows; ", bits,
                    "-bit codes for in_features=", K, " need ", Kp * bits / 32);
  TORCH_CHECK_VALUE(group_size > 0 && K % group_size == 0, "group_size=", group_size,
                    " must be positive and divide in_features=", K);
  const int64_t G = K / group_size;
  auto dt = c10::CppTypeToScalarType<T>::value;
  TORCH_CHECK_VALUE(scales.dim() == 2 && scales.size(0) == G && scales.size(1) == N, "scales must have shape [",
                    G, ", ", N, "]; got ", scales.sizes());
  Weight<T> w;
  w.q = qweight.contiguous();
  w.s = scales.to(dt).contiguous();
  const bool nf4 = codebook.has_value();
  if (nf4) {
    TORCH_CHECK_VALUE(bits == 4, "a codebook needs bits=4; got ", bits);
    TORCH_CHECK_VALUE(codebook->numel() == 16, "codebook must have 16 levels; got ", codebook->numel());
    TORCH_CHECK_VALUE(!zeros.has_value(), "zeros must be None with a codebook (NF4)");
    w.cb = codebook->to(dt).contiguous();
  } else {
    TORCH_CHECK_VALUE(zeros.has_value(), "zeros are required without a codebook");
    TORCH_CHECK_VALUE(zeros->sizes() == scales.sizes(), "zeros must have shape [", G, ", ", N, "]; got ",
                      zeros->sizes());
    w.z = zeros->to(dt).contiguous();
  }
  w.view = WView<T>{reinterpret_cast<const uint32_t*>(w.q.template data_ptr<int32_t>()),
                    w.s.template data_ptr<T>(),
                    nf4 ? nullptr : w.z.template data_ptr<T>(),
                    nf4 ? w.cb.template data_ptr<T>() : nullptr,
                    K, Kp, N, group_size, static_cast<int>(bits)};
  return w;
}

template <typename T>
void dequant_rows(const WView<T>& w, int64_t k0, int64_t k1, T* out) {
#ifdef CLOQ_HAVE_AVX2
  if (g_use_avx2) return kern_avx2::dequant_rows_any<T>(w, k0, k1, out);
#endif
  kern_base::dequant_rows_any<T>(w, k0, k1, out);
}

template <typename T>
void fused_mm(const WView<T>& w, const T* xt, int64_t M, T* y, int64_t ldy) {
#ifdef CLOQ_HAVE_AVX2
  if (g_use_avx2) return kern_avx2::fused_mm_any<T>(w, xt, M, y, ldy);
#endif
  kern_base::fused_mm_any<T>(w, xt, M, y, ldy);
}

template <typename T>
void fused_mm_t(const WView<T>& w, const T* dy, int64_t M, T* dx, int64_t ldx) {
#ifdef CLOQ_HAVE_AVX2
  if (g_use_avx2) return kern_avx2::fused_mm_t_any<T>(w, dy, M, dx, ldx);
#endif
  kern_base::fused_mm_t_any<T>(w, dy, M, dx, ldx);
}

void check_float_2d(const torch::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D; got ", t.dim(), " dims");
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK_VALUE(t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kDouble, name,
                    " must be float32 or float64; got ", t.scalar_type());
}

}  // namespace

torch::Tensor dequantize_kn(const torch::Tensor& qweight, const torch::Tensor& scales,
                            const std::optional<torch::Tensor>& zeros,
                            const std::optional<torch::Tensor>& codebook, int64_t bits, int64_t group_size,
                            int64_t in_features, int64_t k0, int64_t k1, torch::ScalarType dtype) {
  TORCH_CHECK_VALUE(dtype == torch::kFloat || dtype == torch::kDouble, "dtype must be float32 or float64");
  TORCH_CHECK_VALUE(0 <= k0 && k0 <= k1 && k1 <= in_features, "row range [", k0, ", ", k1,
                    ") must lie in [0, in_features=", in_features, "]");
  torch::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(dtype, "dequantize_kn", [&] {
    auto w = make_weight<scalar_t>(qweight, scales, zeros, codebook, bits, group_size, in_features);
    out = torch::empty({k1 - k0, w.view.N}, qweight.options().dtype(dtype));
    dequant_rows<scalar_t>(w.view, k0, k1, out.data_ptr<scalar_t>());
  });
  return out;
}

void qmm_(torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
          const std::optional<torch::Tensor>& zeros, const std::optional<torch::Tensor>& codebook, int64_t bits,
          int64_t group_size, int64_t block_k) {
  check_float_2d(x, "x");
  check_float_2d(y, "y");
  TORCH_CHECK_VALUE(x.scalar_type() == y.scalar_type(), "x and y must have the same dtype");
  TORCH_CHECK_VALUE(y.is_contiguous(), "y must be contiguous");
  TORCH_CHECK_VALUE(block_k >= 0, "block_k must be >= 0; got ", block_k);
  const int64_t M = x.size(0), K = x.size(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "qmm_", [&] {
    auto w = make_weight<scalar_t>(qweight, scales, zeros, codebook, bits, group_size, K);
    TORCH_CHECK_VALUE(y.size(0) == M && y.size(1) == w.view.N, "y must have shape [", M, ", ", w.view.N,
                      "]; got ", y.sizes());
    if (M == 0) return;
    if (block_k == 0) {
      auto xt = x.t().contiguous();
      fused_mm<scalar_t>(w.view, xt.data_ptr<scalar_t>(), M, y.data_ptr<scalar_t>(), y.stride(0));
      return;
    }
    const int64_t bk = std::min(block_k, K);
    auto buf = torch::empty({bk, w.view.N}, x.options());
    for (int64_t k0 = 0; k0 < K; k0 += bk) {
      const int64_t kb = std::min(bk, K - k0);
      auto wb = buf.narrow(0, 0, kb);
      dequant_rows<scalar_t>(w.view, k0, k0 + kb, wb.data_ptr<scalar_t>());
      y.addmm_(x.narrow(1, k0, kb), wb);
    }
  });
}

void qmm_t_(torch::Tensor& dx, const torch::Tensor& dy, const torch::Tensor& qweight, const torch::Tensor& scales,
            const std::optional<torch::Tensor>& zeros, const std::optional<torch::Tensor>& codebook, int64_t bits,
            int64_t group_size, int64_t block_k) {
  check_float_2d(dy, "dy");
  check_float_2d(dx, "dx");
  TORCH_CHECK_VALUE(dx.scalar_type() == dy.scalar_type(), "dx and dy must have the same dtype");
  TORCH_CHECK_VALUE(dx.is_contiguous(), "dx must be contiguous");
  TORCH_CHECK_VALUE(block_k >= 0, "block_k must be >= 0; got ", block_k);
  const int64_t M = dy.size(0), K = dx.size(1);
  TORCH_CHECK_VALUE(dx.size(0) == M, "dx must have ", M, " rows; got ", dx.size(0));
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "qmm_t_", [&] {
    auto w = make_weight<scalar_t>(qweight, scales, zeros, codebook, bits, group_size, K);
    TORCH_CHECK_VALUE(dy.size(1) == w.view.N, "dy must have ", w.view.N, " columns; got ", dy.size(1));
    if (M == 0) return;
    if (block_k == 0) {
      auto dyc = dy.contiguous();
      fused_mm_t<scalar_t>(w.view, dyc.data_ptr<scalar_t>(), M, dx.data_ptr<scalar_t>(), dx.stride(0));
      return;
    }
    const int64_t bk = std::min(block_k, K);
    auto buf = torch::empty({bk, w.view.N}, dy.options());
    for (int64_t k0 = 0; k0 < K; k0 += bk) {
      const int64_t kb = std::min(bk, K - k0);
      auto wb = buf.narrow(0, 0, kb);
      dequant_rows<scalar_t>(w.view, k0, k0 + kb, wb.data_ptr<scalar_t>());
      dx.narrow(1, k0, kb).addmm_(dy, wb.t());
    }
  });
}

std::string kernel_isa() { return g_use_avx2 ? "avx2" : "baseline"; }

// Selects the kernel variant ("avx2" or "baseline"); returns the previous one. For tests and
// benchmarks: the default is the best the CPU supports.
std::string set_kernel_isa(const std::string& isa) {
  TORCH_CHECK_VALUE(isa == "avx2" || isa == "baseline", "isa must be 'avx2' or 'baseline'; got '", isa, "'");
  TORCH_CHECK_VALUE(isa == "baseline" || cpu_has_avx2(), "this CPU (or build) has no AVX2/FMA kernels");
  std::string prev = kernel_isa();
  g_use_avx2 = (isa == "avx2");
  return prev;
}

}  // namespace cloq
