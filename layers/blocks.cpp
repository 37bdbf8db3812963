#include "layers/blocks.h"

#include <algorithm>

#include "kernels/activation.h"
#include "kernels/elementwise.h"
#include "kernels/fused.h"
#include "kernels/pool.h"
#include "kernels/trace.h"

namespace lancet {

// In-place activations below are safe because the module that produced the tensor keeps
// only its input (Linear, BatchNorm2d), never its output.

// ---- SEBlock --------------------------------------------------------------------------------

namespace {
struct SESaved : Saved {
  Tensor x, h, g;  // block input, relu(fc1) output, gate
  SavedPtr fc1, fc2;
};
}  // namespace

SEBlock::SEBlock(std::mt19937_64& rng, int channels, int reduction) : c_(channels) {
  LANCET_CHECK(channels > 0 && reduction > 0,
               "SEBlock: channels and reduction must be positive, got " << channels << ", " << reduction);
  h_ = std::max(1, channels / reduction);
  fc1_ = &register_module("fc1", std::make_unique<Linear>(rng, c_, h_));
  fc2_ = &register_module("fc2", std::make_unique<Linear>(rng, h_, c_));
}

void SEBlock::check_input(const Tensor& x) const {
  LANCET_CHECK(x.ndim() == 4 && x.dim(1) == c_, "SEBlock: expected input [N, " << c_ << ", H, W], got "
                                                                                << x.shape_str());
}

Tensor SEBlock::gate_forward(const Tensor& x, SavedPtr* saved, const Stream& s) {
  check_input(x);
  auto c = make_saved<SESaved>(saved);
  Tensor squeeze = Tensor::empty({x.dim(0), c_}, x.dtype(), x.device());
  global_avgpool_forward(x, squeeze, s);
  Tensor h = fc1_->forward(squeeze, c ? &c->fc1 : nullptr, s);
  relu_forward(h, h, s);
  Tensor g = fc2_->forward(h, c ? &c->fc2 : nullptr, s);
  sigmoid_forward(g, g, s);
  if (c) {
    c->x = x;
    c->h = h;
    c->g = g;
    *saved = std::move(c);
  }
  return g;
}

void SEBlock::gate_backward(const Tensor& dg, Saved& saved, Tensor& dx, const Stream& s) {
  auto& c = saved_as<SESaved>(saved, "SEBlock");
  dg.check_same_shape(c.g, "SEBlock gate backward: dg");
  Tensor da = Tensor::empty_like(dg);
  sigmoid_backward(c.g, dg, da, s);
  Tensor dh = fc2_->backward(da, *c.fc2, true, s);
  relu_backward(c.h, dh, dh, s);
  Tensor dsqueeze = fc1_->backward(dh, *c.fc1, dx.defined(), s);
  if (dx.defined()) {
    Tensor dpool = Tensor::empty_like(c.x);
    global_avgpool_backward(dsqueeze, dpool, s);
    add_inplace(dx, dpool, s);
  }
}

const Tensor& SEBlock::saved_gate(const Saved& saved) {
  const auto* c = dynamic_cast<const SESaved*>(&saved);
  LANCET_CHECK(c, "SEBlock: saved state of another module");
  return c->g;
}

Tensor SEBlock::forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) {
  const Tensor g = gate_forward(x, saved, s);
  Tensor y = Tensor::empty_like(x);
  channel_scale_forward(x, g, y, s);
  return y;
}

Tensor SEBlock::backward_impl(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) {
  auto& c = saved_as<SESaved>(saved, "SEBlock");
  dy.check_same_shape(c.x, "SEBlock backward: dy");
  // y = x * g: the direct path to x, and the gate's path back through the excitation MLP.
  Tensor dx = need_input_grad ? Tensor::empty_like(c.x) : Tensor();
  Tensor dg = Tensor::empty_like(c.g);
  channel_scale_backward(c.x, c.g, dy, dx, dg, s);
  gate_backward(dg, saved, dx, s);
  return dx;
}

// ---- BasicResidualBlock ---------------------------------------------------------------------

