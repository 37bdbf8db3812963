#include "layers/layers.h"

#include <algorithm>
#include <cmath>

#include "kernels/activation.h"
#include "kernels/fused.h"
#include "kernels/linear.h"

namespace lancet {

void init_uniform(Tensor& t, float bound, std::mt19937_64& rng) {
  LANCET_CHECK(t.device().is_cpu(), "init_uniform: tensor on " << t.device().str() << " (initialise on the CPU)");
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    const float u = static_cast<float>(rng() >> 40) * 0x1p-24f;  // exact, in [0, 1)
    p[i] = bound * (2.0f * u - 1.0f);
  }
}

namespace {

// The common saved context: the layer's input (Conv2d, Linear) or output (ReLU).
struct TensorSaved : Saved {
  Tensor t;
};

float uniform_bound(int64_t fan_in) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(fan_in))); }

}  // namespace

// ---- Conv2d ---------------------------------------------------------------------------------

Conv2d::Conv2d(std::mt19937_64& rng, int in_channels, int out_channels, int kernel_size, int stride, int padding,
               int dilation, int groups, bool bias)
    : in_(in_channels), out_(out_channels) {
  LANCET_CHECK(in_channels > 0 && out_channels > 0 && kernel_size > 0 && stride > 0 && padding >= 0 &&
                   dilation > 0 && groups > 0 && in_channels % groups == 0 && out_channels % groups == 0,
               "Conv2d: invalid configuration in=" << in_channels << " out=" << out_channels << " kernel="
                                                   << kernel_size << " stride=" << stride << " padding=" << padding
                                                   << " dilation=" << dilation << " groups=" << groups);
  p_.stride_h = p_.stride_w = stride;
  p_.pad_h = p_.pad_w = padding;
  p_.dilation_h = p_.dilation_w = dilation;
  p_.groups = groups;
  const int64_t fan_in = static_cast<int64_t>(in_channels / groups) * kernel_size * kernel_size;
  const float bound = uniform_bound(fan_in);
  Tensor w = Tensor::empty({out_channels, in_channels / groups, kernel_size, kernel_size});
  init_uniform(w, bound, rng);
  weight_ = &register_parameter("weight", w);
  if (bias) {
    Tensor b = Tensor::empty({out_channels});
    init_uniform(b, bound, rng);
    bias_ = &register_parameter("bias", b);
  }
}

void Conv2d::check_input(const Tensor& x) const {
  LANCET_CHECK(x.ndim() == 4 && x.dim(1) == in_,
               "Conv2d: expected input [N, " << in_ << ", H, W], got " << x.shape_str());
}

Tensor Conv2d::forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) {
  Tensor y = Tensor::empty_like(x, conv2d_output_shape(p_, x.shape(), weight_->value.shape()));
  conv2d_forward(p_, x, weight_->value, bias_ ? bias_->value : Tensor(), y, s);
  if (auto c = make_saved<TensorSaved>(saved)) {
    c->t = x;
    *saved = std::move(c);
  }
  return y;
}

Tensor Conv2d::backward_impl(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) {
  const Tensor& x = saved_as<TensorSaved>(saved, "Conv2d").t;
  dy.check_shape(conv2d_output_shape(p_, x.shape(), weight_->value.shape()), "Conv2d backward: dy");
  Tensor dx = need_input_grad ? Tensor::empty_like(x) : Tensor();
  Tensor db = bias_ ? bias_->grad : Tensor();
  conv2d_backward(p_, x, weight_->value, dy, dx, weight_->grad, db, s);
  return dx;
}

// ---- BatchNorm2d ----------------------------------------------------------------------------

namespace {
struct BatchNormSaved : Saved {
  Tensor x, mean, invstd;
  Tensor y;  // the output, with the fused ReLU (its mask)
  bool batch_stats = true;
  double sync_count = 0;  // > 0: synchronised statistics over this many values per channel
};
}  // namespace

