// loss_scaler.h — dynamic loss scaling for fp16 training, with torch.cuda.amp.GradScaler's
// semantics.
//
// The loss gradient is multiplied by scale() before the backward, so small fp16 activation
// gradients do not flush to zero. Before the optimizer step, unscale_and_check() multiplies the
// (all-reduced) gradients by 1/scale and reports whether all of them were finite; the caller
// then skips the optimizer step when they were not, and calls update():
//   * a non-finite gradient: scale *= backoff_factor, growth tracker reset (step skipped);
//   * growth_interval finite steps in a row: scale *= growth_factor (kept only when finite).
// A backoff to 0 throws instead (the scale stays positive, so its state stays loadable): then
// the gradients are not finite at any scale, and the scaling is not what makes them so.
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
  // After every step (taken or skipped), with what unscale_and_check returned. Throws when a
  // backoff would take the scale to 0, leaving the state as it was.
  void update(bool finite);

  // The training log's line for a step skipped with `scale_before` (called after update(false)):
  // "step 12: inf/NaN gradients, step skipped, loss scale 65536 -> 32768 (3 skipped so far)".
  std::string skip_message(int64_t step, float scale_before) const;

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

// Whether the training log reports a skipped step (the per-step records in steps.jsonl hold every
// one): each of a run's first 5, then one whose run count is a power of two or that comes at
// least 1000 steps after the last reported one (steps_since_last_line < 0: none reported yet in
// this session). A burst of skips (the scale falling) takes O(log n) lines; a healthy run's
// occasional overflow, one line each.
bool log_skipped_step(int64_t skipped_so_far, int64_t steps_since_last_line);

// A loss scale for the log: 65536, 1000.1, 7.88861e-31.
std::string loss_scale_str(float scale);

}  // namespace lancet
