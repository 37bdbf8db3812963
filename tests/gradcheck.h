// gradcheck.h — central-difference gradient checking for kernels, layers, blocks and models
// (after Caffe's GradientChecker): a relative threshold scaled by magnitude, and a "kink"
// margin that skips points where a ReLU/max-pool input sits within `kink` of a non-smooth point.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

#include "kernels/tensor.h"
#include "tests/expect_error.h"

namespace lancet::testing {

inline void fill_uniform(Tensor& t, uint32_t seed, float lo = -1.f, float hi = 1.f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = u(rng);
}

inline Tensor random_tensor(const Shape& shape, uint32_t seed, float lo = -1.f, float hi = 1.f) {
  Tensor t = Tensor::empty(shape);
  fill_uniform(t, seed, lo, hi);
  return t;
}

// A scalar objective of the current state: loss = f(). `analytic` holds d loss / d var,
// computed by the code under test. For each of up to `max_checks` elements of `var`
// (evenly spread), compares analytic with (f(var+h) - f(var-h)) / 2h, computed in float but
// with loss accumulated in double by the caller where possible.
//   |a - n| <= tol * max(1, |a|, |n|)
// Returns the number of elements skipped as kinks (when the two one-sided differences
// disagree by more than `kink` relative, the point is at a non-smooth place).
inline int check_gradient(const std::string& what, Tensor& var, const Tensor& analytic,
                          const std::function<double()>& f, double h = 1e-2, double tol = 1e-2,
                          int max_checks = 64, double kink = 0.1) {
  EXPECT_EQ(var.shape(), analytic.shape()) << what;
  float* v = var.data<float>();
  const float* a = analytic.data<float>();
  const int64_t n = var.numel();
  const int64_t stride = std::max<int64_t>(1, n / max_checks);
  int skipped = 0;
  const double f0 = f();
  for (int64_t i = 0; i < n; i += stride) {
    const float orig = v[i];
    v[i] = static_cast<float>(orig + h);
    const double fp = f();
    v[i] = static_cast<float>(orig - h);
    const double fm = f();
    v[i] = orig;
    const double num = (fp - fm) / (2 * h);
    const double fwd = (fp - f0) / h, bwd = (f0 - fm) / h;
    if (std::fabs(fwd - bwd) > kink * std::max({1.0, std::fabs(fwd), std::fabs(bwd)})) {
      ++skipped;  // a kink lies within h of this point
      continue;
    }
    const double an = a[i];
    const double scale = std::max({1.0, std::fabs(an), std::fabs(num)});
    EXPECT_LE(std::fabs(an - num), tol * scale)
        << what << "[" << i << "]: analytic " << an << " vs numeric " << num;
  }
  EXPECT_LT(skipped, std::max<int64_t>(2, n / stride / 4)) << what << ": too many kink points skipped";
  return skipped;
}

// A tensor of closed-form values sin(a*i + b) * scale + offset (computed in double, stored as
// f32), so that expected values can be reproduced in PyTorch with the same formula.
inline Tensor sin_tensor(const Shape& shape, double a, double b, double scale = 1.0, double offset = 0.0) {
  Tensor t = Tensor::empty(shape);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = static_cast<float>(std::sin(a * i + b) * scale + offset);
  return t;
}


// Expects every element of `t` to be within tol * max(1, |expected|) of `expected`.
inline void expect_near_all(const Tensor& t, const std::vector<float>& expected, double tol, const std::string& what) {
  ASSERT_EQ(t.numel(), static_cast<int64_t>(expected.size())) << what;
  const std::vector<float> v = t.to_vector();
  for (size_t i = 0; i < v.size(); ++i)
    EXPECT_NEAR(v[i], expected[i], tol * std::max(1.0, std::fabs(double(expected[i])))) << what << "[" << i << "]";
}

// A fixed random projection r so that loss = sum(y * r) has a non-trivial gradient dy = r.
inline double dot(const Tensor& y, const Tensor& r) {
  const float* a = y.data<float>();
  const float* b = r.data<float>();
  double s = 0;
  for (int64_t i = 0; i < y.numel(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

}  // namespace lancet::testing
