// Data-parallel gradient synchronisation (trainer/ddp.h), SyncBatchNorm, and loss scaling with
// one rank overflowing. Run as a plain process and, with MPI, under `mpirun -np 2` and `-np 3`
// (CTest gradsync.mpi.np2 / np3): every expectation is written for any rank count, with
// references computed from all ranks' data.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <random>
#include <thread>

#include "comm/communicator.h"
#include "data/loader.h"
#include "layers/layers.h"
#include "layers/medicalcnn.h"
#include "tests/gradsync_fixtures.h"
#include "tests/expect_error.h"
#include "tests/job_comm.h"
#include "trainer/config.h"
#include "trainer/ddp.h"
#include "trainer/loss_scaler.h"
#include "trainer/optimizer.h"
#include "trainer/trainer.h"
#include "trainer/weights.h"

using namespace lancet;
using namespace lancet::testing;
using lancet::testing::expect_error;

namespace {

const Stream kCpu = Stream::cpu();

// Forward and backward of a batch that depends on (rank, round); gradients accumulate.
void local_backward(Module& m, int round) {
  const Tensor x = random_tensor({4, 1, 32, 32}, 100 + 10 * comm().rank() + round);
  SavedPtr saved;
  Tensor y = m.forward(x, &saved, kCpu);
  m.backward(random_tensor(y.shape(), 7 + comm().rank() + round), *saved, false, kCpu);
}

std::vector<std::vector<float>> grads_of(Module& m) {
  std::vector<std::vector<float>> g;
  for (auto& [name, p] : m.named_parameters()) g.push_back(p->grad.to_vector());
  return g;
}

// The mean over ranks of each rank's `local` gradients (gathered, summed in rank order).
std::vector<std::vector<float>> rank_mean(const std::vector<std::vector<float>>& local) {
  const int R = comm().size();
  std::vector<std::vector<float>> out;
  for (const auto& g : local) {
    const int64_t n = static_cast<int64_t>(g.size());
    Tensor in = Tensor::from_vector(g, {n}), all = Tensor::empty({R * n});
    comm().all_gather(in, all, kCpu);
    std::vector<float> mean(g.size(), 0.f);
    for (int r = 0; r < R; ++r)
      for (int64_t i = 0; i < n; ++i) mean[static_cast<size_t>(i)] += all.data<float>()[r * n + i] / R;
    out.push_back(mean);
  }
  return out;
}

void expect_close(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t t = 0; t < a.size(); ++t) {
    ASSERT_EQ(a[t].size(), b[t].size());
    for (size_t i = 0; i < a[t].size(); ++i)
      ASSERT_NEAR(a[t][i], b[t][i], 1e-5 + 1e-5 * std::fabs(b[t][i])) << "tensor " << t << " element " << i;
  }
}

}  // namespace

TEST(GradSync, BucketsCoverEveryParameterInReverseOrder) {
  auto model = make_model(small_gradsync_model(), 1);
  GradSyncOptions o;
  o.bucket_mb = 0.01;  // 2621 floats: several buckets
  GradSync sync(*model, comm(), o);
  const auto sizes = sync.bucket_elements();
  ASSERT_GT(sizes.size(), 3u);
  int64_t total = 0;
  for (int64_t s : sizes) total += s;
  EXPECT_EQ(total, model->num_parameters());
  // Reverse order: the classifier's last parameter heads bucket 0, whose gradients become
  // views of it.
  auto params = model->named_parameters();
  Parameter* last = params.back().second;
  last->grad.fill_(3.f);
  EXPECT_EQ(last->grad.to_vector().front(), 3.f);
  for (auto& [name, p] : params) EXPECT_EQ(p->grad.to_vector().size(), static_cast<size_t>(p->value.numel())) << name;
}

