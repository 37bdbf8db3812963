#include "trainer/loss_scaler.h"

#include <cmath>
#include <iomanip>
#include <sstream>

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
    const float backed_off = static_cast<float>(static_cast<double>(scale_) * cfg_.backoff_factor);
    // Halved ~165 times from 2^16 (below ~2^-128 even 1/scale overflows): a scale of 0 would
    // zero every gradient, and its checkpoint could not be loaded (load_state requires > 0).
    LANCET_CHECK(backed_off > 0, "the loss scale fell to 0 after "
                                     << skipped_steps_ + 1
                                     << " skipped steps: gradients are not finite at any scale, so the scaling is not "
                                        "the cause (an inf/NaN from the data or the model: fp16's range, max 65504, in "
                                        "activations?); try train.precision=bf16, or check data.mean/std and optim.lr");
    scale_ = backed_off;
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

std::string LossScaler::skip_message(int64_t step, float scale_before) const {
  std::ostringstream os;
  os << "step " << step << ": inf/NaN gradients, step skipped, loss scale " << loss_scale_str(scale_before) << " -> "
     << loss_scale_str(scale()) << " (" << skipped_steps_ << " skipped so far)";
  return os.str();
}

bool log_skipped_step(int64_t skipped_so_far, int64_t steps_since_last_line) {
  const bool power_of_two = skipped_so_far > 0 && (skipped_so_far & (skipped_so_far - 1)) == 0;
  return skipped_so_far <= 5 || power_of_two || steps_since_last_line < 0 || steps_since_last_line >= 1000;
}

std::string loss_scale_str(float scale) {
  std::ostringstream os;
  if (scale >= 1 && scale < 1e15f && scale == std::floor(scale))
    os << std::fixed << std::setprecision(0) << scale;  // the usual powers of two, in full
  else
    os << scale;
  return os.str();
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
