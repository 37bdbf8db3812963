// Mixed precision on the GPU (16-bit activations, tensor-core convolutions and GEMMs, FP32
// masters, gradients, BatchNorm and loss) against the CPU emulation of the same precision
// (layers/module.h): the cast op against its CPU twin; every layer, block and a small
// MedicalCNN forward and backward (output, input gradient, every parameter gradient, running
// statistics); the 16-bit weight copies following the weights; real 16-bit storage (memory);
// a few training steps with gradient accumulation; the loss scaler skipping a step on an
// injected inf/NaN with weights and moments bit-identical, and the fused unscale equal to the
// separate pass; `lancet forward|train --device cuda --precision fp16|bf16`. Label gpu: skips
// without a device.
//
// Tolerances. Both devices round to the 16-bit type at every module's output and input
// gradient, and both compute in float in between, so they differ only where
//   * a float result differs in its last bits (other summation orders: cuDNN, cuBLASLt, block
//     reductions) and lands on the other side of a 16-bit rounding boundary: 1 ulp of the
//     16-bit type, 2^-10 relative for fp16, 2^-7 for bf16, on a few elements;
//   * the GPU rounds where the emulation keeps float: intermediates inside modules (the SE
//     squeeze and gate, block sums before the ReLU), the conv bias (FP32 on the GPU, rounded on
//     the CPU), and the 16-bit weight gradient cuDNN writes before it is added to the FP32 one:
//     up to half an ulp each.
// So single layers agree to 2 ulps (rtol 4e-3 fp16, 3e-2 bf16). Through blocks and models the
// ulps add up and BatchNorm's normalisation magnifies them where a channel's variance is small
// (rtol 1.5e-2 / 8e-2 for blocks, 3e-2 / 1.5e-1 for models, training steps included). Every
// comparison also allows rtol * 5e-2 * max|cpu| absolute: gradients are sums of many terms of
// either sign, whose rounding error scales with the terms, not with the (possibly cancelled)
// result. ReLU, whose output is its rounded input or zero, must agree exactly.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <random>

#include "comm/communicator.h"
#include "data/h5file.h"
#include "kernels/elementwise.h"
#include "layers/blocks.h"
#include "layers/medicalcnn.h"
#include "tests/cli_util.h"
#include "tests/gpu_util.h"
#include "tests/module_gradcheck.h"
#include "tests/tiny_medicalcnn.h"
#include "trainer/loss_scaler.h"
#include "trainer/trainer.h"
#include "trainer/weights.h"

using namespace lancet;
using namespace lancet::testing;

