// LR schedules, early stopping and gradient clipping against PyTorch
// (tests/fixtures/schedules.json from tests/reference/make_schedule_fixtures.py), checkpoint
// round trips of their state, and config errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "expect_error.h"
#include "kernels/optim.h"
#include "kernels/parallel.h"
#include "trainer/schedule.h"

using namespace lancet;
using lancet::testing::expect_error;

namespace {

const Stream kCpu = Stream::cpu();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

const Json& fixtures() {
  static const Json j = [] {
    const std::string path = std::string(LANCET_SOURCE_DIR) + "/tests/fixtures/schedules.json";
    std::ifstream f(path);
    EXPECT_TRUE(f.good()) << "cannot open " << path;
    return Json::parse(f);
  }();
  return j;
}

// A checkpoint stores the state as JSON text.
Json through_text(const Json& state) { return Json::parse(state.dump()); }

LrSchedule make(const Json& c, double base_lr = 0.1, int64_t total_steps = 100) {
  return LrSchedule(c, base_lr, total_steps);
}

void expect_lr_near(double expected, double got, const std::string& where) {
  EXPECT_NEAR(got, expected, 1e-6 * std::abs(expected) + 1e-15) << where;
}

// Runs a fixture case from the start, returning every step's lr (f64); `cut` (a step index,
// or -1) saves the state before that step (after the epoch end when it falls on a boundary)
// and continues in a fresh schedule restored from it.
std::vector<double> run_case(const Json& c, int64_t cut) {
  const int64_t spe = c["steps_per_epoch"], epochs = c["epochs"], total = c["total_steps"];
  const double base_lr = c["base_lr"];
  auto sched = std::make_unique<LrSchedule>(c["config"], base_lr, total);
  std::vector<double> lrs;
  for (int64_t e = 1; e <= epochs; ++e) {
    for (int64_t i = 0; i < spe; ++i) {
      const int64_t step = (e - 1) * spe + i;
      if (step == cut) {
        const Json saved = through_text(sched->state());
        sched = std::make_unique<LrSchedule>(c["config"], base_lr, total);
        sched->load_state(saved);
      }
      lrs.push_back(sched->lr_for_step_f64(step));
      EXPECT_EQ(sched->lr_for_step(step), static_cast<float>(lrs.back()));
    }
    sched->on_epoch_end(static_cast<int>(e), c["metrics"][e - 1].get<double>());
  }
  return lrs;
}

}  // namespace

TEST(LrSchedule, MatchesTorch) {
  const Json& cases = fixtures()["schedules"];
  ASSERT_GE(cases.size(), 10u);
  for (auto it = cases.begin(); it != cases.end(); ++it) {
    const Json& c = it.value();
    const std::vector<double> lrs = run_case(c, -1);
    ASSERT_EQ(lrs.size(), c["lr"].size()) << it.key();
    for (size_t i = 0; i < lrs.size(); ++i)
      expect_lr_near(c["lr"][i].get<double>(), lrs[i], it.key() + " step " + std::to_string(i));
  }
}

TEST(LrSchedule, StateRoundTripContinuesBitIdentically) {
  const Json& cases = fixtures()["schedules"];
  for (auto it = cases.begin(); it != cases.end(); ++it) {
    const Json& c = it.value();
    const std::vector<double> straight = run_case(c, -1);
    const int64_t spe = c["steps_per_epoch"], total = c["total_steps"];
    // Mid-epoch, at an epoch boundary, inside the warm-up and near the end.
    for (int64_t cut : {int64_t{1}, spe, 2 * spe + 1, total / 2, total - 1}) {
      const std::vector<double> resumed = run_case(c, cut);
      ASSERT_EQ(resumed.size(), straight.size());
      for (size_t i = 0; i < straight.size(); ++i)
        EXPECT_EQ(resumed[i], straight[i]) << it.key() << " cut at " << cut << ", step " << i;
    }
  }
}

