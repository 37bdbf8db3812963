#include "trainer/loss_scaler.h"

#include <cmath>

#include "kernels/optim.h"

namespace lancet {

LossScaler::LossScaler(const LossScalerConfig& cfg) : cfg_(cfg), scale_(cfg.init_scale) {}

bool LossScaler::unscale_and_check(const std::vector<Tensor*>& grads, const Stream& s) const {
  if (!cfg_.enabled) return true;
  return unscale_and_check_finite(grads, inv_scale(), s);
}

bool LossScaler::check_finite(const std::vector<Tensor*>& grads, const Stream& s) const {
  if (!cfg_.enabled) return true;
  return all_finite(std::vector<const Tensor*>(grads.begin(), grads.end()), s);
}

float LossScaler::inv_scale() const {
  if (!cfg_.enabled) return 1.f;
  return static_cast<float>(1.0 / static_cast<double>(scale_));  // torch: scale.double().reciprocal().float()
}

void LossScaler::update(bool finite) {
  if (!cfg_.enabled) return;
  if (!finite) {  // torch's _amp_update_scale_
    scale_ = static_cast<float>(static_cast<double>(scale_) * cfg_.backoff_factor);
    growth_tracker_ = 0;
    ++skipped_steps_;
    return;
  }
  if (++growth_tracker_ == cfg_.growth_interval) {
    const float grown = static_cast<float>(static_cast<double>(scale_) * cfg_.growth_factor);
    if (std::isfinite(grown)) scale_ = grown;
    growth_tracker_ = 0;
  }
}

Json LossScaler::state() const {
  return {{"scale", scale_}, {"growth_tracker", growth_tracker_}, {"skipped_steps", skipped_steps_}};
}

void LossScaler::load_state(const Json& j, const std::string& where) {
  try {
    scale_ = j.at("scale").get<float>();
    growth_tracker_ = j.at("growth_tracker").get<int64_t>();
    skipped_steps_ = j.at("skipped_steps").get<int64_t>();
  } catch (const Json::exception& e) {
    LANCET_FAIL(where << ": damaged loss scaler state: " << e.what());
  }
  LANCET_CHECK(scale_ > 0 && std::isfinite(scale_), where << ": loss scaler state has scale " << scale_);
}

}  // namespace lancet