namespace {

const Stream kCpu = Stream::cpu();
const Stream kGpu{Device::cuda(0), nullptr};

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// The per-precision tolerance of a comparison level (see the file comment).
struct Rtol {
  double fp16, bf16;
  double operator()(DType t) const { return t == DType::f16 ? fp16 : bf16; }
};
const Rtol kLayer{4e-3, 3e-2}, kBlock{1.5e-2, 8e-2}, kModel{3e-2, 1.5e-1};

void expect_close_lowp(const Tensor& cpu, const Tensor& gpu, double rtol, const std::string& what) {
  const std::vector<float> a = cpu.to_vector();
  double maxabs = 0;
  for (float v : a) maxabs = std::max(maxabs, std::fabs(static_cast<double>(v)));
  expect_close(cpu, gpu, rtol, rtol * 5e-2 * maxabs + 1e-7, what);
}

using Factory = std::function<std::unique_ptr<Module>()>;

// Two copies of the same module (same construction and weights), one on the GPU, both at
// precision t; the same FP32 input and output gradient through both; every result compared.
void compare_module(const Factory& make, const Shape& x_shape, bool training, DType t, MemoryFormat f, double rtol,
                    const std::string& what) {
  SCOPED_TRACE(what + " " + dtype_name(t) + (training ? " (train)" : " (eval)") +
               (f == MemoryFormat::channels_last ? " channels_last" : ""));
  auto cpu = make();
  randomize_batchnorms(*cpu, 17);
  auto gpu = make();
  randomize_batchnorms(*gpu, 17);
  gpu->to(Device::cuda(0));
  for (Module* m : {cpu.get(), gpu.get()}) {
    m->train(training);
    m->set_precision(t);
  }
  gpu->set_memory_format(f);  // the CPU's channels_last gives its nchw bits
  const Tensor x = random_tensor(x_shape, 5);
  SavedPtr saved_c, saved_g;
  const Tensor yc = cpu->forward(x, &saved_c, kCpu);
  const Tensor yg = gpu->forward(to_gpu(x), &saved_g, kGpu);
  ASSERT_TRUE(yg.device().is_cuda());
  ASSERT_EQ(yg.dtype(), DType::f32) << "the model's output leaves in FP32";
  ASSERT_EQ(yg.format(), MemoryFormat::nchw) << "and in nchw";
  expect_close_lowp(yc, yg, rtol, "output");

  const Tensor dy = random_tensor(yc.shape(), 6);
  cpu->zero_grad();
  gpu->zero_grad();
  const Tensor dxc = cpu->backward(dy, *saved_c, /*need_input_grad=*/true, kCpu);
  const Tensor dxg = gpu->backward(to_gpu(dy), *saved_g, /*need_input_grad=*/true, kGpu);
  ASSERT_EQ(dxg.dtype(), DType::f32);
  expect_close_lowp(dxc, dxg, rtol, "input gradient");
  auto pc = cpu->named_parameters();
  auto pg = gpu->named_parameters();
  ASSERT_EQ(pc.size(), pg.size());
  for (size_t i = 0; i < pc.size(); ++i) {
    ASSERT_EQ(pc[i].first, pg[i].first);
    ASSERT_EQ(pg[i].second->value.dtype(), DType::f32) << "FP32 master " << pg[i].first;
    ASSERT_EQ(pg[i].second->grad.dtype(), DType::f32) << "FP32 gradient " << pg[i].first;
    expect_close_lowp(pc[i].second->grad, pg[i].second->grad, rtol, "grad of " + pc[i].first);
  }
  auto bc = cpu->named_buffers();
  auto bg = gpu->named_buffers();
  ASSERT_EQ(bc.size(), bg.size());
  for (size_t i = 0; i < bc.size(); ++i) {
    ASSERT_EQ(bg[i].second->dtype(), DType::f32) << "FP32 running statistics " << bc[i].first;
    expect_close_lowp(*bc[i].second, *bg[i].second, rtol, bc[i].first);
  }
}

void compare_all(const Factory& make, const Shape& x_shape, const Rtol& rtol, const std::string& what) {
  for (const DType t : {DType::f16, DType::bf16})
    for (const MemoryFormat f : {MemoryFormat::nchw, MemoryFormat::channels_last})
      for (const bool training : {true, false}) compare_module(make, x_shape, training, t, f, rtol(t), what);
}

template <typename M, typename... Args> Factory seeded(Args... args) {
  return [=]() -> std::unique_ptr<Module> {
    std::mt19937_64 rng(42);
    return std::make_unique<M>(rng, args...);
  };
}

MedicalCNNConfig tiny_config() { return tiny_medicalcnn_config(3, 5, {8, 16, 16, 24}, 16); }

}  // namespace

// ---- the cast op ------------------------------------------------------------------------------

// The CUDA twin gives the CPU twin's bits in every direction (NaN as NaN: payloads may differ).
TEST(GpuAmpCast, MatchesTheCpuTwinBitForBit) {
  LANCET_REQUIRE_GPU();
  std::vector<float> xs;
  for (uint64_t u = 0; u <= 0xffffffffull; u += 65521) {
    float f;
    const uint32_t b = static_cast<uint32_t>(u);
    std::memcpy(&f, &b, 4);
    xs.push_back(f);
  }
  const int64_t n = static_cast<int64_t>(xs.size());
  const Tensor x = Tensor::from_vector(xs, {n});
  for (const DType t : {DType::f16, DType::bf16}) {
    SCOPED_TRACE(dtype_name(t));
    Tensor lc = Tensor::empty({n}, t), lg = Tensor::empty({n}, t, Device::cuda(0));
    cast(x, lc, kCpu);
    cast(to_gpu(x), lg, kGpu);
    Tensor bc = Tensor::empty({n}), bg = Tensor::empty({n}, DType::f32, Device::cuda(0));
    cast(lc, bc, kCpu);
    cast(lg, bg, kGpu);
    const std::vector<float> want = bc.to_vector(), got = bg.to_vector();
    int bad = 0;
    for (int64_t i = 0; i < n && bad < 10; ++i)
      if (std::isnan(want[i]) ? !std::isnan(got[i]) : bits_of(got[i]) != bits_of(want[i])) {
        ++bad;
        ADD_FAILURE() << std::hex << "x bits 0x" << bits_of(xs[i]) << ": gpu 0x" << bits_of(got[i]) << " cpu 0x"
                      << bits_of(want[i]);
      }
    const DType other = t == DType::f16 ? DType::bf16 : DType::f16;  // 16 -> 16 bits
    const std::vector<float> oc = cast_to(cast_to(lc, other, kCpu), DType::f32, kCpu).to_vector();
    const std::vector<float> og = cast_to(cast_to(lg, other, kGpu), DType::f32, kGpu).to_vector();
    for (int64_t i = 0; i < n; ++i)
      if (!std::isnan(oc[i])) {
        ASSERT_EQ(bits_of(og[i]), bits_of(oc[i])) << "16-bit to 16-bit, element " << i;
      }
  }
}

