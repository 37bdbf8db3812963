// Mixed precision on the CPU: fp16 / bf16 rounding helpers against known values and the
// 16-bit storage types; the loss scaler's state machine (an injected inf or NaN skips the
// step and halves the scale, leaving weights and optimizer state bit-identical; growth after
// growth_interval finite steps; a backoff to 0 fails; state through a checkpoint and a
// bitwise-identical resume; skips in the training log as they happen);
// emulated fp16 / bf16 forward against fp32 within stated tolerances; fp16 / bf16 training
// reaching fp32's accuracy on a small synthetic job; and the CPU twin of the cast op (the
// GPU path's entry, exit and weight copies) against the emulation's rounding.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <sstream>

#include "cli_util.h"
#include "comm/communicator.h"
#include "data/h5file.h"
#include "kernels/dtype.h"
#include "kernels/elementwise.h"
#include "kernels/optim.h"
#include "trainer/metrics.h"
#include "tests/expect_error.h"
#include "tests/gradcheck.h"
#include "trainer/checkpoint.h"
#include "trainer/loss_scaler.h"
#include "trainer/trainer.h"
#include "trainer/weights.h"

using namespace lancet;
using namespace lancet::testing;
namespace fs = std::filesystem;

namespace {

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
float fp16(float f) {
  round_to_fp16_inplace(&f, 1);
  return f;
}
float bf16(float f) {
  round_to_bf16_inplace(&f, 1);
  return f;
}

// The same bits, or both NaN.
void expect_same(float got, float want, const std::string& what) {
  if (std::isnan(want)) {
    EXPECT_TRUE(std::isnan(got)) << what;
  } else {
    EXPECT_EQ(bits_of(got), bits_of(want)) << what << ": got " << got << ", want " << want;
  }
}

}  // namespace

TEST(AmpRounding, Fp16KnownValues) {
  const float inf = std::numeric_limits<float>::infinity();
  expect_same(fp16(1.0f), 1.0f, "1");
  expect_same(fp16(65504.f), 65504.f, "largest half");
  expect_same(fp16(65519.f), 65504.f, "just below the overflow threshold");
  expect_same(fp16(65520.f), inf, "65520 overflows");
  expect_same(fp16(-65520.f), -inf, "-65520 overflows");
  expect_same(fp16(1e6f), inf, "1e6");
  expect_same(fp16(1.f + std::ldexp(1.f, -11)), 1.f, "tie rounds to even (down)");
  expect_same(fp16(1.f + 3 * std::ldexp(1.f, -11)), 1.f + std::ldexp(1.f, -9), "tie rounds to even (up)");
  expect_same(fp16(0.1f), 0.0999755859375f, "0.1");
  expect_same(fp16(std::ldexp(1.f, -14)), std::ldexp(1.f, -14), "smallest normal");
  expect_same(fp16(std::ldexp(1.f, -24)), std::ldexp(1.f, -24), "smallest subnormal");
  expect_same(fp16(std::ldexp(1.f, -25)), 0.f, "half the smallest subnormal: tie to zero");
  expect_same(fp16(1.5f * std::ldexp(1.f, -25)), std::ldexp(1.f, -24), "above the tie");
  expect_same(fp16(3 * std::ldexp(1.f, -25)), std::ldexp(1.f, -23), "subnormal tie to even (up)");
  expect_same(fp16(-std::ldexp(1.f, -26)), -0.f, "underflow keeps the sign");
  expect_same(fp16(std::ldexp(1.f, -20) * 1.3f), std::ldexp(1.f, -24) * 21.f, "subnormal 1.3 * 2^-20");
  expect_same(fp16(inf), inf, "inf");
  expect_same(fp16(-inf), -inf, "-inf");
  EXPECT_TRUE(std::isnan(fp16(std::nanf(""))));
}

TEST(AmpRounding, Bf16KnownValues) {
  const float inf = std::numeric_limits<float>::infinity();
  expect_same(bf16(1.f + std::ldexp(1.f, -8)), 1.f, "tie rounds to even (down)");
  expect_same(bf16(1.f + 3 * std::ldexp(1.f, -8)), 1.f + std::ldexp(1.f, -6), "tie rounds to even (up)");
  expect_same(bf16(0.1f), 0.10009765625f, "0.1");
  expect_same(bf16(65520.f), 65536.f, "no fp16 overflow: float's range");
  expect_same(bf16(std::numeric_limits<float>::max()), inf, "FLT_MAX rounds up to inf");
  expect_same(bf16(std::ldexp(1.f, -130)), std::ldexp(1.f, -130), "float subnormal kept");
  expect_same(bf16(-inf), -inf, "-inf");
  EXPECT_TRUE(std::isnan(bf16(std::nanf(""))));
}