BatchNorm2d::BatchNorm2d(int num_features, float eps, float momentum) : c_(num_features) {
  LANCET_CHECK(num_features > 0, "BatchNorm2d: num_features must be positive, got " << num_features);
  p_.eps = eps;
  p_.momentum = momentum;
  weight_ = &register_parameter("weight", Tensor::full({num_features}, 1.0f));
  bias_ = &register_parameter("bias", Tensor::zeros({num_features}));
  running_mean_ = &register_buffer("running_mean", Tensor::zeros({num_features}));
  running_var_ = &register_buffer("running_var", Tensor::full({num_features}, 1.0f));
}

void BatchNorm2d::check_input(const Tensor& x) const {
  LANCET_CHECK(x.ndim() == 4 && x.dim(1) == c_,
               "BatchNorm2d: expected input [N, " << c_ << ", H, W], got " << x.shape_str());
  LANCET_CHECK(!training() || x.dim(0) * x.dim(2) * x.dim(3) > 1,
               "BatchNorm2d: expected more than 1 value per channel when training, got input " << x.shape_str());
}

Tensor BatchNorm2d::forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) {
  Tensor y = Tensor::empty_like(x);
  Tensor mean = Tensor::empty({c_}, DType::f32, x.device());
  Tensor invstd = Tensor::empty({c_}, DType::f32, x.device());
  double sync_count = 0;
  if (training() && replica_sum_) {
    // Global statistics: per-channel sums added over replicas, then the eval-mode kernel
    // normalises with the global mean and biased variance.
    std::vector<double> sums;
    batchnorm2d_channel_sums(x, sums, s);
    replica_sum_(sums);
    sync_count = sums[static_cast<size_t>(2 * c_)];
    LANCET_CHECK(sync_count > 1, "SyncBatchNorm: expected more than 1 value per channel over all replicas, got "
                                     << sync_count);
    std::vector<float> gmean(static_cast<size_t>(c_)), gvar(static_cast<size_t>(c_));
    for (int c = 0; c < c_; ++c) {
      const double m = sums[static_cast<size_t>(c)] / sync_count;
      gmean[static_cast<size_t>(c)] = static_cast<float>(m);
      gvar[static_cast<size_t>(c)] = static_cast<float>(std::max(0.0, sums[static_cast<size_t>(c_ + c)] / sync_count - m * m));
    }
    Tensor tm = Tensor::from_vector(gmean, {c_}), tv = Tensor::from_vector(gvar, {c_});
    if (!x.device().is_cpu()) {
      tm = tm.to(x.device());
      tv = tv.to(x.device());
    }
    batchnorm2d_forward_eval(p_, x, weight_->value, bias_->value, tm, tv, y, mean, invstd, s);
    if (fused_relu_) relu_forward(y, y, s);
    if (update_running_) {
      // Running statistics as torch: the unbiased variance of the global batch.
      Tensor rm = running_mean_->device().is_cpu() ? *running_mean_ : running_mean_->to(Device::cpu());
      Tensor rv = running_var_->device().is_cpu() ? *running_var_ : running_var_->to(Device::cpu());
      const double unbias = sync_count / (sync_count - 1);
      for (int c = 0; c < c_; ++c) {
        float& a = rm.data<float>()[c];
        float& b = rv.data<float>()[c];
        a = static_cast<float>((1.0 - p_.momentum) * a + p_.momentum * gmean[static_cast<size_t>(c)]);
        b = static_cast<float>((1.0 - p_.momentum) * b + p_.momentum * gvar[static_cast<size_t>(c)] * unbias);
      }
      if (!running_mean_->device().is_cpu()) {
        running_mean_->copy_from(rm);
        running_var_->copy_from(rv);
      }
    }
  } else if (training()) {
    (fused_relu_ ? batchnorm_relu_forward_train : batchnorm2d_forward_train)(
        p_, x, weight_->value, bias_->value, *running_mean_, *running_var_, update_running_, y, mean, invstd, s);
  } else {
    (fused_relu_ ? batchnorm_relu_forward_eval : batchnorm2d_forward_eval)(
        p_, x, weight_->value, bias_->value, *running_mean_, *running_var_, y, mean, invstd, s);
  }
  if (auto c = make_saved<BatchNormSaved>(saved)) {
    c->x = x;
    c->mean = mean;
    c->invstd = invstd;
    c->batch_stats = training();
    c->sync_count = sync_count;
    if (fused_relu_) c->y = y;
    *saved = std::move(c);
  }
  return y;
}

