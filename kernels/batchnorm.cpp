// batchnorm.cpp — CPU BatchNorm2d. Parallel over channels; every channel's statistics are
// reduced by one task in a fixed order (two passes, in double), so results do not depend on
// the thread count. Either memory format: a channel's elements are visited image by image,
// each (n, c) plane in h * W + w order (cpu::Planes: contiguous in nchw, stride C in
// channels_last), so both formats give the same sums and bit-identical results.
#include "kernels/batchnorm.h"

#include <cmath>

#include "kernels/cpu_util.h"
#include "kernels/cuda_twin.h"
#ifdef LANCET_WITH_CUDA
#include "kernels/cuda/batchnorm.h"
#endif

namespace lancet {
namespace {

using Dims = cpu::Planes;

void require_channel_vec(const char* op, const char* name, const Tensor& t, int64_t C, const Tensor& x) {
  cpu::require_shape(op, name, t, {C}, cpu::desc("the channels of input", x));
  cpu::require_dtype(op, name, t, DType::f32);
}

// Checks the common arguments; gamma and beta may be undefined (affine = false: 1 and 0).
Dims check_common(const char* op, const Tensor& x, const Tensor& gamma, const Tensor& beta, const Tensor& y,
                  const Stream& s) {
  cpu::require_cpu_any_format(op, s, x, {&gamma, &beta, &y});
  cpu::require_dtype(op, "input", x, DType::f32);
  LANCET_CHECK(x.ndim() == 4, op << ": input must be 4-D [N, C, H, W], got " << x.shape_str());
  const Dims d = cpu::planes_of(x);
  if (gamma.defined()) require_channel_vec(op, "gamma", gamma, d.C, x);
  if (beta.defined()) require_channel_vec(op, "beta", beta, d.C, x);
  if (y.defined()) cpu::require_like(op, "output", y, x, "input");
  return d;
}

// y = (x - mean) * invstd * gamma + beta for one channel.
void normalize_channel(const Dims& d, int64_t c, const float* x, float mean, float invstd, float gamma, float beta,
                       float* y) {
  const float scale = invstd * gamma, shift = beta - mean * scale;
  const int64_t st = d.step;
  for (int64_t n = 0; n < d.N; ++n) {
    const float* xp = x + d.offset(n, c);
    float* yp = y + d.offset(n, c);
    for (int64_t i = 0; i < d.HW; ++i) yp[i * st] = xp[i * st] * scale + shift;
  }
}

// Channel c's sum of dy and of dy * (x - mu), accumulated in double (the backward's two sums).
inline void dy_channel_sums(const float* xp, const float* dyp, const Dims& d, int64_t c, double mu, double& sum_dy,
                            double& sum_dy_xmu) {
  sum_dy = 0;
  sum_dy_xmu = 0;
  const int64_t st = d.step;
  for (int64_t n = 0; n < d.N; ++n) {
    const float* xq = xp + d.offset(n, c);
    const float* dq = dyp + d.offset(n, c);
    for (int64_t i = 0; i < d.HW; ++i) {
      sum_dy += dq[i * st];
      sum_dy_xmu += dq[i * st] * (xq[i * st] - mu);
    }
  }
}

// Channels per task: enough elements to amortise a parallel region.
int64_t channel_grain(const Dims& d) {
  return std::max<int64_t>(1, cpu::kElementwiseGrain / std::max<int64_t>(1, d.N * d.HW));
}

}  // namespace

void batchnorm2d_forward_train(const BatchNormParams& p, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                               Tensor& running_mean, Tensor& running_var, bool update_running, Tensor& y,
                               Tensor& saved_mean, Tensor& saved_invstd, const Stream& s) {
  LANCET_CUDA_TWIN(x, batchnorm2d_forward_train(p, x, gamma, beta, running_mean, running_var, update_running, y,
                                                saved_mean, saved_invstd, s));
  const char* op = "batchnorm2d_forward_train";
  const Dims d = check_common(op, x, gamma, beta, y, s);
  cpu::require_cpu_any_format(op, s, x, {&running_mean, &running_var, &saved_mean, &saved_invstd});
  cpu::require_defined(op, "output", y);
  require_channel_vec(op, "saved_mean", saved_mean, d.C, x);
  require_channel_vec(op, "saved_invstd", saved_invstd, d.C, x);
  if (update_running) {
    require_channel_vec(op, "running_mean", running_mean, d.C, x);
    require_channel_vec(op, "running_var", running_var, d.C, x);
  }
  const int64_t m = d.N * d.HW;
  LANCET_CHECK(m > 1, op << ": expected more than 1 value per channel when training, got input " << x.shape_str());
  const float* xp = x.data<float>();
  const float* gp = gamma.defined() ? gamma.data<float>() : nullptr;
  const float* bp = beta.defined() ? beta.data<float>() : nullptr;
  float* yp = y.data<float>();
  float* smean = saved_mean.data<float>();
  float* sinv = saved_invstd.data<float>();
  float* rm = update_running ? running_mean.data<float>() : nullptr;
  float* rv = update_running ? running_var.data<float>() : nullptr;
  const int64_t st = d.step;
  parallel_for(d.C, channel_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double sum = 0;
      for (int64_t n = 0; n < d.N; ++n) {
        const float* q = xp + d.offset(n, c);
        for (int64_t i = 0; i < d.HW; ++i) sum += q[i * st];
      }
      const double mean = sum / static_cast<double>(m);
      double ss = 0;
      for (int64_t n = 0; n < d.N; ++n) {
        const float* q = xp + d.offset(n, c);
        for (int64_t i = 0; i < d.HW; ++i) ss += (q[i * st] - mean) * (q[i * st] - mean);
      }
      const double var = ss / static_cast<double>(m);  // biased: normalises
      const double invstd = 1.0 / std::sqrt(var + p.eps);
      smean[c] = static_cast<float>(mean);
      sinv[c] = static_cast<float>(invstd);
      if (rm) {
        rm[c] = static_cast<float>((1.0 - p.momentum) * rm[c] + p.momentum * mean);
        rv[c] = static_cast<float>((1.0 - p.momentum) * rv[c] + p.momentum * ss / static_cast<double>(m - 1));
      }
      normalize_channel(d, c, xp, smean[c], sinv[c], gp ? gp[c] : 1.f, bp ? bp[c] : 0.f, yp);
    }
  });
}

