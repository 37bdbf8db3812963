// fused.cpp — CPU twins of the fused ops (kernels/fused.h). Each must equal its unfused
// composition bit for bit, so:
//   * the BatchNorm+ReLU ops and the SE forward ARE the composition: they call the public ops
//     (one definition of the statistics and of every rounding; in particular x * g + shortcut
//     is rounded after the product exactly as channel_scale_forward then add round it, which a
//     hand-fused loop could not promise: with -march=native the compiler may contract it into
//     an FMA);
//   * the SE backward is one pass per plane whose arithmetic is, operation for operation, that
//     of relu_backward followed by channel_scale_backward (see the loop).
// Either memory format (one per call), as the composed ops; the SE backward walks a plane in
// the order channel_scale_backward does (cpu::Planes), so it matches in both formats.
#include "kernels/fused.h"

#include "kernels/activation.h"
#include "kernels/cpu_util.h"
#include "kernels/cuda_twin.h"
#include "kernels/elementwise.h"
#ifdef LANCET_WITH_CUDA
#include "kernels/cuda/fused.h"
#endif

namespace lancet {
namespace {

void require_channel_vec(const char* op, const char* name, const Tensor& t, int64_t C, const Tensor& x) {
  cpu::require_shape(op, name, t, {C}, cpu::desc("the channels of input", x));
  cpu::require_dtype(op, name, t, DType::f32);
}

// kernels/batchnorm.cpp's checks under the fused op's name, so that a bad argument is reported
// as this op's (the composed ops would accept whatever passes these). Returns C.
// y_name: the forward's output ("output") or, in the backward, its saved copy ("y").
int64_t check_bn(const char* op, const Tensor& x, const Tensor& gamma, const Tensor& beta, const char* y_name,
                 const Tensor& y, const Stream& s, std::initializer_list<const Tensor*> others) {
  cpu::require_cpu_any_format(op, s, x, others);
  cpu::require_dtype(op, "input", x, DType::f32);
  LANCET_CHECK(x.ndim() == 4, op << ": input must be 4-D [N, C, H, W], got " << x.shape_str());
  const int64_t C = x.dim(1);
  if (gamma.defined()) require_channel_vec(op, "gamma", gamma, C, x);
  if (beta.defined()) require_channel_vec(op, "beta", beta, C, x);
  cpu::require_like(op, y_name, y, x, "input");
  LANCET_CHECK(x.numel() == 0 || y.raw_data() != x.raw_data(),
               op << ": " << y_name << " must not alias the input " << x.shape_str());
  return C;
}

// x [N, C, H, W] f32 and g [N, C] f32, as channel_scale_* check them. Returns x's planes.
cpu::Planes check_se(const char* op, const Tensor& x, const Tensor& g) {
  cpu::require_defined(op, "x", x);
  cpu::require_dtype(op, "x", x, DType::f32);
  LANCET_CHECK(x.ndim() == 4, op << ": x must be 4-D [N, C, H, W], got " << x.shape_str());
  const cpu::Planes d = cpu::planes_of(x);
  cpu::require_shape(op, "g", g, {d.N, d.C}, cpu::desc("x", x));
  cpu::require_dtype(op, "g", g, DType::f32);
  return d;
}

void require_distinct(const char* op, const char* out_name, const Tensor& out, const char* in_name, const Tensor& in) {
  LANCET_CHECK(!out.defined() || !in.defined() || in.numel() == 0 || out.raw_data() != in.raw_data(),
               op << ": " << out_name << " " << out.shape_str() << " must not alias " << in_name);
}

}  // namespace

void batchnorm_relu_forward_train(const BatchNormParams& p, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                                  Tensor& running_mean, Tensor& running_var, bool update_running, Tensor& y,
                                  Tensor& saved_mean, Tensor& saved_invstd, const Stream& s) {
  LANCET_CUDA_TWIN(x, batchnorm_relu_forward_train(p, x, gamma, beta, running_mean, running_var, update_running, y,
                                                   saved_mean, saved_invstd, s));
  const char* op = "batchnorm_relu_forward_train";
  const int64_t C = check_bn(op, x, gamma, beta, "output", y, s,
                             {&gamma, &beta, &y, &running_mean, &running_var, &saved_mean, &saved_invstd});
  require_channel_vec(op, "saved_mean", saved_mean, C, x);
  require_channel_vec(op, "saved_invstd", saved_invstd, C, x);
  if (update_running) {
    require_channel_vec(op, "running_mean", running_mean, C, x);
    require_channel_vec(op, "running_var", running_var, C, x);
  }
  LANCET_CHECK(x.dim(0) * x.dim(2) * x.dim(3) > 1,
               op << ": expected more than 1 value per channel when training, got input " << x.shape_str());
  batchnorm2d_forward_train(p, x, gamma, beta, running_mean, running_var, update_running, y, saved_mean, saved_invstd,
                            s);
  relu_forward(y, y, s);
}

void batchnorm_relu_forward_eval(const BatchNormParams& p, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                                 const Tensor& running_mean, const Tensor& running_var, Tensor& y, Tensor& saved_mean,
                                 Tensor& saved_invstd, const Stream& s) {
  LANCET_CUDA_TWIN(x, batchnorm_relu_forward_eval(p, x, gamma, beta, running_mean, running_var, y, saved_mean,
                                                  saved_invstd, s));
  const char* op = "batchnorm_relu_forward_eval";
  const int64_t C = check_bn(op, x, gamma, beta, "output", y, s,
                             {&gamma, &beta, &y, &running_mean, &running_var, &saved_mean, &saved_invstd});
  require_channel_vec(op, "running_mean", running_mean, C, x);
  require_channel_vec(op, "running_var", running_var, C, x);
  require_channel_vec(op, "saved_mean", saved_mean, C, x);
  require_channel_vec(op, "saved_invstd", saved_invstd, C, x);
  batchnorm2d_forward_eval(p, x, gamma, beta, running_mean, running_var, y, saved_mean, saved_invstd, s);
  relu_forward(y, y, s);
}

void batchnorm_relu_backward(bool batch_stats, const Tensor& x, const Tensor& y, const Tensor& dy,
                             const Tensor& gamma, const Tensor& saved_mean, const Tensor& saved_invstd, Tensor& dx,
                             Tensor& dgamma, Tensor& dbeta, const Stream& s) {
  LANCET_CUDA_TWIN(x, batchnorm_relu_backward(batch_stats, x, y, dy, gamma, saved_mean, saved_invstd, dx, dgamma,
                                              dbeta, s));
  const char* op = "batchnorm_relu_backward";
  const int64_t C = check_bn(op, x, gamma, Tensor(), "y", y, s,
                             {&y, &dy, &gamma, &saved_mean, &saved_invstd, &dx, &dgamma, &dbeta});
  cpu::require_like(op, "dy", dy, x, "input");
  if (dx.defined()) cpu::require_like(op, "dx", dx, x, "input");
  require_channel_vec(op, "saved_mean", saved_mean, C, x);
  require_channel_vec(op, "saved_invstd", saved_invstd, C, x);
  if (dgamma.defined()) require_channel_vec(op, "dgamma", dgamma, C, x);
  if (dbeta.defined()) require_channel_vec(op, "dbeta", dbeta, C, x);
  // The CPU twin materialises the masked gradient; the CUDA twin masks dy as it loads it.
  Tensor masked = Tensor::empty_like(x);
  relu_backward(y, dy, masked, s);
  batchnorm2d_backward(batch_stats, x, masked, gamma, saved_mean, saved_invstd, dx, dgamma, dbeta, s);
}

void se_scale_residual_relu_forward(const Tensor& x, const Tensor& g, const Tensor& shortcut, Tensor& y,
                                    const Stream& s) {
  LANCET_CUDA_TWIN(x, se_scale_residual_relu_forward(x, g, shortcut, y, s));
  const char* op = "se_scale_residual_relu_forward";
  cpu::require_cpu_any_format(op, s, x, {&g, &shortcut, &y});
  check_se(op, x, g);
  cpu::require_like(op, "shortcut", shortcut, x, "x");
  cpu::require_like(op, "y", y, x, "x");
  require_distinct(op, "y", y, "x", x);
  require_distinct(op, "y", y, "shortcut", shortcut);
  channel_scale_forward(x, g, y, s);
  add(y, shortcut, y, s);
  relu_forward(y, y, s);
}

void se_scale_residual_relu_backward(const Tensor& x, const Tensor& g, const Tensor& y, const Tensor& dy, Tensor& dx,
                                     Tensor& dg, Tensor& dshortcut, const Stream& s) {
  LANCET_CUDA_TWIN(x, se_scale_residual_relu_backward(x, g, y, dy, dx, dg, dshortcut, s));
  const char* op = "se_scale_residual_relu_backward";
  cpu::require_cpu_any_format(op, s, x, {&g, &y, &dy, &dx, &dg, &dshortcut});
  const cpu::Planes d = check_se(op, x, g);
  cpu::require_like(op, "y", y, x, "x");
  cpu::require_like(op, "dy", dy, x, "x");
  if (dx.defined()) cpu::require_like(op, "dx", dx, x, "x");
  if (dg.defined()) cpu::require_like(op, "dg", dg, g, "g");
  if (dshortcut.defined()) cpu::require_like(op, "dshortcut", dshortcut, x, "x");
  for (const Tensor* in : {&x, &g, &y, &dy}) {
    require_distinct(op, "dx", dx, "an input", *in);
    require_distinct(op, "dg", dg, "an input", *in);
    require_distinct(op, "dshortcut", dshortcut, "an input", *in);
  }
  require_distinct(op, "dshortcut", dshortcut, "dx", dx);
  const float* xp = x.data<float>();
  const float* gp = g.data<float>();
  const float* yp = y.data<float>();
  const float* dyp = dy.data<float>();
  float* dxp = dx.defined() ? dx.data<float>() : nullptr;
  float* dgp = dg.defined() ? dg.data<float>() : nullptr;
  float* dsp = dshortcut.defined() ? dshortcut.data<float>() : nullptr;
  // Planes as channel_scale_backward cuts them. Per element, t = relu_backward's value; dg sums
  // t * x in double in index order as channel_scale_backward does (float * float is exact in
  // double, so an FMA the compiler may form rounds the same); dx = t * g is one rounding.
  parallel_for(d.N * d.C, std::max<int64_t>(1, cpu::kElementwiseGrain / std::max<int64_t>(1, d.HW)),
               [&](int64_t begin, int64_t end) {
                 for (int64_t pl = begin; pl < end; ++pl) {
                   const int64_t o = d.offset(pl / d.C, pl % d.C), st = d.step;
                   const float gv = gp[pl];
                   double sum = 0;
                   for (int64_t i = 0; i < d.HW; ++i) {
                     const int64_t k = o + i * st;
                     const float t = yp[k] > 0.f ? dyp[k] : 0.f;
                     if (dsp) dsp[k] = t;
                     if (dxp) dxp[k] = t * gv;
                     sum += static_cast<double>(t) * xp[k];
                   }
                   if (dgp) dgp[pl] = static_cast<float>(sum);
                 }
               });
}

}  // namespace lancet