TEST(LrSchedule, PlateauStateKeepsInfiniteBestAndCounters) {
  LrSchedule a = make({{"name", "plateau"}, {"mode", "max"}, {"patience", 0}, {"cooldown", 3}});
  const Json fresh = through_text(a.state());
  EXPECT_EQ(fresh["best"], "-inf");
  a.on_epoch_end(1, 0.5);
  a.on_epoch_end(2, 0.4);  // reduce, cooldown 3
  EXPECT_NEAR(a.lr_for_step_f64(0), 0.01, 1e-12);
  LrSchedule b = make({{"name", "plateau"}, {"mode", "max"}, {"patience", 0}, {"cooldown", 3}});
  b.load_state(through_text(a.state()));
  EXPECT_EQ(b.state(), a.state());
  for (int e = 3; e < 10; ++e) {
    a.on_epoch_end(e, 0.3);
    b.on_epoch_end(e, 0.3);
    EXPECT_EQ(a.lr_for_step_f64(0), b.lr_for_step_f64(0)) << e;
  }
  // A restored fresh state still treats the first metric as the best.
  LrSchedule c = make({{"name", "plateau"}, {"mode", "max"}, {"patience", 0}});
  c.load_state(fresh);
  c.on_epoch_end(1, -1e30);
  EXPECT_EQ(c.state()["best"], -1e30);
}

TEST(LrSchedule, CosineKeepsItsLengthWhenTheRunGrows) {
  // t_max 0 derives from total_steps; a resume with more epochs keeps the saved cosine.
  LrSchedule a = make({{"name", "cosine"}}, 0.1, 100);
  LrSchedule b = make({{"name", "cosine"}}, 0.1, 200);
  b.load_state(through_text(a.state()));
  for (int64_t s : {0, 37, 99}) EXPECT_EQ(a.lr_for_step_f64(s), b.lr_for_step_f64(s));
  EXPECT_NEAR(b.lr_for_step_f64(100), 0.0, 1e-15);
}

TEST(LrSchedule, MetricAndEpochContract) {
  LrSchedule p = make({{"name", "plateau"}, {"monitor", "val_accuracy"}, {"mode", "max"}});
  EXPECT_TRUE(p.uses_metric());
  EXPECT_EQ(p.monitor(), "val_accuracy");
  LrSchedule s = make({{"name", "step"}, {"step_size", 1}, {"gamma", 0.5}});
  EXPECT_FALSE(s.uses_metric());
  s.on_epoch_end(1, kNaN);  // metric ignored
  EXPECT_DOUBLE_EQ(s.lr_for_step_f64(5), 0.05);
  expect_error([&] { s.on_epoch_end(3, 0); }, {"on_epoch_end", "expected epoch 2", "got 3"});
  expect_error([&] { s.lr_for_step(-1); }, {"step counts from 0", "-1"});
  // NaN metrics are never an improvement (torch compares the same way).
  LrSchedule q = make({{"name", "plateau"}, {"patience", 0}, {"factor", 0.5}});
  q.on_epoch_end(1, kNaN);
  EXPECT_DOUBLE_EQ(q.lr_for_step_f64(0), 0.05);
}

TEST(LrSchedule, ConfigErrors) {
  const auto bad = [](Json c, const std::vector<std::string>& parts, int64_t total = 100) {
    expect_error([&] { LrSchedule(c, 0.1, total); }, parts);
  };
  bad({{"name", "linear"}}, {"schedule.name", "constant, step, cosine, plateau", "'linear'"});
  bad({{"nmae", "step"}}, {"schedule.nmae", "valid keys", "warmup_steps"});
  bad({{"warmup_steps", -1}}, {"schedule.warmup_steps", ">= 0", "-1"});
  bad({{"warmup_steps", 2.5}}, {"schedule.warmup_steps", "integer", "2.5"});
  bad({{"warmup_start_factor", 0.0}}, {"schedule.warmup_start_factor", "(0, 1]"});
  bad({{"warmup_start_factor", 1.5}}, {"schedule.warmup_start_factor", "1.5"});
  bad({{"step_size", 0}}, {"schedule.step_size", ">= 1", "0"});
  bad({{"gamma", 0}}, {"schedule.gamma", "positive"});
  bad({{"gamma", "half"}}, {"schedule.gamma", "number", "half"});
  bad({{"eta_min", -1e-3}}, {"schedule.eta_min", ">= 0"});
  bad({{"t_max", -5}}, {"schedule.t_max", "-5"});
  bad({{"monitor", "val_auc"}}, {"schedule.monitor", "val_loss", "'val_auc'"});
  bad({{"mode", "minimum"}}, {"schedule.mode", "min or max", "'minimum'"});
  bad({{"factor", 1.0}}, {"schedule.factor", "[0, 1)", "1"});
  bad({{"factor", -0.5}}, {"schedule.factor", "-0.5"});
  bad({{"patience", -1}}, {"schedule.patience", "-1"});
  bad({{"cooldown", -2}}, {"schedule.cooldown", "-2"});
  bad({{"min_lr", -1.0}}, {"schedule.min_lr", ">= 0"});
  bad({{"threshold", -0.1}}, {"schedule.threshold", "-0.1"});
  bad({{"name", "cosine"}, {"warmup_steps", 10}}, {"schedule.t_max", "schedule.warmup_steps", "10"}, 10);
  bad(Json::array(), {"schedule", "section"});
  expect_error([] { LrSchedule(Json::object(), 0.0, 10); }, {"schedule", "base learning rate", "0"});
  expect_error([] { LrSchedule(Json::object(), 0.1, -1); }, {"schedule", "total_steps", "-1"});
  // The defaults are valid for every name.
  for (const char* n : {"constant", "step", "cosine", "plateau"}) {
    Json c = default_schedule_config();
    c["name"] = n;
    EXPECT_NO_THROW(LrSchedule(c, 1e-3, 1000)) << n;
  }
}

