// optimizer.cpp — each step is one multi-tensor update over all parameters (kernels/optim.h):
// on a GPU a few fused launches, on the CPU the same results as stepping parameter by
// parameter. Every parameter is updated (Parameter::grad always exists; zero_grad zeroes it).
#include "trainer/optimizer.h"

#include "kernels/optim.h"

namespace lancet {
namespace {

class Sgd final : public Optimizer {
 public:
  Sgd(const OptimConfig& c, Params params) : Optimizer(std::move(params), c.lr) {
    p_.momentum = c.momentum;
    p_.weight_decay = c.weight_decay;
    p_.nesterov = c.nesterov;
    for (auto& [name, prm] : params_) buf_.push_back(Tensor::zeros(prm->value.shape(), DType::f32, prm->value.device()));
  }
  void step_impl(const Stream& s, float grad_scale_inv) override {
    p_.lr = lr_;
    for (const DeviceGroup& g : groups_) {
      std::vector<Tensor*> values, bufs;
      std::vector<const Tensor*> grads;
      for (size_t i : g.index) {
        values.push_back(&params_[i].second->value);
        grads.push_back(&params_[i].second->grad);
        bufs.push_back(&buf_[i]);
      }
      sgd_step_multi(p_, steps_ == 0, values, grads, bufs, group_stream(g, s), grad_scale_inv);
    }
    ++steps_;
  }
  std::vector<std::pair<std::string, Tensor*>> state() override {
    std::vector<std::pair<std::string, Tensor*>> out;
    for (size_t i = 0; i < params_.size(); ++i) out.emplace_back(params_[i].first + ".momentum_buffer", &buf_[i]);
    return out;
  }

 private:
  SgdParams p_;
  std::vector<Tensor> buf_;
};

class Adam final : public Optimizer {
 public:
  Adam(const OptimConfig& c, Params params, bool decoupled) : Optimizer(std::move(params), c.lr) {
    p_.beta1 = c.beta1;
    p_.beta2 = c.beta2;
    p_.eps = c.eps;
    p_.weight_decay = c.weight_decay;
    p_.decoupled = decoupled;
    for (auto& [name, prm] : params_) {
      m_.push_back(Tensor::zeros(prm->value.shape(), DType::f32, prm->value.device()));
      v_.push_back(Tensor::zeros(prm->value.shape(), DType::f32, prm->value.device()));
    }
  }
  void step_impl(const Stream& s, float grad_scale_inv) override {
    p_.lr = lr_;
    ++steps_;
    for (const DeviceGroup& g : groups_) {
      std::vector<Tensor*> values, ms, vs;
      std::vector<const Tensor*> grads;
      for (size_t i : g.index) {
        values.push_back(&params_[i].second->value);
        grads.push_back(&params_[i].second->grad);
        ms.push_back(&m_[i]);
        vs.push_back(&v_[i]);
      }
      adam_step_multi(p_, steps_, values, grads, ms, vs, group_stream(g, s), grad_scale_inv);
    }
  }
  std::vector<std::pair<std::string, Tensor*>> state() override {
    std::vector<std::pair<std::string, Tensor*>> out;
    for (size_t i = 0; i < params_.size(); ++i) {
      out.emplace_back(params_[i].first + ".exp_avg", &m_[i]);
      out.emplace_back(params_[i].first + ".exp_avg_sq", &v_[i]);
    }
    return out;
  }

 private:
  AdamParams p_;
  std::vector<Tensor> m_, v_;
};

}  // namespace

std::vector<DeviceGroup> group_by_device(const std::vector<Device>& devices) {
  std::vector<DeviceGroup> groups;
  for (size_t i = 0; i < devices.size(); ++i) {
    auto g = groups.begin();
    while (g != groups.end() && g->device != devices[i]) ++g;
    if (g == groups.end()) g = groups.insert(groups.end(), DeviceGroup{devices[i], {}});
    g->index.push_back(i);
  }
  return groups;
}

Optimizer::Optimizer(Params params, float lr) : params_(std::move(params)), lr_(lr) {
  std::vector<Device> devices;
  for (const auto& [name, p] : params_) devices.push_back(p->value.device());
  groups_ = group_by_device(devices);
}

Stream Optimizer::group_stream(const DeviceGroup& g, const Stream& s) const {
  for (size_t i : g.index)  // the state was made on that device
    LANCET_CHECK(params_[i].second->value.device() == g.device,
                 "optimizer: parameter " << params_[i].first << " is on " << params_[i].second->value.device().str()
                                         << " but was on " << g.device.str()
                                         << " when the optimizer was made (move the model before making it)");
  return stream_on(g.device, s);
}

void Optimizer::step(const Stream& s, float grad_scale_inv) {
  step_impl(s, grad_scale_inv);
  for (auto& [name, p] : params_) ++p->version;  // the weights changed: derived copies are stale
}

std::unique_ptr<Optimizer> make_optimizer(const OptimConfig& cfg, Optimizer::Params params) {
  if (cfg.name == "sgd") return std::make_unique<Sgd>(cfg, std::move(params));
  if (cfg.name == "adam") return std::make_unique<Adam>(cfg, std::move(params), false);
  if (cfg.name == "adamw") return std::make_unique<Adam>(cfg, std::move(params), true);
  LANCET_FAIL("unknown optimizer '" << cfg.name << "' (expected sgd, adam or adamw)");
}

}  // namespace lancet
