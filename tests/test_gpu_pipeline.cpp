// Pipeline stages on GPUs (trainer/pipeline.h), label gpu. The one-GPU mode — both stages on
// cuda:0, each with its own stream and memory pool — trains like unpipelined gradient
// accumulation over the same micro-batches on the same GPU, for both schedules and in bf16;
// 1F1B's stage-0 pool peaks lower than GPipe's; a failing stage stops the step with its error
// and the pipeline runs the next one. Stages on two GPUs train like accumulation on one, and a
// rank on the second GPU makes no CUDA context on the first (both skip unless two GPUs are visible).
//
// Bitwise or not: lancet's own kernels and cuBLASLt (user-owned workspace) are deterministic,
// but the cuDNN algorithm chosen for a convolution's backward may accumulate with atomics. So
// each case first trains the unpipelined model twice: when those two runs agree bitwise, the
// pipelined run must agree bitwise too; otherwise it must agree within a tolerance, and the
// test says which it checked.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <random>
#include <string>
#include <thread>
#include <utility>

#include "comm/communicator.h"
#include "kernels/allocator.h"
#include "layers/medicalcnn.h"
#include "tests/expect_error.h"
#include "tests/pipeline_fixtures.h"
#include "tests/gpu_util.h"
#include "trainer/loss_scaler.h"
#include "trainer/pipeline.h"
#include "trainer/trainer.h"

using namespace lancet;
using namespace lancet::testing;

namespace {

MedicalCNNConfig small_config() {
  MedicalCNNConfig c;
  c.in_channels = 1;
  c.num_classes = 3;
  c.widths = {8, 16, 16};
  c.depths = {1, 1, 1};
  c.se_reduction = 2;
  c.head_hidden = 16;
  return c;  // dropout on: its counters must advance as without the pipeline
}

std::unique_ptr<MedicalCNN> gpu_model(DType precision, MemoryFormat format = MemoryFormat::nchw) {
  auto net = std::make_unique<MedicalCNN>(small_config(), 7);
  net->to(Device::cuda(0));
  net->train();
  net->set_precision(precision);
  net->set_memory_format(format);
  return net;
}

bool bitwise_equal(Module& a, Module& b) {
  auto sa = a.state_dict(), sb = b.state_dict();
  if (sa.size() != sb.size()) return false;
  for (size_t i = 0; i < sa.size(); ++i) {
    const auto va = sa[i].second->to_vector(), vb = sb[i].second->to_vector();
    if (va.size() != vb.size() || std::memcmp(va.data(), vb.data(), va.size() * sizeof(float)) != 0) return false;
  }
  return true;
}

void expect_close_weights(Module& ref, Module& got, double rtol, double atol) {
  auto sa = ref.state_dict(), sb = got.state_dict();
  ASSERT_EQ(sa.size(), sb.size());
  for (size_t i = 0; i < sa.size(); ++i) {
    ASSERT_EQ(sa[i].first, sb[i].first);
    expect_close(to_cpu(*sa[i].second), *sb[i].second, rtol, atol, sa[i].first);
  }
}

const Stream kMain{Device::cuda(0), nullptr};  // the training thread's stream, as lancet train's

// Three steps of unpipelined accumulation (`pipe` null) or of the pipeline, from the same start.
std::vector<StepStats> train(MedicalCNN& net, Pipeline* pipe, int m, DType precision) {
  auto opt = make_optimizer(optim("adam", 1e-2f), net.named_parameters());
  LossScalerConfig lsc;
  lsc.enabled = precision == DType::f16;
  lsc.init_scale = 1024.f;
  LossScaler scaler(lsc);
  auto comm = make_single_process_communicator();
  std::vector<StepStats> out;
  for (int step = 0; step < 3; ++step) {
    const MicroBatches b = make_batch(11, m, 24, 100 + static_cast<uint32_t>(step), Device::cuda(0));  // uneven micro-batches
    StepOptions so;
    so.loss_scaler = &scaler;
    so.clip_grad_norm = 1.0f;
    out.push_back(pipe ? pipe->train_step(*opt, b.xs, b.ys, Loss(), so)
                       : train_step_micro(net, *opt, *comm, b.xs, b.ys, Loss(), kMain, so));
  }
  synchronize(kMain);
  return out;
}

PipelineOptions options(PipeSchedule sched, int cut) {
  PipelineOptions po;
  po.schedule = sched;
  po.cut = cut;
  return po;
}

}  // namespace

