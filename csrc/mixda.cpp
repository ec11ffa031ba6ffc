// Every operator schema of the `mixda_fast` namespace, in one TORCH_LIBRARY block
// (DESIGN.md section 4). Kernels live in csrc/cpu/<family>.cpp and csrc/cuda/<family>.cu and
// register themselves with TORCH_LIBRARY_IMPL; fake (meta) impls and autograd formulas are
// registered from Python in mixda_fast/ops.py.
//
// The argument checks shared by every backend of an op also live here, next to the schema they
// enforce, so the CPU and CUDA kernels reject bad input with the same words.
//
// Built two ways: as the Python module `mixda_fast._C` by setup.py (BuildExtension defines
// TORCH_EXTENSION_NAME, and we add the tiny PyInit__C below so `import mixda_fast._C` loads the
// library and runs the static registrations), and as a plain shared library by CMakeLists.txt
// (no Python at all; load it with torch.ops.load_library).

#ifdef TORCH_EXTENSION_NAME
#include <Python.h>  // first, as Python asks
#endif

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#ifdef TORCH_EXTENSION_NAME
extern "C" {
// An empty module: importing it only loads this shared library, whose static initializers
// (TORCH_LIBRARY, TORCH_LIBRARY_IMPL) register the ops. No pybind11, so the module can use
// Python's limited API (see setup.py).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "mixda_fast compiled ops; use them through mixda_fast.ops",
      -1,  // no per-interpreter state
      nullptr,  // no methods: the ops are reached through torch.ops.mixda_fast
  };
  return PyModule_Create(&module_def);
}
}
#endif

namespace mixda_fast {

namespace {

bool is_supported_float(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kDouble || t == c10::kBFloat16 || t == c10::kHalf;
}

}  // namespace

// softmax_combine(logits (R, E), experts (E, R, S, D)) -> (R, S, D)
void check_softmax_combine_args(const char* op, const at::Tensor& logits,
                                const at::Tensor& experts) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must have shape (R, E), got a ", logits.dim(),
              "-d tensor of shape ", logits.sizes());
  TORCH_CHECK(logits.size(1) >= 1, op,
              ": logits must have shape (R, E) with at least one expert (E >= 1), got ",
              logits.sizes());
  TORCH_CHECK(experts.dim() == 4, op, ": experts must have shape (E, R, S, D), got a ",
              experts.dim(), "-d tensor of shape ", experts.sizes());
  TORCH_CHECK(experts.size(0) == logits.size(1) && experts.size(1) == logits.size(0), op,
              ": experts must have shape (E, R, S, D) with E = logits.size(1) = ", logits.size(1),
              " and R = logits.size(0) = ", logits.size(0), ", got ", experts.sizes());
  TORCH_CHECK(is_supported_float(experts.scalar_type()), op,
              ": experts must have dtype float32, float64, bfloat16 or float16, got ",
              experts.scalar_type());
  TORCH_CHECK(logits.scalar_type() == experts.scalar_type(), op,
              ": logits must have the same dtype as experts (", experts.scalar_type(), "), got ",
              logits.scalar_type());
  TORCH_CHECK(logits.device() == experts.device(), op,
              ": logits must be on the same device as experts (", experts.device(), "), got ",
              logits.device());
}

// softmax_combine_backward(grad_out (R, S, D), logits (R, E), experts (E, R, S, D))
void check_softmax_combine_backward_args(const at::Tensor& grad_out, const at::Tensor& logits,
                                         const at::Tensor& experts) {
  constexpr const char* op = "softmax_combine_backward";
  check_softmax_combine_args(op, logits, experts);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == experts.size(1) &&
                  grad_out.size(1) == experts.size(2) && grad_out.size(2) == experts.size(3),
              op, ": grad_out must have shape (R, S, D) = ", experts.sizes().slice(1),
              " (experts.shape[1:]), got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == experts.scalar_type(), op,
              ": grad_out must have the same dtype as experts (", experts.scalar_type(), "), got ",
              grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == experts.device(), op,
              ": grad_out must be on the same device as experts (", experts.device(), "), got ",
              grad_out.device());
}

TORCH_LIBRARY(mixda_fast, m) {
  // out[r, s, :] = sum_e softmax(logits[r, :])[e] * experts[e, r, s, :]
  // Softmax and accumulation in float32 for 16-bit dtypes (float64 for float64).
  m.def("softmax_combine(Tensor logits, Tensor experts) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // w = softmax(logits); grad_experts[e, r, s, :] = w[r, e] * grad_out[r, s, :];
  // gw[r, e] = <grad_out[r], experts[e, r]>; grad_logits = w * (gw - sum_e w * gw).
  m.def(
      "softmax_combine_backward(Tensor grad_out, Tensor logits, Tensor experts) -> "
      "(Tensor grad_logits, Tensor grad_experts)",
      {at::Tag::pt2_compliant_tag});
}

}  // namespace mixda_fast