TEST(GradSync, AveragesGradientsDuringTheBackward) {
  for (bool overlap : {true, false}) {
    auto model = make_model(small_gradsync_model(), 1);
    model->train();
    GradSyncOptions o;
    o.bucket_mb = 0.01;
    o.overlap = overlap;
    GradSync sync(*model, comm(), o);
    // The local gradients, without synchronisation, then the synchronised ones.
    sync.begin_backward(false);
    local_backward(*model, 0);
    sync.finish(kCpu);
    const auto expected = rank_mean(grads_of(*model));
    model->zero_grad();
    sync.begin_backward(true);
    local_backward(*model, 0);
    if (comm().size() > 1) {
      EXPECT_EQ(sync.buckets_started_in_backward(), overlap ? sync.num_buckets() : 0) << "overlap " << overlap;
    }
    sync.finish(kCpu);
    expect_close(grads_of(*model), expected);
  }
}

TEST(GradSync, TimingsOnTheCpuAreHostClockTimesInTheBackward) {
  auto model = make_model(small_gradsync_model(), 1);
  model->train();
  GradSyncOptions o;
  o.bucket_mb = 0.01;
  GradSync sync(*model, comm(), o);
  EXPECT_FALSE(sync.device_timed());
  const auto t0 = std::chrono::steady_clock::now();
  sync.begin_backward(true);
  local_backward(*model, 0);
  sync.finish(kCpu);
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const auto& t = sync.timings();
  const auto elements = sync.bucket_elements();
  ASSERT_EQ(t.size(), elements.size());
  for (size_t i = 0; i < t.size(); ++i) {
    EXPECT_EQ(t[i].bytes, elements[i] * 4) << i;
    EXPECT_GE(t[i].ready_s, 0) << i;
    if (comm().size() == 1) {
      EXPECT_EQ(t[i].start_s, -1) << "one rank: nothing to reduce";
      EXPECT_EQ(t[i].done_s, -1) << i;
      EXPECT_LE(t[i].ready_s, elapsed) << i;
    } else {
      // A bucket starts once it is ready, in bucket order, and is seen done after it started.
      EXPECT_GE(t[i].start_s, t[i].ready_s) << i;
      EXPECT_GE(t[i].done_s, t[i].start_s) << i;
      EXPECT_LE(t[i].done_s, elapsed) << i;
      if (i > 0) {
        EXPECT_GE(t[i].start_s, t[i - 1].start_s) << i;
      }
    }
  }
}

TEST(GradSync, AccumulationSynchronisesOnlyTheSum) {
  auto model = make_model(small_gradsync_model(), 1);
  model->train();
  GradSync sync(*model, comm(), {});
  sync.begin_backward(false);
  local_backward(*model, 0);
  local_backward(*model, 1);
  sync.finish(kCpu);
  const auto expected = rank_mean(grads_of(*model));
  model->zero_grad();
  sync.begin_backward(false);  // micro-step 1: local only
  local_backward(*model, 0);
  EXPECT_EQ(sync.finish(kCpu), 0.0);
  sync.begin_backward(true);  // micro-step 2: the sum is averaged over ranks
  local_backward(*model, 1);
  sync.finish(kCpu);
  expect_close(grads_of(*model), expected);
}

TEST(GradSync, BroadcastGivesEveryRankRankZerosState) {
  auto model = make_model(small_gradsync_model(), 1 + static_cast<uint64_t>(comm().rank()));  // rank-dependent init
  for (auto& [name, t] : model->named_buffers()) t->fill_(static_cast<float>(comm().rank() + 1));
  GradSync sync(*model, comm(), {});
  sync.broadcast_parameters(kCpu);
  auto rank0 = make_model(small_gradsync_model(), 1);
  auto mine = model->state_dict();
  auto ref = rank0->state_dict();
  ASSERT_EQ(mine.size(), ref.size());
  for (size_t i = 0; i < mine.size(); ++i) {
    if (mine[i].first.find("running") != std::string::npos || mine[i].first.find("num_batches") != std::string::npos) {
      for (float v : mine[i].second->to_vector()) ASSERT_EQ(v, 1.f) << mine[i].first;
    } else {
      EXPECT_EQ(mine[i].second->to_vector(), ref[i].second->to_vector()) << mine[i].first;
    }
  }
}

