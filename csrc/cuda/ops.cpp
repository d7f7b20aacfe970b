// Registers the CUDA kernels as torch custom ops binsparse::cuda_* (CUDA dispatch key), and makes
// the shared library importable as a Python module (binsparse_kernels._C_cuda).
//
// Schemas mirror the functions of binsparse_kernels/backends/reference.py; a gradient that was not
// asked for comes back as an empty tensor (custom ops cannot return None).
#include <Python.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace binsparse_cuda {

using at::Tensor;

std::tuple<Tensor, Tensor> encode_forward(const Tensor& x, const Tensor& W_enc, const Tensor& b_enc,
                                          const std::optional<Tensor>& threshold, int64_t k, bool binary);
std::tuple<Tensor, Tensor, Tensor> encode_backward(const Tensor& grad_acts, const Tensor& grad_values,
                                                   const Tensor& values, const Tensor& x, const Tensor& W_enc,
                                                   const Tensor& indices, int64_t mode, double temperature,
                                                   bool need_x, bool need_W, bool need_b);
Tensor decode_forward(const Tensor& indices, const Tensor& acts, const Tensor& W_dec, const std::optional<Tensor>& b_dec,
                      bool binary);
std::tuple<Tensor, Tensor> decode_backward(const Tensor& grad_y, const Tensor& indices, const Tensor& acts,
                                           const Tensor& W_dec, bool binary, bool need_acts, bool need_W);
std::tuple<Tensor, Tensor, Tensor, Tensor> coder_backward(
    const Tensor& grad_y, const Tensor& grad_acts, const Tensor& grad_values, const Tensor& indices,
    const Tensor& acts, const Tensor& values, const Tensor& x, const Tensor& W_enc, const Tensor& W_dec, bool binary,
    int64_t mode, double temperature, bool need_x, bool need_W_enc, bool need_b_enc, bool need_W_dec);
void set_deferred_checks(bool deferred);

}  // namespace binsparse_cuda

TORCH_LIBRARY_FRAGMENT(binsparse, m) {
  m.def("cuda_encode_forward(Tensor x, Tensor W_enc, Tensor b_enc, Tensor? threshold, int k, bool binary)"
        " -> (Tensor, Tensor)");
  m.def("cuda_encode_backward(Tensor grad_acts, Tensor grad_values, Tensor values, Tensor x, Tensor W_enc,"
        " Tensor indices, int mode, float temperature, bool need_x, bool need_W, bool need_b)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("cuda_decode_forward(Tensor indices, Tensor acts, Tensor W_dec, Tensor? b_dec, bool binary) -> Tensor");
  m.def("cuda_decode_backward(Tensor grad_y, Tensor indices, Tensor acts, Tensor W_dec, bool binary,"
        " bool need_acts, bool need_W) -> (Tensor, Tensor)");
  m.def("cuda_coder_backward(Tensor grad_y, Tensor grad_acts, Tensor grad_values, Tensor indices, Tensor acts,"
        " Tensor values, Tensor x, Tensor W_enc, Tensor W_dec, bool binary, int mode, float temperature,"
        " bool need_x, bool need_W_enc, bool need_b_enc, bool need_W_dec) -> (Tensor, Tensor, Tensor, Tensor)");
  // No tensor arguments, so no dispatch key: one kernel for every call (see backends/cuda.py).
  m.def("cuda_set_deferred_checks(bool deferred) -> ()", &binsparse_cuda::set_deferred_checks);
}

TORCH_LIBRARY_IMPL(binsparse, CUDA, m) {
  m.impl("cuda_encode_forward", &binsparse_cuda::encode_forward);
  m.impl("cuda_encode_backward", &binsparse_cuda::encode_backward);
  m.impl("cuda_decode_forward", &binsparse_cuda::decode_forward);
  m.impl("cuda_decode_backward", &binsparse_cuda::decode_backward);
  m.impl("cuda_coder_backward", &binsparse_cuda::coder_backward);
}

// An empty Python module: importing it loads the library, which runs the registrations above.
#define BSK_CONCAT_(a, b) a##b
#define BSK_CONCAT(a, b) BSK_CONCAT_(a, b)
#define BSK_STR_(a) #a
#define BSK_STR(a) BSK_STR_(a)
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C_cuda
#endif

PyMODINIT_FUNC BSK_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, BSK_STR(TORCH_EXTENSION_NAME),
                                   "binsparse CUDA kernels (torch.ops.binsparse.cuda_*)", -1, nullptr};
  return PyModule_Create(&def);
}
