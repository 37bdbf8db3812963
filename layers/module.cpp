#include "layers/module.h"

#include "kernels/elementwise.h"
#include "kernels/trace.h"

namespace lancet {

namespace {

// A fresh tensor when `copy`, else t itself, rounded in place to `precision`.
Tensor rounded(const Tensor& t, DType precision, bool copy) {
  Tensor r = copy ? t.clone() : t;
  round_to_dtype_inplace(r.data<float>(), r.numel(), precision);
  return r;
}

// Swaps parameter values for the low-precision ones for the duration of a forward or backward
// call, and back (also when the call throws).
class SwappedWeights {
 public:
  explicit SwappedWeights(std::vector<std::pair<Parameter*, Tensor>> low) {
    for (auto& [p, t] : low) {
      masters_.emplace_back(p, p->value);
      p->value = std::move(t);
    }
  }
  ~SwappedWeights() {
    for (auto& [p, master] : masters_) p->value = master;
  }
  SwappedWeights(const SwappedWeights&) = delete;
  SwappedWeights& operator=(const SwappedWeights&) = delete;

 private:
  std::vector<std::pair<Parameter*, Tensor>> masters_;
};

std::string qualify(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : prefix + "." + name;
}
}  // namespace

Tensor Module::forward(const Tensor& x, SavedPtr* saved, const Stream& s) {
  TraceScope trace(type_name(), "forward");
  LANCET_CHECK(x.defined(), type_name() << ": forward of an undefined tensor");
  LANCET_CHECK(x.device() == device_, type_name() << ": input on " << x.device().str() << " but the module is on "
                                                  << device_.str());
  LANCET_CHECK(s.device == device_, type_name() << ": stream on " << s.device.str() << " but the module is on "
                                                << device_.str());
  check_input(x);
  if (saved) saved->reset();
  const bool low = precision_ != DType::f32;
  const bool emulated = low && device_.is_cpu();  // else 16-bit tensors on the GPU
  Tensor y;
  {
    SwappedWeights weights(compute_weights(s));
    Tensor in = x;
    if (edge_) in = to_compute(x, s);
    y = forward_impl(in, saved, s);
  }
  LANCET_CHECK(!saved || *saved, type_name() << ": forward_impl saved nothing for backward");
  // In place: y is this call's own output (or a view of an input that is rounded already).
  if (emulated) rounded(y, precision_, /*copy=*/false);
  if (edge_) y = from_compute(y, s);  // FP32 nchw (a fresh tensor when it converts)
  return y;
}

Tensor Module::backward(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) {
  TraceScope trace(type_name(), "backward");
  LANCET_CHECK(dy.defined(), type_name() << ": backward of an undefined gradient");
  LANCET_CHECK(dy.device() == device_, type_name() << ": gradient on " << dy.device().str()
                                                   << " but the module is on " << device_.str());
  const bool low = precision_ != DType::f32;
  const bool emulated = low && device_.is_cpu();
  Tensor dx;
  {
    SwappedWeights weights(compute_weights(s));
    Tensor in = dy;
    if (edge_) in = to_compute(dy, s);
    dx = backward_impl(in, saved, need_input_grad, s);
  }
  LANCET_CHECK(!need_input_grad || dx.defined(), type_name() << ": backward_impl returned no input gradient");
  if (emulated && need_input_grad) rounded(dx, precision_, /*copy=*/false);
  if (edge_ && need_input_grad) dx = from_compute(dx, s);
  if (grad_ready_hook_)
    for (auto& p : params_) (*grad_ready_hook_)(*p.second);
  return need_input_grad ? dx : Tensor();
}

void Module::train(bool on) {
  training_ = on;
  for (auto& c : children_) c.second->train(on);
}

void Module::apply(const std::function<void(const std::string& name, Module& m)>& fn, const std::string& prefix) {
  fn(prefix, *this);
  for (auto& c : children_) c.second->apply(fn, qualify(prefix, c.first));
}

void Module::collect(const std::string& prefix, std::vector<std::pair<std::string, Parameter*>>* params,
                     std::vector<std::pair<std::string, Tensor*>>* buffers,
                     std::vector<std::pair<std::string, Tensor*>>* state) {
  // PyTorch's order: a module's own parameters, then its own buffers, then each child in turn.
  for (auto& p : params_) {
    if (params) params->emplace_back(qualify(prefix, p.first), p.second.get());
    if (state) state->emplace_back(qualify(prefix, p.first), &p.second->value);
  }
  for (auto& b : buffers_) {
    if (buffers) buffers->emplace_back(qualify(prefix, b.first), b.second.get());
    if (state) state->emplace_back(qualify(prefix, b.first), b.second.get());
  }
  for (auto& c : children_) c.second->collect(qualify(prefix, c.first), params, buffers, state);
}

std::vector<std::pair<std::string, Parameter*>> Module::named_parameters() {
  std::vector<std::pair<std::string, Parameter*>> out;
  collect("", &out, nullptr, nullptr);
  return out;
}

std::vector<std::pair<std::string, Tensor*>> Module::named_buffers() {
  std::vector<std::pair<std::string, Tensor*>> out;
  collect("", nullptr, &out, nullptr);
  return out;
}

std::vector<std::pair<std::string, Tensor*>> Module::state_dict() {
  std::vector<std::pair<std::string, Tensor*>> out;
  collect("", nullptr, nullptr, &out);
  return out;
}

int64_t Module::num_parameters() {
  int64_t n = 0;
  for (auto& p : named_parameters()) n += p.second->value.numel();
  return n;
}

void Module::zero_grad() {
  for (auto& p : named_parameters()) p.second->grad.zero_();
}

void Module::to(Device device) {
  apply([device](const std::string&, Module& m) {
    if (m.device_ == device) return;
    m.weight_copies_.clear();
    for (auto& p : m.params_) {
      p.second->value = p.second->value.to(device);
      p.second->grad = p.second->grad.to(device);
    }
    for (auto& b : m.buffers_) *b.second = b.second->to(device);
    m.device_ = device;
  });
}

void Module::set_precision(DType t) {
  LANCET_CHECK(t == DType::f32 || t == DType::f16 || t == DType::bf16,
               type_name() << ": precision " << dtype_name(t) << " (expected f32, f16 or bf16)");
  set_compute([t](Module& m) { m.precision_ = t; });
}

void Module::set_memory_format(MemoryFormat f) {
  set_compute([f](Module& m) { m.memory_format_ = f; });
}

void Module::set_compute(const std::function<void(Module&)>& set) {
  apply([&set](const std::string&, Module& m) {
    set(m);
    m.weight_copies_.clear();  // made for the old settings
    m.mark_gemm();
    m.edge_ = false;
  });
  edge_ = true;  // this module (the model) converts at its edges
}

void Module::mark_gemm() {
  const std::string type = type_name();
  gemm_ = type == "Conv2d" || type == "Linear";  // the layers whose weights are GEMM operands
}

Tensor Module::to_compute(const Tensor& t, const Stream& s) const {
  Tensor r = t;
  if (precision_ != DType::f32)
    r = device_.is_cpu() ? rounded(t, precision_, /*copy=*/true) : cast_to(t, precision_, s);
  if (r.ndim() == 4 && r.format() != memory_format_) r = to_format(r, memory_format_, s);
  return r;
}

Tensor Module::from_compute(const Tensor& t, const Stream& s) const {
  Tensor r = t;
  if (r.ndim() == 4 && r.format() != MemoryFormat::nchw) r = to_format(r, MemoryFormat::nchw, s);  // in 16 bits: fewer bytes
  if (r.dtype() != DType::f32 && device_.is_cuda()) r = cast_to(r, DType::f32, s);
  return r;
}

std::vector<std::pair<Parameter*, Tensor>> Module::compute_weights(const Stream& s) {
  std::vector<std::pair<Parameter*, Tensor>> out;
  if (!gemm_) return out;
  if (device_.is_cpu()) {  // the emulation: a rounded copy of every parameter, per call
    if (precision_ != DType::f32)
      for (auto& p : params_) out.emplace_back(p.second.get(), rounded(p.second->value, precision_, /*copy=*/true));
    return out;  // (a CPU convolution takes an nchw weight whatever the activations' format)
  }
  // GPU: the GEMM operands (weights) as cached copies in the precision and, for a convolution's
  // 4-D weight, the memory format the layer computes in; biases stay FP32 as the conv and
  // linear kernels take them.
  weight_copies_.resize(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    Parameter& p = *params_[i].second;
    if (p.value.ndim() < 2) continue;
    const MemoryFormat format = p.value.ndim() == 4 ? memory_format_ : MemoryFormat::nchw;
    if (precision_ == p.value.dtype() && format == p.value.format()) continue;  // computes with the master
    WeightCopy& c = weight_copies_[i];
    const bool fits = c.low.defined() && c.low.dtype() == precision_ && c.low.shape() == p.value.shape() &&
                      c.low.format() == format;
    if (!fits) c.low = Tensor::empty(p.value.shape(), precision_, p.value.device(), format);
    if (!fits || c.master != p.value.raw_data() || c.version != p.version) {
      // Ordered on s after whatever last wrote value (the optimizer): cast, then lay out.
      if (format == p.value.format()) {
        cast(p.value, c.low, s);
      } else {
        convert_format(cast_to(p.value, precision_, s), c.low, s);
      }
      c.master = p.value.raw_data();
      c.version = p.version;
    }
    out.emplace_back(&p, c.low);
  }
  return out;
}

void Module::set_grad_ready_hook(GradReadyHook hook) {
  auto shared = hook ? std::make_shared<const GradReadyHook>(std::move(hook)) : nullptr;
  apply([&shared](const std::string&, Module& m) { m.grad_ready_hook_ = shared; });
}

Module* Module::child(const std::string& name) const {
  for (auto& c : children_)
    if (c.first == name) return c.second.get();
  return nullptr;
}

Parameter& Module::register_parameter(const std::string& name, Tensor value) {
  LANCET_CHECK(value.defined(), type_name() << ": parameter '" << name << "' is undefined");
  for (auto& p : params_) LANCET_CHECK(p.first != name, type_name() << ": parameter '" << name << "' registered twice");
  auto p = std::make_unique<Parameter>();
  p->grad = Tensor::zeros(value.shape(), value.dtype(), value.device());
  p->value = std::move(value);
  params_.emplace_back(name, std::move(p));
  return *params_.back().second;
}

Tensor& Module::register_buffer(const std::string& name, Tensor value) {
  LANCET_CHECK(value.defined(), type_name() << ": buffer '" << name << "' is undefined");
  for (auto& b : buffers_) LANCET_CHECK(b.first != name, type_name() << ": buffer '" << name << "' registered twice");
  buffers_.emplace_back(name, std::make_unique<Tensor>(std::move(value)));
  return *buffers_.back().second;
}

}  // namespace lancet
