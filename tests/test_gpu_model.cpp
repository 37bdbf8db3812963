// The CUDA path against the CPU reference one level up from the kernels: every layer, every
// block and the whole MedicalCNN, forward (train and eval mode) and backward (input gradient,
// every parameter gradient, running statistics), on odd shapes; a few optimizer steps; and the
// CLI (`lancet forward --device cuda` against the PyTorch fixtures, `lancet train --device
// cuda`). Label gpu: skips without a device.
//
// Tolerances: the GPU sums in other orders (cuDNN's algorithms, block reductions), so f32
// results differ from the CPU's by rounding that BatchNorm's normalisation can magnify where a
// channel's variance is small. Each tensor is compared with |gpu - cpu| <= rtol * |cpu| +
// rtol * 1e-2 * max|cpu| (the floor keeps near-zero elements of a large tensor from demanding
// absurd relative precision), rtol 1e-3 for single layers and 5e-3 through whole models.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <random>

#include "data/h5file.h"
#include "kernels/loss.h"
#include "kernels/optim.h"
#include "layers/blocks.h"
#include "layers/medicalcnn.h"
#include "tests/cli_util.h"
#include "tests/gpu_util.h"
#include "tests/module_gradcheck.h"
#include "tests/tiny_medicalcnn.h"

using namespace lancet;
using namespace lancet::testing;

namespace {

const Stream kCpu = Stream::cpu();
const Stream kGpu{Device::cuda(0), nullptr};

void expect_close_scaled(const Tensor& cpu, const Tensor& gpu, double rtol, const std::string& what) {
  const std::vector<float> a = cpu.to_vector();
  double maxabs = 0;
  for (float v : a) maxabs = std::max(maxabs, std::fabs(static_cast<double>(v)));
  expect_close(cpu, gpu, rtol, rtol * 1e-2 * maxabs + 1e-7, what);
}

using Factory = std::function<std::unique_ptr<Module>()>;

// Two copies of the same module (same construction, same weights), one moved to the GPU and run
// in memory format `f` (channels_last: NHWC activations inside, converted at the module's edges;
// the CPU copy stays nchw, which gives the CPU's channels_last bits anyway); the same input and
// output gradient through both; every result compared.
void compare_module(const Factory& make, const Shape& x_shape, bool training, MemoryFormat f, double rtol,
                    const std::string& what) {
  SCOPED_TRACE(what + (training ? " (train)" : " (eval)") + (f == MemoryFormat::channels_last ? " channels_last" : ""));
  auto cpu = make();
  randomize_batchnorms(*cpu, 17);
  auto gpu = make();
  randomize_batchnorms(*gpu, 17);
  gpu->to(Device::cuda(0));
  gpu->set_memory_format(f);
  cpu->train(training);
  gpu->train(training);

  const Tensor x = random_tensor(x_shape, 5);
  SavedPtr saved_c, saved_g;
  const Tensor yc = cpu->forward(x, &saved_c, kCpu);
  const Tensor yg = gpu->forward(to_gpu(x), &saved_g, kGpu);
  ASSERT_TRUE(yg.device().is_cuda());
  ASSERT_EQ(yg.format(), MemoryFormat::nchw) << "the module's output leaves in nchw";
  expect_close_scaled(yc, yg, rtol, "output");

  const Tensor dy = random_tensor(yc.shape(), 6);
  cpu->zero_grad();
  gpu->zero_grad();
  const Tensor dxc = cpu->backward(dy, *saved_c, /*need_input_grad=*/true, kCpu);
  const Tensor dxg = gpu->backward(to_gpu(dy), *saved_g, /*need_input_grad=*/true, kGpu);
  expect_close_scaled(dxc, dxg, rtol, "input gradient");
  auto pc = cpu->named_parameters();
  auto pg = gpu->named_parameters();
  ASSERT_EQ(pc.size(), pg.size());
  for (size_t i = 0; i < pc.size(); ++i) {
    ASSERT_EQ(pc[i].first, pg[i].first);
    expect_close_scaled(pc[i].second->grad, pg[i].second->grad, rtol, "grad of " + pc[i].first);
  }
  auto bc = cpu->named_buffers();
  auto bg = gpu->named_buffers();
  ASSERT_EQ(bc.size(), bg.size());
  for (size_t i = 0; i < bc.size(); ++i) expect_close_scaled(*bc[i].second, *bg[i].second, rtol, bc[i].first);
}

// Training and eval mode, nchw and channels_last.
void compare_both_modes(const Factory& make, const Shape& x_shape, double rtol, const std::string& what) {
  for (const MemoryFormat f : {MemoryFormat::nchw, MemoryFormat::channels_last})
    for (const bool training : {true, false}) compare_module(make, x_shape, training, f, rtol, what);
}

template <typename M, typename... Args> Factory seeded(Args... args) {
  return [=]() -> std::unique_ptr<Module> {
    std::mt19937_64 rng(42);
    return std::make_unique<M>(rng, args...);
  };
}

MedicalCNNConfig tiny_config() { return tiny_medicalcnn_config(3, 5, {4, 8, 12, 16}, 12); }

}  // namespace