namespace {
struct ResidualSaved : Saved {
  SavedPtr conv1, bn1, conv2, bn2, se, down;
  Tensor r;    // bn2's output, the SE input
  Tensor out;  // block output
};
}  // namespace

BasicResidualBlock::BasicResidualBlock(std::mt19937_64& rng, int in_channels, int out_channels, int stride,
                                       int se_reduction)
    : in_(in_channels) {
  conv1_ = &register_module("conv1", std::make_unique<Conv2d>(rng, in_channels, out_channels, 3, stride, 1, 1, 1, false));
  bn1_ = &register_module("bn1", std::make_unique<BatchNorm2d>(out_channels));
  bn1_->set_fused_relu(true);  // relu(bn1(.)) in one pass
  conv2_ = &register_module("conv2", std::make_unique<Conv2d>(rng, out_channels, out_channels, 3, 1, 1, 1, 1, false));
  bn2_ = &register_module("bn2", std::make_unique<BatchNorm2d>(out_channels));
  se_ = &register_module("se", std::make_unique<SEBlock>(rng, out_channels, se_reduction));
  if (stride != 1 || in_channels != out_channels) {
    down_ = &register_module("down", std::make_unique<Sequential>());
    down_->emplace<Conv2d>(rng, in_channels, out_channels, 1, stride, 0, 1, 1, false);
    down_->emplace<BatchNorm2d>(out_channels);
  }
}

void BasicResidualBlock::check_input(const Tensor& x) const {
  LANCET_CHECK(x.ndim() == 4 && x.dim(1) == in_,
               "BasicResidualBlock: expected input [N, " << in_ << ", H, W], got " << x.shape_str());
}

Tensor BasicResidualBlock::forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) {
  auto c = make_saved<ResidualSaved>(saved);
  Tensor r1 = bn1_->forward(conv1_->forward(x, c ? &c->conv1 : nullptr, s), c ? &c->bn1 : nullptr, s);  // with ReLU
  const Tensor r = bn2_->forward(conv2_->forward(r1, c ? &c->conv2 : nullptr, s), c ? &c->bn2 : nullptr, s);
  // The SE gate, then relu(r * g + shortcut) in one pass (kernels/fused.h; on the CPU bit for
  // bit the unfused channel scale, add and ReLU).
  Tensor g;
  {
    TraceScope trace("SEBlock", "forward");  // the span Module::forward would have given it
    g = se_->gate_forward(r, c ? &c->se : nullptr, s);
  }
  const Tensor shortcut = down_ ? down_->forward(x, c ? &c->down : nullptr, s) : x;
  Tensor y = Tensor::empty_like(r);
  se_scale_residual_relu_forward(r, g, shortcut, y, s);
  if (c) {
    c->r = r;
    c->out = y;
    *saved = std::move(c);
  }
  return y;
}

Tensor BasicResidualBlock::backward_impl(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) {
  auto& c = saved_as<ResidualSaved>(saved, "BasicResidualBlock");
  dy.check_same_shape(c.out, "BasicResidualBlock backward: dy");
  // Through relu(r * g + shortcut): d = dy * (out > 0) to the shortcut, d * g to r, and
  // sum_hw d * r to the gate, which the SE's excitation MLP takes back (adding its part to dr).
  const Tensor& gate = SEBlock::saved_gate(*c.se);
  Tensor d = Tensor::empty_like(dy);  // d out / d (r g + shortcut)
  Tensor dr = Tensor::empty_like(c.r);
  Tensor dg = Tensor::empty_like(gate);
  se_scale_residual_relu_backward(c.r, gate, c.out, dy, dr, dg, d, s);
  {
    TraceScope trace("SEBlock", "backward");
    se_->gate_backward(dg, *c.se, dr, s);
  }
  Tensor g = conv2_->backward(bn2_->backward(dr, *c.bn2, true, s), *c.conv2, true, s);
  Tensor dx = conv1_->backward(bn1_->backward(g, *c.bn1, true, s), *c.conv1, need_input_grad, s);
  if (down_) {
    Tensor dshort = down_->backward(d, *c.down, need_input_grad, s);
    if (need_input_grad) add_inplace(dx, dshort, s);
  } else if (need_input_grad) {
    add_inplace(dx, d, s);
  }
  return dx;
}