// ---- layers, blocks, the model ------------------------------------------------------------------

TEST(GpuAmpLayers, ConvolutionsMatchTheEmulation) {
  LANCET_REQUIRE_GPU();
  compare_all(seeded<Conv2d>(1, 8, 7, 2, 3, 1, 1, false), {2, 1, 37, 29}, kLayer, "stem 7x7/2");
  compare_all(seeded<Conv2d>(5, 13, 3, 1, 1, 1, 1, true), {1, 5, 13, 11}, kLayer, "3x3 odd channels, bias");
  compare_all(seeded<Conv2d>(12, 12, 3, 1, 3, 3, 1, false), {2, 12, 15, 15}, kLayer, "3x3 dilation 3");
  compare_all(seeded<Conv2d>(8, 6, 1, 2, 0, 1, 2, true), {3, 8, 9, 9}, kLayer, "1x1/2 groups 2");
}

TEST(GpuAmpLayers, BatchNormPoolLinearDropoutMatchTheEmulation) {
  LANCET_REQUIRE_GPU();
  compare_all([] { return std::make_unique<BatchNorm2d>(13); }, {3, 13, 7, 5}, kLayer, "BatchNorm2d");
  compare_all(
      [] {
        auto bn = std::make_unique<BatchNorm2d>(9);
        bn->set_fused_relu(true);
        return bn;
      },
      {2, 9, 6, 7}, kLayer, "BatchNorm2d + ReLU");
  compare_all([] { return std::make_unique<MaxPool2d>(3, 2, 1); }, {2, 5, 17, 11}, kLayer, "MaxPool2d");
  compare_all([] { return std::make_unique<GlobalAvgPool>(); }, {2, 7, 9, 5}, kLayer, "GlobalAvgPool");
  compare_all(seeded<Linear>(37, 5, true), {3, 37}, kLayer, "Linear");
  compare_all(seeded<Linear>(64, 24, false), {16, 64}, kLayer, "Linear, tensor-core sizes");
  compare_all([] { return std::make_unique<Dropout>(0.3f); }, {4, 33}, kLayer, "Dropout");
  // ReLU's output is its (identically rounded) input or zero: exact.
  compare_all([] { return std::make_unique<ReLU>(); }, {2, 3, 9, 7}, Rtol{0, 0}, "ReLU");
}

TEST(GpuAmpBlocks, SeResidualAndContextBlocksMatchTheEmulation) {
  LANCET_REQUIRE_GPU();
  compare_all(seeded<SEBlock>(12, 4), {2, 12, 7, 9}, kBlock, "SEBlock");
  compare_all(seeded<BasicResidualBlock>(8, 8, 1, 4), {2, 8, 11, 9}, kBlock, "residual identity");
  compare_all(seeded<BasicResidualBlock>(5, 12, 2, 4), {2, 5, 13, 13}, kBlock, "residual stride 2, 5 -> 12");
  compare_all(seeded<ContextBlock>(12, 4), {2, 12, 9, 7}, kBlock, "ContextBlock");
}