// The vectorisable helpers agree bit for bit with the scalar storage types over a sweep of
// every exponent and many mantissas (both signs, NaN, inf, subnormals).
TEST(AmpRounding, AgreesWithStorageTypes) {
  std::vector<float> xs;
  for (uint64_t u = 0; u <= 0xffffffffull; u += 4093) xs.push_back(from_bits(static_cast<uint32_t>(u)));
  for (uint32_t e = 0; e < 256; ++e)  // the exact ties and their neighbours in every binade
    for (uint32_t m : {0x1000u, 0x0fffu, 0x1001u, 0x3000u, 0x8000u, 0x7fffu, 0x8001u, 0x18000u, 0x7fffffu})
      for (uint32_t sign : {0u, 0x80000000u}) xs.push_back(from_bits(sign | (e << 23) | m));
  std::vector<float> h = xs, b = xs;
  round_to_fp16_inplace(h.data(), static_cast<int64_t>(h.size()));
  round_to_dtype_inplace(b.data(), static_cast<int64_t>(b.size()), DType::bf16);
  int bad = 0;
  for (size_t i = 0; i < xs.size() && bad < 10; ++i) {
    const float want_h = static_cast<float>(half_t(xs[i])), want_b = static_cast<float>(bfloat16_t(xs[i]));
    const bool ok_h = std::isnan(want_h) ? std::isnan(h[i]) : bits_of(h[i]) == bits_of(want_h);
    const bool ok_b = std::isnan(want_b) ? std::isnan(b[i]) : bits_of(b[i]) == bits_of(want_b);
    if (!ok_h || !ok_b) {
      ++bad;
      ADD_FAILURE() << std::hex << "x bits 0x" << bits_of(xs[i]) << ": fp16 0x" << bits_of(h[i]) << " want 0x"
                    << bits_of(want_h) << ", bf16 0x" << bits_of(b[i]) << " want 0x" << bits_of(want_b);
    }
  }
  std::vector<float> same = xs;
  round_to_dtype_inplace(same.data(), static_cast<int64_t>(same.size()), DType::f32);
  EXPECT_EQ(std::memcmp(same.data(), xs.data(), xs.size() * 4), 0);
  expect_error([&] { round_to_dtype_inplace(same.data(), 1, DType::i32); }, {"round_to_dtype_inplace", "i32"});
}

TEST(AmpKernels, UnscaleAndCheckFinite) {
  Tensor a = Tensor::from_vector({2.f, -4.f, 8.f}, {3}), b = Tensor::from_vector({1024.f}, {1}), none;
  EXPECT_TRUE(unscale_and_check_finite({&a, &none, &b}, 0.25f, Stream::cpu()));
  EXPECT_EQ(a.to_vector(), (std::vector<float>{0.5f, -1.f, 2.f}));
  EXPECT_EQ(b.to_vector(), (std::vector<float>{256.f}));
  for (float bad : {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(), std::nanf("")}) {
    Tensor big = Tensor::full({100000}, 1.f);  // several blocks: the bad value in the last
    big.data<float>()[99999] = bad;
    EXPECT_FALSE(unscale_and_check_finite({&a, &big}, 0.5f, Stream::cpu())) << bad;
  }
}

// The cast op's CPU twin: f32 -> f16 / bf16 gives the bits the emulation's rounding gives
// (over the same sweep as above, NaN as NaN), 16-bit -> f32 is exact, 16-bit -> 16-bit rounds
// once from the exact value, equal dtypes copy.
TEST(AmpCast, CpuTwinRoundsAsTheEmulation) {
  std::vector<float> xs;
  for (uint64_t u = 0; u <= 0xffffffffull; u += 65521) xs.push_back(from_bits(static_cast<uint32_t>(u)));
  for (uint32_t e = 0; e < 256; ++e)
    for (uint32_t m : {0x1000u, 0x0fffu, 0x1001u, 0x3000u, 0x8000u, 0x7fffu, 0x8001u, 0x18000u, 0x7fffffu})
      for (uint32_t sign : {0u, 0x80000000u}) xs.push_back(from_bits(sign | (e << 23) | m));
  const int64_t n = static_cast<int64_t>(xs.size());
  const Stream s = Stream::cpu();
  const Tensor x = Tensor::from_vector(xs, {n});
  for (const DType t : {DType::f16, DType::bf16}) {
    SCOPED_TRACE(dtype_name(t));
    Tensor low = Tensor::empty({n}, t);
    cast(x, low, s);
    Tensor back = Tensor::empty({n}, DType::f32);
    cast(low, back, s);
    std::vector<float> want = xs;
    round_to_dtype_inplace(want.data(), n, t);
    const std::vector<float> got = back.to_vector();
    int bad = 0;
    for (int64_t i = 0; i < n && bad < 10; ++i)
      if (std::isnan(want[i]) ? !std::isnan(got[i]) : bits_of(got[i]) != bits_of(want[i])) {
        ++bad;
        ADD_FAILURE() << std::hex << "x bits 0x" << bits_of(xs[i]) << ": got 0x" << bits_of(got[i]) << " want 0x"
                      << bits_of(want[i]);
      }
    // Storage: the 16-bit tensor holds the half_t / bfloat16_t bits.
    if (t == DType::f16) {
      EXPECT_EQ(low.data<half_t>()[0].bits, half_t(xs[0]).bits);
    } else {
      EXPECT_EQ(low.data<bfloat16_t>()[0].bits, bfloat16_t(xs[0]).bits);
    }
    EXPECT_EQ(cast_to(back, DType::f32, s).raw_data(), back.raw_data());  // already f32: the tensor itself
    const Tensor again = cast_to(low, DType::f32, s);
    for (int64_t i = 0; i < n; ++i)
      if (!std::isnan(got[i])) {
        ASSERT_EQ(bits_of(again.data<float>()[i]), bits_of(got[i])) << i;
      }
  }
  // f16 -> bf16: one rounding of the exact half value; equal dtypes copy the bits.
  Tensor h = Tensor::empty({n}, DType::f16), b = Tensor::empty({n}, DType::bf16), h2 = Tensor::empty({n}, DType::f16);
  cast(x, h, s);
  cast(h, b, s);
  cast(h, h2, s);
  for (int64_t i = 0; i < n; ++i) {
    const float hv = static_cast<float>(h.data<half_t>()[i]);
    if (std::isnan(hv)) continue;
    ASSERT_EQ(b.data<bfloat16_t>()[i].bits, bfloat16_t(hv).bits) << i;
    ASSERT_EQ(h2.data<half_t>()[i].bits, h.data<half_t>()[i].bits) << i;
  }
  Tensor wrong = Tensor::empty({n + 1}, DType::f16), ints = Tensor::empty({n}, DType::i32);
  expect_error([&] { cast(x, wrong, s); }, {"cast", "does not match"});
  expect_error([&] { cast(x, ints, s); }, {"cast", "i32"});
  Tensor empty_src = Tensor::empty({0}), empty_dst = Tensor::empty({0}, DType::bf16);
  cast(empty_src, empty_dst, s);  // nothing to do
}

