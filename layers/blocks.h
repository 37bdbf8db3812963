// blocks.h — the reusable blocks of MedicalCNN (see /shared/spec/medicalcnn.md), with the
// spec's child names so state_dict keys match the PyTorch reference.
#pragma once
#include <random>

#include "layers/layers.h"

namespace lancet {

// Squeeze-and-excitation that APPLIES its gate: x [N, C, H, W] ->
//   x * sigmoid(fc2(relu(fc1(mean_hw x))))[n, c]
// Children "fc1" (Linear C -> h, bias) and "fc2" (Linear h -> C, bias), h = max(1, C / reduction).
class SEBlock : public Module {
 public:
  SEBlock(std::mt19937_64& rng, int channels, int reduction);
  const char* type_name() const override { return "SEBlock"; }
  int channels() const { return c_; }
  int hidden() const { return h_; }

  // The excitation alone, for a block that fuses the channel scale into what follows it
  // (BasicResidualBlock: kernels/fused.h se_scale_residual_relu): g [N, C] =
  // sigmoid(fc2(relu(fc1(avgpool(x))))), in x's dtype; `saved` gets what gate_backward needs.
  // forward(x) is x * gate_forward(x).
  Tensor gate_forward(const Tensor& x, SavedPtr* saved, const Stream& s);
  // From dg = dL/dg [N, C]: the parameter gradients of fc1 and fc2 (accumulated), and, when dx
  // is defined, the gate path's part of dL/dx added into dx (dx += avgpool_backward(...)).
  void gate_backward(const Tensor& dg, Saved& saved, Tensor& dx, const Stream& s);
  // The gate saved by gate_forward (needed by the fused backward).
  static const Tensor& saved_gate(const Saved& saved);

 protected:
  Tensor forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) override;
  Tensor backward_impl(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) override;
  void check_input(const Tensor& x) const override;

 private:
  int c_, h_;
  Linear* fc1_ = nullptr;
  Linear* fc2_ = nullptr;
};

// The basic residual block with SE attention:
//   y = se(bn2(conv2(relu(bn1(conv1(x))))));  out = relu(y + shortcut(x))
// (the SE's channel scale, the residual add and the final ReLU run as one fused op,
// kernels/fused.h se_scale_residual_relu: bit for bit the unfused composition on the CPU.)
// (bn1 carries the ReLU: BatchNorm2d::set_fused_relu.)
// conv1 3x3 stride `stride`, conv2 3x3, no biases. shortcut = x, or down.0 (conv 1x1, stride)
// -> down.1 (BatchNorm) when stride != 1 or in_channels != out_channels.
class BasicResidualBlock : public Module {
 public:
  BasicResidualBlock(std::mt19937_64& rng, int in_channels, int out_channels, int stride, int se_reduction);
  const char* type_name() const override { return "BasicResidualBlock"; }
  bool has_downsample() const { return down_ != nullptr; }

 protected:
  Tensor forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) override;
  Tensor backward_impl(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) override;
  void check_input(const Tensor& x) const override;

 private:
  int in_;
  Conv2d* conv1_ = nullptr;
  BatchNorm2d* bn1_ = nullptr;
  Conv2d* conv2_ = nullptr;
  BatchNorm2d* bn2_ = nullptr;
  SEBlock* se_ = nullptr;
  Sequential* down_ = nullptr;  // null for the identity shortcut
};

// The multi-dilated (ASPP-style) context block on C channels with branch width b:
//   branches.k = Sequential(conv, BatchNorm with the ReLU folded in), C -> b: k = 0: 1x1;
//   k = 1, 2, 3: 3x3 with dilation k (padding k); concatenated (branch 0 first) -> project.0 conv 1x1 4b -> C ->
//   project.1 BatchNorm; out = relu(project + x).
class ContextBlock : public Module {
 public:
  ContextBlock(std::mt19937_64& rng, int channels, int branch_width);
  const char* type_name() const override { return "ContextBlock"; }

 protected:
  Tensor forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) override;
  Tensor backward_impl(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) override;
  void check_input(const Tensor& x) const override;

 private:
  int c_, b_;
  ModuleList* branches_ = nullptr;
  Sequential* project_ = nullptr;
};

}  // namespace lancet