TEST(GpuAmpModel, MedicalCnnForwardAndGradientsMatchTheEmulation) {
  LANCET_REQUIRE_GPU();
  const MedicalCNNConfig tiny = tiny_config();
  compare_all([tiny] { return std::make_unique<MedicalCNN>(tiny, 3); }, {4, 3, 48, 40}, kModel,
              "small MedicalCNN, batch 4");
}

// The 16-bit copies follow the FP32 masters: a change that bumps Parameter::version (as the
// optimizer and weight loading do) is seen by the next forward, on the GPU as on the CPU.
TEST(GpuAmpModel, WeightCopiesFollowTheMasters) {
  LANCET_REQUIRE_GPU();
  std::mt19937_64 rc(1), rg(1);
  Linear cpu(rc, 24, 8), gpu(rg, 24, 8);
  gpu.to(Device::cuda(0));
  cpu.set_precision(DType::f16);
  gpu.set_precision(DType::f16);
  const Tensor x = random_tensor({4, 24}, 3);
  const Tensor y0 = gpu.forward(to_gpu(x), nullptr, kGpu);
  expect_close_lowp(cpu.forward(x, nullptr, kCpu), y0, kLayer.fp16, "before");
  const Tensor w = random_tensor({8, 24}, 9);
  cpu.weight().value.copy_from(w);
  gpu.weight().value.copy_from(to_gpu(w));
  ++gpu.weight().version;
  const Tensor y1 = gpu.forward(to_gpu(x), nullptr, kGpu);
  expect_close_lowp(cpu.forward(x, nullptr, kCpu), y1, kLayer.fp16, "after the weights changed");
  EXPECT_NE(y0.to_vector(), y1.to_vector());
}

// Real 16-bit storage: the activations a training forward keeps take about half the bytes
// (estimated 0.52 of FP32's for this model: the max pool's i32 indices do not shrink). The
// input goes in already cast, so that its 16-bit copy does not count.
TEST(GpuAmpModel, SixteenBitActivationsHalveTheSavedMemory) {
  LANCET_REQUIRE_GPU();
  MedicalCNN model(tiny_config(), 4);
  model.to(Device::cuda(0));
  const Tensor x32 = to_gpu(random_tensor({16, 3, 64, 64}, 8));
  Allocator& a = allocator_for(Device::cuda(0));
  std::map<DType, double> kept;
  for (const DType t : {DType::f32, DType::f16, DType::bf16}) {
    model.set_precision(t);
    const Tensor x = cast_to(x32, t, kGpu);  // the entry takes a t input as it is
    model.forward(x, nullptr, kGpu);  // the 16-bit weight copies and cuDNN's choices, made once
    const size_t before = a.current_bytes();  // the allocator's count: no need to wait for the GPU
    SavedPtr saved;
    const Tensor y = model.forward(x, &saved, kGpu);
    kept[t] = static_cast<double>(a.current_bytes() - before);
  }
  EXPECT_LT(kept[DType::f16], 0.65 * kept[DType::f32]) << kept[DType::f16] << " vs " << kept[DType::f32] << " bytes";
  EXPECT_LT(kept[DType::bf16], 0.65 * kept[DType::f32]) << kept[DType::bf16] << " vs " << kept[DType::f32] << " bytes";
}

// ---- training steps -------------------------------------------------------------------------

namespace {

struct AmpRun {
  std::unique_ptr<MedicalCNN> model;
  std::unique_ptr<Optimizer> opt;
  std::unique_ptr<Communicator> comm = make_single_process_communicator();
  LossScaler scaler;
  Device device;

