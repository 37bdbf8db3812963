// module.h — the base of every layer, block and model.
//
// Shape of the API (after tiny-cuda-nn): a non-virtual forward()/backward() pair that checks
// its arguments and calls the virtual *_impl. forward() returns the output and, when asked,
// a Saved object holding exactly what backward() needs; backward() consumes it. Because the
// saved state travels with the call and not inside the module, several micro-batches can be
// in flight at once (GPipe / 1F1B pipeline schedules).
//
// Gradient contract (as in kernels/conv.h): parameter gradients ACCUMULATE into
// Parameter::grad (call zero_grad() between steps; gradient accumulation is free);
// the returned input gradient is a fresh tensor. backward(..., need_input_grad = false)
// returns an undefined tensor and skips that work (the first layer of a model).
//
// Gradient-ready hook (what DDP's autograd hooks are for): when set, backward() calls it for
// each of a module's own parameters right after that module's backward_impl returns — the
// moment its gradient for this backward pass is complete (every module runs once per forward;
// a module used twice would fire twice). Parameters fire in reverse order of use, so gradient
// buckets can be all-reduced while the rest of the backward runs.
//
// Names: children and parameters are registered with PyTorch's state_dict names, so
// state_dict() yields "stages.0.0.conv1.weight" etc. exactly as medicalcnn.md specifies.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "kernels/tensor.h"

namespace lancet {

struct Parameter {
  Tensor value;
  Tensor grad;  // same shape, device and dtype as value; zeroed by zero_grad()
};

// What one forward call saved for its backward. Modules derive their own.
struct Saved {
  virtual ~Saved() = default;
};
using SavedPtr = std::unique_ptr<Saved>;

class Module {
 public:
  Module() = default;
  virtual ~Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  // saved == nullptr: inference, nothing is kept. Otherwise *saved receives the state for backward.
  Tensor forward(const Tensor& x, SavedPtr* saved, const Stream& s);
  Tensor backward(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s);

  virtual const char* type_name() const = 0;

  // Mode: training (batch statistics, dropout on) or eval. Applies recursively.
  void train(bool on = true);
  void eval() { train(false); }
  bool training() const { return training_; }

  // Visits this module and every descendant, parents first, with qualified names ("" for this).
  void apply(const std::function<void(const std::string& name, Module& m)>& fn, const std::string& prefix = "");

  // Trainable parameters and buffers (running statistics) with qualified names, in
  // registration order (= PyTorch's state_dict order).
  std::vector<std::pair<std::string, Parameter*>> named_parameters();
  std::vector<std::pair<std::string, Tensor*>> named_buffers();
  // Parameters then buffers, interleaved per module as PyTorch's state_dict orders them.
  std::vector<std::pair<std::string, Tensor*>> state_dict();

  int64_t num_parameters();  // trainable elements
  void zero_grad();
  // Moves every parameter, gradient and buffer to `device` (a copy; old storage is released).
  void to(Device device);
  Device device() const { return device_; }

  // Mixed precision, emulated on the CPU (compute in float, round on store): with t = f16 or
  // bf16, this module and every descendant round their outputs and input gradients to t
  // (round to nearest even; fp16 overflows to inf), Conv2d and Linear compute with their
  // weights and biases rounded to t (a rounded copy per call: Parameter::value stays the FP32
  // master and parameter gradients accumulate in FP32), and the module it is called on (the
  // model) rounds its input and the incoming loss gradient. BatchNorm's statistics and
  // parameters stay FP32. t = f32 turns it off. CPU only.
  void set_precision(DType t);
  DType precision() const { return precision_; }

  // Sets (or, with an empty function, clears) the gradient-ready hook of this module and every
  // descendant.
  using GradReadyHook = std::function<void(Parameter&)>;
  void set_grad_ready_hook(GradReadyHook hook);

  // Children, by registered name.
  Module* child(const std::string& name) const;
  const std::vector<std::pair<std::string, std::unique_ptr<Module>>>& children() const { return children_; }

 protected:
  virtual Tensor forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) = 0;
  virtual Tensor backward_impl(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) = 0;
  // Checked by forward() before forward_impl; throws naming the module and the shape.
  virtual void check_input(const Tensor& x) const {}

  Parameter& register_parameter(const std::string& name, Tensor value);
  Tensor& register_buffer(const std::string& name, Tensor value);
  template <typename M>
  M& register_module(const std::string& name, std::unique_ptr<M> m) {
    M& ref = *m;
    children_.emplace_back(name, std::move(m));
    return ref;
  }

 private:
  void collect(const std::string& prefix, std::vector<std::pair<std::string, Parameter*>>* params,
               std::vector<std::pair<std::string, Tensor*>>* buffers, std::vector<std::pair<std::string, Tensor*>>* state);

  std::vector<std::pair<std::string, std::unique_ptr<Parameter>>> params_;
  std::vector<std::pair<std::string, std::unique_ptr<Tensor>>> buffers_;
  std::vector<std::pair<std::string, std::unique_ptr<Module>>> children_;
  bool training_ = true;
  Device device_ = Device::cpu();
  DType precision_ = DType::f32;
  bool rounds_weights_ = false;  // Conv2d / Linear under f16 or bf16
  bool rounds_entry_ = false;    // the module set_precision was called on
  std::shared_ptr<const GradReadyHook> grad_ready_hook_;
};

}  // namespace lancet
