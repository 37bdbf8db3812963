// Pipeline model parallelism on two CPU stages: the schedules, the cut, equivalence with
// unpipelined gradient accumulation (bitwise, both schedules, fp32, emulated fp16 with loss
// scaling and emulated bf16), 1F1B's lower activation memory, failure handling, and checkpoints
// that move between pipelined and unpipelined runs; under mpirun, a pipeline per rank (fp32 and
// fp16).
#include <gtest/gtest.h>

#include <array>
#include <chrono>
#include <cmath>
#include <fstream>
#include <cstring>
#include <filesystem>
#include <random>
#include <sstream>
#include <thread>

#include "comm/communicator.h"
#include "data/h5file.h"
#include "kernels/allocator.h"
#include "kernels/parallel.h"
#include "layers/medicalcnn.h"
#include "tests/cli_util.h"
#include "tests/expect_error.h"
#include "tests/pipeline_fixtures.h"
#include "trainer/loss_scaler.h"
#include "trainer/pipeline.h"
#include "trainer/trainer.h"

using namespace lancet;
using namespace lancet::testing;
namespace fs = std::filesystem;

namespace {

std::string ops_str(const std::vector<PipeOp>& ops) {
  std::string s;
  for (const PipeOp& op : ops) s += (s.empty() ? "" : " ") + std::string(op.forward ? "F" : "B") + std::to_string(op.micro);
  return s;
}

MedicalCNNConfig small_config() {
  MedicalCNNConfig c;
  c.in_channels = 1;
  c.num_classes = 3;
  c.widths = {4, 8, 8};
  c.depths = {1, 1, 1};
  c.se_reduction = 2;
  c.head_hidden = 8;
  return c;  // dropout stays on: its counters must advance as without the pipeline
}

void expect_bitwise_equal(Module& a, Module& b) {
  auto sa = a.state_dict(), sb = b.state_dict();
  ASSERT_EQ(sa.size(), sb.size());
  for (size_t i = 0; i < sa.size(); ++i) {
    ASSERT_EQ(sa[i].first, sb[i].first);
    const auto va = sa[i].second->to_vector(), vb = sb[i].second->to_vector();
    ASSERT_EQ(va.size(), vb.size());
    EXPECT_EQ(std::memcmp(va.data(), vb.data(), va.size() * sizeof(float)), 0) << sa[i].first;
  }
}

class Pipelines : public ::testing::Test {
 protected:
  void SetUp() override { set_num_threads(1); }  // the reference's kernels split work as one stage's
  std::unique_ptr<Communicator> comm_ = make_single_process_communicator();
};

}  // namespace

TEST(PipelineSchedule, GpipeAndOneFOneB) {
  EXPECT_EQ(ops_str(stage_schedule(PipeSchedule::gpipe, 0, 2, 4)), "F0 F1 F2 F3 B0 B1 B2 B3");
  EXPECT_EQ(ops_str(stage_schedule(PipeSchedule::gpipe, 1, 2, 4)), "F0 F1 F2 F3 B0 B1 B2 B3");
  EXPECT_EQ(ops_str(stage_schedule(PipeSchedule::one_f_one_b, 0, 2, 4)), "F0 F1 B0 F2 B1 F3 B2 B3");
  EXPECT_EQ(ops_str(stage_schedule(PipeSchedule::one_f_one_b, 1, 2, 4)), "F0 B0 F1 B1 F2 B2 F3 B3");
  EXPECT_EQ(ops_str(stage_schedule(PipeSchedule::one_f_one_b, 0, 2, 1)), "F0 B0");
  EXPECT_EQ(ops_str(stage_schedule(PipeSchedule::one_f_one_b, 0, 4, 2)), "F0 F1 B0 B1");
  // Activation memory: GPipe holds every micro-batch, 1F1B at most p - s.
  for (int m : {1, 2, 4, 8}) {
    EXPECT_EQ(max_in_flight(stage_schedule(PipeSchedule::gpipe, 0, 2, m)), m);
    EXPECT_EQ(max_in_flight(stage_schedule(PipeSchedule::one_f_one_b, 0, 2, m)), std::min(m, 2));
    EXPECT_EQ(max_in_flight(stage_schedule(PipeSchedule::one_f_one_b, 1, 2, m)), 1);
  }
  EXPECT_DOUBLE_EQ(theoretical_bubble(2, 4), 0.2);
  EXPECT_DOUBLE_EQ(theoretical_bubble(2, 1), 0.5);
  EXPECT_EQ(parse_pipe_schedule("1f1b"), PipeSchedule::one_f_one_b);
  expect_error([&] { parse_pipe_schedule("zb"); }, {"gpipe or 1f1b"});
}