TEST(LossScaler, GrowthBackoffAndState) {
  LossScalerConfig cfg;
  cfg.enabled = true;
  cfg.growth_interval = 3;
  LossScaler s(cfg);
  EXPECT_EQ(s.scale(), 65536.f);
  s.update(true);
  s.update(true);
  EXPECT_EQ(s.scale(), 65536.f);
  EXPECT_EQ(s.growth_tracker(), 2);
  s.update(false);  // an overflow: halve, restart the count
  EXPECT_EQ(s.scale(), 32768.f);
  EXPECT_EQ(s.growth_tracker(), 0);
  EXPECT_EQ(s.skipped_steps(), 1);
  for (int i = 0; i < 3; ++i) s.update(true);
  EXPECT_EQ(s.scale(), 65536.f);  // grown after 3 finite steps in a row
  EXPECT_EQ(s.growth_tracker(), 0);
  s.update(true);

  LossScaler back(cfg);
  back.load_state(Json::parse(s.state().dump()), "test");
  EXPECT_EQ(back.scale(), s.scale());
  EXPECT_EQ(back.growth_tracker(), 1);
  EXPECT_EQ(back.skipped_steps(), 1);
  expect_error([&] { back.load_state(Json{{"scale", 2.0}}, "ckpt.h5"); }, {"ckpt.h5", "loss scaler"});

  cfg.init_scale = std::numeric_limits<float>::max();  // growth is kept only while finite
  cfg.growth_interval = 1;
  LossScaler top(cfg);
  top.update(true);
  EXPECT_EQ(top.scale(), std::numeric_limits<float>::max());

  LossScaler off;  // disabled: scale 1, gradients untouched, nothing counted
  Tensor g = Tensor::full({4}, std::numeric_limits<float>::infinity());
  EXPECT_EQ(off.scale(), 1.f);
  EXPECT_TRUE(off.unscale_and_check({&g}, Stream::cpu()));
  off.update(false);
  EXPECT_EQ(off.skipped_steps(), 0);
}

// Backoffs down to 0 mean gradients that are not finite at any scale: update throws, naming the
// count, and leaves a positive scale, so the state a caller might still save loads back.
TEST(LossScaler, BackoffToZeroFailsWithALoadableState) {
  LossScalerConfig cfg;
  cfg.enabled = true;
  cfg.init_scale = std::ldexp(1.f, -147);
  LossScaler s(cfg);
  s.update(false);
  s.update(false);
  EXPECT_EQ(s.scale(), std::ldexp(1.f, -149));  // float's smallest
  expect_error([&] { s.update(false); }, {"loss scale fell to 0 after 3 skipped steps", "not finite at any scale", "bf16"});
  EXPECT_EQ(s.scale(), std::ldexp(1.f, -149));
  EXPECT_EQ(s.skipped_steps(), 2);
  LossScaler back(cfg);
  back.load_state(Json::parse(s.state().dump()), "test");
  EXPECT_EQ(back.scale(), s.scale());
}

// The log's line for a skipped step and which skips get one: the first 5 in a run, then a
// power-of-two count or one 1000 steps after the last line.
TEST(LossScaler, SkippedStepLogLines) {
  LossScalerConfig cfg;
  cfg.enabled = true;
  LossScaler s(cfg);
  for (int i = 0; i < 3; ++i) s.update(false);
  EXPECT_EQ(s.skip_message(12, 16384.f), "step 12: inf/NaN gradients, step skipped, loss scale 16384 -> 8192 (3 skipped so far)");
  EXPECT_EQ(loss_scale_str(16777216.f), "16777216");
  EXPECT_EQ(loss_scale_str(1000.1f), "1000.1");
  EXPECT_EQ(loss_scale_str(0.5f), "0.5");
  EXPECT_EQ(loss_scale_str(std::ldexp(1.f, -100)), "7.88861e-31");  // not "0"
  std::vector<int64_t> logged;
  for (int64_t n = 1; n <= 100; ++n)
    if (log_skipped_step(n, 1)) logged.push_back(n);  // a skip at every step
  EXPECT_EQ(logged, (std::vector<int64_t>{1, 2, 3, 4, 5, 8, 16, 32, 64}));
  EXPECT_FALSE(log_skipped_step(7, 999));
  EXPECT_TRUE(log_skipped_step(7, 1000));  // an occasional overflow in a long run
  EXPECT_TRUE(log_skipped_step(7, -1));    // the first of a resumed session
}

