// The asymmetric loss operators' schemas; their kernels are in cpu/ and cuda/, their element math in
// asl_math.h. A fragment of the package's operator namespace, which the Triton head's operators share.
//
// asymmetric_loss_forward computes, in one pass over the logits, the loss (reduced, or per element) and,
// when need_grad, d loss / d z for every element (z the logit, or P+ - P- in the two-way form), already
// scaled for the reduction. asymmetric_loss_backward multiplies that by the incoming gradient and lays it
// out like the logits (the two-way form's gradient to P- is minus that to P+).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dualcoop_kernels, m) {
  m.def(
      "asymmetric_loss_forward(Tensor logits, Tensor targets, Tensor? mask, float gamma_neg, float gamma_pos, "
      "float clip, float eps, bool focal_grad, int reduction, bool need_grad) -> (Tensor, Tensor)");
  m.def("asymmetric_loss_backward(Tensor grad_loss, Tensor grad, bool two_way, ScalarType dtype) -> Tensor");
}