TEST(PipelineCut, BalancesCostsAndChecksNames) {
  EXPECT_EQ(balanced_cut({1, 1, 1, 1}), 2);
  EXPECT_EQ(balanced_cut({5, 1, 1, 1}), 1);
  EXPECT_EQ(balanced_cut({1, 1, 1, 5}), 3);
  EXPECT_EQ(balanced_cut({1, 2, 3, 4, 10}), 4);  // max(10, 10)
  expect_error([&] { balanced_cut({1}); }, {"at least two units"});
  MedicalCNN model(small_config(), 1);
  const Units& units = model.units();
  ASSERT_EQ(units.front().first, "stem");
  EXPECT_EQ(cut_index(units, "stages.1.0"), 2);
  expect_error([&] { cut_index(units, "stem"); }, {"stage 0 would be empty"});
  expect_error([&] { cut_index(units, "stages.9.0"); }, {"no unit named 'stages.9.0'; valid cuts (stage 1's first unit): stages.0.0"});
  // Costs: one per unit, positive where a unit computes; FLOPs grow with the input.
  const Stream s{Device::cpu(), nullptr};
  Tensor x = Tensor::full({2, 1, 16, 16}, 0.5f);
  const auto secs = measure_unit_seconds(units, x, s, 1);
  ASSERT_EQ(secs.size(), units.size());
  for (double t : secs) EXPECT_GT(t, 0);
  const auto f16 = unit_forward_flops(units, x, s);
  const auto f32 = unit_forward_flops(units, Tensor::full({2, 1, 32, 32}, 0.5f), s);
  // stem: 7x7 conv, 1 -> 4 channels, stride 2 on 16x16 (8x8 out), 2 images: 2*2*4*64*49.
  EXPECT_EQ(f16[0], 2.0 * 2 * 4 * 64 * 49);
  EXPECT_EQ(f32[0], 4 * f16[0]);
  EXPECT_GT(f16.back(), 0);  // head: two linear layers
  EXPECT_EQ(f16[units.size() - 2], 0);  // pool: no conv, no linear
}

