// schedule.cpp — LR schedules and early stopping (see schedule.h). Arithmetic is in double as
// torch's Python schedulers do; StepLR multiplies gamma once per decay as torch's recursive form.
#include "trainer/schedule.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "kernels/error.h"

namespace lancet {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kPlateauEps = 1e-8;  // ReduceLROnPlateau's eps: smaller reductions are ignored

// A config section checked against its defaults: unknown keys and wrong types throw naming
// <section>.<key>; missing keys take the default.
class Section {
 public:
  Section(const Json& given, Json defaults, const char* name) : name_(name), j_(std::move(defaults)) {
    LANCET_CHECK(given.is_object(), name_ << ": expected a section of settings, got " << given.dump());
    for (auto it = given.begin(); it != given.end(); ++it) {
      if (!j_.contains(it.key())) {
        std::string valid;
        for (auto d = j_.begin(); d != j_.end(); ++d) valid += (valid.empty() ? "" : ", ") + d.key();
        LANCET_FAIL("unknown setting '" << name_ << "." << it.key() << "'; valid keys: " << valid);
      }
      j_[it.key()] = it.value();
    }
  }
  std::string key(const char* k) const { return name_ + "." + k; }
  int64_t integer(const char* k, int64_t min) const {
    const Json& v = j_.at(k);
    LANCET_CHECK(v.is_number_integer(), key(k) << " must be an integer, got " << v.dump());
    const int64_t i = v.get<int64_t>();
    LANCET_CHECK(i >= min, key(k) << " must be >= " << min << ", got " << i);
    return i;
  }
  double number(const char* k) const {
    const Json& v = j_.at(k);
    LANCET_CHECK(v.is_number(), key(k) << " must be a number, got " << v.dump());
    const double d = v.get<double>();
    LANCET_CHECK(std::isfinite(d), key(k) << " must be finite, got " << d);
    return d;
  }
  std::string string(const char* k) const {
    const Json& v = j_.at(k);
    LANCET_CHECK(v.is_string(), key(k) << " must be a string, got " << v.dump());
    return v.get<std::string>();
  }
  bool mode_max() const {
    const std::string m = string("mode");
    LANCET_CHECK(m == "min" || m == "max", key("mode") << " must be min or max, got '" << m << "'");
    return m == "max";
  }
  std::string monitor() const {
    const std::string m = string("monitor");
    const auto& names = monitorable_metrics();
    if (std::find(names.begin(), names.end(), m) == names.end()) {
      std::string valid;
      for (const auto& n : names) valid += (valid.empty() ? "" : ", ") + n;
      LANCET_FAIL(key("monitor") << " must be one of " << valid << ", got '" << m << "'");
    }
    return m;
  }

 private:
  std::string name_;
  Json j_;
};

// JSON has no infinities or NaN: non-finite doubles are stored as the strings "inf", "-inf",
// "nan"; finite ones as numbers (nlohmann writes the shortest exact round-trip form).
Json encode(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  return d;
}

const Json& field(const Json& state, const char* what, const char* key) {
  LANCET_CHECK(state.is_object() && state.contains(key), what << " state: missing field '" << key << "'");
  return state.at(key);
}

double decode_double(const Json& state, const char* what, const char* key) {
  const Json& v = field(state, what, key);
  if (v.is_number()) return v.get<double>();
  if (v == "inf") return kInf;
  if (v == "-inf") return -kInf;
  if (v == "nan") return std::numeric_limits<double>::quiet_NaN();
  LANCET_FAIL(what << " state: field '" << key << "' must be a number, got " << v.dump());
}

int64_t decode_int(const Json& state, const char* what, const char* key) {
  const Json& v = field(state, what, key);
  LANCET_CHECK(v.is_number_integer() && v.get<int64_t>() >= 0,
               what << " state: field '" << key << "' must be a non-negative integer, got " << v.dump());
  return v.get<int64_t>();
}

}  // namespace

Json default_schedule_config() {
  return Json{{"name", "constant"}, {"warmup_steps", 0}, {"warmup_start_factor", 0.1}, {"step_size", 30},
              {"gamma", 0.1},       {"eta_min", 0.0},    {"t_max", 0},                 {"monitor", "val_loss"},
              {"mode", "min"},      {"factor", 0.1},     {"patience", 10},             {"cooldown", 0},
              {"min_lr", 0.0},      {"threshold", 0.0001}};
}

Json default_early_stopping_config() {
  return Json{{"monitor", "val_loss"}, {"mode", "min"}, {"patience", 0}, {"min_delta", 0.0}};
}

