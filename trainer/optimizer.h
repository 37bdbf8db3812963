// optimizer.h — torch.optim-compatible SGD, Adam and AdamW over a model's parameters.
// State (momentum buffers, moments) is f32 and lives on each parameter's device; it is created,
// zeroed, with the optimizer. A step is one multi-tensor update over all parameters of a device
// (sgd_step_multi / adam_step_multi in kernels/optim.h), issued on the step's stream for the
// device the step's stream is on and on the other devices' default streams (stream_on) for a
// model spread over several (pipeline stages on their own GPUs). Parameters must stay on the
// device they were on when the optimizer was made.
#pragma once
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "layers/module.h"
#include "trainer/config.h"

namespace lancet {

// The indices of `devices` per device, devices in order of first appearance, indices ascending:
// how work over a model spread over several devices (its parameters, their gradients) is split
// into one launch per device (the optimizer step, trainer.cpp's finish_step).
struct DeviceGroup {
  Device device;
  std::vector<size_t> index;
};
std::vector<DeviceGroup> group_by_device(const std::vector<Device>& devices);

class Optimizer {
 public:
  using Params = std::vector<std::pair<std::string, Parameter*>>;
  virtual ~Optimizer() = default;
  // Applies one update with the gradients currently in the parameters (it does not zero them),
  // each gradient element multiplied by grad_scale_inv as it is read (a loss scaler's unscale
  // fused into the step; 1 leaves them as they are), and bumps every Parameter::version.
  void step(const Stream& s, float grad_scale_inv = 1.0f);
  float lr() const { return lr_; }
  void set_lr(float lr) { lr_ = lr; }
  int64_t steps() const { return steps_; }
  void set_steps(int64_t n) { steps_ = n; }  // when restoring a checkpoint
  // Named state tensors for checkpoints: "<param>.<slot>" -> tensor.
  virtual std::vector<std::pair<std::string, Tensor*>> state() = 0;

 protected:
  Optimizer(Params params, float lr);
  virtual void step_impl(const Stream& s, float grad_scale_inv) = 0;
  // Each group's stream for a step on `s` (checking its parameters have not moved).
  Stream group_stream(const DeviceGroup& g, const Stream& s) const;
  Params params_;
  std::vector<DeviceGroup> groups_;  // indices into params_ per device (one group on one device)
  float lr_;
  int64_t steps_ = 0;
};

std::unique_ptr<Optimizer> make_optimizer(const OptimConfig& cfg, Optimizer::Params params);

}  // namespace lancet