// Factors that are not powers of two: each scale change is a double product rounded to float
// once, as torch's _amp_update_scale_ does. The bits are torch.amp.GradScaler's, from
// tools/reference/grad_scaler_sequence.py (its defaults: this sequence and these factors).
TEST(LossScaler, MatchesGradScalerWithNonDyadicFactors) {
  LossScalerConfig cfg;
  cfg.enabled = true;
  cfg.init_scale = 1000.1f;
  cfg.growth_factor = 3.0;
  cfg.backoff_factor = 0.3;
  cfg.growth_interval = 2;
  const std::string steps = "ffiffnfffiffffff";  // f finite, i inf, n NaN
  const uint32_t torch_bits[] = {0x447a0666, 0x453b84cc, 0x446105c2, 0x446105c2, 0x4528c452, 0x444a852f,
                                 0x444a852f, 0x4517e3e3, 0x4517e3e3, 0x443644aa, 0x443644aa, 0x4508b380,
                                 0x4508b380, 0x45cd0d40, 0x45cd0d40, 0x4699c9f0};
  LossScaler scaler(cfg);
  for (size_t i = 0; i < steps.size(); ++i) {
    scaler.update(steps[i] == 'f');
    const float sc = scaler.scale();
    uint32_t bits;
    std::memcpy(&bits, &sc, sizeof bits);
    EXPECT_EQ(bits, torch_bits[i]) << "after step " << i + 1 << " (" << steps[i] << "): scale " << sc;
  }
}

TEST(LossScaler, ConfigKeys) {
  Json c = default_config();
  EXPECT_FALSE(loss_scaler_config(c).enabled);  // fp32
  apply_override(c, "train.precision=bf16");
  EXPECT_FALSE(loss_scaler_config(c).enabled);  // bf16 has float's range
  apply_override(c, "train.precision=fp16");
  const LossScalerConfig f = loss_scaler_config(c);
  EXPECT_TRUE(f.enabled);
  EXPECT_EQ(f.init_scale, 65536.f);
  EXPECT_EQ(f.growth_factor, 2.f);
  EXPECT_EQ(f.backoff_factor, 0.5f);
  EXPECT_EQ(f.growth_interval, 2000);
  apply_override(c, "amp.loss_scaling=none");
  EXPECT_FALSE(loss_scaler_config(c).enabled);
  apply_override(c, "amp.loss_scaling=dynamic");
  apply_override(c, "train.precision=fp32");
  EXPECT_TRUE(loss_scaler_config(c).enabled);
  apply_override(c, "amp.loss_scaling=sometimes");
  expect_error([&] { loss_scaler_config(c); }, {"amp.loss_scaling", "sometimes"});
  apply_override(c, "amp.loss_scaling=auto");
  apply_override(c, "amp.backoff_factor=1.5");
  expect_error([&] { loss_scaler_config(c); }, {"amp.backoff_factor"});
  apply_override(c, "amp.backoff_factor=0.5");
  apply_override(c, "amp.init_scale=1e39");  // beyond float: named, not "inf"
  expect_error([&] { loss_scaler_config(c); }, {"amp.init_scale", "1e+39"});
  apply_override(c, "amp.init_scale=65536");
  apply_override(c, "amp.growth_factor=.inf");  // YAML's infinity
  expect_error([&] { loss_scaler_config(c); }, {"amp.growth_factor", "finite"});
  apply_override(c, "amp.growth_factor=2");
  apply_override(c, "train.precision=fp8");
  expect_error([&] { train_config(c); }, {"train.precision", "fp8"});
}

namespace {

// A tiny MedicalCNN and a batch for single steps.
struct TinyStep {
  std::unique_ptr<MedicalCNN> model;
  std::unique_ptr<Optimizer> opt;
  std::unique_ptr<Communicator> comm = make_single_process_communicator();
  Tensor x, y;

  explicit TinyStep(const std::string& optimizer, uint64_t seed = 3) {
    model = make_model(Json{{"widths", {4, 8, 8, 8}}, {"depths", {1, 1, 1, 1}}, {"head_hidden", 8},
                            {"in_channels", 1}, {"num_classes", 2}},
                       seed);
    Json c = default_config();
    apply_override(c, "optim.name=" + optimizer);
    opt = make_optimizer(optim_config(c), model->named_parameters());
    std::mt19937 rng(7);
    std::normal_distribution<float> n(0.f, 1.f);
    std::vector<float> v(8 * 16 * 16);
    for (float& e : v) e = n(rng);
    x = Tensor::from_vector(v, {8, 1, 16, 16});
    y = Tensor::from_labels({0, 1, 1, 0, 1, 0, 0, 1});
  }
  StepStats step(const StepOptions& o = {}) { return train_step(*model, *opt, *comm, x, y, Loss{}, Stream::cpu(), o); }