TEST(LrSchedule, LoadStateErrors) {
  LrSchedule step = make({{"name", "step"}});
  LrSchedule cosine = make({{"name", "cosine"}});
  expect_error([&] { cosine.load_state(step.state()); }, {"schedule", "\"step\"", "'cosine'"});
  Json s = step.state();
  s.erase("epochs_done");
  expect_error([&] { step.load_state(s); }, {"schedule state", "epochs_done"});
  expect_error([&] { step.load_state(Json::object()); }, {"schedule state", "missing field"});
  LrSchedule fixed = make({{"name", "cosine"}, {"t_max", 50}});
  expect_error([&] { fixed.load_state(cosine.state()); }, {"t_max 100", "schedule.t_max is 50"});
}

// ---- early stopping ------------------------------------------------------------------------

TEST(EarlyStopping, MinModeWithDelta) {
  EarlyStopping es({{"patience", 2}, {"min_delta", 0.01}});
  EXPECT_TRUE(es.enabled());
  EXPECT_FALSE(es.update(1, 1.0));
  EXPECT_TRUE(es.is_best());
  EXPECT_FALSE(es.update(2, 0.995));  // within min_delta: not an improvement
  EXPECT_FALSE(es.is_best());
  EXPECT_FALSE(es.update(3, 0.9));
  EXPECT_TRUE(es.is_best());
  EXPECT_EQ(es.best_epoch(), 3);
  EXPECT_FALSE(es.update(4, 0.95));
  EXPECT_TRUE(es.update(5, kNaN));  // NaN never improves
  EXPECT_FALSE(es.is_best());
  EXPECT_DOUBLE_EQ(es.best(), 0.9);
  EXPECT_EQ(es.best_epoch(), 3);
  EXPECT_EQ(es.bad_epochs(), 2);
}

TEST(EarlyStopping, MaxModeAndOff) {
  EarlyStopping es({{"monitor", "val_accuracy"}, {"mode", "max"}, {"patience", 1}});
  EXPECT_EQ(es.monitor(), "val_accuracy");
  EXPECT_FALSE(es.update(1, 0.5));
  EXPECT_FALSE(es.update(2, 0.6));
  EXPECT_TRUE(es.update(3, 0.6));  // equal is not better
  EarlyStopping off(default_early_stopping_config());
  EXPECT_FALSE(off.enabled());
  const std::vector<double> losses = {1.0, 2.0, 3.0, 0.5, 4.0, 5.0, 6.0};
  for (size_t i = 0; i < losses.size(); ++i) EXPECT_FALSE(off.update(static_cast<int>(i) + 1, losses[i]));
  EXPECT_EQ(off.best_epoch(), 4);
  EXPECT_DOUBLE_EQ(off.best(), 0.5);
  expect_error([&] { off.update(7, 1.0); }, {"EarlyStopping::update", "epoch 7 after epoch 7"});
}