const std::vector<std::string>& monitorable_metrics() {
  static const std::vector<std::string> names = {"val_loss",   "val_accuracy", "val_balanced_accuracy",
                                                 "val_auroc",  "train_loss",   "train_accuracy"};
  return names;
}

// ---- LrSchedule ------------------------------------------------------------------------

LrSchedule::LrSchedule(const Json& section, double base_lr, int64_t total_steps) {
  const Section c(section, default_schedule_config(), "schedule");
  name_ = c.string("name");
  if (name_ == "constant")
    kind_ = Kind::constant;
  else if (name_ == "step")
    kind_ = Kind::step;
  else if (name_ == "cosine")
    kind_ = Kind::cosine;
  else if (name_ == "plateau")
    kind_ = Kind::plateau;
  else
    LANCET_FAIL("schedule.name must be one of constant, step, cosine, plateau, got '" << name_ << "'");
  LANCET_CHECK(std::isfinite(base_lr) && base_lr > 0, "schedule: the base learning rate must be positive, got "
                                                          << base_lr);
  LANCET_CHECK(total_steps >= 0, "schedule: total_steps must be >= 0, got " << total_steps);
  base_lr_ = base_lr;
  warmup_steps_ = c.integer("warmup_steps", 0);
  warmup_start_factor_ = c.number("warmup_start_factor");
  LANCET_CHECK(warmup_start_factor_ > 0 && warmup_start_factor_ <= 1,
               "schedule.warmup_start_factor must be in (0, 1], got " << warmup_start_factor_);
  step_size_ = c.integer("step_size", 1);
  gamma_ = c.number("gamma");
  LANCET_CHECK(gamma_ > 0, "schedule.gamma must be positive, got " << gamma_);
  eta_min_ = c.number("eta_min");
  LANCET_CHECK(eta_min_ >= 0, "schedule.eta_min must be >= 0, got " << eta_min_);
  t_max_config_ = c.integer("t_max", 0);
  monitor_ = c.monitor();
  mode_max_ = c.mode_max();
  factor_ = c.number("factor");
  LANCET_CHECK(factor_ >= 0 && factor_ < 1, "schedule.factor must be in [0, 1), got " << factor_);
  patience_ = c.integer("patience", 0);
  cooldown_ = c.integer("cooldown", 0);
  min_lr_ = c.number("min_lr");
  LANCET_CHECK(min_lr_ >= 0, "schedule.min_lr must be >= 0, got " << min_lr_);
  threshold_ = c.number("threshold");
  LANCET_CHECK(threshold_ >= 0 && threshold_ < 1, "schedule.threshold must be in [0, 1), got " << threshold_);
  t_max_ = t_max_config_;
  if (kind_ == Kind::cosine && t_max_ == 0) {
    t_max_ = total_steps - warmup_steps_;
    LANCET_CHECK(t_max_ >= 1, "schedule.t_max 0 means the whole run after warm-up, but schedule.warmup_steps "
                                  << warmup_steps_ << " leaves no steps of the run's " << total_steps);
  }
  plateau_lr_ = base_lr_;
  best_ = mode_max_ ? -kInf : kInf;
}

double LrSchedule::lr_for_step_f64(int64_t step) const {
  LANCET_CHECK(step >= 0, "LrSchedule: step counts from 0, got " << step);
  double lr = base_lr_;
  switch (kind_) {
    case Kind::constant: break;
    case Kind::step:
      for (int64_t k = epochs_done_ / step_size_; k > 0; --k) lr *= gamma_;
      break;
    case Kind::cosine: {
      // SequentialLR: the cosine's own step count starts at 0 when the warm-up ends.
      if (step < warmup_steps_) break;
      const double t = static_cast<double>(step - warmup_steps_);
      const double pi = 3.14159265358979323846;
      lr = eta_min_ + (base_lr_ - eta_min_) * (1 + std::cos(pi * t / static_cast<double>(t_max_))) / 2;
      break;
    }
    case Kind::plateau: lr = plateau_lr_; break;
  }
  if (step < warmup_steps_) {
    const double f =
        warmup_start_factor_ + (1.0 - warmup_start_factor_) * static_cast<double>(step) / warmup_steps_;
    lr *= f;
  }
  return lr;
}

float LrSchedule::lr_for_step(int64_t step) const { return static_cast<float>(lr_for_step_f64(step)); }

bool LrSchedule::is_better(double metric) const {
  return mode_max_ ? metric > best_ * (threshold_ + 1) : metric < best_ * (1 - threshold_);
}