  // Every weight and every optimizer state value, and the step counter, as bits.
  std::vector<std::vector<float>> snapshot() {
    std::vector<std::vector<float>> out;
    for (auto& [name, p] : model->named_parameters()) out.push_back(p->value.to_vector());
    for (auto& [name, t] : opt->state()) out.push_back(t->to_vector());
    out.push_back({static_cast<float>(opt->steps())});
    return out;
  }
};

}  // namespace

// The fused unscale (what the GPU path of finish_step uses): check_finite leaves the gradients
// scaled, and Optimizer::step(s, inv_scale()) gives the weights and moments that the separate
// unscale pass followed by a plain step gives, bit for bit; each step bumps every parameter's
// version (what invalidates the GPU's 16-bit weight copies).
TEST(LossScaler, FusedUnscaleEqualsTheSeparatePass) {
  LossScalerConfig cfg;
  cfg.enabled = true;
  cfg.init_scale = 1024.f;
  const LossScaler scaler(cfg);
  EXPECT_EQ(scaler.inv_scale(), 1.f / 1024.f);
  EXPECT_EQ(LossScaler().inv_scale(), 1.f);
  const Stream s = Stream::cpu();
  for (const std::string optimizer : {"sgd", "adamw"}) {
    SCOPED_TRACE(optimizer);
    TinyStep a(optimizer), b(optimizer);
    Json c = default_config();
    apply_override(c, "optim.name=" + optimizer);
    apply_override(c, "optim.weight_decay=0.01");
    a.opt = make_optimizer(optim_config(c), a.model->named_parameters());
    b.opt = make_optimizer(optim_config(c), b.model->named_parameters());
    for (int step = 0; step < 3; ++step) {
      auto pa = a.model->named_parameters(), pb = b.model->named_parameters();
      std::vector<Tensor*> ga, gb;
      for (size_t i = 0; i < pa.size(); ++i) {
        fill_uniform(pa[i].second->grad, 100 + static_cast<uint32_t>(i) + 7 * step, -1000.f, 1000.f);
        pb[i].second->grad.copy_from(pa[i].second->grad);
        ga.push_back(&pa[i].second->grad);
        gb.push_back(&pb[i].second->grad);
      }
      const std::vector<float> scaled = gb.front()->to_vector();
      ASSERT_TRUE(scaler.unscale_and_check(ga, s));
      a.opt->step(s);
      ASSERT_TRUE(scaler.check_finite(gb, s));
      EXPECT_EQ(gb.front()->to_vector(), scaled);  // left scaled
      const uint64_t version = pb.front().second->version;
      b.opt->step(s, scaler.inv_scale());
      EXPECT_EQ(pb.front().second->version, version + 1);
    }
    EXPECT_EQ(a.snapshot(), b.snapshot());
  }
  Tensor g = Tensor::full({3}, 2.f);
  g.data<float>()[1] = std::numeric_limits<float>::infinity();
  EXPECT_FALSE(scaler.check_finite({&g}, s));
  EXPECT_EQ(g.data<float>()[0], 2.f);
  EXPECT_TRUE(LossScaler().check_finite({&g}, s));  // disabled: nothing checked
}

// An injected inf or NaN gradient (in the last parameter whose gradient completes: after the
// whole backward, like an overflow anywhere) skips the step: weights, moments, momentum buffers
// and the step counter stay bit-identical, the scale halves; the next clean step updates.
TEST(LossScaler, InjectedInfOrNanSkipsTheStep) {
  for (const std::string optimizer : {"adam", "sgd", "adamw"}) {
    for (const float bad : {std::numeric_limits<float>::infinity(), std::nanf("")}) {
      SCOPED_TRACE(optimizer + (std::isnan(bad) ? " NaN" : " inf"));
      TinyStep t(optimizer);
      LossScalerConfig cfg;
      cfg.enabled = true;
      cfg.growth_interval = 2;
      LossScaler scaler(cfg);
      StepOptions o;
      o.loss_scaler = &scaler;
      o.clip_grad_norm = 1.0f;
      StepStats st = t.step(o);  // a clean step first, so the optimizer state is not zero
      EXPECT_FALSE(st.skipped);
      EXPECT_EQ(st.loss_scale, 65536.f);
      EXPECT_TRUE(std::isfinite(st.grad_norm));
      const auto before = t.snapshot();
      bool inject = true;
      t.model->set_grad_ready_hook([&](Parameter& p) {
        if (inject) p.grad.data<float>()[0] = bad;
      });
      st = t.step(o);
      EXPECT_TRUE(st.skipped);
      EXPECT_EQ(st.loss_scale, 65536.f);
      EXPECT_EQ(scaler.scale(), 32768.f);
      EXPECT_EQ(scaler.skipped_steps(), 1);
      EXPECT_EQ(t.snapshot(), before);
      for (auto& [name, p] : t.model->named_parameters())  // zeroed for the next step all the same
        EXPECT_EQ(p->grad.to_vector(), std::vector<float>(static_cast<size_t>(p->grad.numel()), 0.f)) << name;
      inject = false;
      st = t.step(o);
      EXPECT_FALSE(st.skipped);
      EXPECT_EQ(st.loss_scale, 32768.f);
      EXPECT_NE(t.snapshot(), before);
      EXPECT_EQ(t.opt->steps(), 2);
      t.step(o);
      EXPECT_EQ(scaler.scale(), 65536.f);  // two finite steps in a row: grown back
    }
  }
}