void batchnorm2d_forward_eval(const BatchNormParams& p, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                              const Tensor& running_mean, const Tensor& running_var, Tensor& y, Tensor& saved_mean,
                              Tensor& saved_invstd, const Stream& s) {
  LANCET_CUDA_TWIN(x, batchnorm2d_forward_eval(p, x, gamma, beta, running_mean, running_var, y, saved_mean,
                                               saved_invstd, s));
  const char* op = "batchnorm2d_forward_eval";
  const Dims d = check_common(op, x, gamma, beta, y, s);
  cpu::require_cpu_any_format(op, s, x, {&running_mean, &running_var, &saved_mean, &saved_invstd});
  cpu::require_defined(op, "output", y);
  require_channel_vec(op, "running_mean", running_mean, d.C, x);
  require_channel_vec(op, "running_var", running_var, d.C, x);
  require_channel_vec(op, "saved_mean", saved_mean, d.C, x);
  require_channel_vec(op, "saved_invstd", saved_invstd, d.C, x);
  const float* xp = x.data<float>();
  const float* gp = gamma.defined() ? gamma.data<float>() : nullptr;
  const float* bp = beta.defined() ? beta.data<float>() : nullptr;
  const float* rm = running_mean.data<float>();
  const float* rv = running_var.data<float>();
  float* yp = y.data<float>();
  float* smean = saved_mean.data<float>();
  float* sinv = saved_invstd.data<float>();
  parallel_for(d.C, channel_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      smean[c] = rm[c];
      sinv[c] = static_cast<float>(1.0 / std::sqrt(static_cast<double>(rv[c]) + p.eps));
      normalize_channel(d, c, xp, smean[c], sinv[c], gp ? gp[c] : 1.f, bp ? bp[c] : 0.f, yp);
    }
  });
}

