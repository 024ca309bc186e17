// Python bindings of cloq_engine._C.
#include "cloq.h"

namespace cloq {
std::string set_kernel_isa(const std::string& isa);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cloq_engine CPU ops: bit packing, dequantization, dequant-matmul (see cpp_backend.py)";
  namespace py = pybind11;
  m.def("pack_codes", &cloq::pack_codes, "codes [K, N] int -> int32 words (formats.pack_codes)",
        py::arg("codes"), py::arg("bits"));
  m.def("unpack_codes", &cloq::unpack_codes, "int32 words -> int64 codes [K, N] (formats.unpack_codes)",
        py::arg("qweight"), py::arg("bits"), py::arg("in_features"));
  m.def("dequantize_kn", &cloq::dequantize_kn, "rows [k0, k1) of W^T as a [k1 - k0, N] tensor",
        py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("codebook"), py::arg("bits"),
        py::arg("group_size"), py::arg("in_features"), py::arg("k0"), py::arg("k1"), py::arg("dtype"));
  m.def("qmm_", &cloq::qmm_, "y += x @ W^T (block_k=0: fused kernel, else K-blocked addmm)", py::arg("y"),
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("codebook"), py::arg("bits"),
        py::arg("group_size"), py::arg("block_k"));
  m.def("qmm_t_", &cloq::qmm_t_, "dx += dy @ W (block_k=0: fused kernel, else K-blocked addmm)", py::arg("dx"),
        py::arg("dy"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("codebook"), py::arg("bits"),
        py::arg("group_size"), py::arg("block_k"));
  m.def("kernel_isa", &cloq::kernel_isa, "the instruction set the kernels run with");
  m.def("set_kernel_isa", &cloq::set_kernel_isa, "select 'avx2' or 'baseline' kernels; returns the previous",
        py::arg("isa"));
}