// Through train_step: an inf at every step (whatever the scale) backs the scale off to 0, and the
// step that would reach it fails, the weights as the last taken step left them.
TEST(LossScaler, InfAtEveryScaleFailsTheStep) {
  TinyStep t("adam");
  LossScalerConfig cfg;
  cfg.enabled = true;
  cfg.init_scale = std::ldexp(1.f, -140);
  LossScaler scaler(cfg);
  StepOptions o;
  o.loss_scaler = &scaler;
  const auto before = t.snapshot();
  t.model->set_grad_ready_hook([](Parameter& p) { p.grad.data<float>()[0] = std::numeric_limits<float>::infinity(); });
  for (int i = 0; i < 9; ++i) EXPECT_TRUE(t.step(o).skipped);
  expect_error([&] { t.step(o); }, {"loss scale fell to 0 after 10 skipped steps"});
  EXPECT_EQ(scaler.scale(), std::ldexp(1.f, -149));
  EXPECT_EQ(t.snapshot(), before);
}

// In fp32 a power-of-two loss scale is exact: scaled, unscaled and clipped, the step is the
// unscaled step bit for bit (so the scaler changes nothing but the range).
TEST(LossScaler, Fp32ScaledStepEqualsUnscaledStep) {
  TinyStep a("adam"), b("adam");
  LossScalerConfig cfg;
  cfg.enabled = true;
  LossScaler scaler(cfg);
  StepOptions plain, scaled;
  plain.clip_grad_norm = scaled.clip_grad_norm = 0.5f;
  scaled.loss_scaler = &scaler;
  for (int i = 0; i < 3; ++i) {
    const StepStats sa = a.step(plain), sb = b.step(scaled);
    EXPECT_EQ(sa.grad_norm, sb.grad_norm);
    EXPECT_EQ(sa.loss, sb.loss);
  }
  EXPECT_EQ(a.snapshot(), b.snapshot());
}

// Emulated fp16 / bf16 forward against fp32 on the same weights. Tolerances, as a fraction of
// the largest fp32 logit: fp16 keeps 11 significant bits (2^-12 relative per rounding), bf16
// 8 (2^-9); over ~20 rounded layers of a freshly initialised model the logits stay within
// 0.5% (fp16) and 2% (bf16) in eval mode; with batch statistics (train mode), whose
// normalisation amplifies small differences of a random-init network, 1% and 8% (measured:
// fp16 0.04% / 0.2%, bf16 0.3% / 3.9%). Outputs are representable in the low precision
// (rounding them again changes nothing).
TEST(AmpForward, LowPrecisionAgainstFp32) {
  auto model = make_model(Json{{"widths", {8, 16, 32, 64}}, {"depths", {1, 1, 1, 1}}, {"head_hidden", 32},
                               {"in_channels", 1}, {"num_classes", 3}},
                          11);
  std::mt19937 rng(5);
  std::normal_distribution<float> n(0.f, 1.f);
  std::vector<float> v(16 * 32 * 32);
  for (float& e : v) e = n(rng);
  const Tensor x = Tensor::from_vector(v, {16, 1, 32, 32});
  const std::vector<float> x_before = x.to_vector();
  for (const bool training : {false, true}) {
    SCOPED_TRACE(training ? "train mode (batch statistics)" : "eval mode");
    model->train(training);
    model->apply([](const std::string&, Module& m) {  // the dropout masks would differ between the passes
      if (std::string(m.type_name()) == "Dropout") m.eval();
    });
    model->set_precision(DType::f32);
    const std::vector<float> ref = model->forward(x, nullptr, Stream::cpu()).to_vector();
    float scale = 0;
    for (float r : ref) scale = std::max(scale, std::fabs(r));
    const float tol16 = training ? 0.01f : 0.005f, tolb16 = training ? 0.08f : 0.02f;
    for (const auto& [dtype, tol] : {std::pair<DType, float>{DType::f16, tol16}, {DType::bf16, tolb16}}) {
      SCOPED_TRACE(dtype_name(dtype));
      model->set_precision(dtype);
      std::vector<float> got = model->forward(x, nullptr, Stream::cpu()).to_vector();
      float worst = 0;
      for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::fabs(got[i] - ref[i]) / scale);
      EXPECT_LT(worst, tol);
      EXPECT_GT(worst, 0.f);  // it did compute in the low precision
      std::vector<float> again = got;
      round_to_dtype_inplace(again.data(), static_cast<int64_t>(again.size()), dtype);
      EXPECT_EQ(again, got);
      for (auto& [name, p] : model->named_parameters()) {  // FP32 masters untouched
        std::vector<float> w = p->value.to_vector();
        round_to_dtype_inplace(w.data(), static_cast<int64_t>(w.size()), dtype);
        if (p->value.numel() > 64) {
          EXPECT_NE(w, p->value.to_vector()) << name;
        }
      }
    }
  }
  EXPECT_EQ(x.to_vector(), x_before);  // the caller's input is not rounded in place
  model->set_precision(DType::f32);
}