void batchnorm2d_backward(bool batch_stats, const Tensor& x, const Tensor& dy, const Tensor& gamma,
                          const Tensor& saved_mean, const Tensor& saved_invstd, Tensor& dx, Tensor& dgamma,
                          Tensor& dbeta, const Stream& s) {
  LANCET_CUDA_TWIN(x, batchnorm2d_backward(batch_stats, x, dy, gamma, saved_mean, saved_invstd, dx, dgamma, dbeta, s));
  const char* op = "batchnorm2d_backward";
  const Dims d = check_common(op, x, gamma, Tensor(), Tensor(), s);
  cpu::require_cpu_any_format(op, s, x, {&dy, &dx, &saved_mean, &saved_invstd, &dgamma, &dbeta});
  cpu::require_like(op, "dy", dy, x, "input");
  if (dx.defined()) cpu::require_like(op, "dx", dx, x, "input");
  require_channel_vec(op, "saved_mean", saved_mean, d.C, x);
  require_channel_vec(op, "saved_invstd", saved_invstd, d.C, x);
  if (dgamma.defined()) require_channel_vec(op, "dgamma", dgamma, d.C, x);
  if (dbeta.defined()) require_channel_vec(op, "dbeta", dbeta, d.C, x);
  const int64_t m = d.N * d.HW;
  const float* xp = x.data<float>();
  const float* dyp = dy.data<float>();
  const float* gp = gamma.defined() ? gamma.data<float>() : nullptr;
  const float* mean = saved_mean.data<float>();
  const float* inv = saved_invstd.data<float>();
  float* dxp = dx.defined() ? dx.data<float>() : nullptr;
  float* dgp = dgamma.defined() ? dgamma.data<float>() : nullptr;
  float* dbp = dbeta.defined() ? dbeta.data<float>() : nullptr;
  parallel_for(d.C, channel_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      // sum_dy = sum dy, sum_dy_xhat = sum dy * (x - mean) * invstd
      double sum_dy, sum_dy_xmu;
      dy_channel_sums(xp, dyp, d, c, mean[c], sum_dy, sum_dy_xmu);
      const double invstd = inv[c], g = gp ? gp[c] : 1.0;
      const double sum_dy_xhat = sum_dy_xmu * invstd;
      if (dgp) dgp[c] += static_cast<float>(sum_dy_xhat);
      if (dbp) dbp[c] += static_cast<float>(sum_dy);
      if (!dxp) continue;
      // training: dx = g * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)); eval: g * invstd * dy
      const float k = static_cast<float>(g * invstd);
      const float mdy = batch_stats ? static_cast<float>(sum_dy / m) : 0.f;
      const float proj = batch_stats ? static_cast<float>(sum_dy_xhat / m * invstd) : 0.f;  // per (x - mean)
      const float muf = mean[c];
      const int64_t st = d.step;
      for (int64_t n = 0; n < d.N; ++n) {
        const float* xq = xp + d.offset(n, c);
        const float* dq = dyp + d.offset(n, c);
        float* o = dxp + d.offset(n, c);
        for (int64_t i = 0; i < d.HW; ++i) o[i * st] = k * (dq[i * st] - mdy - (xq[i * st] - muf) * proj);
      }
    }
  });
}

void batchnorm2d_channel_sums(const Tensor& x, std::vector<double>& out, const Stream& s) {
  LANCET_CUDA_TWIN(x, batchnorm2d_channel_sums(x, out, s));
  const char* op = "batchnorm2d_channel_sums";
  const Dims d = check_common(op, x, Tensor(), Tensor(), Tensor(), s);
  out.assign(static_cast<size_t>(2 * d.C + 1), 0.0);
  const float* xp = x.data<float>();
  const int64_t st = d.step;
  parallel_for(d.C, channel_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double sum = 0, sq = 0;
      for (int64_t n = 0; n < d.N; ++n) {
        const float* q = xp + d.offset(n, c);
        for (int64_t i = 0; i < d.HW; ++i) {
          sum += q[i * st];
          sq += static_cast<double>(q[i * st]) * q[i * st];
        }
      }
      out[static_cast<size_t>(c)] = sum;
      out[static_cast<size_t>(d.C + c)] = sq;
    }
  });
  out[static_cast<size_t>(2 * d.C)] = static_cast<double>(d.N * d.HW);
}