// The heart of it: two stages on two threads, both schedules, equal bitwise to one thread's
// gradient accumulation over the same micro-batches, over several steps (BatchNorm running
// statistics, dropout counters, Adam moments all follow).
TEST_F(Pipelines, EqualGradientAccumulationBitwise) {
  for (const PipeSchedule sched : {PipeSchedule::gpipe, PipeSchedule::one_f_one_b}) {
    for (const int m : {1, 3, 4}) {
      for (const DType precision : {DType::f32, DType::f16, DType::bf16}) {
        SCOPED_TRACE(std::string(pipe_schedule_name(sched)) + ", " + std::to_string(m) + " micro-batches, " +
                     dtype_name(precision));
        MedicalCNN ref(small_config(), 7), piped(small_config(), 7);
        for (MedicalCNN* net : {&ref, &piped}) {
          net->train();
          net->set_precision(precision);
        }
        auto opt_ref = make_optimizer(optim("adam", 1e-2f), ref.named_parameters());
        auto opt_pipe = make_optimizer(optim("adam", 1e-2f), piped.named_parameters());
        LossScalerConfig lsc;
        lsc.enabled = precision == DType::f16;
        lsc.init_scale = 1024.f;
        lsc.growth_interval = 2;  // grows during the test
        LossScaler scaler_ref(lsc), scaler_pipe(lsc);
        PipelineOptions po;
        po.schedule = sched;
        po.cut = 2;
        po.threads_per_stage = 1;
        Pipeline pipe(piped, piped.units(), po, *comm_);
        const Loss loss;
        const Stream s{Device::cpu(), nullptr};
        for (int step = 0; step < 3; ++step) {
          const MicroBatches b = make_batch(11, m, 16, 100 + static_cast<uint32_t>(step));  // 11 rows: uneven micro-batches
          StepOptions so_ref, so_pipe;
          so_ref.loss_scaler = &scaler_ref;
          so_pipe.loss_scaler = &scaler_pipe;
          so_ref.clip_grad_norm = so_pipe.clip_grad_norm = 1.0f;
          const StepStats a = train_step_micro(ref, *opt_ref, *comm_, b.xs, b.ys, loss, s, so_ref);
          const StepStats p = pipe.train_step(*opt_pipe, b.xs, b.ys, loss, so_pipe);
          EXPECT_EQ(a.loss, p.loss) << std::hexfloat << a.loss << " " << p.loss;
          EXPECT_EQ(a.correct, p.correct);
          EXPECT_EQ(a.count, p.count);
          EXPECT_EQ(a.grad_norm, p.grad_norm);
          EXPECT_EQ(a.loss_scale, p.loss_scale);
        }
        expect_bitwise_equal(ref, piped);
        for (size_t d = 0; d < ref.dropouts().size(); ++d)
          EXPECT_EQ(ref.dropouts()[d]->counter(), piped.dropouts()[d]->counter());
        EXPECT_EQ(scaler_ref.scale(), scaler_pipe.scale());
        const PipelineStats st = pipe.stats();
        EXPECT_EQ(st.steps, 3);
        EXPECT_EQ(st.micro_batches, m);
        ASSERT_EQ(st.stage.size(), 2u);
        EXPECT_EQ(st.stage[0].last_unit, "stages.0.0");
        EXPECT_EQ(st.stage[1].first_unit, "stages.1.0");
        for (const auto& q : st.stage) {
          EXPECT_GT(q.busy_s, 0);
          EXPECT_GE(q.idle, 0);
          EXPECT_LT(q.idle, 1);
          EXPECT_GT(q.peak_bytes, 0);
        }
        EXPECT_GT(st.step_s, 0);
        EXPECT_DOUBLE_EQ(st.bubble_theory, theoretical_bubble(2, m));
        EXPECT_NE(st.text().find("bubble"), std::string::npos);
        EXPECT_EQ(st.to_json().at("stage").size(), 2u);
      }
    }
  }
}

