// channels_last through the model (layers/module.h set_memory_format) on the CPU, where every
// kernel gives the same bits in either memory format: MedicalCNN's logits, input gradient,
// parameter gradients and BatchNorm statistics in channels_last equal nchw's bit for bit
// (fp32 and the fp16 emulation, training and eval), every activation inside really is
// channels_last while the model's edges stay nchw, pipeline stages carry the format, and
// `lancet train --memory-format channels_last` writes the same weights as nchw. What is checked
// here is the layout logic of the layers; the GPU NHWC kernels are checked against these CPU
// twins in tests/test_gpu_channels_last.cpp.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "kernels/elementwise.h"
#include "kernels/parallel.h"
#include "layers/medicalcnn.h"
#include "tests/cli_util.h"
#include "tests/expect_error.h"
#include "tests/pipeline_fixtures.h"
#include "tests/tiny_medicalcnn.h"
#include "tests/weights_diff.h"
#include "trainer/pipeline.h"
#include "trainer/trainer.h"

using namespace lancet;
using namespace lancet::testing;

namespace {

const Stream kCpu{Device::cpu(), nullptr};
constexpr MemoryFormat kNhwc = MemoryFormat::channels_last;

Tensor random_tensor(const Shape& shape, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  Tensor t = Tensor::empty(shape);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = nd(rng);
  return t;
}

void expect_bitwise(const Tensor& a, const Tensor& b, const std::string& what) {
  ASSERT_EQ(a.shape(), b.shape()) << what;
  ASSERT_EQ(a.format(), b.format()) << what;
  const auto va = a.to_vector(), vb = b.to_vector();
  EXPECT_EQ(std::memcmp(va.data(), vb.data(), va.size() * sizeof(float)), 0) << what;
}

// Every parameter, gradient and buffer of two models bit for bit.
void expect_same_state(Module& a, Module& b) {
  auto pa = a.named_parameters(), pb = b.named_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    expect_bitwise(pa[i].second->value, pb[i].second->value, pa[i].first);
    expect_bitwise(pa[i].second->grad, pb[i].second->grad, pa[i].first + ".grad");
  }
  auto ba = a.named_buffers(), bb = b.named_buffers();
  ASSERT_EQ(ba.size(), bb.size());
  for (size_t i = 0; i < ba.size(); ++i) expect_bitwise(*ba[i].second, *bb[i].second, ba[i].first);
}

// Widths not multiples of 8, odd spatial sizes: every kernel's channels_last indexing is used
// with C != inner sizes.
MedicalCNNConfig odd_config() { return tiny_medicalcnn_config(3, 3, {5, 6, 7, 9}, 10); }

}  // namespace

TEST(ChannelsLast, MedicalCNNEqualsNchwBitForBit) {
  set_num_threads(2);
  for (const DType precision : {DType::f32, DType::f16, DType::bf16}) {
    for (const bool training : {true, false}) {
      SCOPED_TRACE(std::string(dtype_name(precision)) + (training ? " training" : " eval"));
      MedicalCNN ref(odd_config(), 11), nhwc(odd_config(), 11);
      for (MedicalCNN* m : {&ref, &nhwc}) {
        m->train(training);
        m->set_dropout_enabled(false);  // dropout's masks are drawn per memory position (2-D here anyway)
        m->set_precision(precision);
      }
      nhwc.set_memory_format(kNhwc);
      EXPECT_EQ(nhwc.memory_format(), kNhwc);
      const Tensor x = random_tensor({2, 3, 19, 21}, 5);
      SavedPtr sa, sb;
      const Tensor ya = ref.forward(x, &sa, kCpu), yb = nhwc.forward(x, &sb, kCpu);
      expect_bitwise(ya, yb, "logits");
      const Tensor dy = random_tensor(ya.shape(), 6);
      const Tensor dxa = ref.backward(dy, *sa, true, kCpu), dxb = nhwc.backward(dy, *sb, true, kCpu);
      EXPECT_EQ(dxb.format(), MemoryFormat::nchw) << "the model's input gradient leaves it in nchw";
      expect_bitwise(dxa, dxb, "input gradient");
      expect_same_state(ref, nhwc);
    }
  }
}