// ---- ContextBlock ---------------------------------------------------------------------------

namespace {
struct ContextSaved : Saved {
  std::vector<SavedPtr> branches;
  SavedPtr project;
  Tensor out;
};
constexpr int kContextBranches = 4;
}  // namespace

ContextBlock::ContextBlock(std::mt19937_64& rng, int channels, int branch_width) : c_(channels), b_(branch_width) {
  LANCET_CHECK(channels > 0 && branch_width > 0,
               "ContextBlock: channels and branch width must be positive, got " << channels << ", " << branch_width);
  branches_ = &register_module("branches", std::make_unique<ModuleList>());
  for (int k = 0; k < kContextBranches; ++k) {
    auto& branch = branches_->emplace<Sequential>();
    if (k == 0)
      branch.emplace<Conv2d>(rng, c_, b_, 1, 1, 0, 1, 1, false);
    else
      branch.emplace<Conv2d>(rng, c_, b_, 3, 1, /*padding=*/k, /*dilation=*/k, 1, false);
    // BatchNorm -> ReLU in one pass (BatchNorm2d::set_fused_relu; bit for bit on the CPU). ReLU
    // has no parameters, so the names stay those of Sequential(conv, BatchNorm, ReLU).
    branch.emplace<BatchNorm2d>(b_).set_fused_relu(true);
  }
  project_ = &register_module("project", std::make_unique<Sequential>());
  project_->emplace<Conv2d>(rng, kContextBranches * b_, c_, 1, 1, 0, 1, 1, false);
  project_->emplace<BatchNorm2d>(c_);
}

void ContextBlock::check_input(const Tensor& x) const {
  LANCET_CHECK(x.ndim() == 4 && x.dim(1) == c_,
               "ContextBlock: expected input [N, " << c_ << ", H, W], got " << x.shape_str());
}

Tensor ContextBlock::forward_impl(const Tensor& x, SavedPtr* saved, const Stream& s) {
  auto c = make_saved<ContextSaved>(saved);
  if (c) c->branches.resize(kContextBranches);
  std::vector<Tensor> outs(kContextBranches);
  for (int k = 0; k < kContextBranches; ++k) outs[k] = (*branches_)[k].forward(x, c ? &c->branches[k] : nullptr, s);
  Tensor cat = Tensor::empty_like(x, {x.dim(0), kContextBranches * b_, x.dim(2), x.dim(3)});
  concat_channels_forward(outs, cat, s);
  Tensor y = project_->forward(cat, c ? &c->project : nullptr, s);  // ends in BatchNorm: fresh
  add_inplace(y, x, s);
  relu_forward(y, y, s);
  if (c) {
    c->out = y;
    *saved = std::move(c);
  }
  return y;
}

Tensor ContextBlock::backward_impl(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) {
  auto& c = saved_as<ContextSaved>(saved, "ContextBlock");
  dy.check_same_shape(c.out, "ContextBlock backward: dy");
  Tensor d = Tensor::empty_like(dy);  // d out / d (project + x)
  relu_backward(c.out, dy, d, s);
  Tensor dcat = project_->backward(d, *c.project, true, s);
  std::vector<Tensor> dbranch;
  for (int k = 0; k < kContextBranches; ++k)
    dbranch.push_back(Tensor::empty_like(dy, {dy.dim(0), b_, dy.dim(2), dy.dim(3)}));
  concat_channels_backward(dcat, dbranch, s);
  Tensor dx;
  for (int k = 0; k < kContextBranches; ++k) {
    Tensor dk = (*branches_)[k].backward(dbranch[k], *c.branches[k], need_input_grad, s);
    if (!need_input_grad) continue;
    if (dx.defined())
      add_inplace(dx, dk, s);
    else
      dx = dk;
  }
  if (need_input_grad) add_inplace(dx, d, s);
  return dx;
}

}  // namespace lancet