// val_auroc (the usual clinical choice) is monitorable, in max mode; an epoch whose AUROC is
// undefined (NaN) never improves.
TEST(EarlyStopping, MonitorsValAuroc) {
  const auto& names = monitorable_metrics();
  EXPECT_NE(std::find(names.begin(), names.end(), "val_auroc"), names.end());
  EarlyStopping es({{"monitor", "val_auroc"}, {"mode", "max"}, {"patience", 2}});
  EXPECT_EQ(es.monitor(), "val_auroc");
  EXPECT_FALSE(es.update(1, 0.71));
  EXPECT_FALSE(es.update(2, kNaN));
  EXPECT_FALSE(es.is_best());
  EXPECT_FALSE(es.update(3, 0.80));
  EXPECT_TRUE(es.is_best());
  EXPECT_FALSE(es.update(4, 0.79));
  EXPECT_TRUE(es.update(5, 0.80));  // equal is not better
  EXPECT_EQ(es.best_epoch(), 3);
  const LrSchedule plateau({{"name", "plateau"}, {"monitor", "val_auroc"}, {"mode", "max"}}, 0.1, 10);
  EXPECT_EQ(plateau.monitor(), "val_auroc");
}

// The stop decision is part of the state: a run restored from the checkpoint written after the
// epoch that stopped it stops again at once (a resumed early-stopped run trained on once).
TEST(EarlyStopping, StopDecisionSurvivesTheState) {
  const Json cfg = {{"patience", 2}};
  EarlyStopping es(cfg);
  EXPECT_FALSE(es.should_stop());
  for (int e = 1; e <= 3; ++e) EXPECT_EQ(es.update(e, 1.0), e == 3);
  EXPECT_TRUE(es.should_stop());
  EarlyStopping restored(cfg);
  restored.load_state(through_text(es.state()));
  EXPECT_TRUE(restored.should_stop());
  EarlyStopping before_stop(cfg);  // one epoch earlier: not stopped yet
  before_stop.update(1, 1.0);
  before_stop.update(2, 1.0);
  restored.load_state(through_text(before_stop.state()));
  EXPECT_FALSE(restored.should_stop());
  EarlyStopping off(Json::object());  // patience 0 never stops, whatever the bad epochs
  for (int e = 1; e <= 5; ++e) off.update(e, 1.0);
  EXPECT_FALSE(off.should_stop());
}

TEST(EarlyStopping, StateRoundTrip) {
  const Json cfg = {{"patience", 3}, {"min_delta", 0.001}};
  const std::vector<double> metrics = {2.0, 1.5, 1.6, 1.4, 1.41, 1.45, 1.5, 1.3};
  for (size_t cut = 0; cut <= metrics.size(); ++cut) {
    EarlyStopping a(cfg), b(cfg);
    std::vector<bool> stop_a, stop_b;
    for (size_t i = 0; i < metrics.size(); ++i) {
      if (i == cut) {
        EarlyStopping restored(cfg);
        restored.load_state(through_text(b.state()));
        b = restored;
      }
      stop_a.push_back(a.update(static_cast<int>(i) + 1, metrics[i]));
      stop_b.push_back(b.update(static_cast<int>(i) + 1, metrics[i]));
      EXPECT_EQ(a.is_best(), b.is_best());
    }
    EXPECT_EQ(stop_a, stop_b) << "cut " << cut;
    EXPECT_EQ(a.state(), b.state()) << "cut " << cut;
  }
  EarlyStopping fresh(cfg);
  EXPECT_EQ(through_text(fresh.state())["best"], "inf");
}

TEST(EarlyStopping, ConfigAndStateErrors) {
  const auto bad = [](Json c, const std::vector<std::string>& parts) {
    expect_error([&] { EarlyStopping es(c); }, parts);
  };
  bad({{"patience", -1}}, {"early_stopping.patience", "-1"});
  bad({{"min_delta", -0.1}}, {"early_stopping.min_delta", ">= 0", "-0.1"});
  bad({{"mode", "up"}}, {"early_stopping.mode", "'up'"});
  bad({{"monitor", 3}}, {"early_stopping.monitor", "string", "3"});
  bad({{"monitor", "loss"}}, {"early_stopping.monitor", "'loss'"});
  bad({{"delta", 0.1}}, {"early_stopping.delta", "valid keys", "min_delta"});
  EarlyStopping es(Json::object());
  expect_error([&] { es.load_state({{"best", "big"}}); }, {"early_stopping state", "best", "big"});
}

// ---- gradient clipping ---------------------------------------------------------------------