TEST(GpuPipeline, OneGpuEqualsGradientAccumulation) {
  LANCET_REQUIRE_GPU();
  auto comm = make_single_process_communicator();
  for (const PipeSchedule sched : {PipeSchedule::gpipe, PipeSchedule::one_f_one_b}) {
    for (const int m : {1, 4}) {
      // bf16 in channels_last too: NHWC 16-bit activations handed between the stages.
      for (const auto& [precision, format] : {std::pair{DType::f32, MemoryFormat::nchw},
                                              std::pair{DType::bf16, MemoryFormat::nchw},
                                              std::pair{DType::bf16, MemoryFormat::channels_last}}) {
        const bool nhwc = format == MemoryFormat::channels_last;
        SCOPED_TRACE(std::string(pipe_schedule_name(sched)) + ", " + std::to_string(m) + " micro-batches, " +
                     dtype_name(precision) + (nhwc ? " channels_last" : ""));
        auto ref = gpu_model(precision, format), again = gpu_model(precision, format),
             piped = gpu_model(precision, format);
        const auto a = train(*ref, nullptr, m, precision);
        train(*again, nullptr, m, precision);
        Pipeline pipe(*piped, piped->units(), options(sched, 2), *comm);
        const auto p = train(*piped, &pipe, m, precision);
        const bool deterministic = bitwise_equal(*ref, *again);
        std::cout << "[          ] " << pipe_schedule_name(sched) << ", m " << m << ", " << dtype_name(precision)
                  << ": the unpipelined runs are " << (deterministic ? "bitwise reproducible: checking bitwise"
                                                                     : "not bitwise reproducible: checking tolerances")
                  << "\n";
        if (deterministic) {
          EXPECT_TRUE(bitwise_equal(*ref, *piped)) << "pipelined weights differ from the unpipelined ones";
          for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i].loss, p[i].loss) << "step " << i;
        }
        const double rtol = precision == DType::f32 ? 1e-4 : 2e-2, atol = precision == DType::f32 ? 1e-5 : 2e-3;
        expect_close_weights(*ref, *piped, rtol, atol);
        for (size_t i = 0; i < a.size(); ++i) {
          EXPECT_NEAR(a[i].loss, p[i].loss, 1e-3 * std::max(1.0, std::fabs(a[i].loss))) << "step " << i;
          EXPECT_EQ(a[i].count, p[i].count);
        }
        for (size_t d = 0; d < ref->dropouts().size(); ++d)
          EXPECT_EQ(ref->dropouts()[d]->counter(), piped->dropouts()[d]->counter());
        const PipelineStats st = pipe.stats();
        EXPECT_EQ(st.steps, 3);
        ASSERT_EQ(st.stage.size(), 2u);
        for (const auto& q : st.stage) {
          EXPECT_NE(q.device.find("cuda:0"), std::string::npos) << q.device;
          EXPECT_GT(q.busy_s, 0);  // CUDA-event times on the stage's stream
          EXPECT_GE(q.idle, 0);
          EXPECT_LT(q.idle, 1);
          EXPECT_GT(q.peak_bytes, 0);  // the stage's own pool
        }
      }
    }
  }
}

TEST(GpuPipeline, OneFOneBHoldsLessActivationMemoryThanGpipe) {
  LANCET_REQUIRE_GPU();
  auto comm = make_single_process_communicator();
  int64_t peak[2] = {0, 0};
  for (const PipeSchedule sched : {PipeSchedule::gpipe, PipeSchedule::one_f_one_b}) {
    auto net = gpu_model(DType::f32);
    auto opt = make_optimizer(optim("sgd", 0.01f), net->named_parameters());
    Pipeline pipe(*net, net->units(), options(sched, 2), *comm);  // stage 0 holds the large early activations
    const MicroBatches b = make_batch(32, 8, 96, 5, Device::cuda(0));
    for (int step = 0; step < 2; ++step) pipe.train_step(*opt, b.xs, b.ys, Loss(), StepOptions());
    peak[sched == PipeSchedule::gpipe ? 0 : 1] = pipe.stats().stage[0].peak_bytes;
    EXPECT_EQ(pipe.stats().stage[0].max_in_flight, sched == PipeSchedule::gpipe ? 8 : 2);
  }
  EXPECT_LT(peak[1] * 2, peak[0]) << "1f1b " << peak[1] << " bytes, gpipe " << peak[0] << " bytes";
}