  AmpRun(Device d, DType t, const std::string& optimizer, float init_scale) : device(d) {
    model = make_model(Json{{"widths", {8, 16, 16, 16}}, {"depths", {1, 1, 1, 1}}, {"head_hidden", 16},
                            {"in_channels", 1}, {"num_classes", 3}},
                       5);
    model->to(d);
    model->set_precision(t);
    Json c = default_config();
    apply_override(c, "optim.name=" + optimizer);
    apply_override(c, "optim.lr=0.05");
    opt = make_optimizer(optim_config(c), model->named_parameters());
    LossScalerConfig sc;
    sc.enabled = t == DType::f16;
    sc.init_scale = init_scale;
    sc.growth_interval = 2;
    scaler = LossScaler(sc);
  }
  Stream stream() const { return device.is_cpu() ? kCpu : kGpu; }
  Tensor here(const Tensor& t) const { return device.is_cpu() ? t : to_gpu(t); }
  StepStats step(const std::vector<Tensor>& xs, const std::vector<Tensor>& ys, float clip = 0) {
    StepOptions o;
    o.loss_scaler = &scaler;
    o.clip_grad_norm = clip;
    o.compute_grad_norm = true;
    std::vector<Tensor> xd, yd;
    for (const Tensor& x : xs) xd.push_back(here(x));
    for (const Tensor& y : ys) yd.push_back(here(y));
    return train_step_micro(*model, *opt, *comm, xd, yd, Loss{}, stream(), o);
  }
  std::vector<std::vector<float>> snapshot() {
    std::vector<std::vector<float>> out;
    for (auto& [name, p] : model->named_parameters()) out.push_back(p->value.to_vector());
    for (auto& [name, t] : opt->state()) out.push_back(t->to_vector());
    out.push_back({static_cast<float>(opt->steps())});
    return out;
  }
};

std::vector<Tensor> batches(int count, uint32_t seed) {
  std::vector<Tensor> xs;
  for (int i = 0; i < count; ++i) xs.push_back(random_tensor({4, 1, 32, 32}, seed + static_cast<uint32_t>(i)));
  return xs;
}

}  // namespace

// Three SGD steps of two micro-batches each (the 16-bit weight copies made once per step and
// shared by both micro-batches): per-step losses, the weight updates and the running
// statistics track the CPU emulation. The fp16 loss scale starts at 2^10: the GPU's conv
// weight gradients pass through fp16 (cuDNN writes them in the operands' type) where the
// emulation sums in float, so at PyTorch's 2^16 the GPU may back off on a step the emulation
// takes — legitimately, but then the two runs are no longer comparable.
TEST(GpuAmpTraining, StepsWithAccumulationTrackTheEmulation) {
  LANCET_REQUIRE_GPU();
  const std::vector<Tensor> ys = {Tensor::from_labels({0, 1, 2, 1}), Tensor::from_labels({2, 0, 1, 0})};
  for (const DType t : {DType::f16, DType::bf16}) {
    SCOPED_TRACE(dtype_name(t));
    AmpRun cpu(Device::cpu(), t, "sgd", 1024.f), gpu(Device::cuda(0), t, "sgd", 1024.f);
    std::vector<std::vector<float>> w0;
    for (auto& [name, p] : cpu.model->named_parameters()) w0.push_back(p->value.to_vector());
    for (int step = 0; step < 3; ++step) {
      const auto xs = batches(2, 40 + 2 * static_cast<uint32_t>(step));
      const StepStats sc = cpu.step(xs, ys), sg = gpu.step(xs, ys);
      EXPECT_FALSE(sc.skipped);
      EXPECT_FALSE(sg.skipped);
      EXPECT_NEAR(sg.loss, sc.loss, kModel(t) * std::fabs(sc.loss)) << "step " << step;
      EXPECT_NEAR(sg.grad_norm, sc.grad_norm, kModel(t) * sc.grad_norm) << "step " << step;
    }
    auto pc = cpu.model->named_parameters(), pg = gpu.model->named_parameters();
    for (size_t i = 0; i < pc.size(); ++i) {  // the updates w - w0, not the weights (dominated by w0)
      const Tensor w = Tensor::from_vector(w0[i], pc[i].second->value.shape());
      Tensor dc = pc[i].second->value.clone(), dg = pg[i].second->value.to(Device::cpu());
      axpy(-1.f, w, dc, kCpu);
      axpy(-1.f, w, dg, kCpu);
      expect_close_lowp(dc, dg, kModel(t), "update of " + pc[i].first);
    }
    auto bc = cpu.model->named_buffers(), bg = gpu.model->named_buffers();
    for (size_t i = 0; i < bc.size(); ++i) expect_close_lowp(*bc[i].second, *bg[i].second, kModel(t), bc[i].first);
  }
}