TEST(SyncBatchNorm, MatchesOneBatchNormOverAllRanksBatches) {
  const int R = comm().size(), r = comm().rank();
  const int64_t C = 5;
  const Shape local{3, C, 4, 3};
  // Every rank's input, known to all (seeded by rank); the reference runs on their concatenation.
  std::vector<Tensor> xs, dys;
  for (int q = 0; q < R; ++q) {
    Tensor x = random_tensor(local, 300 + q);
    for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = x.data<float>()[i] * (1 + q) + q;  // ranks differ
    xs.push_back(x);
    dys.push_back(random_tensor(local, 400 + q));
  }
  Tensor x_all = Tensor::empty({3 * R, C, 4, 3}), dy_all = Tensor::empty({3 * R, C, 4, 3});
  for (int q = 0; q < R; ++q) {
    x_all.narrow(3 * q, 3).copy_from(xs[q]);
    dy_all.narrow(3 * q, 3).copy_from(dys[q]);
  }
  BatchNorm2d ref(static_cast<int>(C)), sync(static_cast<int>(C));
  for (BatchNorm2d* bn : {&ref, &sync}) {
    bn->weight().value = random_tensor({C}, 9);
    bn->bias().value = random_tensor({C}, 10);
  }
  sync.set_replica_sum([](std::vector<double>& v) { comm().all_reduce_doubles(v.data(), static_cast<int>(v.size()), ReduceOp::sum); });
  SavedPtr sr, ss;
  const Tensor y_ref = ref.forward(x_all, &sr, kCpu);
  const Tensor y = sync.forward(xs[static_cast<size_t>(r)], &ss, kCpu);
  const std::vector<float> y_slice = y_ref.narrow(3 * r, 3).clone().to_vector(), yv = y.to_vector();
  for (size_t i = 0; i < yv.size(); ++i) ASSERT_NEAR(yv[i], y_slice[i], 2e-5) << i;
  // Running statistics follow the global batch (unbiased variance), as torch's SyncBatchNorm.
  const auto rm = sync.running_mean().to_vector(), rm_ref = ref.running_mean().to_vector();
  const auto rv = sync.running_var().to_vector(), rv_ref = ref.running_var().to_vector();
  for (int64_t c = 0; c < C; ++c) {
    EXPECT_NEAR(rm[c], rm_ref[c], 1e-5);
    EXPECT_NEAR(rv[c], rv_ref[c], 1e-5);
  }
  const Tensor dx_ref = ref.backward(dy_all, *sr, true, kCpu);
  const Tensor dx = sync.backward(dys[static_cast<size_t>(r)], *ss, true, kCpu);
  const std::vector<float> dx_slice = dx_ref.narrow(3 * r, 3).clone().to_vector(), dxv = dx.to_vector();
  for (size_t i = 0; i < dxv.size(); ++i) ASSERT_NEAR(dxv[i], dx_slice[i], 2e-5) << i;
  // Parameter gradients are local: their sum over ranks is the reference's.
  Tensor dg = sync.weight().grad.clone(), db = sync.bias().grad.clone();
  comm().all_reduce(dg, ReduceOp::sum, kCpu);
  comm().all_reduce(db, ReduceOp::sum, kCpu);
  const auto dgv = dg.to_vector(), dgr = ref.weight().grad.to_vector(), dbv = db.to_vector(), dbr = ref.bias().grad.to_vector();
  for (int64_t c = 0; c < C; ++c) {
    EXPECT_NEAR(dgv[c], dgr[c], 1e-4);
    EXPECT_NEAR(dbv[c], dbr[c], 1e-4);
  }
}