TEST(GpuPipeline, AFailingStageStopsTheStepWithItsErrorAndTheNextStepRuns) {
  LANCET_REQUIRE_GPU();
  auto comm = make_single_process_communicator();
  auto net = gpu_model(DType::f32);
  auto opt = make_optimizer(optim("sgd", 0.01f), net->named_parameters());
  Pipeline pipe(*net, net->units(), options(PipeSchedule::one_f_one_b, 3), *comm);
  MicroBatches bad = make_batch(8, 4, 24, 9, Device::cuda(0));
  Tensor y = to_cpu(bad.ys[2]);
  y.data<int64_t>()[0] = 7;  // out of range: the last stage's loss of micro-batch 2 throws
  bad.ys[2] = to_gpu(y);
  expect_error([&] { pipe.train_step(*opt, bad.xs, bad.ys, Loss(), StepOptions()); },
               {"pipeline stage 1, forward of micro-batch 2: "});
  net->zero_grad();
  const MicroBatches good = make_batch(8, 4, 24, 10, Device::cuda(0));
  const StepStats st = pipe.train_step(*opt, good.xs, good.ys, Loss(), StepOptions());
  EXPECT_EQ(st.count, 8);
  EXPECT_TRUE(std::isfinite(st.loss));
}

// Stages on two GPUs (pipeline.devices [cuda:0, cuda:1], one process): stage 1's units placed on
// cuda:1, activations and gradients handed over by peer copies, the optimizer, clipping and the
// loss scaler per device — trains like unpipelined accumulation on cuda:0, for both schedules, in
// fp32 and bf16 channels_last; the model used whole (validation) runs across both GPUs and gives
// the one-GPU logits. Skips unless two GPUs are visible. (The same logic runs in CI on the
// logical host devices [cpu, cpu:1]: tests/test_pipeline.cpp TwoDevices*.)
TEST(GpuPipeline, TwoGpusEqualGradientAccumulationOnOne) {
  LANCET_REQUIRE_GPU();
#ifdef LANCET_WITH_CUDA
  if (cuda_devices().size() < 2) GTEST_SKIP() << "needs two visible GPUs, " << cuda_devices().size() << " visible";
#endif
  auto comm = make_single_process_communicator();
  const std::vector<Device> devices = {Device::cuda(0), Device::cuda(1)};
  for (const PipeSchedule sched : {PipeSchedule::gpipe, PipeSchedule::one_f_one_b}) {
    for (const auto& [precision, format] : {std::pair{DType::f32, MemoryFormat::nchw},
                                            std::pair{DType::bf16, MemoryFormat::channels_last}}) {
      SCOPED_TRACE(std::string(pipe_schedule_name(sched)) + ", " + dtype_name(precision));
      auto ref = gpu_model(precision, format), piped = gpu_model(precision, format);
      place_pipeline_stages(piped->units(), 2, devices);
      for (auto& [name, p] : piped->named_parameters()) {
        const bool stage1 = name.rfind("stem", 0) != 0 && name.rfind("stages.0.", 0) != 0;
        EXPECT_EQ(p->value.device(), stage1 ? Device::cuda(1) : Device::cuda(0)) << name;
      }
      PipelineOptions po = options(sched, 2);
      po.devices = devices;
      Pipeline pipe(*piped, piped->units(), po, *comm);
      const auto a = train(*ref, nullptr, 4, precision);
      const auto p = train(*piped, &pipe, 4, precision);
      synchronize(Stream{Device::cuda(1), nullptr});
      const double rtol = precision == DType::f32 ? 1e-4 : 2e-2, atol = precision == DType::f32 ? 1e-5 : 2e-3;
      expect_close_weights(*ref, *piped, rtol, atol);
      for (size_t i = 0; i < a.size(); ++i) {
        EXPECT_NEAR(a[i].loss, p[i].loss, 1e-3 * std::max(1.0, std::fabs(a[i].loss))) << "step " << i;
        EXPECT_NEAR(a[i].grad_norm, p[i].grad_norm, 1e-3 * std::max(1.0, std::fabs(a[i].grad_norm))) << "step " << i;
        EXPECT_EQ(a[i].count, p[i].count);
      }
      const PipelineStats st = pipe.stats();
      ASSERT_EQ(st.stage.size(), 2u);
      EXPECT_NE(st.stage[0].device.find("cuda:0"), std::string::npos) << st.stage[0].device;
      EXPECT_NE(st.stage[1].device.find("cuda:1"), std::string::npos) << st.stage[1].device;
      for (const auto& q : st.stage) {
        EXPECT_GT(q.busy_s, 0);
        EXPECT_GT(q.peak_bytes, 0);  // each stage's own pool on its own GPU
      }
      // The whole model across both GPUs (evaluation): input and logits on cuda:0.
      ref->eval();
      piped->eval();
      const MicroBatches x = make_batch(5, 1, 24, 77, Device::cuda(0));
      const Tensor want = ref->forward(x.xs[0], nullptr, kMain), got = piped->forward(x.xs[0], nullptr, kMain);
      EXPECT_EQ(got.device(), Device::cuda(0));
      expect_close(to_cpu(want), got, rtol, atol, "logits");
    }
  }
  // Stage 0 elsewhere than the model, a GPU that is not there, units left unplaced: refused.
  auto net = gpu_model(DType::f32);
  PipelineOptions po = options(PipeSchedule::one_f_one_b, 2);
  po.devices = {Device::cuda(1), Device::cuda(0)};
  expect_error([&] { Pipeline p(*net, net->units(), po, *comm); }, {"stage 0 must be on the model's device"});
  po.devices = {Device::cuda(0), Device::cuda(64)};
  expect_error([&] { Pipeline p(*net, net->units(), po, *comm); }, {"pipeline.devices names cuda:64"});
  po.devices = devices;
  expect_error([&] { Pipeline p(*net, net->units(), po, *comm); }, {"is on cuda:0, its stage on cuda:1", "place_pipeline_stages"});
}