Tensor BatchNorm2d::backward_impl(const Tensor& dy_out, Saved& saved, bool need_input_grad, const Stream& s) {
  auto& c = saved_as<BatchNormSaved>(saved, "BatchNorm2d");
  dy_out.check_same_shape(c.x, "BatchNorm2d backward: dy");
  Tensor dx = need_input_grad ? Tensor::empty_like(c.x) : Tensor();
  Tensor dy = dy_out;
  if (c.y.defined()) {  // the fused ReLU
    if (c.sync_count == 0) {
      batchnorm_relu_backward(c.batch_stats, c.x, c.y, dy, weight_->value, c.mean, c.invstd, dx, weight_->grad,
                              bias_->grad, s);
      return dx;
    }
    dy = Tensor::empty_like(dy_out);  // SyncBatchNorm: the mask first
    relu_backward(c.y, dy_out, dy, s);
  }
  if (c.sync_count > 0) {
    LANCET_CHECK(replica_sum_, "SyncBatchNorm: the cross-replica sum was removed between forward and backward");
    std::vector<double> sums;
    batchnorm2d_backward_sums(c.x, dy, c.mean, c.invstd, sums, s);
    {  // the parameter gradients are local (averaged later with every other gradient)
      Tensor dg = weight_->grad.device().is_cpu() ? weight_->grad : weight_->grad.to(Device::cpu());
      Tensor db = bias_->grad.device().is_cpu() ? bias_->grad : bias_->grad.to(Device::cpu());
      for (int ch = 0; ch < c_; ++ch) {
        db.data<float>()[ch] += static_cast<float>(sums[static_cast<size_t>(ch)]);
        dg.data<float>()[ch] += static_cast<float>(sums[static_cast<size_t>(c_ + ch)]);
      }
      if (!weight_->grad.device().is_cpu()) {
        weight_->grad.copy_from(dg);
        bias_->grad.copy_from(db);
      }
    }
    if (need_input_grad) {
      replica_sum_(sums);
      batchnorm2d_backward_dx(c.x, dy, weight_->value, c.mean, c.invstd, sums, c.sync_count, dx, s);
    }
    return dx;
  }
  batchnorm2d_backward(c.batch_stats, c.x, dy, weight_->value, c.mean, c.invstd, dx, weight_->grad, bias_->grad, s);
  return dx;
}

// ---- ReLU -----------------------------------------------------------------------------------

Tensor ReLU::forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) {
  Tensor y = inplace_ ? x : Tensor::empty_like(x);
  relu_forward(x, y, s);
  if (auto c = make_saved<TensorSaved>(saved)) {
    c->t = y;
    *saved = std::move(c);
  }
  return y;
}

Tensor ReLU::backward_impl(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) {
  const Tensor& y = saved_as<TensorSaved>(saved, "ReLU").t;
  dy.check_same_shape(y, "ReLU backward: dy");
  if (!need_input_grad) return Tensor();
  Tensor dx = Tensor::empty_like(y);
  relu_backward(y, dy, dx, s);
  return dx;
}

// ---- MaxPool2d ------------------------------------------------------------------------------

namespace {
struct MaxPoolSaved : Saved {
  Shape x_shape;
  Tensor argmax;
};
}  // namespace

MaxPool2d::MaxPool2d(int kernel_size, int stride, int padding) {
  LANCET_CHECK(kernel_size > 0 && stride > 0 && padding >= 0 && 2 * padding <= kernel_size,
               "MaxPool2d: invalid kernel " << kernel_size << ", stride " << stride << ", padding " << padding
                                            << " (padding must be at most half the kernel)");
  p_.kernel = kernel_size;
  p_.stride = stride;
  p_.pad = padding;
}

void MaxPool2d::check_input(const Tensor& x) const {
  LANCET_CHECK(x.ndim() == 4, "MaxPool2d: expected a 4-D input [N, C, H, W], got " << x.shape_str());
}

