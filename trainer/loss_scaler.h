// loss_scaler.h — dynamic loss scaling for fp16 training, with torch.cuda.amp.GradScaler's
// semantics.
//
// The loss gradient is multiplied by scale() before the backward, so small fp16 activation
// gradients do not flush to zero. Before the optimizer step, unscale_and_check() multiplies the
// (all-reduced) gradients by 1/scale and reports whether all of them were finite; the caller
// then skips the optimizer step when they were not, and calls update():
//   * a non-finite gradient: scale *= backoff_factor, growth tracker reset (step skipped);
//   * growth_interval finite steps in a row: scale *= growth_factor (kept only when finite).
// Disabled (bf16, fp32): scale() is 1 and unscale_and_check() / update() do nothing.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/tensor.h"
#include "trainer/config.h"

namespace lancet {

class LossScaler {
 public:
  explicit LossScaler(const LossScalerConfig& cfg = {});

  bool enabled() const { return cfg_.enabled; }
  float scale() const { return cfg_.enabled ? scale_ : 1.f; }
  int64_t growth_tracker() const { return growth_tracker_; }
  int64_t skipped_steps() const { return skipped_steps_; }  // in the whole run

  // grads *= 1/scale in place; true when every element was finite (then the step may be
  // taken). Undefined entries are skipped. Disabled: true, gradients untouched.
  bool unscale_and_check(const std::vector<Tensor*>& grads, const Stream& s) const;
  // The fused variant (GPU): true when every element is finite, the gradients left scaled (one
  // read-only pass); the optimizer step then multiplies them by inv_scale() as it reads them
  // (Optimizer::step's grad_scale_inv), the same float product unscale_and_check computes.
  // Disabled: true, and inv_scale() is 1.
  bool check_finite(const std::vector<Tensor*>& grads, const Stream& s) const;
  float inv_scale() const;
  // After every step (taken or skipped), with what unscale_and_check returned.
  void update(bool finite);

  // {"scale", "growth_tracker", "skipped_steps"} for checkpoints; load_state takes the same
  // (throws naming `where` on a missing or mistyped field).
  Json state() const;
  void load_state(const Json& j, const std::string& where);

 private:
  LossScalerConfig cfg_;
  float scale_;
  int64_t growth_tracker_ = 0;  // consecutive finite steps since the last change of scale
  int64_t skipped_steps_ = 0;
};

}  // namespace lancet
