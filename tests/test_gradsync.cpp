// Data-parallel gradient synchronisation (trainer/ddp.h) and SyncBatchNorm. Run as a plain
// process and, with MPI, under `mpirun -np 2` and `-np 3` (CTest gradsync.mpi.np2 / np3): every
// expectation is written for any rank count, with references computed from all ranks' data.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <random>
#include <thread>

#include "comm/communicator.h"
#include "layers/layers.h"
#include "layers/medicalcnn.h"
#include "tests/gradsync_fixtures.h"
#include "tests/expect_error.h"
#include "tests/job_comm.h"
#include "trainer/ddp.h"
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

TEST(GradSync, ConfigurationMismatchNamesTheFieldAndBothValues) {
  check_same_on_all_ranks(comm(), {{"train.batch_size", "64"}, {"the model", "{\"a\":1}"}});  // all agree
  if (comm().size() == 1) GTEST_SKIP() << "a mismatch needs several ranks (mpirun CTest entries)";
  const std::string r = std::to_string(comm().rank());
  expect_error([&] { check_same_on_all_ranks(comm(), {{"the model", "same"}, {"train.batch_size", r}}); },
               {"the ranks disagree on train.batch_size: rank 0 has 0, rank 1 has 1"});
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
