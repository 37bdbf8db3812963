// schedule.h — learning-rate schedules and early stopping, with torch.optim.lr_scheduler's
// semantics, configured by the `schedule` and `early_stopping` config sections.
//
// The training loop drives them like this (steps count optimizer steps from 0 over the whole
// run; epochs are 1-based):
//   LrSchedule sched(config["schedule"], optim.lr, total_steps);
//   EarlyStopping stopper(config["early_stopping"]);
//   for each step:  opt.set_lr(sched.lr_for_step(global_step)); opt.step(stream); ...
//   at each epoch end, after validation:
//     sched.on_epoch_end(epoch, metric(sched.monitor()));
//     bool stop = stopper.update(epoch, metric(stopper.monitor()));
//     if (stopper.is_best()) export the best model;  if (stop) break;
// Both are deterministic functions of their state: state() goes into the checkpoint and
// load_state() on resume continues bit-identically.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "trainer/config.h"

namespace lancet {

// The sections with their defaults (the config's documented defaults come from here):
//   schedule: {"name": "constant", "warmup_steps": 0, "warmup_start_factor": 0.1,
//              "step_size": 30, "gamma": 0.1, "eta_min": 0.0, "t_max": 0, "monitor": "val_loss",
//              "mode": "min", "factor": 0.1, "patience": 10, "cooldown": 0, "min_lr": 0.0,
//              "threshold": 0.0001}
//   early_stopping: {"monitor": "val_loss", "mode": "min", "patience": 0, "min_delta": 0.0}
Json default_schedule_config();
Json default_early_stopping_config();

// Epoch metrics a schedule or early stopping can monitor (the names epochs.csv uses):
// val_loss, val_accuracy, val_balanced_accuracy, val_auroc, train_loss, train_accuracy.
// val_auroc is the report's `auroc` (binary, or the one-vs-rest macro mean), NaN when
// undefined (a validation set without both classes), and a NaN epoch never improves.
const std::vector<std::string>& monitorable_metrics();

// name (the main schedule; warm-up applies to any of them):
//   constant  lr = base_lr
//   step      StepLR stepped at every epoch end: base_lr * gamma^(epochs done / step_size)
//   cosine    CosineAnnealingLR stepped every optimizer step, starting after the warm-up:
//             eta_min + (base_lr - eta_min) * (1 + cos(pi * t / t_max)) / 2, t = step - warmup;
//             t_max 0 = total_steps - warmup_steps. Past t_max it rises again, as torch's does.
//   plateau   ReduceLROnPlateau on the epoch metric `monitor` (threshold_mode 'rel', eps 1e-8):
//             after more than `patience` epochs without improvement lr = max(lr*factor, min_lr),
//             then `cooldown` epochs in which bad epochs are not counted.
// Warm-up (warmup_steps > 0): torch's LinearLR from warmup_start_factor to 1 over the first
// warmup_steps steps. For cosine it is SequentialLR([LinearLR, CosineAnnealingLR]); for step
// and plateau the warm-up factor multiplies their lr, as chaining LinearLR (per step) with
// StepLR / ReduceLROnPlateau (per epoch) on one torch optimizer does (plateau's min_lr and eps
// then apply to the lr before the warm-up factor).
class LrSchedule {
 public:
  // Keys missing from `section` take their defaults; unknown keys and bad values throw one
  // line naming schedule.<key>. total_steps: optimizer steps in the whole run (cosine, t_max 0).
  LrSchedule(const Json& section, double base_lr, int64_t total_steps);

  // The learning rate for optimizer step `step` (0-based, whole run); call before the step.
  float lr_for_step(int64_t step) const;
  double lr_for_step_f64(int64_t step) const;  // the same before rounding to float

  // Call once at the end of every epoch (1-based, consecutive). `metric` is the value of
  // monitor() for that epoch; only plateau uses it (others may pass anything).
  void on_epoch_end(int epoch, double metric);

  const std::string& name() const { return name_; }
  const std::string& monitor() const { return monitor_; }
  bool uses_metric() const { return kind_ == Kind::plateau; }

  // {"name", "epochs_done", "plateau_lr", "best", "num_bad_epochs", "cooldown_counter",
  //  "t_max"}; load_state() throws on a state of another schedule or a missing field.
  Json state() const;
  void load_state(const Json& state);

 private:
  enum class Kind { constant, step, cosine, plateau };
  bool is_better(double metric) const;

  std::string name_, monitor_;
  Kind kind_ = Kind::constant;
  double base_lr_;
  int64_t warmup_steps_;
  double warmup_start_factor_;
  int64_t step_size_;
  double gamma_, eta_min_;
  int64_t t_max_config_, t_max_;  // as configured (0 = derived) and in effect
  bool mode_max_;
  double factor_, min_lr_, threshold_;
  int64_t patience_, cooldown_;
  // State.
  int epochs_done_ = 0;
  double plateau_lr_;                // ReduceLROnPlateau's current lr (before warm-up)
  double best_;                      // best metric so far (+-inf before the first)
  int64_t num_bad_epochs_ = 0, cooldown_counter_ = 0;
};

// Early stopping on an epoch metric: an epoch improves when its metric beats the best so far
// by more than min_delta (mode min: metric < best - min_delta; max: metric > best + min_delta);
// NaN never improves. update() returns true (stop) once `patience` consecutive epochs have not
// improved; patience 0 turns stopping off but still tracks the best epoch for is_best().
class EarlyStopping {
 public:
  explicit EarlyStopping(const Json& section);  // errors name early_stopping.<key>

  // Records epoch `epoch` (1-based, increasing) with its metric; true when training should stop.
  bool update(int epoch, double metric);
  bool is_best() const { return is_best_; }  // the last update() improved on the best
  bool enabled() const { return patience_ > 0; }
  // The last update() returned true; after load_state(), whether the saved run had stopped (a
  // resumed run that had stopped early does not train further).
  bool should_stop() const { return patience_ > 0 && bad_epochs_ >= patience_; }
  const std::string& monitor() const { return monitor_; }
  double best() const { return best_; }        // +-inf before the first finite improvement
  int best_epoch() const { return best_epoch_; }  // 0 before
  int64_t bad_epochs() const { return bad_epochs_; }

  Json state() const;  // {"best", "best_epoch", "bad_epochs", "last_epoch"}
  void load_state(const Json& state);

 private:
  std::string monitor_;
  bool mode_max_;
  int64_t patience_;
  double min_delta_;
  double best_;
  int best_epoch_ = 0, last_epoch_ = 0;
  int64_t bad_epochs_ = 0;
  bool is_best_ = false;
};

}  // namespace lancet