// A data-parallel rank on a node's second GPU (train.device cuda: rank 1 trains on cuda:1) never
// touches GPU 0, rank 0's: no CUDA context is made there — by a device guard switching a thread
// back to device 0 (where a thread that never chose one is), a loader thread's pinned batch, the
// pipeline's stage threads and their cuDNN / cuBLAS handles' teardown, or a peer copy from such a
// thread. cudaSetDevice initialises a device: hundreds of MiB on the other rank's GPU, or an error
// under exclusive-process compute mode. Run in a process of its own (a death test), where nothing
// has used GPU 0. Skips unless two GPUs are visible; the peer copy needs three.
TEST(GpuPipeline, ARankOnTheSecondGpuMakesNoContextOnTheFirst) {
  LANCET_REQUIRE_GPU();
#ifdef LANCET_WITH_CUDA
  const int gpus = static_cast<int>(cuda_devices().size());
  if (gpus < 2) GTEST_SKIP() << "needs two visible GPUs, " << gpus << " visible";
  GTEST_FLAG_SET(death_test_style, "threadsafe");  // the child re-runs this test alone: a fresh process
  auto rank_on_second_gpu = [gpus] {
    const Device gpu = Device::cuda(1);
    const Stream main{gpu, nullptr};
    auto comm = make_single_process_communicator();
    auto net = std::make_unique<MedicalCNN>(small_config(), 7);
    net->to(gpu);
    net->train();
    auto opt = make_optimizer(optim("adam", 1e-2f), net->named_parameters());
    // A loader worker: a thread that never chose a device allocates a pinned batch.
    std::thread([&] { Tensor h = Tensor::empty({4, 1, 24, 24}, DType::f32, pinned_host_allocator(gpu)); }).join();
    const MicroBatches b = make_batch(8, 2, 24, 3, gpu);
    train_step_micro(*net, *opt, *comm, b.xs, b.ys, Loss(), main, StepOptions());
    {
      Pipeline pipe(*net, net->units(), options(PipeSchedule::one_f_one_b, 2), *comm);  // both stages on cuda:1
      pipe.train_step(*opt, b.xs, b.ys, Loss(), StepOptions());
    }  // the stage threads have ended: their handles are destroyed
    if (gpus >= 3)  // a peer copy between two GPUs other than 0, from a thread that never chose a device
      std::thread([&] { Tensor t = b.xs[0].to(Device::cuda(2)); }).join();
    synchronize(main);
    const bool touched = cuda_device_initialized(0);
    if (touched) std::fprintf(stderr, "GPU 0 has a CUDA context\n");
    std::exit(touched ? 1 : 0);
  };
  EXPECT_EXIT(rank_on_second_gpu(), ::testing::ExitedWithCode(0), "");
#endif
}