// An inf or NaN injected into a gradient on the GPU skips the step: weights, moments, momentum
// buffers and the step counter stay bit-identical, the scale halves, the gradients are zeroed;
// the next clean step updates. Both unscale paths: fused into the step (no clipping) and the
// separate pass (clipping).
TEST(GpuAmpTraining, InjectedInfOrNanSkipsTheStep) {
  LANCET_REQUIRE_GPU();
  const std::vector<Tensor> ys = {Tensor::from_labels({0, 1, 2, 1})};
  for (const std::string optimizer : {"adam", "sgd"}) {
    for (const float clip : {0.f, 1.f}) {
      for (const float bad : {std::numeric_limits<float>::infinity(), std::nanf("")}) {
        SCOPED_TRACE(optimizer + (clip > 0 ? " clipped" : " fused unscale") + (std::isnan(bad) ? " NaN" : " inf"));
        AmpRun r(Device::cuda(0), DType::f16, optimizer, 1024.f);
        StepStats st = r.step(batches(1, 60), ys, clip);  // a clean step first: non-zero optimizer state
        ASSERT_FALSE(st.skipped);
        const auto before = r.snapshot();
        bool inject = true;
        const Tensor poison = Tensor::from_vector({bad}, {1});
        r.model->set_grad_ready_hook([&](Parameter& p) {
          if (inject) p.grad.view({p.grad.numel()}).narrow(0, 1).copy_from(poison);
        });
        st = r.step(batches(1, 61), ys, clip);
        EXPECT_TRUE(st.skipped);
        EXPECT_EQ(st.loss_scale, 1024.f);
        EXPECT_EQ(r.scaler.scale(), 512.f);
        EXPECT_EQ(r.scaler.skipped_steps(), 1);
        EXPECT_EQ(r.snapshot(), before);
        for (auto& [name, p] : r.model->named_parameters())
          EXPECT_EQ(p->grad.to_vector(), std::vector<float>(static_cast<size_t>(p->grad.numel()), 0.f)) << name;
        inject = false;
        st = r.step(batches(1, 62), ys, clip);
        EXPECT_FALSE(st.skipped);
        EXPECT_EQ(st.loss_scale, 512.f);
        EXPECT_NE(r.snapshot(), before);
        EXPECT_EQ(r.opt->steps(), 2);
      }
    }
  }
}

// The fused unscale (finite check, then the step multiplying by 1/scale as it reads) and the
// separate pass (unscale in place, then a plain step) make the same products: from the same
// gradients they leave the same weights and moments, bit for bit, and report the same norm.
TEST(GpuAmpTraining, FusedUnscaleEqualsTheSeparatePass) {
  LANCET_REQUIRE_GPU();
  for (const std::string optimizer : {"adam", "sgd"}) {
    SCOPED_TRACE(optimizer);
    AmpRun fused(Device::cuda(0), DType::f16, optimizer, 4096.f);
    AmpRun separate(Device::cuda(0), DType::f16, optimizer, 4096.f);
    StepOptions of, os;
    of.loss_scaler = &fused.scaler;
    os.loss_scaler = &separate.scaler;
    of.compute_grad_norm = os.compute_grad_norm = true;
    os.clip_grad_norm = 1e30f;  // clipping never scales, but takes the separate pass
    StepProfiler timer;
    for (int step = 0; step < 3; ++step) {
      auto pf = fused.model->named_parameters(), ps = separate.model->named_parameters();
      for (size_t i = 0; i < pf.size(); ++i) {
        const uint32_t seed = 300 + static_cast<uint32_t>(i) + 31 * static_cast<uint32_t>(step);
        const Tensor g = random_tensor(pf[i].second->grad.shape(), seed, -4e3f, 4e3f);
        pf[i].second->grad.copy_from(to_gpu(g));
        ps[i].second->grad.copy_from(to_gpu(g));
      }
      StepStats sf, ss;
      finish_step(*fused.model, *fused.opt, *fused.comm, of, /*synced=*/true, sf, timer, kGpu);
      finish_step(*separate.model, *separate.opt, *separate.comm, os, /*synced=*/true, ss, timer, kGpu);
      EXPECT_FALSE(sf.skipped);
      EXPECT_FALSE(ss.skipped);
      EXPECT_NEAR(sf.grad_norm, ss.grad_norm, 1e-6 * ss.grad_norm) << "step " << step;
    }
    EXPECT_EQ(fused.snapshot(), separate.snapshot());
  }
}

// ---- the CLI --------------------------------------------------------------------------------