// Dynamic loss scaling with one rank overflowing: its inf/NaN gradients reach every rank through
// the mean all-reduce, so all skip the step, back off to the same scale and keep the same
// weights and optimizer state; the next clean step is taken everywhere alike. Three ways the
// gradients travel: GradSync's buckets started by the backward's hooks (the overflow from the
// last rank's input, beyond fp16's range), GradSync's buckets reduced after the backward (hooks
// off; an inf written into one gradient as it completes), finish_step's plain all-reduce.
TEST(GradSync, OneRanksOverflowSkipsTheStepOnEveryRank) {
  if (comm().size() == 1) GTEST_SKIP() << "needs several ranks (mpirun CTest entries)";
  const int R = comm().size(), r = comm().rank();
  const bool overflows = r == R - 1;
  // Every tensor of `state` has rank 0's bits on every rank.
  auto expect_same_on_every_rank = [&](const std::vector<std::vector<float>>& state) {
    for (size_t t = 0; t < state.size(); ++t) {
      const int64_t n = static_cast<int64_t>(state[t].size());
      Tensor mine = Tensor::from_vector(state[t], {n}), all = Tensor::empty({R * n});
      comm().all_gather(mine, all, kCpu);
      const float* a = all.data<float>();
      EXPECT_EQ(std::vector<float>(a, a + n), state[t]) << "tensor " << t << " differs from rank 0's";
    }
  };
  for (const std::string route : {"hooks", "after the backward", "plain all-reduce"}) {
    SCOPED_TRACE(route);
    auto model = make_model(small_gradsync_model(), 1);
    model->train();
    if (route == "hooks") model->set_precision(DType::f16);  // emulated: inputs rounded to fp16
    auto opt = make_optimizer(optim_config(default_config()), model->named_parameters());
    std::unique_ptr<GradSync> sync;
    if (route != "plain all-reduce") {
      GradSyncOptions o;
      o.bucket_mb = 0.01;  // several buckets
      o.hooks = route == "hooks";
      sync = std::make_unique<GradSync>(*model, comm(), o);
    }
    LossScalerConfig cfg;
    cfg.enabled = true;
    cfg.init_scale = 256;  // 65536 overflows this model's fp16 backward on every rank
    LossScaler scaler(cfg);
    StepOptions so;
    so.grad_sync = sync.get();
    so.loss_scaler = &scaler;
    Tensor x = random_tensor({4, 1, 32, 32}, 100 + r);
    const Tensor y = Tensor::from_labels({0, 1, 2, r % 3});
    auto step = [&](const Tensor& input) { return train_step(*model, *opt, comm(), input, y, Loss{}, kCpu, so); };
    auto snapshot = [&] {
      std::vector<std::vector<float>> out;
      for (auto& [name, p] : model->named_parameters()) out.push_back(p->value.to_vector());
      for (auto& [name, t] : opt->state()) out.push_back(t->to_vector());
      out.push_back({static_cast<float>(opt->steps())});
      return out;
    };
    ASSERT_FALSE(step(x).skipped);  // a clean step first: optimizer moments that are not zero
    const auto before = snapshot();

    Tensor input = x;
    if (overflows && route == "hooks") {
      input = x.clone();
      for (int64_t i = 0; i < input.numel(); ++i) input.data<float>()[i] *= 1e6f;  // inf in fp16
    }
    if (overflows && route != "hooks")  // the hooks are GradSync's on that route
      model->set_grad_ready_hook([](Parameter& p) { p.grad.data<float>()[0] = std::numeric_limits<float>::infinity(); });
    StepStats st = step(input);
    EXPECT_TRUE(st.skipped) << "rank " << r;
    EXPECT_EQ(st.loss_scale, 256.f);
    EXPECT_EQ(scaler.scale(), 128.f) << "rank " << r;
    EXPECT_EQ(scaler.skipped_steps(), 1);
    EXPECT_EQ(snapshot(), before) << "rank " << r;
    expect_same_on_every_rank(snapshot());
    if (overflows && route != "hooks") model->set_grad_ready_hook(nullptr);

    st = step(x);  // clean everywhere: taken everywhere, at the backed-off scale
    EXPECT_FALSE(st.skipped) << "rank " << r;
    EXPECT_EQ(st.loss_scale, 128.f);
    EXPECT_NE(snapshot(), before);
    expect_same_on_every_rank(snapshot());
  }
}

TEST(GradSync, ConfigurationMismatchNamesTheFieldAndBothValues) {
  check_same_on_all_ranks(comm(), {{"train.batch_size", "64"}, {"the model", "{\"a\":1}"}});  // all agree
  if (comm().size() == 1) GTEST_SKIP() << "a mismatch needs several ranks (mpirun CTest entries)";
  const std::string r = std::to_string(comm().rank());
  expect_error([&] { check_same_on_all_ranks(comm(), {{"the model", "same"}, {"train.batch_size", r}}); },
               {"the ranks disagree on train.batch_size: rank 0 has 0, rank 1 has 1"});
}