// ---- layers ---------------------------------------------------------------------------------

TEST(GpuLayers, ConvolutionsMatchTheCpu) {
  LANCET_REQUIRE_GPU();
  // in, out, kernel, stride, padding, dilation, groups, bias — the model's stem, its 3x3 and
  // 1x1 convolutions, the context block's dilations, and odd channel counts.
  compare_both_modes(seeded<Conv2d>(1, 8, 7, 2, 3, 1, 1, false), {2, 1, 37, 29}, 1e-3, "stem 7x7/2");
  compare_both_modes(seeded<Conv2d>(5, 13, 3, 1, 1, 1, 1, true), {1, 5, 13, 11}, 1e-3, "3x3 odd channels");
  compare_both_modes(seeded<Conv2d>(12, 12, 3, 1, 3, 3, 1, false), {2, 12, 15, 15}, 1e-3, "3x3 dilation 3");
  compare_both_modes(seeded<Conv2d>(8, 6, 1, 2, 0, 1, 2, true), {3, 8, 9, 9}, 1e-3, "1x1/2 groups 2");
}

TEST(GpuLayers, BatchNormReluPoolLinearDropoutMatchTheCpu) {
  LANCET_REQUIRE_GPU();
  compare_both_modes([] { return std::make_unique<BatchNorm2d>(13); }, {3, 13, 7, 5}, 1e-3, "BatchNorm2d");
  compare_both_modes([] { return std::make_unique<ReLU>(); }, {2, 3, 9, 7}, 1e-6, "ReLU");
  compare_both_modes([] { return std::make_unique<MaxPool2d>(3, 2, 1); }, {2, 5, 17, 11}, 1e-6, "MaxPool2d");
  compare_both_modes([] { return std::make_unique<GlobalAvgPool>(); }, {2, 7, 9, 5}, 1e-5, "GlobalAvgPool");
  compare_both_modes(seeded<Linear>(37, 5, true), {3, 37}, 1e-4, "Linear");
  compare_both_modes(seeded<Linear>(16, 1, false), {1, 16}, 1e-4, "Linear batch 1, one output");
  // The counter-based dropout mask is the same on both devices.
  compare_both_modes([] { return std::make_unique<Dropout>(0.3f); }, {4, 33}, 1e-6, "Dropout");
}

// ---- blocks ---------------------------------------------------------------------------------

TEST(GpuBlocks, SeResidualAndContextBlocksMatchTheCpu) {
  LANCET_REQUIRE_GPU();
  compare_both_modes(seeded<SEBlock>(12, 4), {2, 12, 7, 9}, 1e-3, "SEBlock");
  compare_both_modes(seeded<BasicResidualBlock>(8, 8, 1, 4), {2, 8, 11, 9}, 1e-3, "residual identity");
  compare_both_modes(seeded<BasicResidualBlock>(5, 12, 2, 4), {1, 5, 13, 13}, 1e-3, "residual stride 2, 5 -> 12");
  compare_both_modes(seeded<ContextBlock>(12, 4), {2, 12, 9, 7}, 1e-3, "ContextBlock");
}

// ---- the whole model ------------------------------------------------------------------------

TEST(GpuModel, MedicalCnnForwardAndGradientsMatchTheCpu) {
  LANCET_REQUIRE_GPU();
  const MedicalCNNConfig tiny = tiny_config();
  const Factory make_tiny = [tiny] { return std::make_unique<MedicalCNN>(tiny, 3); };
  compare_both_modes(make_tiny, {1, 3, 33, 45}, 5e-3, "tiny MedicalCNN, batch 1, 33x45");
  compare_both_modes(make_tiny, {5, 3, 64, 64}, 5e-3, "tiny MedicalCNN, batch 5");
  const Factory make_default = [] { return std::make_unique<MedicalCNN>(MedicalCNNConfig{}, 0); };
  compare_both_modes(make_default, {2, 1, 64, 64}, 5e-3, "default MedicalCNN");
}

