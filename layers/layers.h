// layers.h — the basic layers (PyTorch semantics and parameter names) and the containers.
//
// Every layer computes through the kernels in kernels/ only, so the CUDA backend runs under
// the same code. Layers that own weights draw their initial values from an explicit
// std::mt19937_64 in a fixed order (see init_uniform), so a model built from the same seed is
// bit-identical on every machine.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/batchnorm.h"
#include "kernels/conv.h"
#include "kernels/pool.h"
#include "layers/module.h"

namespace lancet {

// Fills t (f32, CPU) with U(-bound, bound), one rng draw per element in order. Uses its own
// 24-bit mapping instead of std::uniform_real_distribution, whose output is not specified
// exactly by the standard.
void init_uniform(Tensor& t, float bound, std::mt19937_64& rng);

// The Saved of a forward as the type a module's backward expects; throws when a context from
// another module (or another kind of module) is passed in.
template <typename T>
T& saved_as(Saved& saved, const char* who) {
  T* p = dynamic_cast<T*>(&saved);
  LANCET_CHECK(p != nullptr, who << ": backward got a context saved by a different module");
  return *p;
}

// A fresh context of type T when the caller asked for one (saved != nullptr), else null.
template <typename T>
std::unique_ptr<T> make_saved(SavedPtr* saved) {
  return saved ? std::make_unique<T>() : nullptr;
}

// Conv2d(in, out, kernel_size, stride, padding, dilation, groups, bias), argument order as in
// torch.nn.Conv2d. Parameters "weight" [out, in/groups, k, k] and "bias" [out] (when bias).
// Init as PyTorch: kaiming_uniform(a = sqrt(5)), i.e. U(+-1/sqrt(fan_in)) for weight and bias.
class Conv2d : public Module {
 public:
  Conv2d(std::mt19937_64& rng, int in_channels, int out_channels, int kernel_size, int stride = 1, int padding = 0,
         int dilation = 1, int groups = 1, bool bias = true);
  const char* type_name() const override { return "Conv2d"; }
  Parameter& weight() { return *weight_; }
  Parameter* bias() { return bias_; }  // null without a bias
  const Conv2dParams& params() const { return p_; }
  int in_channels() const { return in_; }
  int out_channels() const { return out_; }

 protected:
  Tensor forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) override;
  Tensor backward_impl(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) override;
  void check_input(const Tensor& x) const override;

 private:
  Conv2dParams p_;
  int in_, out_;
  Parameter* weight_ = nullptr;
  Parameter* bias_ = nullptr;
};

// BatchNorm2d: parameters "weight" (1) and "bias" (0), buffers "running_mean" (0) and
// "running_var" (1); num_batches_tracked is not kept (momentum is fixed). Training mode uses
// batch statistics and, unless set_update_running_stats(false), updates the running ones.
class BatchNorm2d : public Module {
 public:
  explicit BatchNorm2d(int num_features, float eps = 1e-5f, float momentum = 0.1f);
  const char* type_name() const override { return "BatchNorm2d"; }
  Parameter& weight() { return *weight_; }
  Parameter& bias() { return *bias_; }
  Tensor& running_mean() { return *running_mean_; }
  Tensor& running_var() { return *running_var_; }
  int num_features() const { return c_; }
  // false: training-mode forwards normalise with batch statistics but leave the running ones
  // untouched (`lancet forward --mode train`).
  void set_update_running_stats(bool on) { update_running_ = on; }
  bool update_running_stats() const { return update_running_; }
  // SyncBatchNorm: with a cross-replica sum set (it adds a host vector elementwise over every
  // data-parallel replica, in place), training-mode forwards normalise with the statistics of
  // all replicas' batches together and the backward reduces its two per-channel sums the same
  // way (torch.nn.SyncBatchNorm). Every replica must run the same forwards and backwards.
  // Parameter gradients stay local, for the data-parallel gradient average. Empty = per-replica.
  using ReplicaSum = std::function<void(std::vector<double>&)>;
  void set_replica_sum(ReplicaSum sum) { replica_sum_ = std::move(sum); }
  bool synchronized() const { return static_cast<bool>(replica_sum_); }
  // ReLU folded in: forward returns relu(bn(x)) and backward takes the gradient of that output
  // (kernels/fused.h: one pass over the activations on the GPU, the same bits on the CPU as
  // BatchNorm2d followed by ReLU). For blocks whose BatchNorm always feeds a ReLU.
  void set_fused_relu(bool on) { fused_relu_ = on; }
  bool fused_relu() const { return fused_relu_; }

 protected:
  Tensor forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) override;
  Tensor backward_impl(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) override;
  void check_input(const Tensor& x) const override;

 private:
  int c_;
  BatchNormParams p_;
  bool update_running_ = true;
  bool fused_relu_ = false;
  ReplicaSum replica_sum_;
  Parameter* weight_ = nullptr;
  Parameter* bias_ = nullptr;
  Tensor* running_mean_ = nullptr;
  Tensor* running_var_ = nullptr;
};

