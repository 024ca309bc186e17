// Registration of cloq_engine._C: the tensor ops as dispatcher ops (torch.ops.cloq_engine.*), so
// that torch.compile, FakeTensor and functionalization see them as ops rather than opaque Python
// calls; the ISA switch (no tensors) stays a plain pybind function.
//
// Their fake (shape) kernels live in Python, in cloq_engine/_ext.py (named below with
// set_python_module so torch can point at it). None of the ops is differentiated directly:
// QuantLoRAFunction (cloq_engine/nn.py) owns the forward/backward pair and calls them with grad
// mode off. Their Autograd kernel refuses a call that would need a derivative (an input that
// requires grad while grad mode is on): the in-place ops return nothing, so autograd could not
// even attach an error node to their output, and the gradient would silently go missing.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "cloq.h"

namespace cloq {
std::string set_kernel_isa(const std::string& isa);
}

namespace {
constexpr const char* kOps[] = {"pack_codes", "unpack_codes", "dequantize_kn", "qmm_", "qmm_t_"};

void refuse_grad_then_redispatch(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    const auto& args = op.schema().arguments();
    const auto inputs = torch::jit::last(*stack, args.size());
    for (size_t i = 0; i < args.size(); ++i) {
      const bool needs_grad = inputs[i].isTensor() && inputs[i].toTensor().requires_grad();  // None: not a tensor
      TORCH_CHECK(!needs_grad, op.schema().name(), " has no derivative, and its argument `", args[i].name(),
                  "` requires grad: call it under torch.no_grad() (QuantLoRAFunction in cloq_engine/nn.py "
                  "differentiates the quantized layer)");
    }
  }
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}
}  // namespace

TORCH_LIBRARY(cloq_engine, m) {
  m.set_python_module("cloq_engine._ext");
  // formats.pack_codes / unpack_codes: codes [K, N] (K-major) <-> int32 words [Kp * bits / 32, N].
  m.def("pack_codes(Tensor codes, int bits) -> Tensor");
  m.def("unpack_codes(Tensor qweight, int bits, int in_features) -> Tensor");
  // Rows [k0, k1) of W^T as a [k1 - k0, N] tensor in `dtype` (float32 or float64).
  m.def("dequantize_kn(Tensor qweight, Tensor scales, Tensor? zeros, Tensor? codebook, int bits, int group_size, "
        "int in_features, int k0, int k1, ScalarType dtype) -> Tensor");
  // y += x @ W^T and dx += dy @ W (block_k = 0: fused kernel, else K-blocked addmm).
  m.def("qmm_(Tensor(a!) y, Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? codebook, int bits, "
        "int group_size, int block_k) -> ()");
  m.def("qmm_t_(Tensor(a!) dx, Tensor dy, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? codebook, "
        "int bits, int group_size, int block_k) -> ()");
}

TORCH_LIBRARY_IMPL(cloq_engine, CPU, m) {
  m.impl("pack_codes", &cloq::pack_codes);
  m.impl("unpack_codes", &cloq::unpack_codes);
  m.impl("dequantize_kn", &cloq::dequantize_kn);
  m.impl("qmm_", &cloq::qmm_);
  m.impl("qmm_t_", &cloq::qmm_t_);
}

TORCH_LIBRARY_IMPL(cloq_engine, Autograd, m) {
  for (const char* op : kOps) m.impl(op, torch::CppFunction::makeFromBoxedFunction<&refuse_grad_then_redispatch>());
}

TORCH_LIBRARY_IMPL(cloq_engine, ADInplaceOrView, m) {
  for (const char* op : kOps) m.impl(op, torch::autograd::autogradNotImplementedInplaceOrViewFallback());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cloq_engine CPU kernels; the tensor ops are torch.ops.cloq_engine.* (see cloq_engine/_ext.py)";
  namespace py = pybind11;
  m.def("kernel_isa", &cloq::kernel_isa, "the instruction set the kernels run with");
  m.def("set_kernel_isa", &cloq::set_kernel_isa, "select 'avx2' or 'baseline' kernels; returns the previous",
        py::arg("isa"));
}