namespace {

Json small_job(const std::string& out, const std::string& precision) {
  Json c = default_config();
  for (const char* s : {"model.widths=[8, 16, 32, 64]", "model.depths=[1, 1, 1, 1]", "model.head_hidden=32",
                        "data.image_size=32", "data.synth.train=200", "data.synth.val=64", "data.synth.size=32",
                        "train.epochs=3", "train.batch_size=32", "train.threads=2", "train.checkpoint_every=3",
                        "train.clip_grad_norm=0.5", "amp.growth_interval=4", "amp.init_scale=16777216",
                        "schedule.name=cosine"})
    apply_override(c, s);
  apply_override(c, "train.precision=" + precision);
  apply_override(c, "train.out=" + out);
  return c;
}

TrainSummary train(const Json& c, std::string* log_text = nullptr) {
  auto comm = make_single_process_communicator();
  std::ostringstream log;
  TrainSummary s = run_training(c, *comm, log);
  if (log_text) *log_text = log.str();
  return s;
}

std::vector<Json> jsonl(const std::string& path) {
  std::vector<Json> out;
  std::ifstream f(path);
  for (std::string line; std::getline(f, line);) out.push_back(Json::parse(line));
  return out;
}

void expect_same_weights(const std::string& a, const std::string& b) {
  H5File fa = H5File::open_read(a), fb = H5File::open_read(b);
  const auto names = fa.list("/model");
  ASSERT_EQ(names, fb.list("/model"));
  for (const auto& n : names) EXPECT_EQ(fa.read("/model/" + n).to_vector(), fb.read("/model/" + n).to_vector()) << n;
}

class AmpTraining : public ::testing::Test {
 protected:
  void SetUp() override { setenv("LANCET_CACHE", (tmp_ / "cache").c_str(), 1); }
  TempDir tmp_{"amp"};
};

}  // namespace

// fp16 with dynamic loss scaling: scale and skips in steps.jsonl / metrics.jsonl and the log,
// the LR schedule advancing on skipped steps too (as torch's scheduler.step() does),
// the scaler's state in checkpoints, and a run stopped mid-epoch and resumed ends bitwise
// identical to the uninterrupted one (scale and growth tracker restored).
TEST_F(AmpTraining, Fp16LogsScaleAndResumesBitwise) {
  const std::string full = tmp_ / "full", part = tmp_ / "part";
  std::string log;
  const TrainSummary want = train(small_job(full, "fp16"), &log);
  SCOPED_TRACE(log);
  EXPECT_NE(log.find("precision: fp16 emulated"), std::string::npos);
  EXPECT_NE(log.find("loss scale "), std::string::npos);
  const auto steps = jsonl(full + "/steps.jsonl");
  ASSERT_EQ(static_cast<int64_t>(steps.size()), want.steps);
  int64_t skipped = 0;
  for (const Json& j : steps) {
    ASSERT_TRUE(j.contains("loss_scale") && j.contains("skipped")) << j.dump();
    skipped += j["skipped"].get<bool>();
  }
  EXPECT_EQ(steps.front()["loss_scale"].get<float>(), 16777216.f);
  const auto metrics = jsonl(full + "/metrics.jsonl");
  ASSERT_EQ(metrics.size(), 3u);
  int64_t skipped_by_epoch = 0;
  for (const Json& m : metrics) skipped_by_epoch += m.at("skipped_steps").get<int64_t>();
  EXPECT_EQ(skipped_by_epoch, skipped);
  // 2^24 overflows fp16 at once: the run backs off, grows and overflows again, the scale
  // following the state machine step by step (growth_interval 4).
  EXPECT_TRUE(steps.front()["skipped"].get<bool>());
  EXPECT_GE(skipped, 3);
  EXPECT_LT(skipped, want.steps / 2);
  float scale = 16777216.f;
  int64_t good = 0;
  for (const Json& j : steps) {
    EXPECT_EQ(j["loss_scale"].get<float>(), scale) << j.dump();
    if (j["skipped"].get<bool>()) {
      scale *= 0.5f, good = 0;
    } else if (++good == 4) {
      scale *= 2.f, good = 0;
    }
  }
  EXPECT_EQ(metrics.back()["loss_scale"].get<float>(), scale);
  // The log reports skips as they happen (log_skipped_step's choice), each with the scales.
  std::string want_lines;
  int64_t seen = 0, last_line = -1;
  for (const Json& j : steps) {
    if (!j["skipped"].get<bool>()) continue;
    const int64_t step = j["step"].get<int64_t>();
    if (!log_skipped_step(++seen, last_line < 0 ? -1 : step - last_line)) continue;
    last_line = step;
    want_lines += "step " + std::to_string(step) + ": inf/NaN gradients, step skipped, loss scale " +
                  loss_scale_str(j["loss_scale"].get<float>()) + " -> " + loss_scale_str(j["loss_scale"].get<float>() / 2) +
                  " (" + std::to_string(seen) + " skipped so far)\n";
  }
  std::string got_lines;
  {
    std::istringstream in(log);
    for (std::string line; std::getline(in, line);)
      if (line.find(": inf/NaN gradients, step skipped") != std::string::npos) got_lines += line + "\n";
  }
  EXPECT_EQ(got_lines, want_lines);
  EXPECT_NE(log.find(std::to_string(skipped) + " in the run\n"), std::string::npos);
  for (size_t i = 1; i < steps.size(); ++i)  // cosine from step 1: a skipped step still moves the LR on
    EXPECT_LT(steps[i]["lr"].get<double>(), steps[i - 1]["lr"].get<double>()) << i;

  const auto ckpts = list_checkpoints(full);
  ASSERT_FALSE(ckpts.empty());
  const Json st = Json::parse(*H5File::open_read(ckpts.back()).get_attr("/train", "state"));
  EXPECT_EQ(st.at("loss_scaler").at("scale").get<float>(), scale);

  for (int64_t stop : {5, 10}) {  // resumes from 3 (mid-epoch) and from 9
    SCOPED_TRACE("stopped after step " + std::to_string(stop));
    fs::remove_all(part);
    Json first = small_job(part, "fp16");
    apply_override(first, "train.max_steps=" + std::to_string(stop));
    train(first);
    Json second = small_job(part, "fp16");
    apply_override(second, "train.resume=auto");
    const TrainSummary got = train(second);
    EXPECT_EQ(got.steps, want.steps);
    expect_same_weights(full + "/final.h5", part + "/final.h5");
    EXPECT_EQ(got.final_eval.loss, want.final_eval.loss);
    const auto metrics_again = jsonl(part + "/metrics.jsonl");
    ASSERT_EQ(metrics_again.size(), metrics.size());
    for (size_t i = 0; i < metrics.size(); ++i) {
      EXPECT_EQ(metrics_again[i]["loss_scale"], metrics[i]["loss_scale"]) << i;
      EXPECT_EQ(metrics_again[i]["skipped_steps"], metrics[i]["skipped_steps"]) << i;
    }
    const auto again = jsonl(part + "/steps.jsonl");
    ASSERT_EQ(again.size(), steps.size());
    for (size_t i = 0; i < steps.size(); ++i) {
      EXPECT_EQ(again[i]["loss_scale"], steps[i]["loss_scale"]) << i;
      EXPECT_EQ(again[i]["loss"], steps[i]["loss"]) << i;
    }
  }
}