// ReLU. inplace = true overwrites the input, as torch's ReLU(inplace=True): use it only where
// nothing else keeps that tensor (e.g. right after a BatchNorm, which saves its input only).
class ReLU : public Module {
 public:
  explicit ReLU(bool inplace = false) : inplace_(inplace) {}
  const char* type_name() const override { return "ReLU"; }

 protected:
  Tensor forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) override;
  Tensor backward_impl(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) override;

 private:
  bool inplace_;
};

// MaxPool2d(kernel, stride, padding) on [N, C, H, W], -inf padding as PyTorch.
class MaxPool2d : public Module {
 public:
  MaxPool2d(int kernel_size, int stride, int padding);
  const char* type_name() const override { return "MaxPool2d"; }

 protected:
  Tensor forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) override;
  Tensor backward_impl(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) override;
  void check_input(const Tensor& x) const override;

 private:
  MaxPool2dParams p_;
};

// Mean over H and W: [N, C, H, W] -> [N, C] (AdaptiveAvgPool2d(1) followed by flatten).
class GlobalAvgPool : public Module {
 public:
  const char* type_name() const override { return "GlobalAvgPool"; }

 protected:
  Tensor forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) override;
  Tensor backward_impl(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) override;
  void check_input(const Tensor& x) const override;
};

// Linear(in, out, bias): "weight" [out, in], "bias" [out]; input [N, in]. PyTorch init:
// U(+-1/sqrt(in)) for weight and bias.
class Linear : public Module {
 public:
  Linear(std::mt19937_64& rng, int in_features, int out_features, bool bias = true);
  const char* type_name() const override { return "Linear"; }
  Parameter& weight() { return *weight_; }
  Parameter* bias() { return bias_; }
  int in_features() const { return in_; }
  int out_features() const { return out_; }

 protected:
  Tensor forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) override;
  Tensor backward_impl(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) override;
  void check_input(const Tensor& x) const override;

 private:
  int in_, out_;
  Parameter* weight_ = nullptr;
  Parameter* bias_ = nullptr;
};

// Inverted dropout with probability p, active only in training mode and while enabled. The
// mask for a forward is drawn from (seed, counter .. counter + numel - 1) and the counter then
// advances by numel, so a run is reproducible from (seed, counter), which checkpoints keep.
// In eval (or disabled) the output is the input tensor itself.
class Dropout : public Module {
 public:
  explicit Dropout(float p);
  const char* type_name() const override { return "Dropout"; }
  float p() const { return p_; }
  void set_seed(uint64_t seed) { seed_ = seed; }
  uint64_t seed() const { return seed_; }
  uint64_t counter() const { return counter_; }
  void set_counter(uint64_t c) { counter_ = c; }
  void set_enabled(bool on) { enabled_ = on; }
  bool enabled() const { return enabled_; }

 protected:
  Tensor forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) override;
  Tensor backward_impl(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) override;

 private:
  float p_;
  uint64_t seed_ = 0;
  uint64_t counter_ = 0;
  bool enabled_ = true;
};

// An indexed container of modules named "0", "1", ... (torch.nn.ModuleList); not callable.
class ModuleList : public Module {
 public:
  const char* type_name() const override { return "ModuleList"; }
  Module& add(std::unique_ptr<Module> m);
  template <typename M, typename... Args>
  M& emplace(Args&&... args) {
    auto m = std::make_unique<M>(std::forward<Args>(args)...);
    M& ref = *m;
    add(std::move(m));
    return ref;
  }
  size_t size() const { return children().size(); }
  Module& operator[](size_t i) const;

 protected:
  Tensor forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) override;
  Tensor backward_impl(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) override;
};

// The loop of Sequential, for any chain of modules (a model's named parts, a pipeline stage's
// slice of a model): forward runs ms in order, backward in reverse; the first module gets
// need_input_grad, the others always compute their input gradient.
// A chain may span devices (a model whose pipeline stages were placed on their own devices,
// run whole for validation or inference): each module runs on its own device, on stream_on(its
// device, s); the tensor is copied to it when it crosses (Tensor::to: on GPUs a peer copy
// ordered after the work on both devices' default streams); the output comes back to x's device
// and the input gradient to dy's, so from outside the chain is on one device.
Tensor chain_forward(const std::vector<Module*>& ms, const Tensor& x, SavedPtr* saved, const Stream& s);
Tensor chain_backward(const std::vector<Module*>& ms, const Tensor& dy, Saved& saved, bool need_input_grad,
                      const Stream& s);

// Runs its children in order (torch.nn.Sequential); backward runs them in reverse.
class Sequential : public ModuleList {
 public:
  const char* type_name() const override { return "Sequential"; }

 protected:
  Tensor forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) override;
  Tensor backward_impl(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) override;

 private:
  std::vector<Module*> modules() const;
};

}  // namespace lancet