TEST(ChannelsLast, ActivationsInsideAreChannelsLastAndTheEdgesNchw) {
  MedicalCNN net(odd_config(), 3);
  net.train();
  net.set_memory_format(kNhwc);
  const Tensor x = random_tensor({2, 3, 16, 16}, 1);
  Tensor h = net.to_compute(x, kCpu);
  EXPECT_EQ(h.format(), kNhwc);
  EXPECT_EQ(x.format(), MemoryFormat::nchw) << "the caller's tensor is left as it was";
  // Every 4-D unit output (stem .. context) is channels_last; pool and head are 2-D.
  std::vector<SavedPtr> saved(net.units().size());
  for (size_t i = 0; i < net.units().size(); ++i) {
    h = net.units()[i].second->forward(h, &saved[i], kCpu);
    if (h.ndim() == 4) {
      EXPECT_EQ(h.format(), kNhwc) << net.units()[i].first;
    }
  }
  EXPECT_EQ(h.ndim(), 2);
  // And their input gradients on the way back.
  Tensor g = random_tensor(h.shape(), 2);
  for (size_t i = net.units().size(); i-- > 1;) {
    g = net.units()[i].second->backward(g, *saved[i], true, kCpu);
    if (g.ndim() == 4) {
      EXPECT_EQ(g.format(), kNhwc) << net.units()[i].first;
    }
  }
  const Tensor back = net.from_compute(to_format(x, kNhwc, kCpu), kCpu);
  EXPECT_EQ(back.format(), MemoryFormat::nchw);
  expect_bitwise(back, x, "to_compute then from_compute");
  // The parameters stay nchw (checkpoints and weight files are PyTorch's layout).
  for (auto& [name, p] : net.named_parameters()) EXPECT_EQ(p->value.format(), MemoryFormat::nchw) << name;
}

TEST(ChannelsLast, ResolvesAutoAndRejectsUnknownSettings) {
  EXPECT_EQ(resolve_memory_format("auto", Device::cpu(), DType::f16), MemoryFormat::nchw);
  EXPECT_EQ(resolve_memory_format("auto", Device::cuda(0), DType::f32), MemoryFormat::nchw);
  EXPECT_EQ(resolve_memory_format("auto", Device::cuda(0), DType::f16), kNhwc);
  EXPECT_EQ(resolve_memory_format("auto", Device::cuda(0), DType::bf16), kNhwc);
  EXPECT_EQ(resolve_memory_format("channels_last", Device::cpu(), DType::f32), kNhwc);
  EXPECT_EQ(resolve_memory_format("nchw", Device::cuda(0), DType::f16), MemoryFormat::nchw);
  expect_error([] { resolve_memory_format("nhwc", Device::cpu(), DType::f32); }, {"train.memory_format", "nhwc"});
  Json c = default_config();
  c["train"]["memory_format"] = "NHWC";
  expect_error([&] { train_config(c); }, {"train.memory_format must be auto, nchw or channels_last", "NHWC"});
}

// Pipeline stages run the model's units directly: the first stage converts at the model's
// entry, the activations cross between stages in channels_last, and the weights after a few
// steps are those of unpipelined nchw training with gradient accumulation.
TEST(ChannelsLast, PipelineStagesEqualNchwAccumulation) {
  set_num_threads(1);
  auto comm = make_single_process_communicator();
  MedicalCNNConfig cfg = tiny_medicalcnn_config(1, 3, {4, 6, 6, 6}, 8);
  MedicalCNN ref(cfg, 7), piped(cfg, 7);
  ref.train();
  piped.train();
  piped.set_memory_format(kNhwc);
  auto opt_ref = make_optimizer(optim("sgd", 1e-2f), ref.named_parameters());
  auto opt_pipe = make_optimizer(optim("sgd", 1e-2f), piped.named_parameters());
  PipelineOptions po;
  po.schedule = PipeSchedule::one_f_one_b;
  po.cut = 2;
  Pipeline pipe(piped, piped.units(), po, *comm);
  const Loss loss;
  for (int step = 0; step < 2; ++step) {
    const MicroBatches b = make_batch(9, 3, 16, 40 + static_cast<uint32_t>(step));
    const StepStats a = train_step_micro(ref, *opt_ref, *comm, b.xs, b.ys, loss, kCpu, StepOptions{});
    const StepStats p = pipe.train_step(*opt_pipe, b.xs, b.ys, loss, StepOptions{});
    EXPECT_EQ(a.loss, p.loss);
    EXPECT_EQ(a.correct, p.correct);
  }
  expect_same_state(ref, piped);
}

// End to end: the config key and the flag reach the model, the log says so, and the weights
// equal an nchw run's.
TEST(ChannelsLast, TrainingRunWritesTheSameWeightsAsNchw) {
  TempDir dir("channels_last_cli");
  const std::string env = "LANCET_CACHE=" + dir / "cache";
  auto args = [&](const std::string& out, const std::string& extra) {
    return "train --set model.widths=[6,10,10,12] --set model.depths=[1,1,1,1] --set model.head_hidden=8 "
           "--set data.image_size=24 --set data.synth.size=24 --set data.synth.train=48 --set data.synth.val=16 "
           "--set train.batch_size=16 --set train.tensorboard=false --epochs 1 --threads 2 --out " +
           out + " " + extra;
  };
  RunResult r = run_lancet_env(env, args(dir / "nchw", "--memory-format nchw"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output.find("memory format:"), std::string::npos) << r.output;
  r = run_lancet_env(env, args(dir / "nhwc", "--memory-format channels_last"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("memory format: channels_last activations inside the model"), std::string::npos) << r.output;
  EXPECT_EQ(max_difference(dir / "nchw/final.h5", dir / "nhwc/final.h5"), 0.0);
  r = run_lancet_env(env, args(dir / "bad", "--memory-format nhwc"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("train.memory_format must be auto, nchw or channels_last"), std::string::npos) << r.output;
}