// A run stopped by max_steps inside its first epoch (no epoch summary): the skips are in the log
// as they happen, and the run's count before the final report.
TEST_F(AmpTraining, SkipsAreLoggedWhenTheyHappen) {
  Json c = small_job(tmp_ / "run", "fp16");
  apply_override(c, "train.max_steps=3");
  std::string log;
  train(c, &log);
  SCOPED_TRACE(log);
  const auto steps = jsonl(tmp_ / "run/steps.jsonl");
  ASSERT_EQ(steps.size(), 3u);
  for (const Json& j : steps) EXPECT_TRUE(j["skipped"].get<bool>()) << j.dump();  // 2^24 overflows fp16
  const size_t a = log.find("step 1: inf/NaN gradients, step skipped, loss scale 16777216 -> 8388608 (1 skipped so far)\n");
  const size_t b = log.find("step 3: inf/NaN gradients, step skipped, loss scale 4194304 -> 2097152 (3 skipped so far)\n");
  const size_t total = log.find("loss scale 2097152, 3 steps skipped in this epoch's first 3 (inf/NaN gradients), 3 in the run\n");
  const size_t report = log.find("validation report");
  EXPECT_NE(log.find("step 2: inf/NaN gradients"), std::string::npos);
  ASSERT_NE(a, std::string::npos);
  ASSERT_NE(b, std::string::npos);
  ASSERT_NE(total, std::string::npos);
  EXPECT_LT(a, b);
  EXPECT_LT(b, total);
  EXPECT_LT(total, report);
}

// Inputs of a large scale (data.std tiny) overflow fp16's activations at once: the divergence
// error names fp16's range and the ways out; bf16, with float's range, trains on the same data.
TEST_F(AmpTraining, Fp16ForwardOverflowNamesTheRange) {
  Json c = small_job(tmp_ / "fp16", "fp16");
  apply_override(c, "data.std=[0.00001]");
  apply_override(c, "train.max_steps=2");
  expect_error([&] { train(c); }, {"training diverged: the loss is", "at step 1 in fp16", "max 65504",
                                   "train.precision=bf16", "data.mean/std"});
  Json b = small_job(tmp_ / "bf16", "bf16");
  apply_override(b, "data.std=[0.00001]");
  apply_override(b, "train.max_steps=2");
  EXPECT_EQ(train(b).steps, 2);
}

// LowPrecisionTrainsLikeFp32 (fp16/bf16 vs fp32 accuracy on the synthetic task) is in
// test_slow_amp.cpp: minutes under the sanitizers, so it runs in the main pass only.