// The whole resolved configuration is compared, not a list of chosen fields: settings that
// would make the ranks train apart silently (clip norm, normalisation) or fail in a collective
// far from the cause (drop_last, early stopping) are named with both values.
TEST(GradSync, EverySettingButThePerRankOnesIsCompared) {
  std::map<std::string, std::string> fields;
  for (const auto& [name, value] : config_fields(default_config())) fields[name] = value;
  EXPECT_EQ(fields.at("train.clip_grad_norm"), "0");
  EXPECT_EQ(fields.at("train.drop_last"), "false");
  EXPECT_EQ(fields.at("data.mean"), "[0.5]");
  EXPECT_EQ(fields.at("train.memory_format"), "\"auto\"");
  EXPECT_EQ(fields.at("dist.sampler_drop_last"), "false");
  for (const char* key : {"data.std", "data.image_size", "data.channels", "train.out", "dist.bucket_mb", "dist.overlap",
                          "dist.sync_bn", "dist.timeout_s", "loss.label_smoothing", "optim.lr"})
    EXPECT_EQ(fields.count(key), 1u) << key;
  EXPECT_TRUE(std::any_of(fields.begin(), fields.end(), [](const auto& f) { return f.first.rfind("early_stopping.", 0) == 0; }));
  EXPECT_TRUE(std::any_of(fields.begin(), fields.end(), [](const auto& f) { return f.first.rfind("schedule.", 0) == 0; }));
  // Every per-rank setting exists (a renamed key would otherwise be compared again unnoticed),
  // and none is compared.
  const Json defaults = default_config();
  for (const std::string& key : per_rank_settings()) {
    EXPECT_TRUE(defaults.contains(Json::json_pointer("/" + key.substr(0, key.find('.')) + "/" + key.substr(key.find('.') + 1))))
        << key;
    EXPECT_EQ(fields.count(key), 0u) << key;
  }
  // A float setting given as an integer is the same setting.
  Json one = default_config(), other = default_config();
  apply_override(one, "train.clip_grad_norm=1");
  apply_override(other, "train.clip_grad_norm=1.0");
  EXPECT_EQ(config_fields(one), config_fields(other));
}

TEST(GradSync, RanksWithDifferentSettingsAreStopped) {
  Json config = default_config();
  apply_override(config, "train.threads=" + std::to_string(comm().rank() + 1));  // per rank: allowed
  apply_override(config, "data.workers=" + std::to_string(comm().rank()));
  check_same_on_all_ranks(comm(), config_fields(config));
  if (comm().size() == 1) GTEST_SKIP() << "a mismatch needs several ranks (mpirun CTest entries)";
  const int last = comm().size() - 1;
  Json clip = config;
  if (comm().rank() == last) apply_override(clip, "train.clip_grad_norm=0.01");
  expect_error([&] { check_same_on_all_ranks(comm(), config_fields(clip)); },
               {"the ranks disagree on train.clip_grad_norm: rank 0 has 0, rank " + std::to_string(last) + " has 0.01"});
  Json drop = config;
  if (comm().rank() == last) apply_override(drop, "train.drop_last=true");
  expect_error([&] { check_same_on_all_ranks(comm(), config_fields(drop)); },
               {"the ranks disagree on train.drop_last: rank 0 has false, rank " + std::to_string(last) + " has true"});
  Json std_dev = config;
  if (comm().rank() == 1) apply_override(std_dev, "data.std=[0.3]");
  expect_error([&] { check_same_on_all_ranks(comm(), config_fields(std_dev)); },
               {"the ranks disagree on data.std: rank 0 has [0.25], rank 1 has [0.3]"});
}

