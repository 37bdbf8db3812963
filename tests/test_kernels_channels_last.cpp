// Tests for channels_last (NHWC) in the CPU kernels: every op that takes a channels_last 4-D
// tensor gives, element by logical index, BIT FOR BIT the result of the same call in nchw
// (inputs converted with to_format, outputs converted back and compared with memcmp), on shapes
// with N = 1, C = 1, odd H/W and C not a multiple of 8; parameter gradients accumulate onto
// non-zero values in both layouts; convert_format reorders memory and round-trips exactly; and
// mixed formats are refused naming the op.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/activation.h"
#include "kernels/batchnorm.h"
#include "kernels/conv.h"
#include "kernels/conv_winograd.h"
#include "kernels/elementwise.h"
#include "kernels/fused.h"
#include "kernels/optim.h"
#include "kernels/pool.h"
#include "tests/gradcheck.h"
#include "tests/kernel_test_util.h"

namespace lancet {
namespace {

using testing::BnParams;
using testing::conv_params;
using testing::ConvCase;
using testing::expect_error;
using testing::expect_same_bits;
using testing::random_tensor;

const Stream kCpu = Stream::cpu();
constexpr MemoryFormat kNchw = MemoryFormat::nchw, kNhwc = MemoryFormat::channels_last;

const std::vector<Shape> kShapes = {{2, 3, 4, 5}, {1, 5, 7, 9}, {3, 13, 1, 1}, {1, 1, 6, 7}, {2, 17, 9, 11},
                                    {4, 8, 16, 16}};

Tensor nhwc(const Tensor& t) { return to_format(t, kNhwc, kCpu); }

// A fresh tensor in format f (same shape and dtype) holding t's values: the starting values of an
// accumulated gradient.
Tensor copy_in(const Tensor& t, MemoryFormat f) {
  Tensor c = Tensor::empty(t.shape(), t.dtype(), t.device(), f);
  convert_format(t, c, kCpu);
  return c;
}

void expect_format(const Tensor& t, MemoryFormat f, const std::string& what) {
  EXPECT_EQ(t.format(), f) << what << " changed memory format";
}

// ---- convert_format / to_format -------------------------------------------------------------

TEST(ConvertFormat, ReordersMemoryAndRoundTripsExactly) {
  const Shape xs = {2, 3, 4, 5};
  Tensor x = random_tensor(xs, 1);
  Tensor y = nhwc(x);
  ASSERT_EQ(y.format(), kNhwc);
  ASSERT_EQ(y.shape(), xs) << "shapes stay logical";
  // Element (n, c, h, w) = (1, 2, 3, 1): nchw offset ((1*3 + 2)*4 + 3)*5 + 1 = 116, NHWC offset
  // ((1*4 + 3)*5 + 1)*3 + 2 = 110.
  EXPECT_EQ(y.data<float>()[110], x.data<float>()[116]);
  EXPECT_NE(y.data<float>()[116], x.data<float>()[116]) << "memory was not reordered";
  EXPECT_NE(std::memcmp(x.raw_data(), y.raw_data(), x.nbytes()), 0);
  Tensor back = to_format(y, kNchw, kCpu);
  ASSERT_EQ(back.format(), kNchw);
  EXPECT_EQ(std::memcmp(x.raw_data(), back.raw_data(), x.nbytes()), 0) << "round trip is exact";
  // Already in the format (or not 4-D): the same tensor, no copy.
  EXPECT_EQ(to_format(x, kNchw, kCpu).raw_data(), x.raw_data());
  EXPECT_EQ(to_format(y, kNhwc, kCpu).raw_data(), y.raw_data());
  Tensor v = random_tensor({3, 4}, 2);
  EXPECT_EQ(to_format(v, kNchw, kCpu).raw_data(), v.raw_data());
  // Matching formats: a plain copy.
  Tensor z = Tensor::empty(xs, DType::f32, Device::cpu(), kNhwc);
  convert_format(y, z, kCpu);
  EXPECT_EQ(std::memcmp(y.raw_data(), z.raw_data(), y.nbytes()), 0);
}

TEST(ConvertFormat, AnyDtypeByItsByteSize) {
  const Shape xs = {3, 5, 2, 7};
  for (DType dt : {DType::u8, DType::f16, DType::bf16, DType::i32, DType::i64, DType::f32}) {
    SCOPED_TRACE(dtype_name(dt));
    Tensor x = Tensor::empty(xs, dt);
    auto* bytes = static_cast<unsigned char*>(x.raw_data());
    for (size_t i = 0; i < x.nbytes(); ++i) bytes[i] = static_cast<unsigned char>(i * 37 + i / 7);
    Tensor y = nhwc(x);
    EXPECT_EQ(y.dtype(), dt);
    const size_t es = dtype_size(dt);
    // (n, c, h, w) = (2, 3, 1, 4): nchw ((2*5 + 3)*2 + 1)*7 + 4 = 193, NHWC ((2*2 + 1)*7 + 4)*5 + 3 = 198.
    EXPECT_EQ(std::memcmp(static_cast<char*>(y.raw_data()) + 198 * es, static_cast<char*>(x.raw_data()) + 193 * es, es),
              0);
    Tensor back = to_format(y, kNchw, kCpu);
    EXPECT_EQ(std::memcmp(x.raw_data(), back.raw_data(), x.nbytes()), 0);
  }
}

TEST(ConvertFormat, Errors) {
  Tensor x = random_tensor({2, 3, 4, 5}, 1);
  Tensor bad_shape = Tensor::empty({2, 3, 5, 4}, DType::f32, Device::cpu(), kNhwc);
  expect_error([&] { convert_format(x, bad_shape, kCpu); }, {"convert_format", "[2, 3, 5, 4]", "[2, 3, 4, 5]"});
  Tensor bad_dtype = Tensor::empty({2, 3, 4, 5}, DType::f16, Device::cpu(), kNhwc);
  expect_error([&] { convert_format(x, bad_dtype, kCpu); }, {"convert_format", "f16", "f32"});
  expect_error([&] { convert_format(x, x, kCpu); }, {"convert_format", "overlaps"});
  expect_error([&] { to_format(random_tensor({4, 5}, 2), kNhwc, kCpu); }, {"to_format", "[4, 5]", "4-D"});
}

// ---- elementwise ops over memory ------------------------------------------------------------

TEST(ChannelsLastElementwise, MatchNchwBitwise) {
  for (const Shape& xs : kShapes) {
    SCOPED_TRACE(shape_str(xs));
    const Tensor a = random_tensor(xs, 1), b = random_tensor(xs, 2);
    const Tensor al = nhwc(a), bl = nhwc(b);

    Tensor f0 = Tensor::empty(xs), f1 = Tensor::empty_like(al);
    fill(f0, 0.25f, kCpu);
    fill(f1, 0.25f, kCpu);
    expect_same_bits(f0, f1, "fill");

    Tensor y0 = Tensor::empty(xs), y1 = Tensor::empty_like(al);
    add(a, b, y0, kCpu);
    add(al, bl, y1, kCpu);
    expect_format(y1, kNhwc, "add");
    expect_same_bits(y0, y1, "add");
    add_inplace(y0, a, kCpu);
    add_inplace(y1, al, kCpu);
    expect_same_bits(y0, y1, "add_inplace");
    axpy(-0.7f, b, y0, kCpu);
    axpy(-0.7f, bl, y1, kCpu);
    expect_same_bits(y0, y1, "axpy");
    scale_inplace(y0, 1.3f, kCpu);
    scale_inplace(y1, 1.3f, kCpu);
    expect_same_bits(y0, y1, "scale_inplace");

    for (DType dt : {DType::f16, DType::bf16}) {
      Tensor h0 = cast_to(a, dt, kCpu), h1 = cast_to(al, dt, kCpu);
      expect_format(h1, kNhwc, "cast_to");
      expect_same_bits(h0, h1, std::string("cast_to ") + dtype_name(dt));
      Tensor r0 = Tensor::empty(xs), r1 = Tensor::empty_like(al);
      cast(h0, r0, kCpu);
      cast(h1, r1, kCpu);
      expect_same_bits(r0, r1, "cast back to f32");
    }

    // Summed in logical order in both formats: the same double, bit for bit.
    const double s0 = sum_squares(a, kCpu), s1 = sum_squares(al, kCpu);
    EXPECT_EQ(std::memcmp(&s0, &s1, sizeof(double)), 0) << s0 << " vs " << s1;
    EXPECT_TRUE(all_finite(al, kCpu));
    Tensor nan = al.clone();
    nan.data<float>()[nan.numel() / 2] = std::numeric_limits<float>::quiet_NaN();
    EXPECT_FALSE(all_finite(nan, kCpu));
  }
}

TEST(ChannelsLastElementwise, SumSquaresAddsInLogicalOrder) {
  // Values of very different magnitudes make the sum depend on the order of the additions; more
  // than one 65536-element block exercises the blocked reduction.
  const Shape xs = {3, 24, 41, 43};
  Tensor a = random_tensor(xs, 5);
  float* p = a.data<float>();
  for (int64_t i = 0; i < a.numel(); i += 3) p[i] *= 4096.f;
  const double s0 = sum_squares(a, kCpu), s1 = sum_squares(nhwc(a), kCpu);
  EXPECT_EQ(std::memcmp(&s0, &s1, sizeof(double)), 0) << s0 << " vs " << s1;
}

// An activation's forward, and its backward from y.
struct ActivationOp {
  std::string name;
  void (*forward)(const Tensor& x, Tensor& y, const Stream& s);
  void (*backward)(const Tensor& y, const Tensor& dy, Tensor& dx, const Stream& s);
};

TEST(ChannelsLastActivation, MatchNchwBitwise) {
  const ActivationOp ops[] = {{"relu", relu_forward, relu_backward}, {"sigmoid", sigmoid_forward, sigmoid_backward}};
  for (const Shape& xs : kShapes) {
    SCOPED_TRACE(shape_str(xs));
    const Tensor x = random_tensor(xs, 3, -2.f, 2.f), dy = random_tensor(xs, 4);
    const Tensor xl = nhwc(x), dyl = nhwc(dy);
    Tensor y0 = Tensor::empty(xs), y1 = Tensor::empty_like(xl), dx0 = Tensor::empty(xs), dx1 = Tensor::empty_like(xl);
    for (const ActivationOp& op : ops) {
      op.forward(x, y0, kCpu);
      op.forward(xl, y1, kCpu);
      expect_same_bits(y0, y1, op.name + "_forward");
      op.backward(y0, dy, dx0, kCpu);
      op.backward(y1, dyl, dx1, kCpu);
      expect_same_bits(dx0, dx1, op.name + "_backward");
    }
    // p = 0 keeps every element: the same result in both formats.
    Tensor m0 = Tensor::empty(xs, DType::u8), m1 = Tensor::empty(xs, DType::u8, Device::cpu(), kNhwc);
    dropout_forward(0.f, 7, 0, x, y0, m0, kCpu);
    dropout_forward(0.f, 7, 0, xl, y1, m1, kCpu);
    expect_same_bits(y0, y1, "dropout_forward p=0");
    expect_same_bits(m0, m1, "dropout mask p=0");
  }
}

// A 1-D nchw tensor holding t's memory as it lies: the elementwise ops' view of t.
Tensor memory_of(const Tensor& t) {
  Tensor m = Tensor::empty({t.numel()}, t.dtype());
  std::memcpy(m.raw_data(), t.raw_data(), t.nbytes());
  return m;
}

TEST(ChannelsLastActivation, DropoutDrawsPerMemoryPosition) {
  const Shape xs = {2, 5, 3, 7};
  const Tensor xl = nhwc(random_tensor(xs, 3)), dyl = nhwc(random_tensor(xs, 4));
  Tensor y = Tensor::empty_like(xl), mask = Tensor::empty(xs, DType::u8, Device::cpu(), kNhwc);
  dropout_forward(0.4f, 11, 100, xl, y, mask, kCpu);
  Tensor dx = Tensor::empty_like(xl);
  dropout_backward(0.4f, mask, dyl, dx, kCpu);
  // The same call on the memory seen as a flat nchw tensor gives the same bytes.
  const Tensor xm = memory_of(xl), dym = memory_of(dyl);
  Tensor ym = Tensor::empty_like(xm), mm = Tensor::empty({xm.numel()}, DType::u8), dxm = Tensor::empty_like(xm);
  dropout_forward(0.4f, 11, 100, xm, ym, mm, kCpu);
  dropout_backward(0.4f, mm, dym, dxm, kCpu);
  EXPECT_EQ(std::memcmp(y.raw_data(), ym.raw_data(), y.nbytes()), 0);
  EXPECT_EQ(std::memcmp(mask.raw_data(), mm.raw_data(), mask.nbytes()), 0);
  EXPECT_EQ(std::memcmp(dx.raw_data(), dxm.raw_data(), dx.nbytes()), 0);
}

// ---- per-channel ops: concat, SE channel scale ------------------------------------------------

TEST(ChannelsLastChannelOps, ConcatMatchesNchw) {
  for (const Shape& xs : kShapes) {
    SCOPED_TRACE(shape_str(xs));
    std::vector<Tensor> parts, parts_l;
    int64_t total = 0;
    for (int64_t ci : {xs[1], int64_t{1}, int64_t{5}}) {
      parts.push_back(random_tensor({xs[0], ci, xs[2], xs[3]}, static_cast<uint32_t>(10 + total)));
      parts_l.push_back(nhwc(parts.back()));
      total += ci;
    }
    const Shape ys = {xs[0], total, xs[2], xs[3]};
    Tensor y0 = Tensor::empty(ys), y1 = Tensor::empty(ys, DType::f32, Device::cpu(), kNhwc);
    concat_channels_forward(parts, y0, kCpu);
    concat_channels_forward(parts_l, y1, kCpu);
    expect_same_bits(y0, y1, "concat_channels_forward");
    const Tensor dy = random_tensor(ys, 20), dyl = nhwc(dy);
    std::vector<Tensor> dx0, dx1;
    for (const Tensor& p : parts) {
      dx0.push_back(Tensor::empty(p.shape()));
      dx1.push_back(Tensor::empty(p.shape(), DType::f32, Device::cpu(), kNhwc));
    }
    concat_channels_backward(dy, dx0, kCpu);
    concat_channels_backward(dyl, dx1, kCpu);
    for (size_t i = 0; i < dx0.size(); ++i)
      expect_same_bits(dx0[i], dx1[i], "concat_channels_backward part " + std::to_string(i));
  }
}

TEST(ChannelsLastChannelOps, ChannelScaleMatchesNchw) {
  for (const Shape& xs : kShapes)
    for (bool with_dx : {true, false}) {
      SCOPED_TRACE(shape_str(xs) + (with_dx ? " dx" : " no dx"));
      const Tensor x = random_tensor(xs, 1, -2.f, 2.f), g = random_tensor({xs[0], xs[1]}, 2, 0.f, 1.f);
      const Tensor dy = random_tensor(xs, 3);
      const Tensor xl = nhwc(x), dyl = nhwc(dy);
      Tensor y0 = Tensor::empty(xs), y1 = Tensor::empty_like(xl);
      channel_scale_forward(x, g, y0, kCpu);
      channel_scale_forward(xl, g, y1, kCpu);
      expect_same_bits(y0, y1, "channel_scale_forward");
      Tensor dx0 = with_dx ? Tensor::empty(xs) : Tensor(), dx1 = with_dx ? Tensor::empty_like(xl) : Tensor();
      Tensor dg0 = Tensor::empty(g.shape()), dg1 = Tensor::empty(g.shape());
      channel_scale_backward(x, g, dy, dx0, dg0, kCpu);
      channel_scale_backward(xl, g, dyl, dx1, dg1, kCpu);
      if (with_dx) expect_same_bits(dx0, dx1, "dx");
      expect_same_bits(dg0, dg1, "dg (the sum over h, w in the same order)");
    }
}

// ---- BatchNorm ----------------------------------------------------------------------------------

bool trainable(const Shape& xs) { return xs[0] * xs[2] * xs[3] > 1; }

TEST(ChannelsLastBatchNorm, ForwardTrainAndEvalMatchNchw) {
  for (const Shape& xs : kShapes)
    for (bool affine : {true, false})
      for (bool fused : {false, true}) {
        SCOPED_TRACE(shape_str(xs) + (affine ? " affine" : " plain") + (fused ? " +relu" : ""));
        const int64_t C = xs[1];
        const Tensor x = random_tensor(xs, 1, -2.f, 3.f), xl = nhwc(x);
        auto train = fused ? batchnorm_relu_forward_train : batchnorm2d_forward_train;
        auto eval = fused ? batchnorm_relu_forward_eval : batchnorm2d_forward_eval;
        if (trainable(xs)) {
          BnParams a(C, affine), b(C, affine);
          Tensor y0 = Tensor::empty(xs), m0 = Tensor::empty({C}), v0 = Tensor::empty({C});
          Tensor y1 = Tensor::empty_like(xl), m1 = Tensor::empty({C}), v1 = Tensor::empty({C});
          train({}, x, a.gamma, a.beta, a.rm, a.rv, true, y0, m0, v0, kCpu);
          train({}, xl, b.gamma, b.beta, b.rm, b.rv, true, y1, m1, v1, kCpu);
          expect_format(y1, kNhwc, "train y");
          expect_same_bits(y0, y1, "train y");
          expect_same_bits(m0, m1, "saved_mean");
          expect_same_bits(v0, v1, "saved_invstd");
          expect_same_bits(a.rm, b.rm, "running_mean");
          expect_same_bits(a.rv, b.rv, "running_var");
        }
        BnParams p(C, affine);
        Tensor y0 = Tensor::empty(xs), m0 = Tensor::empty({C}), v0 = Tensor::empty({C});
        Tensor y1 = Tensor::empty_like(xl), m1 = Tensor::empty({C}), v1 = Tensor::empty({C});
        eval({}, x, p.gamma, p.beta, p.rm, p.rv, y0, m0, v0, kCpu);
        eval({}, xl, p.gamma, p.beta, p.rm, p.rv, y1, m1, v1, kCpu);
        expect_same_bits(y0, y1, "eval y");
        expect_same_bits(v0, v1, "eval saved_invstd");
      }
}

TEST(ChannelsLastBatchNorm, BackwardMatchesNchwAndAccumulates) {
  for (const Shape& xs : kShapes)
    for (bool batch_stats : {true, false})
      for (bool fused : {false, true})
        for (bool with_dx : {true, false}) {
          if (batch_stats && !trainable(xs)) continue;
          SCOPED_TRACE(shape_str(xs) + (batch_stats ? " train" : " eval") + (fused ? " +relu" : "") +
                       (with_dx ? " dx" : " no dx"));
          const int64_t C = xs[1];
          const Tensor x = random_tensor(xs, 3, -2.f, 2.f), dy = random_tensor(xs, 4);
          const Tensor xl = nhwc(x), dyl = nhwc(dy);
          BnParams p(C, true);
          Tensor y = Tensor::empty(xs), mean = Tensor::empty({C}), invstd = Tensor::empty({C});
          batchnorm_relu_forward_train({}, x, p.gamma, p.beta, p.rm, p.rv, false, y, mean, invstd, kCpu);
          const Tensor yl = nhwc(y);
          Tensor dx0 = with_dx ? Tensor::empty(xs) : Tensor(), dx1 = with_dx ? Tensor::empty_like(xl) : Tensor();
          // Parameter gradients accumulate onto the same non-zero start in both formats.
          Tensor dg0 = random_tensor({C}, 5), db0 = random_tensor({C}, 6);
          Tensor dg1 = dg0.clone(), db1 = db0.clone();
          if (fused) {
            batchnorm_relu_backward(batch_stats, x, y, dy, p.gamma, mean, invstd, dx0, dg0, db0, kCpu);
            batchnorm_relu_backward(batch_stats, xl, yl, dyl, p.gamma, mean, invstd, dx1, dg1, db1, kCpu);
          } else {
            batchnorm2d_backward(batch_stats, x, dy, p.gamma, mean, invstd, dx0, dg0, db0, kCpu);
            batchnorm2d_backward(batch_stats, xl, dyl, p.gamma, mean, invstd, dx1, dg1, db1, kCpu);
          }
          if (with_dx) expect_same_bits(dx0, dx1, "dx");
          expect_same_bits(dg0, dg1, "dgamma");
          expect_same_bits(db0, db1, "dbeta");
        }
}

void expect_same_doubles(const std::vector<double>& a, const std::vector<double>& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_EQ(std::memcmp(&a[i], &b[i], sizeof(double)), 0) << what << "[" << i << "]: " << a[i] << " vs " << b[i];
}

TEST(ChannelsLastBatchNorm, SyncBatchNormPiecesMatchNchw) {
  for (const Shape& xs : kShapes) {
    SCOPED_TRACE(shape_str(xs));
    const int64_t C = xs[1];
    const Tensor x = random_tensor(xs, 1, -2.f, 2.f), dy = random_tensor(xs, 2);
    const Tensor xl = nhwc(x), dyl = nhwc(dy);
    std::vector<double> s0, s1;
    batchnorm2d_channel_sums(x, s0, kCpu);
    batchnorm2d_channel_sums(xl, s1, kCpu);
    expect_same_doubles(s0, s1, "channel_sums");
    const Tensor mean = random_tensor({C}, 3, -0.2f, 0.2f), invstd = random_tensor({C}, 4, 0.5f, 2.f);
    const Tensor gamma = random_tensor({C}, 5, 0.5f, 1.5f);
    std::vector<double> b0, b1;
    batchnorm2d_backward_sums(x, dy, mean, invstd, b0, kCpu);
    batchnorm2d_backward_sums(xl, dyl, mean, invstd, b1, kCpu);
    expect_same_doubles(b0, b1, "backward_sums");
    Tensor dx0 = Tensor::empty(xs), dx1 = Tensor::empty_like(xl);
    const double count = 3.0 * static_cast<double>(xs[0] * xs[2] * xs[3]);
    batchnorm2d_backward_dx(x, dy, gamma, mean, invstd, b0, count, dx0, kCpu);
    batchnorm2d_backward_dx(xl, dyl, gamma, mean, invstd, b1, count, dx1, kCpu);
    expect_same_bits(dx0, dx1, "backward_dx");
  }
}

// ---- fused SE scale + residual + ReLU -----------------------------------------------------------

TEST(ChannelsLastFused, SeScaleResidualReluMatchesNchw) {
  for (const Shape& xs : kShapes) {
    SCOPED_TRACE(shape_str(xs));
    const Tensor x = random_tensor(xs, 1, -2.f, 2.f), g = random_tensor({xs[0], xs[1]}, 2, 0.01f, 0.99f);
    const Tensor sc = random_tensor(xs, 3), dy = random_tensor(xs, 4);
    const Tensor xl = nhwc(x), scl = nhwc(sc), dyl = nhwc(dy);
    Tensor y0 = Tensor::empty(xs), y1 = Tensor::empty_like(xl);
    se_scale_residual_relu_forward(x, g, sc, y0, kCpu);
    se_scale_residual_relu_forward(xl, g, scl, y1, kCpu);
    expect_same_bits(y0, y1, "forward");
    Tensor dx0 = Tensor::empty(xs), dg0 = Tensor::empty(g.shape()), ds0 = Tensor::empty(xs);
    Tensor dx1 = Tensor::empty_like(xl), dg1 = Tensor::empty(g.shape()), ds1 = Tensor::empty_like(xl);
    se_scale_residual_relu_backward(x, g, y0, dy, dx0, dg0, ds0, kCpu);
    se_scale_residual_relu_backward(xl, g, y1, dyl, dx1, dg1, ds1, kCpu);
    expect_same_bits(dx0, dx1, "dx");
    expect_same_bits(dg0, dg1, "dg");
    expect_same_bits(ds0, ds1, "dshortcut");
  }
}

// ---- pools ----------------------------------------------------------------------------------

TEST(ChannelsLastPool, MaxPoolMatchesNchwIncludingArgmax) {
  const std::vector<MaxPool2dParams> params = {{3, 2, 1}, {2, 2, 0}, {3, 1, 1}, {2, 1, 1}};
  for (const Shape& xs : kShapes)
    for (const MaxPool2dParams& p : params)
      for (bool ties : {false, true}) {
        if (xs[2] + 2 * p.pad < p.kernel || xs[3] + 2 * p.pad < p.kernel) continue;
        SCOPED_TRACE(shape_str(xs) + " k" + std::to_string(p.kernel) + " s" + std::to_string(p.stride) + " p" +
                     std::to_string(p.pad) + (ties ? " ties" : ""));
        Tensor x = random_tensor(xs, 1, -2.f, 2.f);
        if (ties)  // few distinct values: equal maxima, where the first one must win in both formats
          for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = std::round(x.data<float>()[i]);
        const Tensor xl = nhwc(x);
        const Shape ys = maxpool2d_output_shape(p, xs);
        Tensor y0 = Tensor::empty(ys), a0 = Tensor::empty(ys, DType::i32);
        Tensor y1 = Tensor::empty(ys, DType::f32, Device::cpu(), kNhwc);
        Tensor a1 = Tensor::empty(ys, DType::i32, Device::cpu(), kNhwc);
        maxpool2d_forward(p, x, y0, a0, kCpu);
        maxpool2d_forward(p, xl, y1, a1, kCpu);
        expect_same_bits(y0, y1, "y");
        expect_same_bits(a0, a1, "argmax (the h*W+w index in the plane)");
        const Tensor dy = random_tensor(ys, 2), dyl = nhwc(dy);
        Tensor dx0 = Tensor::empty(xs), dx1 = Tensor::empty_like(xl);
        maxpool2d_backward(p, dy, a0, dx0, kCpu);
        maxpool2d_backward(p, dyl, a1, dx1, kCpu);
        expect_same_bits(dx0, dx1, "dx");
      }
}

TEST(ChannelsLastPool, GlobalAvgPoolMatchesNchw) {
  for (const Shape& xs : kShapes) {
    SCOPED_TRACE(shape_str(xs));
    const Tensor x = random_tensor(xs, 1), xl = nhwc(x);
    Tensor y0 = Tensor::empty({xs[0], xs[1]}), y1 = Tensor::empty({xs[0], xs[1]});
    global_avgpool_forward(x, y0, kCpu);
    global_avgpool_forward(xl, y1, kCpu);
    expect_same_bits(y0, y1, "forward");
    const Tensor dy = random_tensor({xs[0], xs[1]}, 2);
    Tensor dx0 = Tensor::empty(xs), dx1 = Tensor::empty_like(xl);
    global_avgpool_backward(dy, dx0, kCpu);
    global_avgpool_backward(dy, dx1, kCpu);
    expect_format(dx1, kNhwc, "global_avgpool_backward");
    expect_same_bits(dx0, dx1, "backward");
  }
}

// ---- conv2d -----------------------------------------------------------------------------------

const std::vector<ConvCase> kConvCases = {
    {conv_params(1, 1), {2, 16, 13, 15}, {17, 16, 3, 3}, "3x3 s1 p1 (winograd)"},
    {conv_params(1, 1), {1, 3, 7, 9}, {5, 3, 3, 3}, "3x3 s1 p1 few channels"},
    {conv_params(1, 0), {3, 13, 5, 7}, {6, 13, 1, 1}, "1x1 pointwise"},
    {conv_params(1, 0), {1, 9, 6, 5}, {1, 9, 1, 1}, "1x1 pointwise N=1"},
    {conv_params(2, 1), {2, 5, 9, 8}, {7, 5, 3, 3}, "3x3 s2"},
    {conv_params(2, 3), {2, 1, 17, 15}, {8, 1, 7, 7}, "7x7 s2 p3 stem"},
    {conv_params(1, 2, 2), {1, 4, 11, 10}, {3, 4, 3, 3}, "3x3 dilated 2"},
    {conv_params(1, 1, 1, 2), {2, 6, 7, 7}, {4, 3, 3, 3}, "3x3 groups 2"},
    {conv_params(1, 1), {4, 24, 2, 2}, {24, 24, 3, 3}, "2x2 planes"},
};

TEST(ChannelsLastConv, ForwardAndBackwardMatchNchw) {
  ASSERT_TRUE(cpu::winograd_applies(kConvCases[0].p, kConvCases[0].x, kConvCases[0].w)) << "covers the Winograd path";
  for (const ConvCase& c : kConvCases)
    for (MemoryFormat wf : {kNchw, kNhwc})
      for (MemoryFormat dwf : {kNchw, kNhwc}) {
        SCOPED_TRACE(c.name + (wf == kNhwc ? " w channels_last" : " w nchw") +
                     (dwf == kNhwc ? " dw channels_last" : " dw nchw"));
        const Shape ys = conv2d_output_shape(c.p, c.x, c.w);
        const Tensor x = random_tensor(c.x, 1), w = random_tensor(c.w, 2, -0.5f, 0.5f), b = random_tensor({c.w[0]}, 3);
        const Tensor dy = random_tensor(ys, 4);
        const Tensor xl = nhwc(x), wl = to_format(w, wf, kCpu), dyl = nhwc(dy);
        Tensor y0 = Tensor::empty(ys), y1 = Tensor::empty(ys, DType::f32, Device::cpu(), kNhwc);
        conv2d_forward(c.p, x, w, b, y0, kCpu);
        conv2d_forward(c.p, xl, wl, b, y1, kCpu);
        expect_format(y1, kNhwc, "y");
        expect_same_bits(y0, y1, "y");
        // dx overwritten; dw, db accumulate onto the same non-zero values in both runs.
        Tensor dx0 = Tensor::empty(c.x), dx1 = Tensor::empty_like(xl);
        const Tensor dw_start = random_tensor(c.w, 5), db_start = random_tensor({c.w[0]}, 6);
        Tensor dw0 = dw_start.clone(), dw1 = copy_in(dw_start, dwf);
        Tensor db0 = db_start.clone(), db1 = db_start.clone();
        conv2d_backward(c.p, x, w, dy, dx0, dw0, db0, kCpu);
        conv2d_backward(c.p, xl, wl, dyl, dx1, dw1, db1, kCpu);
        expect_format(dx1, kNhwc, "dx");
        expect_format(dw1, dwf, "dw");
        expect_same_bits(dx0, dx1, "dx");
        expect_same_bits(dw0, dw1, "dw");
        expect_same_bits(db0, db1, "db");
      }
}

TEST(ChannelsLastConv, NchwInputWithChannelsLastWeight) {
  const ConvCase& c = kConvCases[0];
  const Shape ys = conv2d_output_shape(c.p, c.x, c.w);
  const Tensor x = random_tensor(c.x, 1), w = random_tensor(c.w, 2, -0.5f, 0.5f), dy = random_tensor(ys, 4);
  Tensor y0 = Tensor::empty(ys), y1 = Tensor::empty(ys), none;
  conv2d_forward(c.p, x, w, none, y0, kCpu);
  conv2d_forward(c.p, x, nhwc(w), none, y1, kCpu);
  expect_same_bits(y0, y1, "y");
  Tensor dx0 = Tensor::empty(c.x), dx1 = Tensor::empty(c.x);
  Tensor dw0 = random_tensor(c.w, 5), dw1 = nhwc(dw0);
  conv2d_backward(c.p, x, w, dy, dx0, dw0, none, kCpu);
  conv2d_backward(c.p, x, nhwc(w), dy, dx1, dw1, none, kCpu);
  expect_same_bits(dx0, dx1, "dx");
  expect_same_bits(dw0, dw1, "dw");
}

// ---- mixed formats are refused, naming the op ------------------------------------------------

TEST(ChannelsLastErrors, MixedFormatsNameTheOp) {
  const Shape xs = {2, 3, 4, 5};
  const Tensor x = random_tensor(xs, 1), xl = nhwc(x);
  Tensor y = Tensor::empty(xs), yl = Tensor::empty_like(xl);
  expect_error([&] { add(x, xl, y, kCpu); }, {"add", "b [2, 3, 4, 5] is channels_last", "a [2, 3, 4, 5] is nchw"});
  expect_error([&] { relu_forward(xl, y, kCpu); }, {"relu_forward", "y [2, 3, 4, 5] is nchw", "channels_last"});
  Tensor mask = Tensor::empty(xs, DType::u8);
  expect_error([&] { dropout_forward(0.5f, 1, 0, xl, yl, mask, kCpu); }, {"dropout_forward", "mask", "nchw"});
  expect_error([&] { channel_scale_forward(xl, random_tensor({2, 3}, 2), y, kCpu); },
               {"channel_scale_forward", "y", "channels_last"});
  std::vector<Tensor> parts = {x, xl};
  Tensor cat = Tensor::empty({2, 6, 4, 5});
  expect_error([&] { concat_channels_forward(parts, cat, kCpu); },
               {"concat_channels_forward", "part 1", "channels_last", "nchw"});
  Tensor mean = Tensor::empty({3}), invstd = Tensor::empty({3}), none;
  expect_error([&] { batchnorm2d_forward_train({}, xl, none, none, none, none, false, y, mean, invstd, kCpu); },
               {"batchnorm2d_forward_train", "output [2, 3, 4, 5] is nchw", "channels_last"});
  Tensor dx = Tensor::empty(xs), dg = Tensor::zeros({3}), db = Tensor::zeros({3});
  expect_error([&] { batchnorm2d_backward(true, xl, yl, none, mean, invstd, dx, dg, db, kCpu); },
               {"batchnorm2d_backward", "dx", "nchw"});
  expect_error([&] { batchnorm_relu_forward_eval({}, x, none, none, mean, invstd, yl, mean, invstd, kCpu); },
               {"batchnorm_relu_forward_eval", "output", "channels_last"});
  expect_error([&] { se_scale_residual_relu_forward(xl, random_tensor({2, 3}, 2), x, yl, kCpu); },
               {"se_scale_residual_relu_forward", "shortcut", "nchw"});
  const MaxPool2dParams mp{3, 2, 1};
  const Shape ps = maxpool2d_output_shape(mp, xs);
  Tensor py = Tensor::empty(ps), pa = Tensor::empty(ps, DType::i32, Device::cpu(), kNhwc);
  expect_error([&] { maxpool2d_forward(mp, xl, py, pa, kCpu); }, {"maxpool2d_forward", "output", "nchw"});
  Tensor py_l = Tensor::empty(ps, DType::f32, Device::cpu(), kNhwc), pa_n = Tensor::empty(ps, DType::i32);
  expect_error([&] { maxpool2d_forward(mp, xl, py_l, pa_n, kCpu); }, {"maxpool2d_forward", "argmax", "nchw"});
  expect_error([&] { maxpool2d_backward(mp, py_l, pa, dx, kCpu); }, {"maxpool2d_backward", "dx", "nchw"});
  const Conv2dParams cp = conv_params(1, 1);
  const Tensor w = random_tensor({4, 3, 3, 3}, 3);
  Tensor cy = Tensor::empty({2, 4, 4, 5});
  expect_error([&] { conv2d_forward(cp, xl, w, none, cy, kCpu); },
               {"conv2d_forward", "output [2, 4, 4, 5] is nchw", "input [2, 3, 4, 5] is channels_last"});
  Tensor cdx = Tensor::empty_like(xl), cdw = Tensor::zeros({4, 3, 3, 3});
  expect_error([&] { conv2d_backward(cp, xl, w, cy, cdx, cdw, none, kCpu); },
               {"conv2d_backward", "dy [2, 4, 4, 5] is nchw", "channels_last"});
}

TEST(ChannelsLastErrors, OptimizerStillRefusesChannelsLast) {
  // The optimizers update parameters, which stay nchw (layers/module.h); a channels_last one is
  // refused by name rather than updated in an unexpected order.
  Tensor param = nhwc(random_tensor({4, 3, 3, 3}, 1)), grad = nhwc(random_tensor({4, 3, 3, 3}, 2)), none;
  SgdParams p;
  p.momentum = 0.f;
  expect_error([&] { sgd_step(p, true, param, grad, none, kCpu); },
               {"sgd_step", "channels_last", "[4, 3, 3, 3]", "not supported on the CPU"});
}

}  // namespace
}  // namespace lancet
