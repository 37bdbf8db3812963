// GradSync's bucket timings on a GPU (trainer/ddp.h, timings()), label gpu: skips without one.
//
// On a GPU the timings come from CUDA events, so they say when the device ran the work. A host
// function holding the compute stream for kHold right after begin_backward tells the two
// clocks apart: the device passes every gradient after the hold, whenever the host queued it.
//
// One rank (the single-process communicator) has nothing to reduce: ready times only. To time
// all-reduces on one GPU, a communicator that says it has two ranks forwards every call to a
// one-rank NCCL communicator: GradSync then starts every bucket as in a real job, on NCCL's
// stream, and the mean over that one rank leaves the gradients as they are.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "comm/communicator.h"
#include "kernels/cuda/runtime.h"
#include "tests/gradsync_fixtures.h"
#include "tests/gpu_util.h"
#include "trainer/ddp.h"
#include "trainer/weights.h"

using namespace lancet;
using namespace lancet::testing;

namespace {

constexpr double kHold = 0.1;   // seconds the compute stream is held after begin_backward
constexpr double kSlack = 1e-4;  // event timestamps on two streams: ordering up to their resolution

void CUDART_CB hold_stream(void*) { std::this_thread::sleep_for(std::chrono::duration<double>(kHold)); }

// Holds `s` for kHold: its later work starts after that, as behind a long kernel.
void hold(const Stream& s) {
  LANCET_CUDA_CHECK(cudaLaunchHostFunc(static_cast<cudaStream_t>(s.native), hold_stream, nullptr));
}

// Reports two ranks, so that GradSync reduces its buckets; every call goes to `one`, a one-rank
// communicator, where each collective is the identity.
class TwoRankFacade final : public Communicator {
 public:
  explicit TwoRankFacade(std::unique_ptr<Communicator> one) : one_(std::move(one)) {}
  int rank() const override { return 0; }
  int size() const override { return 2; }
  int local_rank() const override { return 0; }
  int local_size() const override { return 1; }
  std::string backend() const override { return one_->backend(); }
  void all_reduce(Tensor& t, ReduceOp op, const Stream& s) override { one_->all_reduce(t, op, s); }
  std::unique_ptr<Work> all_reduce_async(Tensor& t, ReduceOp op, const Stream& s) override {
    return one_->all_reduce_async(t, op, s);
  }
  void broadcast(Tensor& t, int root, const Stream& s) override { one_->broadcast(t, root, s); }
  // Shapes would betray the single rank; GradSync does not use these.
  void all_gather(const Tensor&, Tensor&, const Stream&) override { LANCET_FAIL("TwoRankFacade: all_gather"); }
  void reduce_scatter(const Tensor&, Tensor&, ReduceOp, const Stream&) override {
    LANCET_FAIL("TwoRankFacade: reduce_scatter");
  }
  void send(const Tensor&, int, int) override { LANCET_FAIL("TwoRankFacade: send"); }
  void recv(Tensor&, int, int) override { LANCET_FAIL("TwoRankFacade: recv"); }
  void barrier() override { one_->barrier(); }
  void all_reduce_doubles(double* v, int n, ReduceOp op) override { one_->all_reduce_doubles(v, n, op); }
  void abort(int code) noexcept override { one_->abort(code); }
  std::unique_ptr<Communicator> for_device(Device) override { LANCET_FAIL("TwoRankFacade: for_device"); }

 private:
  std::unique_ptr<Communicator> one_;
};

std::vector<float> flat_grads(Module& m) {
  std::vector<float> all;
  for (auto& [name, p] : m.named_parameters()) {
    const std::vector<float> g = p->grad.to_vector();
    all.insert(all.end(), g.begin(), g.end());
  }
  return all;
}

// One model on cuda:0 with a GradSync of small buckets (several of them) over `comm`.
struct Fixture {
  explicit Fixture(Communicator& c)
      : comm(c), dev(Device::cuda(0)), s{dev, nullptr}, model(make_model(small_gradsync_model(), 1)) {
    model->to(dev);
    model->train();
    GradSyncOptions o;
    o.bucket_mb = 0.01;
    sync = std::make_unique<GradSync>(*model, c, o);
    x = random_tensor({4, 1, 32, 32}, 100).to(dev);
    dy = random_tensor({4, 3}, 200).to(dev);
  }

  // Forward, then begin_backward(sync_on), the hold, the backward and finish(). Returns the
  // device seconds from just before begin_backward to just after finish(), once they are known.
  double step(bool sync_on) {
    model->zero_grad();
    SavedPtr saved;
    model->forward(x, &saved, s);
    CudaEvent before(dev, /*timing=*/true), after(dev, /*timing=*/true);
    before.record(s);
    sync->begin_backward(sync_on);
    hold(s);
    model->backward(dy, *saved, /*need_input_grad=*/false, s);
    if (sync_on && comm.size() > 1) {
      EXPECT_EQ(sync->buckets_started_in_backward(), sync->num_buckets()) << "overlap: all in the backward";
    }
    sync->finish(s);
    after.record(s);
    // timings() itself waits for the events it reads: no synchronize before it.
    timings = sync->timings();
    after.synchronize();
    return after.elapsed_ms_since(before) * 1e-3;
  }