TEST(ClipGradNorm, MatchesTorch) {
  const Json& cases = fixtures()["clip_grad_norm"];
  ASSERT_GE(cases.size(), 3u);
  for (auto it = cases.begin(); it != cases.end(); ++it) {
    const Json& c = it.value();
    std::vector<Tensor> grads;
    for (size_t i = 0; i < c["shapes"].size(); ++i)
      grads.push_back(Tensor::from_vector(c["grads"][i].get<std::vector<float>>(), c["shapes"][i].get<Shape>()));
    std::vector<Tensor*> ptrs;
    for (auto& g : grads) ptrs.push_back(&g);
    Tensor unused;  // a parameter without a gradient is skipped
    ptrs.push_back(&unused);
    const double expected = c["total_norm"];
    EXPECT_NEAR(global_l2_norm({ptrs.begin(), ptrs.end()}, kCpu), expected, 1e-6 * expected) << it.key();
    const float total = clip_grad_norm(ptrs, c["max_norm"].get<float>(), kCpu);
    EXPECT_NEAR(total, expected, 1e-6 * expected) << it.key();
    for (size_t i = 0; i < grads.size(); ++i) {
      const std::vector<float> got = grads[i].to_vector();
      const std::vector<float> want = c["clipped"][i].get<std::vector<float>>();
      ASSERT_EQ(got.size(), want.size());
      for (size_t k = 0; k < got.size(); ++k)
        EXPECT_NEAR(got[k], want[k], 1e-6 * std::abs(want[k]) + 1e-12) << it.key() << " tensor " << i << " [" << k
                                                                       << "]";
    }
  }
}

TEST(ClipGradNorm, NormIsIndependentOfThreads) {
  std::vector<float> v(300001);
  double ref = 0;
  for (size_t i = 0; i < v.size(); ++i) {
    v[i] = static_cast<float>(std::sin(0.37 * static_cast<double>(i)) * (1 + i % 7));
    ref += static_cast<double>(v[i]) * v[i];
  }
  const Tensor a = Tensor::from_vector(v, {static_cast<int64_t>(v.size())});
  const Tensor b = Tensor::from_vector({3.f, 4.f}, {2});
  const int saved = num_threads();
  set_num_threads(1);
  const double serial = global_l2_norm({&a, &b}, kCpu);
  set_num_threads(2);
  const double threaded = global_l2_norm({&a, &b}, kCpu);
  set_num_threads(saved);
  EXPECT_EQ(serial, threaded);
  EXPECT_NEAR(serial, std::sqrt(ref + 25.0), 1e-12 * serial);
  EXPECT_EQ(global_l2_norm({}, kCpu), 0.0);
}

TEST(ClipGradNorm, FiniteChecksAndNonFiniteNorms) {
  std::vector<float> v(70000, 1.f);
  Tensor a = Tensor::from_vector(v, {70000});
  Tensor b = Tensor::from_vector({1.f, 2.f}, {2});
  EXPECT_TRUE(all_finite({&a, &b}, kCpu));
  a.data<float>()[65000] = static_cast<float>(kInf);
  EXPECT_FALSE(all_finite({&a, &b}, kCpu));
  a.data<float>()[65000] = 1.f;
  b.data<float>()[1] = static_cast<float>(kNaN);
  EXPECT_FALSE(all_finite({&a, &b}, kCpu));
  // As torch (error_if_nonfinite=False): a NaN norm makes every gradient NaN.
  const float total = clip_grad_norm({&a, &b}, 1.f, kCpu);
  EXPECT_TRUE(std::isnan(total));
  EXPECT_TRUE(std::isnan(a.to_vector()[0]));
  // Below max_norm nothing changes, bit for bit.
  Tensor c = Tensor::from_vector({0.1f, -0.2f}, {2});
  EXPECT_NEAR(clip_grad_norm({&c}, 1.f, kCpu), std::sqrt(0.05), 1e-7);
  EXPECT_EQ(c.to_vector(), (std::vector<float>{0.1f, -0.2f}));
}

TEST(ClipGradNorm, Errors) {
  Tensor g = Tensor::from_vector({1.f}, {1});
  expect_error([&] { clip_grad_norm({&g}, 0.f, kCpu); }, {"clip_grad_norm", "max_norm", "0"});
  expect_error([&] { clip_grad_norm({&g}, -1.f, kCpu); }, {"clip_grad_norm", "max_norm", "-1"});
  const Tensor labels = Tensor::from_labels({1, 2});
  expect_error([&] { global_l2_norm({&labels}, kCpu); }, {"global_l2_norm", "f32", "i64"});
  expect_error([&] { all_finite({nullptr}, kCpu); }, {"all_finite", "null"});
}