// Stages on two devices: [cpu, cpu:1] (cpu:1 a logical host device whose tensors every kernel
// keeps apart from cpu's, kernels/device.h) runs the two-GPU mode's logic — stage 1's units,
// gradients and optimizer state on the second device, hand-offs copied across, the loss on the
// last stage's device, the loss scaler / clipping / optimizer per device, the whole model run
// across both — and must train exactly like one device.
TEST_F(Pipelines, TwoDevicesEqualOneDeviceBitwise) {
  const std::vector<Device> devices = {Device::cpu(), Device::cpu(1)};
  const Stream s{Device::cpu(), nullptr};
  Loss loss;
  loss.class_weights = Tensor::from_vector({1.f, 2.f, 0.5f}, {3});  // on cpu; the loss is on cpu:1
  for (const PipeSchedule sched : {PipeSchedule::gpipe, PipeSchedule::one_f_one_b}) {
    for (const DType precision : {DType::f32, DType::f16, DType::bf16}) {
      SCOPED_TRACE(std::string(pipe_schedule_name(sched)) + ", " + dtype_name(precision));
      MedicalCNN ref(small_config(), 7), piped(small_config(), 7), naive(small_config(), 7);
      for (MedicalCNN* net : {&ref, &piped, &naive}) {
        net->train();
        net->set_precision(precision);
      }
      place_pipeline_stages(piped.units(), 2, devices);
      place_pipeline_stages(naive.units(), 2, devices);  // split, but run whole (no pipeline)
      for (auto& [name, p] : piped.named_parameters()) {
        const bool stage1 = name.rfind("stem", 0) != 0 && name.rfind("stages.0.", 0) != 0;
        ASSERT_EQ(p->value.device(), stage1 ? Device::cpu(1) : Device::cpu()) << name;
        ASSERT_EQ(p->grad.device(), p->value.device()) << name;
      }
      auto opt_ref = make_optimizer(optim("adam", 1e-2f), ref.named_parameters());
      auto opt_pipe = make_optimizer(optim("adam", 1e-2f), piped.named_parameters());
      auto opt_naive = make_optimizer(optim("adam", 1e-2f), naive.named_parameters());
      for (auto& [name, t] : opt_pipe->state())
        EXPECT_EQ(t->device(), name.rfind("stem", 0) != 0 && name.rfind("stages.0.", 0) != 0 ? Device::cpu(1) : Device::cpu())
            << name;
      LossScalerConfig lsc;
      lsc.enabled = precision == DType::f16;
      lsc.init_scale = 1024.f;
      lsc.growth_interval = 2;
      LossScaler scaler_ref(lsc), scaler_pipe(lsc), scaler_naive(lsc);
      PipelineOptions po;
      po.schedule = sched;
      po.cut = 2;
      po.devices = devices;
      Pipeline pipe(piped, piped.units(), po, *comm_);
      for (int step = 0; step < 3; ++step) {
        const MicroBatches b = make_batch(11, 3, 16, 200 + static_cast<uint32_t>(step));
        StepOptions so_ref, so_pipe, so_naive;
        so_ref.loss_scaler = &scaler_ref;
        so_pipe.loss_scaler = &scaler_pipe;
        so_naive.loss_scaler = &scaler_naive;
        so_ref.clip_grad_norm = so_pipe.clip_grad_norm = so_naive.clip_grad_norm = 1.0f;
        const StepStats a = train_step_micro(ref, *opt_ref, *comm_, b.xs, b.ys, loss, s, so_ref);
        const StepStats p = pipe.train_step(*opt_pipe, b.xs, b.ys, loss, so_pipe);
        const StepStats q = train_step_micro(naive, *opt_naive, *comm_, b.xs, b.ys, loss, s, so_naive);
        for (const StepStats* o : {&p, &q}) {
          EXPECT_EQ(a.loss, o->loss);
          EXPECT_EQ(a.correct, o->correct);
          // The root of two per-device sums: the same norm up to the double's last bits.
          EXPECT_NEAR(a.grad_norm, o->grad_norm, 1e-12 * a.grad_norm);
          EXPECT_EQ(a.loss_scale, o->loss_scale);
        }
      }
      expect_bitwise_equal(ref, piped);
      expect_bitwise_equal(ref, naive);
      EXPECT_EQ(scaler_ref.scale(), scaler_pipe.scale());
      const PipelineStats st = pipe.stats();
      EXPECT_EQ(st.stage[0].device, "cpu (1 thread)");
      EXPECT_EQ(st.stage[1].device, "cpu:1 (1 thread)");
      EXPECT_NE(pipe.describe().find("on cpu:1 (1 thread)"), std::string::npos) << pipe.describe();
      // The model run whole across both devices (validation): input and logits on cpu.
      ref.eval();
      piped.eval();
      const MicroBatches x = make_batch(5, 1, 16, 99);
      const Tensor want = ref.forward(x.xs[0], nullptr, s), got = piped.forward(x.xs[0], nullptr, s);
      EXPECT_EQ(got.device(), Device::cpu());
      EXPECT_EQ(want.to_vector(), got.to_vector());
    }
  }
}

