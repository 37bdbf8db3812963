// GPU tests for the optimizer ops (kernels/cuda/optim.cu) against their CPU twins: SGD and
// Adam/AdamW steps (per tensor and multi-tensor, several steps, fused unscale), the global
// gradient norm, the finite checks, the loss-scale unscale, clipping and device errors.
//
// Lists mimic a CNN's parameters (about 120 tensors of conv/batch-norm/linear shapes) plus odd
// sizes: 1, 7, 1000003 (16 chunks of 64K elements) and 20000001 (306 chunks), placed so the
// big one spans two launch tables (320 chunks each) and the tensor count spans several tables.
//
// Tolerances: the CPU and GPU steps follow the same formula in float, but nvcc contracts
// a*b+c into fma, so each operation may differ by about one ulp; after a few steps parameters
// and state agree within rtol 1e-5 + atol 1e-6 (values are O(1); a real indexing or formula
// bug shows as errors of O(1e-2) or more). The gradient unscale and clip are single roundings
// of the same product: exact. The norm sums in double in another order: 1e-12 relative.
//
// Tensors move with Tensor::to / copy_from (cudaMemcpy, ordered on the legacy default
// stream), so the ops run on that stream (native null) unless a test synchronises explicitly.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "kernels/optim.h"
#include "tests/gpu_util.h"
#include "tests/gradcheck.h"