namespace {

const std::string kFixtures = std::string(LANCET_SOURCE_DIR) + "/tests/fixtures";

// The largest |a - b| over the largest |b|.
double worst_over_peak(const Tensor& a, const Tensor& b) {
  const std::vector<float> va = a.to_vector(), vb = b.to_vector();
  double peak = 0, worst = 0;
  for (size_t i = 0; i < vb.size(); ++i) {
    peak = std::max(peak, std::fabs(static_cast<double>(vb[i])));
    worst = std::max(worst, std::fabs(static_cast<double>(va[i]) - vb[i]));
  }
  return worst / std::max(peak, 1e-30);
}

}  // namespace

// `lancet forward --device cuda --precision fp16|bf16`: logits within the emulation's stated
// distance of the PyTorch FP32 reference (fraction of the largest logit: fp16 0.5%, bf16 2%,
// as tests/test_forward_cli.cpp holds the CPU emulation to), and logits, loss and every
// gradient (train mode, --grads) close to the CPU emulation's.
TEST(GpuAmpCli, ForwardOnCudaInLowPrecision) {
  LANCET_REQUIRE_GPU();
  TempDir tmp("gpu_amp_fwd");
  const std::string name = "gray_65x57";
  const std::string base = "forward --weights " + kFixtures + "/" + name + "_weights.h5 --input " + kFixtures + "/" +
                           name + "_batch.h5 --output ";
  for (const auto& [precision, tol] : {std::pair<std::string, double>{"fp16", 0.005}, {"bf16", 0.02}}) {
    const DType t = parse_dtype(precision);
    for (const std::string mode : {"eval", "train"}) {
      SCOPED_TRACE(precision + " " + mode);
      const std::string gpu_out = tmp / (precision + "_" + mode + "_gpu.h5");
      const std::string cpu_out = tmp / (precision + "_" + mode + "_cpu.h5");
      const std::string args = " --mode " + mode + " --grads --precision " + precision;
      RunResult r = run_lancet(base + gpu_out + args + " --device cuda");
      ASSERT_EQ(r.status, 0) << r.output;
      r = run_lancet(base + cpu_out + args);
      ASSERT_EQ(r.status, 0) << r.output;
      H5File reference = H5File::open_read(kFixtures + "/" + name + "_" + mode + ".h5");
      H5File gpu = H5File::open_read(gpu_out), cpu = H5File::open_read(cpu_out);
      const Tensor logits = gpu.read("/logits");
      if (mode == "eval") {
        EXPECT_LE(worst_over_peak(logits, reference.read("/logits")), tol) << "against PyTorch FP32";
      }
      expect_close_lowp(cpu.read("/logits"), logits, kModel(t), "logits against the emulation");
      const float lc = *cpu.read("/loss").data<float>(), lg = *gpu.read("/loss").data<float>();
      EXPECT_NEAR(lg, lc, kModel(t) * std::fabs(lc)) << "loss";
      const auto grads = cpu.list("/grads");
      ASSERT_FALSE(grads.empty());
      EXPECT_EQ(grads, gpu.list("/grads"));
      for (const std::string& g : grads)
        expect_close_lowp(cpu.read("/grads/" + g), gpu.read("/grads/" + g), kModel(t), g);
    }
  }
}

// `lancet train --device cuda --precision fp16|bf16` runs, says what it runs in, and reports the
// peak device memory of the run.
TEST(GpuAmpCli, TrainOnCudaInLowPrecision) {
  LANCET_REQUIRE_GPU();
  for (const std::string precision : {"fp16", "bf16"}) {
    SCOPED_TRACE(precision);
    TempDir tmp("gpu_amp_train");
    const RunResult r = run_lancet("train --device cuda --precision " + precision +
                                   " --max-steps 6 --epochs 1 --batch-size 8 --image-size 32 "
                                   "--set data.synth.train=64 --set data.synth.val=16 --out " + tmp.path.string());
    ASSERT_EQ(r.status, 0) << r.output;
    EXPECT_NE(r.output.find("precision: " + precision + " on cuda:0"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("peak memory on cuda:0 (" + precision + " training)"), std::string::npos) << r.output;
    EXPECT_TRUE(std::filesystem::exists(tmp / "final.h5"));
  }
}