TEST_F(Pipelines, TwoDevicesRefusedWhereTheyCannotRun) {
  MedicalCNN net(small_config(), 3);
  PipelineOptions po;
  po.cut = 2;
  po.devices = {Device::cpu(), Device::cpu(1)};
  expect_error([&] { Pipeline p(net, net.units(), po, *comm_); },
               {"unit stages.1.0 of stage 1 is on cpu, its stage on cpu:1", "place_pipeline_stages"});
  po.devices = {Device::cpu(1), Device::cpu()};
  expect_error([&] { Pipeline p(net, net.units(), po, *comm_); }, {"[cpu:1, cpu]", "stage 0 must be on the model's device"});
  po.devices = {Device::cpu(), Device::cuda(0)};
  expect_error([&] { Pipeline p(net, net.units(), po, *comm_); }, {"both stages on CPUs or both on GPUs"});
  po.devices = {Device::cpu()};
  expect_error([&] { Pipeline p(net, net.units(), po, *comm_); }, {"1 device(s) for 2 stages"});
  // A kernel keeps the logical devices apart: a cpu:1 tensor on a cpu stream is refused.
  place_pipeline_stages(net.units(), 2, {Device::cpu(), Device::cpu(1)});
  const MicroBatches b = make_batch(4, 1, 16, 1, Device::cpu(1));
  expect_error([&] { net.units()[2].second->forward(b.xs[0], nullptr, Stream{Device::cpu(), nullptr}); },
               {"stream on cpu but the module is on cpu:1"});
  // An optimizer made before the stages were placed holds its state on the old device.
  MedicalCNN late(small_config(), 3);
  auto opt = make_optimizer(optim("sgd", 0.1f), late.named_parameters());
  place_pipeline_stages(late.units(), 2, {Device::cpu(), Device::cpu(1)});
  expect_error([&] { opt->step(Stream{Device::cpu(), nullptr}); }, {"optimizer: parameter", "is on cpu:1 but was on cpu"});
  EXPECT_EQ(parse_device("cpu:1"), Device::cpu(1));
  EXPECT_EQ(Device::cpu(1).str(), "cpu:1");
  EXPECT_EQ(Device::cpu().str(), "cpu");
  expect_error([] { parse_device("cpu:x"); }, {"bad device 'cpu:x'", "cpu:N"});
  // pipeline.devices as lancet train reads them: as written, or with train.device cuda counted
  // from the rank's first GPU (whose index the CUDA build checks against the visible GPUs).
  EXPECT_EQ(pipeline_devices({}, Device::cpu()), (std::vector<Device>{Device::cpu(), Device::cpu()}));
  EXPECT_EQ(pipeline_devices({"cpu", "cpu:1"}, Device::cpu(), /*rank_relative=*/true),
            (std::vector<Device>{Device::cpu(), Device::cpu(1)}));
  expect_error([] { pipeline_devices({"cuda:1", "cuda:2"}, Device::cuda(2), true); },
               {"pipeline.devices starts with cuda:1", "count from each rank's first GPU (cuda:2 here)", "[cuda:0, cuda:1]"});
  EXPECT_EQ(pipeline_gpus_per_rank({"cuda:0", "cuda:1"}), 2);
  EXPECT_EQ(pipeline_gpus_per_rank({"cuda:0", "cuda:0"}), 1);
  EXPECT_EQ(pipeline_gpus_per_rank({"cpu", "cpu:1"}), 1);
  EXPECT_EQ(pipeline_gpus_per_rank({}), 1);
  // The CPU has one allocator for every stage, domain and logical device: one pool to read.
  const std::vector<Allocator*> pools = training_memory_pools(Device::cpu(), {Device::cpu(), Device::cpu(1)});
  ASSERT_EQ(pools.size(), 1u);
  EXPECT_EQ(pools[0], &allocator_for(Device::cpu()));
}

TEST_F(Pipelines, OneFOneBHoldsLessActivationMemoryThanGpipe) {
  int64_t peak[2] = {0, 0};
  for (const PipeSchedule sched : {PipeSchedule::gpipe, PipeSchedule::one_f_one_b}) {
    MedicalCNN net(small_config(), 3);
    net.train();
    auto opt = make_optimizer(optim("sgd", 0.01f), net.named_parameters());
    PipelineOptions po;
    po.schedule = sched;
    po.cut = 2;  // stage 0 holds the large early activations
    Pipeline pipe(net, net.units(), po, *comm_);
    const MicroBatches b = make_batch(16, 8, 48, 5);
    pipe.train_step(*opt, b.xs, b.ys, Loss(), StepOptions());
    peak[sched == PipeSchedule::gpipe ? 0 : 1] = pipe.stats().stage[0].peak_bytes;
    EXPECT_EQ(pipe.stats().stage[0].max_in_flight, sched == PipeSchedule::gpipe ? 8 : 2);
  }
  // 8 micro-batches: GPipe keeps 8 micro-batches' activations on stage 0, 1F1B at most 2.
  EXPECT_LT(peak[1] * 2, peak[0]) << "1f1b " << peak[1] << " bytes, gpipe " << peak[0] << " bytes";
}