void batchnorm2d_backward_sums(const Tensor& x, const Tensor& dy, const Tensor& mean, const Tensor& invstd,
                               std::vector<double>& out, const Stream& s) {
  LANCET_CUDA_TWIN(x, batchnorm2d_backward_sums(x, dy, mean, invstd, out, s));
  const char* op = "batchnorm2d_backward_sums";
  const Dims d = check_common(op, x, Tensor(), Tensor(), Tensor(), s);
  cpu::require_cpu_any_format(op, s, x, {&dy, &mean, &invstd});
  cpu::require_like(op, "dy", dy, x, "input");
  require_channel_vec(op, "mean", mean, d.C, x);
  require_channel_vec(op, "invstd", invstd, d.C, x);
  out.assign(static_cast<size_t>(2 * d.C), 0.0);
  const float* xp = x.data<float>();
  const float* dyp = dy.data<float>();
  const float* mp = mean.data<float>();
  const float* ip = invstd.data<float>();
  parallel_for(d.C, channel_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double sum_dy, sum_dy_xmu;
      dy_channel_sums(xp, dyp, d, c, mp[c], sum_dy, sum_dy_xmu);
      out[static_cast<size_t>(c)] = sum_dy;
      out[static_cast<size_t>(d.C + c)] = sum_dy_xmu * ip[c];
    }
  });
}

void batchnorm2d_backward_dx(const Tensor& x, const Tensor& dy, const Tensor& gamma, const Tensor& mean,
                             const Tensor& invstd, const std::vector<double>& global_sums, double count, Tensor& dx,
                             const Stream& s) {
  LANCET_CUDA_TWIN(x, batchnorm2d_backward_dx(x, dy, gamma, mean, invstd, global_sums, count, dx, s));
  const char* op = "batchnorm2d_backward_dx";
  const Dims d = check_common(op, x, gamma, Tensor(), Tensor(), s);
  cpu::require_cpu_any_format(op, s, x, {&dy, &dx, &mean, &invstd});
  cpu::require_like(op, "dy", dy, x, "input");
  cpu::require_like(op, "dx", dx, x, "input");
  require_channel_vec(op, "mean", mean, d.C, x);
  require_channel_vec(op, "invstd", invstd, d.C, x);
  LANCET_CHECK(static_cast<int64_t>(global_sums.size()) == 2 * d.C,
               op << ": global_sums has " << global_sums.size() << " values, expected 2 x " << d.C << " channels");
  LANCET_CHECK(count > 1, op << ": count must exceed 1, got " << count);
  const float* xp = x.data<float>();
  const float* dyp = dy.data<float>();
  const float* gp = gamma.defined() ? gamma.data<float>() : nullptr;
  const float* mp = mean.data<float>();
  const float* ip = invstd.data<float>();
  float* dxp = dx.data<float>();
  parallel_for(d.C, channel_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const double inv = ip[c];
      const float k = static_cast<float>((gp ? gp[c] : 1.0) * inv);
      const float mdy = static_cast<float>(global_sums[static_cast<size_t>(c)] / count);
      const float proj = static_cast<float>(global_sums[static_cast<size_t>(d.C + c)] / count * inv);
      const float muf = mp[c];
      const int64_t st = d.step;
      for (int64_t n = 0; n < d.N; ++n) {
        const float* xq = xp + d.offset(n, c);
        const float* dq = dyp + d.offset(n, c);
        float* o = dxp + d.offset(n, c);
        for (int64_t i = 0; i < d.HW; ++i) o[i * st] = k * (dq[i * st] - mdy - (xq[i * st] - muf) * proj);
      }
    }
  });
}

}  // namespace lancet
