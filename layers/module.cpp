#include "layers/module.h"

#include "kernels/trace.h"

namespace lancet {

namespace {
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
  Tensor y = forward_impl(x, saved, s);
  LANCET_CHECK(!saved || *saved, type_name() << ": forward_impl saved nothing for backward");
  return y;
}

Tensor Module::backward(const Tensor& dy, Saved& saved, bool need_input_grad, const Stream& s) {
  TraceScope trace(type_name(), "backward");
  LANCET_CHECK(dy.defined(), type_name() << ": backward of an undefined gradient");
  LANCET_CHECK(dy.device() == device_, type_name() << ": gradient on " << dy.device().str()
                                                   << " but the module is on " << device_.str());
  Tensor dx = backward_impl(dy, saved, need_input_grad, s);
  LANCET_CHECK(!need_input_grad || dx.defined(), type_name() << ": backward_impl returned no input gradient");
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
    for (auto& p : m.params_) {
      p.second->value = p.second->value.to(device);
      p.second->grad = p.second->grad.to(device);
    }
    for (auto& b : m.buffers_) *b.second = b.second->to(device);
    m.device_ = device;
  });
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