// Identical steps leave identical parameters, reported as such; one drifted element on one rank
// fails every rank, naming that rank and the parameter.
TEST(GradSync, ParametersAreCheckedIdenticalAfterTraining) {
  auto model = make_model(small_gradsync_model(), 1 + static_cast<uint64_t>(comm().rank()));  // rank-dependent init
  GradSync sync(*model, comm(), {});
  sync.broadcast_parameters(kCpu);
  for (int round = 0; round < 2; ++round) {
    model->zero_grad();
    sync.begin_backward(true);
    local_backward(*model, round);
    sync.finish(kCpu);
    for (auto& [name, p] : model->named_parameters()) {  // the same plain SGD step everywhere
      float* w = p->value.data<float>();
      const float* g = p->grad.data<float>();
      for (int64_t i = 0; i < p->value.numel(); ++i) w[i] -= 0.1f * g[i];
    }
  }
  const std::string ok = check_parameters_identical(comm(), model->named_parameters());
  if (comm().size() == 1) {
    EXPECT_NE(ok.find("(one rank)"), std::string::npos) << ok;
    GTEST_SKIP() << "a drift needs several ranks (mpirun CTest entries)";
  }
  EXPECT_NE(ok.find("parameters identical on all " + std::to_string(comm().size()) + " ranks"), std::string::npos) << ok;
  // The fault LANCET_FAULT=R:S:perturb injects: the last rank's first parameter nudged.
  const int last = comm().size() - 1;
  FaultInjection(comm().rank() == last ? FaultInjection::What::perturb : FaultInjection::What::none, 3)
      .maybe_fail(3, *model);
  const std::string first = model->named_parameters().front().first;
  expect_error([&] { check_parameters_identical(comm(), model->named_parameters()); },
               {"rank " + std::to_string(last) + "'s parameters differ from rank 0's after training: 1 of ",
                "the first " + first + " (1 of " + std::to_string(comm().size()) + " ranks drifted)"});
}

// DistributedSampler over the real ranks of the job, on an uneven dataset: with padding every
// sample is seen (total - n of them twice); with dist.sampler_drop_last every rank takes
// floor(n / ranks) samples and none is seen twice. Each rank's indices are all-gathered.
TEST(GradSync, EpochSplitOverTheRanksPadsOrDrops) {
  const int R = comm().size();
  for (int64_t n : {250, 242, 7}) {
    std::vector<int64_t> labels(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) labels[static_cast<size_t>(i)] = i % 3 == 0;
    for (bool drop : {false, true}) {
      SCOPED_TRACE("n " + std::to_string(n) + (drop ? " drop" : " pad"));
      const EpochSampler sampler(SamplerKind::shuffle, labels, 2, comm().rank(), R, 11, drop);
      const int64_t per_rank = drop ? n / R : (n + R - 1) / R;
      ASSERT_EQ(sampler.num_samples(), per_rank);
      EXPECT_EQ(sampler.padding(), per_rank * R - n);
      const std::vector<int64_t> mine = sampler.indices(2);
      ASSERT_EQ(static_cast<int64_t>(mine.size()), per_rank);
      Tensor all = Tensor::empty({per_rank * R}, DType::i64);
      comm().all_gather(Tensor::from_labels(mine), all, kCpu);
      std::map<int64_t, int> seen;
      for (int64_t i = 0; i < all.numel(); ++i) ++seen[all.data<int64_t>()[i]];
      int64_t twice = 0;
      for (const auto& [index, times] : seen) {
        EXPECT_TRUE(index >= 0 && index < n) << index;
        EXPECT_LE(times, drop ? 1 : 2) << "sample " << index;
        twice += times == 2;
      }
      if (drop) {
        EXPECT_EQ(static_cast<int64_t>(seen.size()), n / R * R);
      } else {
        EXPECT_EQ(static_cast<int64_t>(seen.size()), n);
        EXPECT_EQ(twice, per_rank * R - n);
      }
    }
  }
}

TEST(GradSync, ARankThatDoesNotJoinTimesOut) {
  if (comm().size() == 1) GTEST_SKIP() << "needs several ranks (mpirun CTest entries)";
  comm().barrier();
  const double saved = comm().timeout();
  comm().set_timeout(0.5);
  if (comm().rank() == 0) {
    const auto t0 = std::chrono::steady_clock::now();
    expect_error([&] { comm().barrier(); }, {"barrier on rank 0 of", "no answer from the other ranks"});
    EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 10.0);
  } else {
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    comm().barrier();  // completes rank 0's abandoned barrier
  }
  comm().set_timeout(saved);
  // The communicator still works for everyone.
  EXPECT_DOUBLE_EQ(comm().all_reduce_scalar(1.0, ReduceOp::sum), comm().size());
}