Tensor MaxPool2d::forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) {
  const Shape ys = maxpool2d_output_shape(p_, x.shape());
  Tensor y = Tensor::empty_like(x, ys);
  Tensor argmax = Tensor::empty(ys, DType::i32, x.device(), x.format());  // laid out as y
  maxpool2d_forward(p_, x, y, argmax, s);
  if (auto c = make_saved<MaxPoolSaved>(saved)) {
    c->x_shape = x.shape();
    c->argmax = argmax;
    *saved = std::move(c);
  }
  return y;
}

Tensor MaxPool2d::backward_impl(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) {
  auto& c = saved_as<MaxPoolSaved>(saved, "MaxPool2d");
  dy.check_same_shape(c.argmax, "MaxPool2d backward: dy");
  if (!need_input_grad) return Tensor();
  Tensor dx = Tensor::empty_like(dy, c.x_shape);
  maxpool2d_backward(p_, dy, c.argmax, dx, s);
  return dx;
}

// ---- GlobalAvgPool --------------------------------------------------------------------------

namespace {
struct ShapeSaved : Saved {
  Shape x_shape;
  MemoryFormat x_format = MemoryFormat::nchw;
};
}  // namespace

void GlobalAvgPool::check_input(const Tensor& x) const {
  LANCET_CHECK(x.ndim() == 4, "GlobalAvgPool: expected a 4-D input [N, C, H, W], got " << x.shape_str());
}

Tensor GlobalAvgPool::forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) {
  Tensor y = Tensor::empty({x.dim(0), x.dim(1)}, x.dtype(), x.device());
  global_avgpool_forward(x, y, s);
  if (auto c = make_saved<ShapeSaved>(saved)) {
    c->x_shape = x.shape();
    c->x_format = x.format();
    *saved = std::move(c);
  }
  return y;
}

Tensor GlobalAvgPool::backward_impl(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) {
  const auto& c = saved_as<ShapeSaved>(saved, "GlobalAvgPool");
  const Shape& xs = c.x_shape;
  dy.check_shape({xs[0], xs[1]}, "GlobalAvgPool backward: dy");
  if (!need_input_grad) return Tensor();
  Tensor dx = Tensor::empty(xs, dy.dtype(), dy.device(), c.x_format);  // laid out as the input was
  global_avgpool_backward(dy, dx, s);
  return dx;
}

// ---- Linear ---------------------------------------------------------------------------------

Linear::Linear(std::mt19937_64& rng, int in_features, int out_features, bool bias)
    : in_(in_features), out_(out_features) {
  LANCET_CHECK(in_features > 0 && out_features > 0,
               "Linear: invalid sizes in=" << in_features << " out=" << out_features);
  const float bound = uniform_bound(in_features);
  Tensor w = Tensor::empty({out_features, in_features});
  init_uniform(w, bound, rng);
  weight_ = &register_parameter("weight", w);
  if (bias) {
    Tensor b = Tensor::empty({out_features});
    init_uniform(b, bound, rng);
    bias_ = &register_parameter("bias", b);
  }
}

void Linear::check_input(const Tensor& x) const {
  LANCET_CHECK(x.ndim() == 2 && x.dim(1) == in_, "Linear: expected input [N, " << in_ << "], got " << x.shape_str());
}

Tensor Linear::forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) {
  Tensor y = Tensor::empty({x.dim(0), out_}, x.dtype(), x.device());
  linear_forward(x, weight_->value, bias_ ? bias_->value : Tensor(), y, s);
  if (auto c = make_saved<TensorSaved>(saved)) {
    c->t = x;
    *saved = std::move(c);
  }
  return y;
}

Tensor Linear::backward_impl(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) {
  const Tensor& x = saved_as<TensorSaved>(saved, "Linear").t;
  dy.check_shape({x.dim(0), out_}, "Linear backward: dy");
  Tensor dx = need_input_grad ? Tensor::empty_like(x) : Tensor();
  Tensor db = bias_ ? bias_->grad : Tensor();
  linear_backward(x, weight_->value, dy, dx, weight_->grad, db, s);
  return dx;
}

// ---- Dropout --------------------------------------------------------------------------------

namespace {
struct DropoutSaved : Saved {
  Shape shape;
  Tensor mask;  // undefined when the forward was the identity
};
}  // namespace