  // What every step's timings satisfy: the buckets' bytes, and ready times on the device's
  // clock (after the hold, within the backward).
  void expect_ready_times(double backward_s) const {
    ASSERT_EQ(static_cast<int>(timings.size()), sync->num_buckets());
    const std::vector<int64_t> elements = sync->bucket_elements();
    int64_t bytes = 0;
    for (size_t i = 0; i < timings.size(); ++i) {
      const GradSync::BucketTiming& t = timings[i];
      EXPECT_EQ(t.bytes, elements[i] * 4) << "bucket " << i;
      bytes += t.bytes;
      ASSERT_TRUE(std::isfinite(t.ready_s)) << "bucket " << i;
      EXPECT_GE(t.ready_s, 0.9 * kHold) << "bucket " << i << ": not the device's clock (the stream was held)";
      EXPECT_LE(t.ready_s, backward_s + kSlack) << "bucket " << i;
    }
    EXPECT_EQ(bytes, model->num_parameters() * 4);
  }

  Communicator& comm;
  Device dev;
  Stream s;
  std::unique_ptr<MedicalCNN> model;
  std::unique_ptr<GradSync> sync;
  Tensor x, dy;
  std::vector<GradSync::BucketTiming> timings;
};

}  // namespace

TEST(GradSyncDeviceTimes, OneRankRecordsReadyTimesOnTheDevice) {
  LANCET_REQUIRE_GPU();
  auto comm = make_single_process_communicator();
  Fixture f(*comm);
  ASSERT_TRUE(f.sync->device_timed());
  ASSERT_GT(f.sync->num_buckets(), 2);
  const int64_t version = f.sync->layout_version();
  for (int round = 0; round < 3; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    const double backward_s = f.step(/*sync_on=*/true);
    f.expect_ready_times(backward_s);
    for (const auto& t : f.timings) {
      EXPECT_EQ(t.start_s, -1) << "one rank: nothing to reduce";
      EXPECT_EQ(t.done_s, -1);
    }
    // From the second backward the buckets follow the order the gradients became ready in, and
    // the ready events are recorded in that order on one stream.
    if (round > 0) {
      EXPECT_EQ(f.sync->layout_version(), version + 1);
      for (size_t i = 1; i < f.timings.size(); ++i)
        EXPECT_GE(f.timings[i].ready_s, f.timings[i - 1].ready_s) << "bucket " << i;
    }
  }
}

TEST(GradSyncDeviceTimes, AllReducesAreTimedOnTheDeviceAndLeaveOneRanksGradients) {
  LANCET_REQUIRE_GPU();
  if (!nccl_available()) GTEST_SKIP() << "this build has no NCCL backend";
  TwoRankFacade comm(make_communicator("nccl", "cuda"));
  Fixture f(comm);
  ASSERT_TRUE(f.sync->device_timed());
  // Sync off (an accumulation micro-step): ready times, no all-reduce.
  f.expect_ready_times(f.step(/*sync_on=*/false));
  for (const auto& t : f.timings) EXPECT_EQ(t.start_s, -1) << "sync off";
  const std::vector<float> local = flat_grads(*f.model);
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    const double backward_s = f.step(/*sync_on=*/true);
    f.expect_ready_times(backward_s);
    for (size_t i = 0; i < f.timings.size(); ++i) {
      const GradSync::BucketTiming& t = f.timings[i];
      ASSERT_TRUE(std::isfinite(t.start_s) && std::isfinite(t.done_s)) << "bucket " << i;
      // The comm stream starts a bucket once the compute stream has passed its last gradient,
      // and the next one once the previous all-reduce is done; finish()'s stream waits for all.
      EXPECT_GE(t.start_s, t.ready_s - kSlack) << "bucket " << i;
      EXPECT_GE(t.done_s, t.start_s) << "bucket " << i;
      EXPECT_LE(t.done_s, backward_s + kSlack) << "bucket " << i;
      if (i > 0) {
        EXPECT_GE(t.start_s, f.timings[i - 1].done_s) << "bucket " << i;
      }
    }
    // The mean over one rank: the gradients are the local ones (up to the backward's own
    // run-to-run rounding), read after finish() ordered the compute stream.
    const std::vector<float> got = flat_grads(*f.model);
    ASSERT_EQ(got.size(), local.size());
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_NEAR(got[i], local[i], 1e-4 * std::fabs(local[i]) + 1e-6) << "element " << i;
  }
}