TEST_F(Pipelines, AFailingStageStopsTheStepWithItsErrorAndTheNextStepRuns) {
  MedicalCNN net(small_config(), 3);
  net.train();
  auto opt = make_optimizer(optim("sgd", 0.01f), net.named_parameters());
  PipelineOptions po;
  po.cut = 3;
  Pipeline pipe(net, net.units(), po, *comm_);
  MicroBatches b = make_batch(8, 4, 16, 9);
  b.ys[2].data<int64_t>()[0] = 7;  // a label out of range: the last stage's loss of micro-batch 2 throws
  const auto t0 = std::chrono::steady_clock::now();
  expect_error([&] { pipe.train_step(*opt, b.xs, b.ys, Loss(), StepOptions()); }, {"pipeline stage 1, forward of micro-batch 2: "});
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 30.0);
  // A wrong input shape fails in stage 0.
  MicroBatches bad = make_batch(8, 4, 16, 9);
  bad.xs[1] = Tensor::zeros({2, 3, 16, 16});
  expect_error([&] { pipe.train_step(*opt, bad.xs, bad.ys, Loss(), StepOptions()); }, {"pipeline stage 0, forward of micro-batch 1: "});
  // The pipeline is usable again.
  net.zero_grad();
  const MicroBatches good = make_batch(8, 4, 16, 10);
  const StepStats st = pipe.train_step(*opt, good.xs, good.ys, Loss(), StepOptions());
  EXPECT_EQ(st.count, 8);
  EXPECT_TRUE(std::isfinite(st.loss));
}

TEST_F(Pipelines, RejectsBadCutsAndGradSyncOptions) {
  MedicalCNN net(small_config(), 3);
  PipelineOptions po;
  po.cut = 0;
  expect_error([&] { Pipeline p(net, net.units(), po, *comm_); }, {"cut 0 out of range"});
  po.cut = static_cast<int>(net.units().size());
  expect_error([&] { Pipeline p(net, net.units(), po, *comm_); }, {"out of range"});
}

// End to end through lancet train: a pipelined run and an unpipelined run with as many
// accumulation micro-batches give the same weights, and checkpoints resume across the two.
namespace {
class PipelineCli : public ::testing::Test {
 protected:
  TempDir dir{"pipeline_cli"};
  std::string env() const { return "LANCET_CACHE=" + dir / "cache"; }
  std::string args(const std::string& out, const std::string& extra) const {
    return "train --set model.widths=[8,16,16,16] --set model.depths=[1,1,1,1] --set model.head_hidden=16 "
           "--set data.image_size=32 --set data.synth.size=32 --set data.synth.train=128 --set data.synth.val=32 "
           "--set train.batch_size=32 --set train.tensorboard=false --out " +
           out + " " + extra;
  }
  static std::string piped(int epochs, const std::string& schedule) {
    return "--epochs " + std::to_string(epochs) + " --threads 2 --set pipeline.stages=2 --set pipeline.micro_batches=4 "
           "--set pipeline.threads_per_stage=1 --set pipeline.cut=stages.2.0 --set pipeline.schedule=" + schedule;
  }
  static std::string accumulated(int epochs) {
    return "--epochs " + std::to_string(epochs) + " --threads 1 --set train.grad_accum_steps=4";
  }
};

void expect_same_weights(const std::string& a, const std::string& b) {
  H5File fa = H5File::open_read(a), fb = H5File::open_read(b);
  const auto names = fa.list("/model");
  ASSERT_EQ(names, fb.list("/model"));
  for (const auto& n : names) EXPECT_EQ(fa.read("/model/" + n).to_vector(), fb.read("/model/" + n).to_vector()) << n;
}
}  // namespace