TEST(GpuModel, AdamStepsTrackTheCpu) {
  LANCET_REQUIRE_GPU();
  const MedicalCNNConfig c = tiny_config();
  MedicalCNN cpu(c, 9), gpu(c, 9);
  gpu.to(Device::cuda(0));
  auto pc = cpu.named_parameters();
  auto pg = gpu.named_parameters();
  std::vector<Tensor> mc, vc, mg, vg;
  for (auto& [n, p] : pc) {
    mc.push_back(Tensor::zeros(p->value.shape()));
    vc.push_back(Tensor::zeros(p->value.shape()));
    mg.push_back(Tensor::zeros(p->value.shape(), DType::f32, Device::cuda(0)));
    vg.push_back(Tensor::zeros(p->value.shape(), DType::f32, Device::cuda(0)));
  }
  AdamParams ap;
  ap.lr = 1e-3f;
  ap.weight_decay = 1e-4f;
  ap.decoupled = true;
  const Tensor labels = Tensor::from_labels({0, 4, 2, 1});
  for (int step = 1; step <= 3; ++step) {
    const Tensor x = random_tensor({4, 3, 40, 40}, 100 + step);
    for (auto* m : {&cpu, &gpu}) {
      const bool on_gpu = m == &gpu;
      const Stream& s = on_gpu ? kGpu : kCpu;
      SavedPtr saved;
      m->zero_grad();
      const Tensor logits = m->forward(on_gpu ? to_gpu(x) : x, &saved, s);
      Tensor dlogits = Tensor::empty(logits.shape(), DType::f32, logits.device()), none;
      softmax_cross_entropy(logits, on_gpu ? to_gpu(labels) : labels, Tensor(), 0.f, dlogits, none, s);
      m->backward(dlogits, *saved, false, s);
      auto ps = m->named_parameters();
      for (size_t i = 0; i < ps.size(); ++i)
        adam_step(ap, step, ps[i].second->value, ps[i].second->grad, on_gpu ? mg[i] : mc[i], on_gpu ? vg[i] : vc[i], s);
    }
  }
  // Adam normalises each step to about lr per element whatever the gradient's size, so after
  // three steps the weights differ by far less than lr where the gradients' signs agree.
  for (size_t i = 0; i < pc.size(); ++i)
    expect_close(pc[i].second->value, pg[i].second->value, 1e-3, 3e-4, pc[i].first);
}

// ---- the CLI --------------------------------------------------------------------------------

TEST(GpuCli, ForwardOnCudaMatchesThePyTorchFixtures) {
  LANCET_REQUIRE_GPU();
  const std::string fixtures = std::string(LANCET_SOURCE_DIR) + "/tests/fixtures";
  TempDir tmp("gpu_fwd");
  for (const std::string name : {"gray_65x57", "gray_b1_69x47"}) {
    for (const std::string mode : {"eval", "train"}) {
      SCOPED_TRACE(name + " " + mode);
      const std::string out = tmp / (name + "_" + mode + ".h5");
      const RunResult r = run_lancet("forward --device cuda --weights " + fixtures + "/" + name + "_weights.h5 --input " +
                                     fixtures + "/" + name + "_batch.h5 --output " + out + " --mode " + mode + " --grads");
      ASSERT_EQ(r.status, 0) << r.output;
      H5File expected = H5File::open_read(fixtures + "/" + name + "_" + mode + ".h5");
      H5File actual = H5File::open_read(out);
      expect_close_scaled(expected.read("/logits"), actual.read("/logits"), 1e-3, "logits");
      for (const std::string& g : expected.list("/grads"))
        expect_close_scaled(expected.read("/grads/" + g), actual.read("/grads/" + g), 5e-3, g);
    }
  }
}

TEST(GpuCli, TrainOnCudaRunsAndWritesTheRun) {
  LANCET_REQUIRE_GPU();
  TempDir tmp("gpu_train");
  const RunResult r = run_lancet("train --device cuda --max-steps 6 --epochs 1 --batch-size 8 --image-size 32 "
                                 "--set data.synth.train=64 --set data.synth.val=16 --cudnn-autotune --out " +
                                 tmp.path.string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("cuda:0"), std::string::npos) << r.output;
  EXPECT_TRUE(std::filesystem::exists(tmp / "final.h5"));
  EXPECT_TRUE(std::filesystem::exists(tmp / "metrics.jsonl"));
}

// --nsys-steps 2:3 brackets steps 2..3 with cudaProfilerStart/Stop, each call logged (without
// nsys attached both calls succeed and do nothing else).
TEST(GpuCli, NsysStepsOpenAndCloseTheCaptureWindow) {
  LANCET_REQUIRE_GPU();
  TempDir tmp("gpu_nsys");
  const RunResult r = run_lancet("train --device cuda --nsys-steps 2:3 --max-steps 4 --epochs 1 --batch-size 8 "
                                 "--image-size 32 --set data.synth.train=64 --set data.synth.val=16 --out " +
                                 tmp.path.string());
  ASSERT_EQ(r.status, 0) << r.output;
  const size_t start = r.output.find("nsys capture: cudaProfilerStart before step 2\n");
  const size_t stop = r.output.find("nsys capture: cudaProfilerStop after step 3\n");
  EXPECT_NE(start, std::string::npos) << r.output;
  EXPECT_NE(stop, std::string::npos) << r.output;
  EXPECT_LT(start, stop) << r.output;
}

TEST(GpuCli, UnsupportedGpuSettingsAreRefusedUpFront) {
  LANCET_REQUIRE_GPU();
  const RunResult r = run_lancet("train --device cuda:99 --max-steps 1");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("cuda:99"), std::string::npos) << r.output;
}