namespace lancet {
namespace {

using testing::expect_close;
using testing::expect_error;
using testing::random_tensor;
using testing::to_gpu;

const Stream kCpu = Stream::cpu();
const Stream kGpu{Device::cuda(0), nullptr};  // the legacy default stream, ordered with Tensor copies
constexpr double kRtol = 1e-5, kAtol = 1e-6;

std::vector<Shape> cnn_shapes(bool with_huge) {
  std::vector<Shape> s = {{1000003}, {7}, {1}};
  if (with_huge) s.push_back({20000001});
  s.push_back({32, 3, 7, 7});
  const int64_t widths[] = {32, 32, 64, 64, 96, 96, 128, 128};
  int64_t in = 32;
  for (int block = 0; block < 20; ++block) {
    const int64_t out = widths[block % 8];
    s.push_back({out, in, 3, 3});  // conv
    s.push_back({out});            // batch-norm weight
    s.push_back({out});            // batch-norm bias
    s.push_back({out, out, 1, 1});
    s.push_back({out});
    in = out;
  }
  s.push_back({5, in});  // classifier
  s.push_back({5});
  return s;
}

struct List {
  std::vector<Tensor> t;
  std::vector<Tensor*> ptrs() {
    std::vector<Tensor*> out;
    for (Tensor& x : t) out.push_back(&x);
    return out;
  }
  std::vector<const Tensor*> cptrs() const {
    std::vector<const Tensor*> out;
    for (const Tensor& x : t) out.push_back(&x);
    return out;
  }
  List gpu() const {
    List out;
    for (const Tensor& x : t) out.t.push_back(to_gpu(x));
    return out;
  }
};

List random_list(const std::vector<Shape>& shapes, uint32_t seed, float lo = -1.f, float hi = 1.f) {
  List l;
  for (size_t i = 0; i < shapes.size(); ++i)
    l.t.push_back(random_tensor(shapes[i], seed + 7919 * static_cast<uint32_t>(i), lo, hi));
  return l;
}

List clone_list(const List& l) {
  List out;
  for (const Tensor& t : l.t) out.t.push_back(t.clone());
  return out;
}

List zeros_list(const std::vector<Shape>& shapes) {
  List l;
  for (const Shape& s : shapes) l.t.push_back(Tensor::zeros(s));
  return l;
}

void expect_list_close(const List& cpu, const List& gpu, double rtol, double atol, const std::string& what) {
  ASSERT_EQ(cpu.t.size(), gpu.t.size());
  for (size_t i = 0; i < cpu.t.size(); ++i)
    expect_close(cpu.t[i], gpu.t[i], rtol, atol, what + " #" + std::to_string(i));
}

// Equal values, NaN matching NaN (a CPU NaN keeps its payload, a GPU one is canonical).
void expect_same_values(const List& cpu, const List& gpu, const std::string& what) {
  ASSERT_EQ(cpu.t.size(), gpu.t.size());
  for (size_t i = 0; i < cpu.t.size(); ++i) {
    const std::vector<float> a = cpu.t[i].to_vector(), b = gpu.t[i].to_vector();
    int bad = 0;
    for (size_t j = 0; j < a.size(); ++j)
      if (!(a[j] == b[j] || (std::isnan(a[j]) && std::isnan(b[j]))) && bad++ < 3)
        ADD_FAILURE() << what << " #" << i << "[" << j << "]: cpu " << a[j] << " gpu " << b[j];
  }
}

void sgd_both(const SgdParams& sp, bool with_bufs, float scale_inv, int steps) {
  const auto shapes = cnn_shapes(false);
  List p = random_list(shapes, 1), b = zeros_list(shapes);
  List gp = p.gpu(), gb = b.gpu();
  for (int t = 0; t < steps; ++t) {
    const List g = random_list(shapes, 100 + t);
    const List gg = g.gpu();
    sgd_step_multi(sp, t == 0, p.ptrs(), g.cptrs(), with_bufs ? b.ptrs() : std::vector<Tensor*>{}, kCpu, scale_inv);
    sgd_step_multi(sp, t == 0, gp.ptrs(), gg.cptrs(), with_bufs ? gb.ptrs() : std::vector<Tensor*>{}, kGpu,
                   scale_inv);
    const std::string at = " after step " + std::to_string(t);
    expect_list_close(p, gp, kRtol, kAtol, "param" + at);
    expect_list_close(b, gb, kRtol, kAtol, "momentum buffer" + at);
    expect_list_close(g, gg, 0, 0, "gradient (unchanged)" + at);
  }
}

TEST(GpuOptim, SgdMultiMatchesCpu) {
  LANCET_REQUIRE_GPU();
  SgdParams a;
  a.lr = 0.1f, a.momentum = 0.9f, a.dampening = 0.1f, a.weight_decay = 0.01f;
  sgd_both(a, true, 1.0f, 3);
  SgdParams n;
  n.lr = 0.05f, n.momentum = 0.8f, n.nesterov = true, n.weight_decay = 1e-4f;
  sgd_both(n, true, 1.0f, 3);
  sgd_both(n, true, 1.0f / 3.0f, 2);  // fused unscale
  SgdParams plain;
  plain.lr = 0.1f, plain.momentum = 0.f;
  sgd_both(plain, false, 1.0f, 2);
}

void adam_both(const AdamParams& ap, const std::vector<Shape>& shapes, float scale_inv, int steps) {
  List p = random_list(shapes, 2), m = zeros_list(shapes), v = zeros_list(shapes);
  List gp = p.gpu(), gm = m.gpu(), gv = v.gpu();
  for (int t = 1; t <= steps; ++t) {
    const List g = random_list(shapes, 200 + t);
    const List gg = g.gpu();
    adam_step_multi(ap, t, p.ptrs(), g.cptrs(), m.ptrs(), v.ptrs(), kCpu, scale_inv);
    adam_step_multi(ap, t, gp.ptrs(), gg.cptrs(), gm.ptrs(), gv.ptrs(), kGpu, scale_inv);
    const std::string at = " after step " + std::to_string(t);
    expect_list_close(p, gp, kRtol, kAtol, "param" + at);
    expect_list_close(m, gm, kRtol, kAtol, "exp_avg" + at);
    expect_list_close(v, gv, kRtol, kAtol, "exp_avg_sq" + at);
  }
}

TEST(GpuOptim, AdamMultiMatchesCpu) {
  LANCET_REQUIRE_GPU();
  AdamParams adam;
  adam.lr = 0.01f, adam.weight_decay = 0.1f;
  adam_both(adam, cnn_shapes(true), 1.0f, 3);  // the huge tensor spans two launch tables
  AdamParams adamw = adam;
  adamw.decoupled = true;
  adam_both(adamw, cnn_shapes(false), 1.0f, 3);
  adam_both(adamw, cnn_shapes(false), 1.0f / 1024.0f, 2);
  AdamParams low_beta;  // 1 - beta1 >= 0.5: the other branch of torch's lerp; no weight decay
  low_beta.beta1 = 0.3f;
  adam_both(low_beta, cnn_shapes(false), 1.0f, 2);
}

TEST(GpuOptim, PerTensorStepsMatchCpu) {
  LANCET_REQUIRE_GPU();
  for (const Shape& shape : {Shape{1}, Shape{7}, Shape{1000003}}) {
    Tensor p = random_tensor(shape, 3), gp = to_gpu(p), b = Tensor::zeros(shape), gb = to_gpu(b);
    Tensor q = random_tensor(shape, 4), gq = to_gpu(q), m = Tensor::zeros(shape), gm = to_gpu(m);
    Tensor v = Tensor::zeros(shape), gv = to_gpu(v);
    SgdParams sp;
    sp.weight_decay = 0.01f, sp.nesterov = true;
    AdamParams ap;
    ap.weight_decay = 0.01f, ap.decoupled = true;
    for (int t = 0; t < 3; ++t) {
      const Tensor g = random_tensor(shape, 50 + t), gg = to_gpu(g);
      sgd_step(sp, t == 0, p, g, b, kCpu);
      sgd_step(sp, t == 0, gp, gg, gb, kGpu);
      adam_step(ap, t + 1, q, g, m, v, kCpu);
      adam_step(ap, t + 1, gq, gg, gm, gv, kGpu);
    }
    expect_close(p, gp, kRtol, kAtol, "sgd param " + shape_str(shape));
    expect_close(b, gb, kRtol, kAtol, "sgd buffer " + shape_str(shape));
    expect_close(q, gq, kRtol, kAtol, "adam param " + shape_str(shape));
    expect_close(m, gm, kRtol, kAtol, "adam exp_avg " + shape_str(shape));
    expect_close(v, gv, kRtol, kAtol, "adam exp_avg_sq " + shape_str(shape));
  }
}

#ifdef LANCET_WITH_CUDA
// A non-blocking stream gives the same bits as the default stream (the kernels are deterministic).
TEST(GpuOptim, NonBlockingStreamSameBits) {
  LANCET_REQUIRE_GPU();
  const auto shapes = cnn_shapes(false);
  const List p = random_list(shapes, 5), g = random_list(shapes, 6), z = zeros_list(shapes);
  List p1 = p.gpu(), p2 = p.gpu(), g1 = g.gpu(), m1 = z.gpu(), m2 = z.gpu(), v1 = z.gpu(), v2 = z.gpu();
  AdamParams ap;
  adam_step_multi(ap, 1, p1.ptrs(), g1.cptrs(), m1.ptrs(), v1.ptrs(), kGpu);
  CudaStream stream(Device::cuda(0));
  synchronize(kGpu);  // the copies above are ordered on the default stream only
  adam_step_multi(ap, 1, p2.ptrs(), g1.cptrs(), m2.ptrs(), v2.ptrs(), stream.stream());
  EXPECT_TRUE(all_finite(p2.cptrs(), stream.stream()));
  stream.synchronize();
  expect_list_close(p1, p2, 0, 0, "param");
  expect_list_close(m1, m2, 0, 0, "exp_avg");
  expect_list_close(v1, v2, 0, 0, "exp_avg_sq");
}
#endif

// Where the non-finite value goes: (tensor, element, value); tensor -1 is the last one.
struct Plant {
  int tensor;
  int64_t element;  // -1: the last element
  float value;
};

List planted(const List& clean, const Plant& pl) {
  List l = clone_list(clean);
  Tensor& t = l.t[pl.tensor < 0 ? l.t.size() - 1 : static_cast<size_t>(pl.tensor)];
  const int64_t e = pl.element < 0 ? t.numel() - 1 : pl.element;
  t.data<float>()[e] = pl.value;
  return l;
}

TEST(GpuOptim, GlobalNormMatchesCpuAndIsDeterministic) {
  LANCET_REQUIRE_GPU();
  const List l = random_list(cnn_shapes(true), 7, -2.f, 3.f);
  const List gl = l.gpu();
  std::vector<const Tensor*> cpu = l.cptrs(), gpu = gl.cptrs();
  const Tensor none;
  cpu.insert(cpu.begin() + 2, &none);  // undefined entries (parameters without a gradient) are skipped
  gpu.insert(gpu.begin() + 2, &none);
  gpu.insert(gpu.begin(), &none);
  const double want = global_l2_norm(cpu, kCpu), got = global_l2_norm(gpu, kGpu);
  EXPECT_NEAR(got, want, 1e-12 * want);
  EXPECT_EQ(global_l2_norm(gpu, kGpu), got);  // same bits on every call
  const Tensor one = to_gpu(Tensor::full({1}, -3.f));
  EXPECT_EQ(global_l2_norm({&one}, kGpu), 3.0);
  EXPECT_EQ(global_l2_norm({}, kGpu), 0.0);  // nothing defined: the CPU path
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(std::isinf(global_l2_norm(planted(l, {-1, -1, inf}).gpu().cptrs(), kGpu)));
  EXPECT_TRUE(std::isnan(global_l2_norm(planted(l, {0, 5, nan}).gpu().cptrs(), kGpu)));
}

TEST(GpuOptim, FiniteChecksAndUnscaleMatchCpu) {
  LANCET_REQUIRE_GPU();
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const auto shapes = cnn_shapes(true);
  const List clean = random_list(shapes, 8, -6e4f, 6e4f);
  const std::vector<Plant> plants = {
      {-1, -1, nan},         // the last element of the last tensor
      {-1, -1, -inf},        //
      {0, 0, inf},           // the first element of the first tensor
      {0, 999999, nan},      // inside the 16th chunk of the 1000003-element tensor
      {3, 19900000, inf},    // the huge tensor, in its chunks in the second launch table
      {1, 6, -inf},          // the last element of the 7-element tensor
  };
  const float inv = 1.0f / 65536.0f * 3.0f;
  for (int k = -1; k < static_cast<int>(plants.size()); ++k) {
    const bool finite = k < 0;
    List cpu = finite ? clone_list(clean) : planted(clean, plants[static_cast<size_t>(k)]);
    List gpu = cpu.gpu();
    const std::string what = finite ? "clean" : "plant " + std::to_string(k);
    EXPECT_EQ(all_finite(gpu.cptrs(), kGpu), finite) << what;
    EXPECT_EQ(all_finite(cpu.cptrs(), kCpu), finite) << what;
    EXPECT_EQ(unscale_and_check_finite(gpu.ptrs(), inv, kGpu), finite) << what;
    EXPECT_EQ(unscale_and_check_finite(cpu.ptrs(), inv, kCpu), finite) << what;
    expect_same_values(cpu, gpu, "unscaled " + what);
  }
}

TEST(GpuOptim, ClipGradNormMatchesCpu) {
  LANCET_REQUIRE_GPU();
  const auto shapes = cnn_shapes(false);
  const List g = random_list(shapes, 9);
  const double norm = global_l2_norm(g.cptrs(), kCpu);
  for (const double max_norm : {norm * 0.25, norm * 4.0}) {  // clipped, then left alone
    List cpu = clone_list(g), gpu = g.gpu();
    const float want = clip_grad_norm(cpu.ptrs(), static_cast<float>(max_norm), kCpu);
    const float got = clip_grad_norm(gpu.ptrs(), static_cast<float>(max_norm), kGpu);
    EXPECT_NEAR(got, want, 1e-6 * want);
    expect_list_close(cpu, gpu, 1e-6, 0, "clipped gradient, max_norm " + std::to_string(max_norm));
  }
  List gpu = g.gpu();
  expect_error([&] { clip_grad_norm(gpu.ptrs(), 0.f, kGpu); }, {"clip_grad_norm", "max_norm must be positive"});
}

TEST(GpuOptim, DeviceMismatchErrors) {
  LANCET_REQUIRE_GPU();
  Tensor p = to_gpu(Tensor::zeros({4})), g = to_gpu(Tensor::zeros({4})), buf = to_gpu(Tensor::zeros({4}));
  Tensor g_cpu = Tensor::zeros({4}), g5 = to_gpu(Tensor::zeros({5}));
  SgdParams sp;
  expect_error([&] { sgd_step(sp, true, p, g_cpu, buf, kGpu); }, {"sgd_step", "is on cpu", "cuda:0"});
  expect_error([&] { sgd_step(sp, true, p, g, buf, kCpu); }, {"sgd_step", "stream is on cpu", "cuda:0"});
  expect_error([&] { sgd_step(sp, true, p, g5, buf, kGpu); }, {"grad [5]", "param [4]"});
  expect_error([&] { sgd_step_multi(sp, true, {&p, &p}, {&g, &g_cpu}, {&buf, &buf}, kGpu); },
               {"sgd_step", "is on cpu"});
  Tensor m = to_gpu(Tensor::zeros({4})), v = to_gpu(Tensor::zeros({4}));
  expect_error([&] { adam_step_multi({}, 1, {&p}, {&g}, {&m}, {&g_cpu}, kGpu); }, {"adam_step", "is on cpu"});
  expect_error([&] { adam_step_multi({}, 0, {&p}, {&g}, {&m}, {&v}, kGpu); }, {"step counts from 1"});
  expect_error([&] { global_l2_norm({&g, &g_cpu}, kGpu); }, {"global_l2_norm", "stream is on cuda:0", "cpu"});
  expect_error([&] { unscale_and_check_finite({&g, &g_cpu}, 0.5f, kGpu); }, {"unscale_and_check_finite"});
  expect_error([&] { all_finite({&g_cpu, &g}, kCpu); }, {"all_finite", "stream is on cpu", "cuda:0"});
  Tensor i32 = Tensor::empty({4}, DType::i32, Device::cuda(0));
  expect_error([&] { all_finite({&i32}, kGpu); }, {"all_finite", "must be f32"});
}

}  // namespace
}  // namespace lancet
