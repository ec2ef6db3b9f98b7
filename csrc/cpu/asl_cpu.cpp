// CPU kernels of the asymmetric loss operators (schemas in ../asl.cpp): at::parallel_for over rows, an
// inner loop over classes that the compiler vectorises: build with -O3 -ffast-math -fopenmp, and -lmvec
// for glibc's vector exp and log (asl_element keeps NaN logits NaN under -ffast-math).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../asl_host.h"

namespace dualcoop_asl {
namespace {

constexpr int64_t kGrainElements = 32768;  // elements per parallel task, at least

// One range of rows; returns the sum of their (masked) losses.
template <typename scalar_t, bool TWO_WAY, bool HAS_MASK, bool STORE_LOSS, bool WANT_GRAD>
double forward_rows(const AslInputs& in, const AslOptions<at::opmath_type<scalar_t>> o, double grad_scale,
                    scalar_t* loss_out, at::opmath_type<scalar_t>* grad_out, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t cols = in.cols;
  const acc_t scale = acc_t(grad_scale);
  double total = 0;
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* pos = in.pos.data_ptr<scalar_t>() + row * in.pos.stride(0);
    const scalar_t* neg = TWO_WAY ? in.neg.data_ptr<scalar_t>() + row * in.neg.stride(0) : nullptr;
    const scalar_t* target = in.targets.data_ptr<scalar_t>() + row * in.targets.stride(0);
    // read as bytes: a bool has no vector type, and the loop would not vectorise
    const uint8_t* known =
        HAS_MASK ? reinterpret_cast<const uint8_t*>(in.mask.data_ptr<bool>()) + row * in.mask.stride(0) : nullptr;
    scalar_t* loss_row = STORE_LOSS ? loss_out + row * cols : nullptr;
    acc_t* grad_row = WANT_GRAD ? grad_out + row * cols : nullptr;
    acc_t row_total = 0;
#pragma omp simd reduction(+ : row_total)
    for (int64_t c = 0; c < cols; ++c) {
      const acc_t z = TWO_WAY ? acc_t(pos[c]) - acc_t(neg[c]) : acc_t(pos[c]);
      const bool counts = HAS_MASK ? known[c] != 0 : true;
      const AslTerms<acc_t> t = asl_element<acc_t>(z, acc_t(target[c]) > acc_t(0.5), counts, o, scale);
      row_total += t.loss;
      if (STORE_LOSS) loss_row[c] = scalar_t(t.loss);
      if (WANT_GRAD) grad_row[c] = t.grad;
    }
    total += row_total;
  }
  return total;
}

std::tuple<at::Tensor, at::Tensor> asl_forward_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                                   const c10::optional<at::Tensor>& mask, double gamma_neg,
                                                   double gamma_pos, double clip, double eps, bool focal_grad,
                                                   int64_t reduction, bool need_grad) {
  const AslInputs in = prepare(logits, targets, mask);
  ForwardBuffers buffers = forward_buffers(in, logits, reduction, need_grad);
  at::Tensor loss = buffers.loss, grad = buffers.grad;
  const bool store_loss = reduction == kNone;
  const double scale = gradient_scale(in, reduction);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, in.cols));
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "asl_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto o = options<acc_t>(gamma_neg, gamma_pos, clip, eps, focal_grad);
    scalar_t* loss_out = store_loss ? loss.data_ptr<scalar_t>() : nullptr;
    acc_t* grad_out = need_grad ? grad.data_ptr<acc_t>() : nullptr;
    with_flag(in.neg.defined(), [&](auto two_way) {
      with_flag(in.mask.defined(), [&](auto has_mask) {
        with_flag(store_loss, [&](auto stores) {
          with_flag(need_grad, [&](auto wants_grad) {
            total = at::parallel_reduce(
                0, in.rows, grain, 0.0,
                [&](int64_t begin, int64_t end, double partial) {
                  return partial + forward_rows<scalar_t, decltype(two_way)::value, decltype(has_mask)::value,
                                                              decltype(stores)::value, decltype(wants_grad)::value>(
                                       in, o, scale, loss_out, grad_out, begin, end);
                },
                std::plus<double>());
          });
        });
      });
    });
  });
  if (!store_loss) loss = at::scalar_tensor(total * scale, logits.options());
  return {loss, grad};
}

// Rows [begin, end) of the backward: out = grad * incoming (a scalar, or per element), laid out like
// the logits. (A pragma cannot sit inside the dispatch macro, hence a function of its own.)
template <typename scalar_t>
void backward_rows(const at::opmath_type<scalar_t>* grad, const at::opmath_type<scalar_t>* per_element,
                   at::opmath_type<scalar_t> scalar, int64_t cols, bool two_way, scalar_t* out, int64_t begin,
                   int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t row = begin; row < end; ++row) {
    const acc_t* g_row = grad + row * cols;
    const acc_t* in_row = per_element != nullptr ? per_element + row * cols : nullptr;
    scalar_t* pos_row = two_way ? out + (row * 2 + 1) * cols : out + row * cols;
    scalar_t* neg_row = two_way ? out + row * 2 * cols : nullptr;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      const acc_t value = g_row[c] * (in_row != nullptr ? in_row[c] : scalar);
      pos_row[c] = scalar_t(value);
      if (two_way) neg_row[c] = scalar_t(-value);
    }
  }
}

at::Tensor asl_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& grad, bool two_way,
                            at::ScalarType dtype) {
  const int64_t rows = grad.size(0), cols = grad.size(1);
  const bool elementwise = grad_loss.dim() == 2;
  const at::Tensor incoming = grad_loss.to(grad.scalar_type()).contiguous();
  at::Tensor out = backward_output(grad, two_way, dtype);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, cols));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "asl_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* per_element = elementwise ? incoming.data_ptr<acc_t>() : nullptr;
    const acc_t scalar = elementwise ? acc_t(0) : incoming.item<acc_t>();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      backward_rows<scalar_t>(grad.data_ptr<acc_t>(), per_element, scalar, cols, two_way, out.data_ptr<scalar_t>(),
                              begin, end);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dualcoop_kernels, CPU, m) {
  m.impl("asymmetric_loss_forward", &asl_forward_cpu);
  m.impl("asymmetric_loss_backward", &asl_backward_cpu);
}

}  // namespace dualcoop_asl
