// CUDA kernels of the asymmetric loss operators declared in ../asl.cpp (load the CPU library, which holds it, first).
// One thread an element over a grid-stride loop; the sum for the reductions is taken per block and
// the block sums are added by at::sum afterwards, so the result does not depend on scheduling.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "../asl_host.h"

namespace dualcoop_asl {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t elements) {
  const int64_t wanted = (elements + kThreads - 1) / kThreads;
  const int64_t limit = 8 * int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  return static_cast<int>(std::max<int64_t>(1, std::min(wanted, limit)));
}

template <typename scalar_t>
struct Rows {  // a (B, C) view with unit column stride
  const scalar_t* data;
  int64_t row_stride;
  __device__ scalar_t at(int64_t row, int64_t col) const { return data[row * row_stride + col]; }
};

template <typename scalar_t>
Rows<scalar_t> rows_of(const at::Tensor& t) {
  return {t.defined() ? t.data_ptr<scalar_t>() : nullptr, t.defined() ? t.stride(0) : 0};
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(Rows<scalar_t> pos, Rows<scalar_t> neg, Rows<scalar_t> targets, Rows<bool> mask,
                               int64_t rows, int64_t cols, AslOptions<acc_t> o, acc_t grad_scale,
                               scalar_t* __restrict__ loss_out, acc_t* __restrict__ grad_out,
                               acc_t* __restrict__ block_sums) {
  __shared__ acc_t partial[kThreads];
  acc_t total = 0;
  const int64_t elements = rows * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < elements; i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t row = i / cols, col = i % cols;
    acc_t z = acc_t(pos.at(row, col));
    if (neg.data != nullptr) z -= acc_t(neg.at(row, col));
    const bool counts = mask.data == nullptr || mask.at(row, col);
    const AslTerms<acc_t> t = asl_element<acc_t>(z, acc_t(targets.at(row, col)) > acc_t(0.5), counts, o, grad_scale);
    total += t.loss;
    if (loss_out != nullptr) loss_out[i] = scalar_t(t.loss);
    if (grad_out != nullptr) grad_out[i] = t.grad;
  }
  partial[threadIdx.x] = total;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) block_sums[blockIdx.x] = partial[0];
}

template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(const acc_t* __restrict__ grad, const acc_t* __restrict__ per_element,
                                const acc_t* __restrict__ scalar, int64_t rows, int64_t cols, bool two_way,
                                scalar_t* __restrict__ out) {
  const int64_t elements = rows * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < elements; i += int64_t(blockDim.x) * gridDim.x) {
    const acc_t value = grad[i] * (per_element != nullptr ? per_element[i] : *scalar);
    if (two_way) {
      const int64_t row = i / cols, col = i % cols;
      out[(row * 2 + 1) * cols + col] = scalar_t(value);
      out[row * 2 * cols + col] = scalar_t(-value);
    } else {
      out[i] = scalar_t(value);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> asl_forward_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                                    const c10::optional<at::Tensor>& mask, double gamma_neg,
                                                    double gamma_pos, double clip, double eps, bool focal_grad,
                                                    int64_t reduction, bool need_grad) {
  const AslInputs in = prepare(logits, targets, mask);
  ForwardBuffers buffers = forward_buffers(in, logits, reduction, need_grad);
  at::Tensor loss = buffers.loss, grad = buffers.grad;
  const bool store_loss = reduction == kNone;
  const double scale = gradient_scale(in, reduction);
  const int blocks = blocks_for(in.rows * in.cols);
  at::Tensor block_sums = at::zeros({blocks}, grad.options());
  if (in.rows * in.cols > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "asl_forward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      forward_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          rows_of<scalar_t>(in.pos), rows_of<scalar_t>(in.neg), rows_of<scalar_t>(in.targets), rows_of<bool>(in.mask),
          in.rows, in.cols, options<acc_t>(gamma_neg, gamma_pos, clip, eps, focal_grad), acc_t(scale),
          store_loss ? loss.data_ptr<scalar_t>() : nullptr, need_grad ? grad.data_ptr<acc_t>() : nullptr,
          block_sums.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (!store_loss) loss = (block_sums.sum() * scale).to(logits.scalar_type());
  return {loss, grad};
}

at::Tensor asl_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& grad, bool two_way,
                             at::ScalarType dtype) {
  const int64_t rows = grad.size(0), cols = grad.size(1);
  const bool elementwise = grad_loss.dim() == 2;
  const at::Tensor incoming = grad_loss.to(grad.scalar_type()).contiguous();
  at::Tensor out = backward_output(grad, two_way, dtype);
  if (rows * cols == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "asl_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t, acc_t><<<blocks_for(rows * cols), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad.data_ptr<acc_t>(), elementwise ? incoming.data_ptr<acc_t>() : nullptr,
        elementwise ? nullptr : incoming.data_ptr<acc_t>(), rows, cols, two_way, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dualcoop_kernels, CUDA, m) {
  m.impl("asymmetric_loss_forward", &asl_forward_cuda);
  m.impl("asymmetric_loss_backward", &asl_backward_cuda);
}

}  // namespace dualcoop_asl