Dropout::Dropout(float p) : p_(p) {
  LANCET_CHECK(p >= 0.0f && p < 1.0f, "Dropout: p must be in [0, 1), got " << p);
}

Tensor Dropout::forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) {
  Tensor y = x, mask;
  if (training() && enabled_ && p_ > 0.0f) {
    y = Tensor::empty_like(x);
    mask = Tensor::empty(x.shape(), DType::u8, x.device(), x.format());
    dropout_forward(p_, seed_, counter_, x, y, mask, s);
    counter_ += static_cast<uint64_t>(x.numel());
  }
  if (auto c = make_saved<DropoutSaved>(saved)) {
    c->shape = x.shape();
    c->mask = mask;
    *saved = std::move(c);
  }
  return y;
}

Tensor Dropout::backward_impl(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) {
  auto& c = saved_as<DropoutSaved>(saved, "Dropout");
  dy.check_shape(c.shape, "Dropout backward: dy");
  if (!need_input_grad) return Tensor();
  if (!c.mask.defined()) return dy.clone();  // input gradients are fresh tensors
  Tensor dx = Tensor::empty_like(dy);
  dropout_backward(p_, c.mask, dy, dx, s);
  return dx;
}

// ---- ModuleList, Sequential -----------------------------------------------------------------

Module& ModuleList::add(std::unique_ptr<Module> m) {
  LANCET_CHECK(m != nullptr, type_name() << ": add of a null module");
  LANCET_CHECK(m->device() == device(), type_name() << ": adding a module on " << m->device().str() << " to one on "
                                                    << device().str());
  m->train(training());
  return register_module(std::to_string(size()), std::move(m));
}

Module& ModuleList::operator[](size_t i) const {
  LANCET_CHECK(i < size(), type_name() << ": index " << i << " out of range (size " << size() << ")");
  return *children()[i].second;
}

Tensor ModuleList::forward_impl(const Tensor&, SavedPtr*, const Stream&) {
  LANCET_FAIL("ModuleList is a container and cannot be called; call its elements");
}

Tensor ModuleList::backward_impl(const Tensor&, Saved&, bool, const Stream&) {
  LANCET_FAIL("ModuleList is a container and cannot be called; call its elements");
}

namespace {
struct ChainSaved : Saved {
  std::vector<SavedPtr> items;
};
}  // namespace

Tensor chain_forward(const std::vector<Module*>& ms, const Tensor& x, SavedPtr* saved, const Stream& s) {
  auto c = make_saved<ChainSaved>(saved);
  if (c) c->items.resize(ms.size());
  Tensor h = x;
  for (size_t i = 0; i < ms.size(); ++i) {
    const Device d = ms[i]->device();
    if (h.device() != d) h = h.to(d);
    h = ms[i]->forward(h, c ? &c->items[i] : nullptr, stream_on(d, s));
  }
  if (c) *saved = std::move(c);
  return h.device() == x.device() ? h : h.to(x.device());
}

Tensor chain_backward(const std::vector<Module*>& ms, const Tensor& dy, Saved& saved, bool need_input_grad,
                      const Stream& s) {
  auto& c = saved_as<ChainSaved>(saved, "chain of modules");
  LANCET_CHECK(c.items.size() == ms.size(),
               "chain backward: saved context has " << c.items.size() << " entries for " << ms.size() << " modules");
  if (ms.empty()) return need_input_grad ? dy.clone() : Tensor();
  Tensor g = dy;
  for (size_t i = ms.size(); i-- > 0;) {
    const Device d = ms[i]->device();
    if (g.device() != d) g = g.to(d);
    g = ms[i]->backward(g, *c.items[i], i > 0 || need_input_grad, stream_on(d, s));
  }
  return !g.defined() || g.device() == dy.device() ? g : g.to(dy.device());
}

std::vector<Module*> Sequential::modules() const {
  std::vector<Module*> ms;
  for (auto& c : children()) ms.push_back(c.second.get());
  return ms;
}

Tensor Sequential::forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) {
  return chain_forward(modules(), x, saved, s);
}

Tensor Sequential::backward_impl(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) {
  return chain_backward(modules(), dy, saved, need_input_grad, s);
}

}  // namespace lancet
