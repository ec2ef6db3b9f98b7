// Host-side preparation shared by the CPU and CUDA implementations of the asymmetric loss operators.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Optional.h>

#include <type_traits>

#include "asl_math.h"

namespace dualcoop_asl {

// The loss's inputs as (B, C) views with unit column stride (copied only when they are not).
struct AslInputs {
  at::Tensor pos;      // the logits, or P+ of the two-way form
  at::Tensor neg;      // P- of the two-way form; undefined for the sigmoid form
  at::Tensor targets;  // in the dtype of the logits
  at::Tensor mask;     // bool; undefined when every label is known
  int64_t rows = 0, cols = 0;
};

inline at::Tensor unit_column_stride(const at::Tensor& t) {
  return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous();
}

inline AslInputs prepare(const at::Tensor& logits, const at::Tensor& targets, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(logits.dim() == 2 || (logits.dim() == 3 && logits.size(1) == 2),
              "logits must be B x C or B x 2 x C, got ", logits.sizes());
  AslInputs in;
  const bool two_way = logits.dim() == 3;
  in.pos = unit_column_stride(two_way ? logits.select(1, 1) : logits);
  if (two_way) in.neg = unit_column_stride(logits.select(1, 0));
  in.rows = in.pos.size(0);
  in.cols = in.pos.size(1);
  TORCH_CHECK(targets.sizes() == in.pos.sizes() && targets.scalar_type() == logits.scalar_type(),
              "targets must be B x C in the dtype of logits");
  in.targets = unit_column_stride(targets);
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->sizes() == in.pos.sizes() && mask->scalar_type() == at::kBool, "mask must be B x C bool");
    in.mask = unit_column_stride(*mask);
  }
  return in;
}

// What each element's gradient is scaled by: 1 / (number of known labels) for the mean, else 1.
inline double gradient_scale(const AslInputs& in, int64_t reduction) {
  if (reduction != kMean) return 1.0;
  const int64_t known = in.mask.defined() ? in.mask.sum().item<int64_t>() : in.rows * in.cols;
  return 1.0 / static_cast<double>(known > 0 ? known : 1);
}

// asl_forward's outputs: the per-element losses (reduction none; else empty, the sum is returned as a
// 0-d tensor) and d loss / d z in the compute dtype (empty unless need_grad).
struct ForwardBuffers {
  at::Tensor loss, grad;
};

inline ForwardBuffers forward_buffers(const AslInputs& in, const at::Tensor& logits, int64_t reduction,
                                      bool need_grad) {
  const bool store_loss = reduction == kNone;
  const auto acc_dtype = at::toOpMathType(logits.scalar_type());
  return {at::empty({store_loss ? in.rows : 0, store_loss ? in.cols : 0}, logits.options()),
          at::empty({need_grad ? in.rows : 0, need_grad ? in.cols : 0}, logits.options().dtype(acc_dtype))};
}

// asl_backward's output: laid out like the logits, B x C or B x 2 x C.
inline at::Tensor backward_output(const at::Tensor& grad, bool two_way, at::ScalarType dtype) {
  const int64_t rows = grad.size(0), cols = grad.size(1);
  return at::empty(two_way ? at::IntArrayRef{rows, 2, cols} : at::IntArrayRef{rows, cols}, grad.options().dtype(dtype));
}

template <typename acc_t>
AslOptions<acc_t> options(double gamma_neg, double gamma_pos, double clip, double eps, bool focal_grad) {
  return {acc_t(gamma_neg), acc_t(gamma_pos), acc_t(clip), acc_t(eps), acc_t(focal_grad ? 1 : 0)};
}

// Calls f(std::true_type{}) or f(std::false_type{}): a runtime flag as a compile-time one.
template <typename F>
decltype(auto) with_flag(bool flag, F&& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

}  // namespace dualcoop_asl
