// The exposure_slot operator library: every op's schema, in one place.
//
// Kernels register against these schemas per device in csrc/<device>/*.cpp
// (TORCH_LIBRARY_IMPL). The Python side of each op -- its fake (meta) kernel for
// torch.compile and its autograd formula -- lives in exposure_slot/ops/<op>.py;
// set_python_module tells torch which module that is, so torch can point a user
// at it (or import it) when an op is traced before the module was imported.

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(exposure_slot, m) {
  // out[b,n,c] = (base[b,n,c] or 1) * sum_i masks[b,i,n] * table[tb,i,c],
  // masks [B,K,N], table [B or 1,K,C], base [B,N,C] -> out [B,N,C].
  m.set_python_module("exposure_slot.ops.mask_fusion");
  m.def(
      "mask_fusion(Tensor masks, Tensor table, Tensor? base=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Gradients of mask_fusion for an output gradient `grad` [B,N,C]. grad_base
  // is None exactly when base is None.
  m.def(
      "mask_fusion_backward(Tensor grad, Tensor masks, Tensor table, Tensor? base)"
      " -> (Tensor grad_masks, Tensor grad_table, Tensor? grad_base)",
      {at::Tag::pt2_compliant_tag});
}

// `import exposure_slot._C` only has to run the static registrations above (and
// those of the kernel files linked into the same library); the module itself
// exposes nothing. Import torch first: the extension links against libtorch.
static PyModuleDef exposure_slot_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Registers the torch.ops.exposure_slot operators and their C++ kernels.",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&exposure_slot_module); }
