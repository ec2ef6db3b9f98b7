// The asymmetric loss of one logit and its derivative, shared by the CPU and CUDA kernels.
// docs/math.md, "Asymmetric loss": p = sigmoid(z), q = min(1 - p + clip, 1), l = log(max(p or q, eps)),
// focusing weight (1 - p_t)^gamma; element loss -l * weight. Written without branches so that the CPU
// loop vectorises, and without cancellation: 1 - p comes from exp(-|z|), 1 - q as max(p - clip, 0).
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace dualcoop_asl {

// Floor of the base of the focusing weight before its log: keeps exp(gamma * log(base)) finite when
// the base is 0 (a saturated probability); the weight it gives, at most 1e-30^gamma, is nothing.
constexpr double kMinFocusBase = 1e-30;
// Floor of every exponent: exp(-80) = 1.8e-35 is a normal float, while arguments that underflow send
// vectorised exp down a slow path. What it changes is below 1e-34 of the result.
constexpr double kMinExponent = -80;

// Passed by value: the element loop must see the options as loop invariants (a load through a
// reference may alias the loop's stores), and as numbers (a bool has no vector type).
template <typename acc_t>
struct AslOptions {
  acc_t gamma_neg, gamma_pos, clip, eps;
  acc_t focal_grad;  // 1: gradient flows through the focusing weight; 0: it is held constant
};

template <typename acc_t>
struct AslTerms {
  acc_t loss;
  acc_t grad;  // d loss / d z
};

// Always inlined, and the focusing-weight flag applied by arithmetic, not a branch: a call or control
// flow in the element loop stops the compiler from vectorising it.
template <typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE AslTerms<acc_t> asl_terms(acc_t z, bool positive, AslOptions<acc_t> o) {
  using std::exp;
  using std::fabs;
  using std::fmax;
  using std::fmin;
  using std::log;
  const acc_t one = 1, zero = 0;
  const acc_t floor = acc_t(kMinExponent);
  const acc_t e = exp(fmax(-fabs(z), floor));
  const acc_t inv = one / (one + e);
  const acc_t p = z >= zero ? inv : e * inv;      // sigmoid(z)
  const acc_t p_neg = z >= zero ? e * inv : inv;  // 1 - p
  const acc_t dp = p * p_neg;                     // dp / dz
  const acc_t shifted = p_neg + o.clip;
  // the probability of the label, its derivative, and one minus it
  const acc_t prob = positive ? p : fmin(shifted, one);
  const acc_t dprob = positive ? dp : (shifted <= one ? -dp : zero);
  const acc_t miss = positive ? p_neg : fmax(p - o.clip, zero);
  const acc_t gamma = positive ? o.gamma_pos : o.gamma_neg;

  const acc_t log_prob = log(fmax(prob, o.eps));
  const acc_t dlog = prob >= o.eps ? dprob / prob : zero;  // clamp(min=eps) passes gradient at eps
  const acc_t base = fmax(miss, acc_t(kMinFocusBase));
  const acc_t focus = gamma == zero ? one : exp(fmax(gamma * log(base), floor));
  // d focus / dz = gamma * base^(gamma - 1) * (-dprob), and 0 at gamma = 0 as torch.pow gives
  const acc_t dfocus_dbase = gamma == zero ? zero : gamma * focus / base;
  return {-log_prob * focus, -dlog * focus + o.focal_grad * log_prob * dfocus_dbase * dprob};
}

// IEEE bit layout: a value is NaN or infinite exactly when its exponent bits are all ones.
template <typename acc_t>
struct IeeeBits;
template <>
struct IeeeBits<float> {
  using type = uint32_t;
  static constexpr type exponent = 0x7f800000u, quiet_nan = 0x7fc00000u;
};
template <>
struct IeeeBits<double> {
  using type = uint64_t;
  static constexpr type exponent = 0x7ff0000000000000ull, quiet_nan = 0x7ff8000000000000ull;
};

template <typename To, typename From>
C10_HOST_DEVICE C10_ALWAYS_INLINE To bits_as(From from) {
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

// What one element adds: its loss and its gradient (times grad_scale) where the label is known, 0
// where it is not, and NaN for both wherever the logit is NaN or infinite, known label or not: a
// diverging model must not train on with a finite loss. The test and the NaN are integer bit
// patterns because the CPU kernel is built with -ffast-math, whose finite-math assumption lets the
// compiler drop a floating-point NaN test (asl_terms alone turns NaN into a number).
template <typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE AslTerms<acc_t> asl_element(acc_t z, bool positive, bool known,
                                                              AslOptions<acc_t> o, acc_t grad_scale) {
  using Bits = IeeeBits<acc_t>;
  const AslTerms<acc_t> t = asl_terms<acc_t>(z, positive, o);
  const bool finite = (bits_as<typename Bits::type>(z) & Bits::exponent) != Bits::exponent;
  const acc_t nan = bits_as<acc_t>(Bits::quiet_nan);
  return {finite ? (known ? t.loss : acc_t(0)) : nan, finite ? (known ? grad_scale * t.grad : acc_t(0)) : nan};
}

// Reductions, as the Python side numbers them.
enum Reduction : int64_t { kNone = 0, kSum = 1, kMean = 2 };

}  // namespace dualcoop_asl
