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
  // Bumped by every in-place change of value that lancet makes (optimizer steps, weight and
  // checkpoint loading). What is derived from value — the 16-bit weight copies of mixed
  // precision on a GPU — is rebuilt when it (or value's storage) changes; code that writes
  // value in place by other means must bump it too.
  uint64_t version = 0;
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

  // Mixed precision with t = f16 or bf16 (t = f32 turns it off); Parameter::value stays the
  // FP32 master, parameter gradients accumulate in FP32, BatchNorm's statistics and parameters
  // stay FP32, and the module it is called on (the model) keeps FP32 at its edges.
  //   CPU, emulated (compute in float, round on store): this module and every descendant round
  //   their outputs and input gradients to t (round to nearest even; fp16 overflows to inf),
  //   Conv2d and Linear compute with their weights and biases rounded to t (a rounded copy per
  //   call), and the model rounds its input and the incoming loss gradient.
  //   GPU, real 16-bit storage: the model casts its FP32 input and loss gradient to t at entry
  //   and its output and input gradient back to FP32 at exit; in between every activation and
  //   activation gradient is a t tensor (kernels compute in float and round once per store).
  //   Conv2d and Linear run their GEMMs (cuDNN, cuBLASLt tensor cores) on a cached t copy of
  //   their weight, cast again only when Parameter::version or value's storage changed (once
  //   per optimizer step, shared by every micro-batch), with biases in FP32; their weight
  //   gradients go into the FP32 .grad (kernels/conv.h, linear.h).
  // The GPU rounds at the same places plus a few inside modules whose intermediates the CPU
  // keeps in float (the SE squeeze and gate, block-internal sums), so the two agree to a few
  // 16-bit ulps, not bitwise (tests/test_gpu_amp.cpp).
  void set_precision(DType t);
  DType precision() const { return precision_; }

  // Memory format of the activations inside the module (kernels/tensor.h): with channels_last,
  // the module it is called on (the model) converts its 4-D input and incoming gradient to
  // channels_last at entry and its 4-D output and input gradient back to nchw at exit, and
  // every layer inside allocates its outputs and gradients in its input's format
  // (Tensor::empty_like), so the whole forward and backward run NHWC — what cuDNN's tensor-core
  // convolutions want — with layout conversions only at the edges. Parameters, their
  // gradients, checkpoints and weight files stay nchw (PyTorch's layout); on a GPU, Conv2d
  // computes with a cached channels_last copy of its weight (refreshed as the 16-bit copies
  // are). On the CPU every kernel gives the same bits in either format (the CPU convolution
  // converts to nchw internally), which is what tests check the layout logic against. Call
  // set_precision and set_memory_format on the same module (the model).
  void set_memory_format(MemoryFormat f);
  MemoryFormat memory_format() const { return memory_format_; }

  // What the model does to a tensor entering it (its input, or the loss gradient entering its
  // backward) and leaving it (its output, its input gradient): entry rounds (CPU emulation) or
  // casts (GPU) to the low precision and converts a 4-D tensor to the memory format; exit casts
  // back to FP32 (GPU) and converts a 4-D tensor back to nchw. Identity for f32 and nchw. A
  // pipeline runs the model's units directly and calls these at its ends.
  Tensor to_compute(const Tensor& t, const Stream& s) const;
  Tensor from_compute(const Tensor& t, const Stream& s) const;

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
  bool gemm_ = false;  // Conv2d / Linear: computes with rounded / cached copies of its weights (mark_gemm)
  MemoryFormat memory_format_ = MemoryFormat::nchw;
  bool edge_ = false;  // the module set_precision / set_memory_format was called on: converts at entry and exit
  std::shared_ptr<const GradReadyHook> grad_ready_hook_;
  // The parameters to compute with during one forward or backward: under mixed precision the
  // rounded (CPU) weights, on a GPU the cached compute copies (16-bit, channels_last) that
  // Conv2d / Linear swap in; else none.
  std::vector<std::pair<Parameter*, Tensor>> compute_weights(const Stream& s);
  void mark_gemm();
  // set_precision / set_memory_format: `set` on this module and every descendant, their
  // weight copies dropped, this module the one converting at the edges.
  void set_compute(const std::function<void(Module&)>& set);
  // GPU: per entry of params_, the copy of value that Conv2d / Linear compute with (16-bit
  // under mixed precision; channels_last for a 4-D weight under channels_last) and what it was
  // made from (value's storage and version); undefined for parameters used as they are (biases).
  struct WeightCopy {
    Tensor low;
    const void* master = nullptr;
    uint64_t version = 0;
  };
  std::vector<WeightCopy> weight_copies_;
};

}  // namespace lancet