TEST_F(PipelineCli, TrainsLikeAccumulationAndCheckpointsMoveBothWays) {
  RunResult r = run_lancet_env(env(), args(dir / "acc", accumulated(2)));
  ASSERT_EQ(r.status, 0) << r.output;
  r = run_lancet_env(env(), args(dir / "pipe", piped(2, "1f1b")));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("pipeline: 2 stages, 1f1b schedule, 4 micro-batches per step; cut before stages.2.0"),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("stage 0: stem .. stages.1.0"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("% measured ("), std::string::npos) << r.output;  // the per-epoch report
  EXPECT_NE(r.output.find("pipeline "), std::string::npos) << r.output;     // the phase table row
  expect_same_weights(dir / "acc/final.h5", dir / "pipe/final.h5");
  // Stage 1 on a second (logical host) device: the same weights; evaluation runs across both.
  r = run_lancet_env(env(), args(dir / "dev", piped(2, "1f1b") + " --set pipeline.devices=[cpu,cpu:1]"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("stages.2.0 .. head"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("on cpu:1 (1 thread)"), std::string::npos) << r.output;
  expect_same_weights(dir / "acc/final.h5", dir / "dev/final.h5");
  r = run_lancet_env(env(), args(dir / "devx", "--set pipeline.stages=2 --set pipeline.devices=[cpu:1,cpu]"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("stage 0 must be on the model's device"), std::string::npos) << r.output;

  // Pipelined (GPipe) for one epoch, resumed without the pipeline; and the other way round.
  r = run_lancet_env(env(), args(dir / "a", piped(1, "gpipe")));
  ASSERT_EQ(r.status, 0) << r.output;
  r = run_lancet_env(env(), args(dir / "a", accumulated(2) + " --resume auto"));
  ASSERT_EQ(r.status, 0) << r.output;
  expect_same_weights(dir / "acc/final.h5", dir / "a/final.h5");
  r = run_lancet_env(env(), args(dir / "b", accumulated(1)));
  ASSERT_EQ(r.status, 0) << r.output;
  r = run_lancet_env(env(), args(dir / "b", piped(2, "1f1b") + " --resume auto"));
  ASSERT_EQ(r.status, 0) << r.output;
  expect_same_weights(dir / "acc/final.h5", dir / "b/final.h5");

  // metrics.jsonl carries the pipeline report per epoch.
  std::ifstream metrics(dir / "pipe/metrics.jsonl");
  std::string line;
  ASSERT_TRUE(std::getline(metrics, line));
  const Json m = Json::parse(line);
  ASSERT_TRUE(m.contains("pipeline")) << line;
  EXPECT_EQ(m["pipeline"]["stage"].size(), 2u);
  EXPECT_GT(m["phases"]["phases"]["pipeline"]["mean_ms"].get<double>(), 0.0);

  // Automatic cut, and what cannot be combined.
  r = run_lancet_env(env(), args(dir / "auto", "--max-steps 2 --set pipeline.stages=2 --set pipeline.balance=flops"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("balanced by forward FLOPs"), std::string::npos) << r.output;
  r = run_lancet_env(env(), args(dir / "x", "--set pipeline.stages=2 --set train.grad_accum_steps=2"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("set one of them"), std::string::npos) << r.output;
  r = run_lancet_env(env(), args(dir / "y", "--set pipeline.stages=2 --set pipeline.cut=nope"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("no unit named 'nope'"), std::string::npos) << r.output;
  r = run_lancet_env(env(), args(dir / "z", "--set pipeline.stages=3"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("pipeline.stages must be 1"), std::string::npos) << r.output;
}

// lancet bench train with a pipeline: the pipelined step against the unpipelined model on one
// device; with pipeline.devices the stages on their own devices (the two-GPU benchmark's path,
// here on [cpu, cpu:1]).
TEST_F(PipelineCli, BenchReportsThePipelineAgainstOneDevice) {
  const std::string tiny = "--set model.widths=[8,16,16,16] --set model.depths=[1,1,1,1] --set model.head_hidden=16 "
                           "--set data.image_size=32 --batch-size 8 --steps 2 --warmup 1 --threads 2 "
                           "--set pipeline.stages=2 --set pipeline.micro_batches=2 --set pipeline.cut=stages.2.0";
  RunResult r = run_lancet("bench train --json " + tiny + " --set pipeline.devices=[cpu,cpu:1]");
  ASSERT_EQ(r.status, 0) << r.output;
  const Json j = Json::parse(r.output.substr(r.output.find('{')));
  EXPECT_EQ(j.at("benchmark"), "train_pipeline");
  EXPECT_EQ(j.at("config").at("devices"), Json({"cpu", "cpu:1"}));
  EXPECT_EQ(j.at("pipeline").at("stage").at(1).at("device"), "cpu:1 (1 thread)");
  EXPECT_EQ(j.at("cut"), "stages.2.0");
  EXPECT_GT(j.at("speedup_vs_one_device").get<double>(), 0);
  EXPECT_GT(j.at("peak_bytes").get<int64_t>(), 0);
  EXPECT_EQ(j.at("one_device").at("device"), "cpu");
  r = run_lancet("bench train " + tiny);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("one device (cpu, 1 thread, no pipeline)"), std::string::npos) << r.output;
  r = run_lancet("bench train " + tiny + " --precision fp16");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("fp16/bf16 on the CPU are emulated"), std::string::npos) << r.output;
}

// Data parallelism over pipelines: 2 ranks, each a two-stage pipeline, train like 2 ranks with
// gradient accumulation (each stage's gradients averaged on their own), in fp32 and in fp16.
TEST_F(PipelineCli, EachRankAPipelineUnderMpirun) {
  const std::string mpiexec = LANCET_MPIEXEC;
  if (mpiexec.empty()) GTEST_SKIP() << "this build has no MPI (libopenmpi-dev) or no mpirun";
  auto mpirun = [&](const std::string& a) {
    return run_command("env " + env() + " " + mpiexec + " --allow-run-as-root --oversubscribe -np 2 " +
                       lancet_binary() + " " + a);
  };
  RunResult r = mpirun(args(dir / "acc2", "--epochs 1 --threads 1 --set train.grad_accum_steps=2"));
  ASSERT_EQ(r.status, 0) << r.output;
  r = mpirun(args(dir / "pipe2", "--epochs 1 --threads 2 --set pipeline.stages=2 --set pipeline.micro_batches=2 "
                                 "--set pipeline.threads_per_stage=1 --set dist.bucket_mb=0.01"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("each a two-stage pipeline"), std::string::npos) << r.output;
  expect_same_weights(dir / "acc2/final.h5", dir / "pipe2/final.h5");
  // Each rank's stage 1 on a second (logical host) device: gradients reduced per stage there.
  r = mpirun(args(dir / "dev2", "--epochs 1 --threads 2 --set pipeline.stages=2 --set pipeline.micro_batches=2 "
                                "--set pipeline.threads_per_stage=1 --set dist.bucket_mb=0.01 "
                                "--set pipeline.devices=[cpu,cpu:1]"));
  ASSERT_EQ(r.status, 0) << r.output;
  expect_same_weights(dir / "acc2/final.h5", dir / "dev2/final.h5");
  // Emulated fp16 with dynamic loss scaling: the pipeline's per-stage unscale, inf check and
  // skip decision agree across ranks as the accumulation run's do.
  r = mpirun(args(dir / "acc2h", "--epochs 1 --threads 1 --precision fp16 --set train.grad_accum_steps=2"));
  ASSERT_EQ(r.status, 0) << r.output;
  r = mpirun(args(dir / "pipe2h", "--epochs 1 --threads 2 --precision fp16 --set pipeline.stages=2 "
                                  "--set pipeline.micro_batches=2 --set pipeline.threads_per_stage=1 "
                                  "--set dist.bucket_mb=0.01"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("each a two-stage pipeline"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("precision: fp16 emulated on the CPU"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("loss scaling dynamic from"), std::string::npos) << r.output;
  expect_same_weights(dir / "acc2h/final.h5", dir / "pipe2h/final.h5");
}

// What the per-stage figures rest on: a block is charged to its allocating thread's memory
// domain and released from it whichever thread frees it; a thread's own kernel thread count.
TEST(PipelineSupport, MemoryDomainsAndThreadLocalThreadCounts) {
  const size_t before = memory_domain_current_bytes(3);
  reset_memory_domain_peak(3);
  Tensor t;
  std::thread([&] {
    MemoryDomainScope scope(3);
    t = Tensor::zeros({1000});
    Tensor scratch = Tensor::zeros({500});  // freed at once: counts in the peak only
  }).join();
  EXPECT_EQ(memory_domain_current_bytes(3), before + 4000);
  EXPECT_EQ(memory_domain_peak_bytes(3), before + 6000);
  t = Tensor();  // freed by this thread, from domain 3
  EXPECT_EQ(memory_domain_current_bytes(3), before);
  expect_error([] { MemoryDomainScope bad(kMemoryDomains); }, {"memory domain 4 out of range"});

  set_num_threads(2);
  int inside = 0;
  std::thread([&] {
    set_thread_local_threads(1);
    inside = num_threads();
  }).join();
  EXPECT_EQ(inside, 1);
  EXPECT_EQ(num_threads(), 2);
}