void LrSchedule::on_epoch_end(int epoch, double metric) {
  LANCET_CHECK(epoch == epochs_done_ + 1, "LrSchedule::on_epoch_end: expected epoch " << epochs_done_ + 1
                                                                                      << " next, got " << epoch);
  epochs_done_ = epoch;
  if (kind_ != Kind::plateau) return;
  // ReduceLROnPlateau.step(metric), line by line.
  if (is_better(metric)) {
    best_ = metric;
    num_bad_epochs_ = 0;
  } else {
    ++num_bad_epochs_;
  }
  if (cooldown_counter_ > 0) {
    --cooldown_counter_;
    num_bad_epochs_ = 0;
  }
  if (num_bad_epochs_ > patience_) {
    const double new_lr = std::max(plateau_lr_ * factor_, min_lr_);
    if (plateau_lr_ - new_lr > kPlateauEps) plateau_lr_ = new_lr;
    cooldown_counter_ = cooldown_;
    num_bad_epochs_ = 0;
  }
}

Json LrSchedule::state() const {
  return Json{{"name", name_},
              {"epochs_done", epochs_done_},
              {"plateau_lr", encode(plateau_lr_)},
              {"best", encode(best_)},
              {"num_bad_epochs", num_bad_epochs_},
              {"cooldown_counter", cooldown_counter_},
              {"t_max", t_max_}};
}

void LrSchedule::load_state(const Json& state) {
  const char* what = "schedule";
  const Json& name = field(state, what, "name");
  LANCET_CHECK(name == name_, "schedule state is for schedule.name " << name.dump() << " but schedule.name is '"
                                                                      << name_ << "'");
  const int64_t t_max = decode_int(state, what, "t_max");
  // t_max 0 is derived from the run's length, which may change on resume (more epochs): the
  // saved value keeps the cosine the run started with.
  LANCET_CHECK(t_max_config_ == 0 || t_max == t_max_config_,
               "schedule state has t_max " << t_max << " but schedule.t_max is " << t_max_config_);
  const int64_t epochs_done = decode_int(state, what, "epochs_done");
  LANCET_CHECK(epochs_done <= std::numeric_limits<int>::max(), "schedule state: bad epochs_done " << epochs_done);
  const double plateau_lr = decode_double(state, what, "plateau_lr");
  LANCET_CHECK(std::isfinite(plateau_lr) && plateau_lr >= 0, "schedule state: bad plateau_lr " << plateau_lr);
  best_ = decode_double(state, what, "best");
  num_bad_epochs_ = decode_int(state, what, "num_bad_epochs");
  cooldown_counter_ = decode_int(state, what, "cooldown_counter");
  epochs_done_ = static_cast<int>(epochs_done);
  plateau_lr_ = plateau_lr;
  if (kind_ == Kind::cosine) t_max_ = t_max;
}

// ---- EarlyStopping ---------------------------------------------------------------------

EarlyStopping::EarlyStopping(const Json& section) {
  const Section c(section, default_early_stopping_config(), "early_stopping");
  monitor_ = c.monitor();
  mode_max_ = c.mode_max();
  patience_ = c.integer("patience", 0);
  min_delta_ = c.number("min_delta");
  LANCET_CHECK(min_delta_ >= 0, "early_stopping.min_delta must be >= 0, got " << min_delta_);
  best_ = mode_max_ ? -kInf : kInf;
}

bool EarlyStopping::update(int epoch, double metric) {
  LANCET_CHECK(epoch > last_epoch_, "EarlyStopping::update: epoch " << epoch << " after epoch " << last_epoch_);
  last_epoch_ = epoch;
  is_best_ = mode_max_ ? metric > best_ + min_delta_ : metric < best_ - min_delta_;
  if (is_best_) {
    best_ = metric;
    best_epoch_ = epoch;
    bad_epochs_ = 0;
  } else {
    ++bad_epochs_;
  }
  return should_stop();
}

Json EarlyStopping::state() const {
  return Json{{"best", encode(best_)}, {"best_epoch", best_epoch_}, {"bad_epochs", bad_epochs_},
              {"last_epoch", last_epoch_}};
}

void EarlyStopping::load_state(const Json& state) {
  const char* what = "early_stopping";
  const double best = decode_double(state, what, "best");
  const int64_t best_epoch = decode_int(state, what, "best_epoch");
  const int64_t last_epoch = decode_int(state, what, "last_epoch");
  LANCET_CHECK(last_epoch <= std::numeric_limits<int>::max() && best_epoch <= last_epoch,
               "early_stopping state: best_epoch " << best_epoch << " after last_epoch " << last_epoch);
  bad_epochs_ = decode_int(state, what, "bad_epochs");
  best_ = best;
  best_epoch_ = static_cast<int>(best_epoch);
  last_epoch_ = static_cast<int>(last_epoch);
  is_best_ = false;
}

}  // namespace lancet
