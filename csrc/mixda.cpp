// Every operator schema of the `mixda_fast` namespace, in one TORCH_LIBRARY block
// (docs/design.md section 4). Kernels live in csrc/cpu/<family>.cpp and csrc/cuda/<family>.cu and
// register themselves with TORCH_LIBRARY_IMPL; fake (meta) impls and autograd formulas are
// registered from Python beside each op's wrapper, in mixda_fast/ops/{combine,ffn,gate}.py. The
// argument checks every backend of an op runs first are declared in csrc/checks.h (defined in
// csrc/checks.cpp).
//
// Built two ways: as the Python module `mixda_fast._C` by setup.py (BuildExtension defines
// TORCH_EXTENSION_NAME, and we add the tiny PyInit__C below so `import mixda_fast._C` loads the
// library and runs the static registrations), and as a plain shared library by CMakeLists.txt
// (no Python at all; load it with torch.ops.load_library).

#ifdef TORCH_EXTENSION_NAME
#include <Python.h>  // first, as Python asks
#endif

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
  // Step 0: the host FFN's first GEMM with its activation as the epilogue.
  // pre = x @ w1^T + b1 (N, F) -> h = act(pre); gated (w3 given): pre = [x w1^T + b1 | x w3^T + b3]
  // (N, 2F) and h = act(pre[:, :F]) * pre[:, F:]. act (csrc/activations.h): 0 identity, 1 gelu
  // (erf), 2 gelu (tanh), 3 gelu_new (transformers' NewGELUActivation formula), 4 silu, 5 relu.
  // Weights in x's dtype, or float32 for a 16-bit x (float32 compute). pre is returned for the
  // backward.
  m.def(
      "ffn_in(Tensor x, Tensor w1, Tensor? b1, Tensor? w3, Tensor? b3, int act) -> "
      "(Tensor h, Tensor pre)",
      {at::Tag::pt2_compliant_tag});
  // grad_pre = grad_h * act'(pre) (gated: [grad_h * u * act'(g) | grad_h * act(g)]).
  m.def("ffn_in_backward(Tensor grad_h, Tensor pre, int act) -> Tensor grad_pre",
        {at::Tag::pt2_compliant_tag});
  // Steps 1-4: p = [h w2^T + b2 | z wdown_k^T + bdown_k ...] (N, D + K r); g = softmax(logits)
  // (one row per S = N / R consecutive rows); s_k = g_k GELU(p_k);
  // y = (g_K if E = K + 1 else 1) * f + sum_k (s_k wup_k^T + g_k bup_k), f = p[:, :D].
  m.def(
      "mixda_out(Tensor h, Tensor z, Tensor w2, Tensor? b2, Tensor[] wdown, Tensor[] bdown, "
      "Tensor[] wup, Tensor[] bup, Tensor logits) -> (Tensor y, Tensor p)",
      {at::Tag::pt2_compliant_tag});
  // The non-GEMM part of mixda_out's backward, plus grad_y @ wup_k: grad_p = [dL/df | dL/dp_k],
  // grad_logits, s (N, K r) = the scaled adapter activations (for dL/dwup_k = grad_y^T s_k) and
  // grad_bup (K, D).
  m.def(
      "mixda_out_backward(Tensor grad_y, Tensor p, Tensor logits, Tensor[] wup, Tensor[] bup) -> "
      "(Tensor grad_p, Tensor grad_logits, Tensor s, Tensor grad_bup)",
      {at::Tag::pt2_compliant_tag});
  // The gate MLP (MixDAGate): a_0 = z; a_i = relu(a_{i-1} W_i^T + b_i) for
  // i < L; logits = a_{L-1} W_L^T + b_L. hidden = [a_1 .. a_{L-1}] for the backward. 16-bit z on
  // CPUs without native bf16 GEMMs: computed in float32 end to end, rounded once at the end.
  // With p > 0, dropout before every Linear (MixDAGate in training): masks from the counter-based
  // generator of csrc/philox.h keyed by seed, kept elements scaled by 1 / (1 - p); hidden then
  // holds the dropped activations (the inputs of Linear layers 2..L).
  m.def(
      "gate_mlp(Tensor z, Tensor[] weights, Tensor[] biases, float p=0., Tensor? seed=None) -> "
      "(Tensor logits, Tensor[] hidden)",
      {at::Tag::pt2_compliant_tag});
  // grad_z is empty (0,) when grad_z is False (its GEMM skipped).
  m.def(
      "gate_mlp_backward(Tensor grad_logits, Tensor z, Tensor[] weights, Tensor[] hidden, "
      "float p=0., Tensor? seed=None, bool grad_z=True) -> "
      "(Tensor grad_z, Tensor[] grad_weights, Tensor[] grad_biases)",
      {at::Tag::pt2_compliant_tag});
}

}  // namespace mixda_fast
