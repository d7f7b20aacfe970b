// Registers the CPU kernels as torch custom ops binsparse::cpu_*, and makes the shared library a
// Python module so that `import binsparse_kernels._C` loads the registrations.
#include <torch/extension.h>
#include <torch/library.h>

#include "common.h"

TORCH_LIBRARY_FRAGMENT(binsparse, m) {
  // Their fake (meta) implementations, for torch.compile, live in this Python module.
  m.set_python_module("binsparse_kernels.backends.cpu");
  m.def("cpu_encode_forward(Tensor x, Tensor W_enc, Tensor b_enc, Tensor? threshold, int k, bool binary)"
        " -> (Tensor values, Tensor indices)");
  m.def("cpu_encode_backward(Tensor grad_acts, Tensor grad_values, Tensor values, Tensor x, Tensor W_enc,"
        " Tensor indices, int mode, float temperature, bool need_x, bool need_W, bool need_b)"
        " -> (Tensor grad_x, Tensor grad_W_enc, Tensor grad_b_enc)");
  m.def("cpu_decode_forward(Tensor indices, Tensor acts, Tensor W_dec, Tensor? b_dec, bool binary) -> Tensor");
  m.def("cpu_decode_backward(Tensor grad_y, Tensor indices, Tensor acts, Tensor W_dec, bool binary,"
        " bool need_acts, bool need_W) -> (Tensor grad_acts, Tensor grad_W_dec)");
  m.def("cpu_coder_backward(Tensor grad_y, Tensor grad_acts, Tensor grad_values, Tensor indices, Tensor acts,"
        " Tensor values, Tensor x, Tensor W_enc, Tensor W_dec, bool binary, int mode, float temperature,"
        " bool need_x, bool need_W_enc, bool need_b_enc, bool need_W_dec)"
        " -> (Tensor grad_x, Tensor grad_W_enc, Tensor grad_b_enc, Tensor grad_W_dec)");
}

TORCH_LIBRARY_IMPL(binsparse, CPU, m) {
  m.impl("cpu_encode_forward", &binsparse_cpu::encode_forward);
  m.impl("cpu_encode_backward", &binsparse_cpu::encode_backward);
  m.impl("cpu_decode_forward", &binsparse_cpu::decode_forward);
  m.impl("cpu_decode_backward", &binsparse_cpu::decode_backward);
  m.impl("cpu_coder_backward", &binsparse_cpu::coder_backward);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "binsparse-kernels CPU kernels; importing registers torch.ops.binsparse.cpu_*";
}
