// cuda/conv_util.h — the small kernels the cuDNN / cuBLASLt twins share (conv.cu, linear.cu):
// per-channel bias and bias gradient, NCHW <-> channels_last conversion, f32 -> 16-bit casts
// and 16-bit -> f32 accumulation.
//
// Per-channel ops see a tensor as [outer, C, inner]: NCHW [N, C, H, W] is outer N, inner H*W;
// channels_last is outer N*H*W, inner 1; a Linear activation [N, C] is outer N, inner 1.
// Everything is enqueued on `s` (no host sync); callers hold a CudaDeviceGuard for s's device
// and have checked devices, shapes and dtypes. No CUDA header here.
#pragma once
#include <string>

#include "kernels/error.h"
#include "kernels/tensor.h"

namespace lancet::cuda {

// Argument checks worded like the CPU twins' (kernels/cpu_util.h, which CUDA files can't include:
// its OpenMP pragmas). "input [2, 3, 8, 8]" for messages:
inline std::string desc(const char* name, const Tensor& t) { return std::string(name) + " " + t.shape_str(); }
inline void require_defined(const char* op, const char* name, const Tensor& t) {
  LANCET_CHECK(t.defined(), op << ": " << name << " is an undefined tensor");
}
// `t` must have shape `expected`, which follows from `context` (the operands it derives from).
inline void require_shape(const char* op, const char* name, const Tensor& t, const Shape& expected,
                          const std::string& context) {
  require_defined(op, name, t);
  LANCET_CHECK(t.shape() == expected, op << ": " << name << " " << t.shape_str() << " does not match " << context
                                         << " (expected " << shape_str(expected) << ")");
}

struct ChannelView {
  int64_t outer, channels, inner;
};
ChannelView channel_view(const Tensor& t);  // 2-D [N, C] or 4-D in its memory format

// y[o, c, i] += b[c]; y f32/f16/bf16, b f32 [C] (added in f32, rounded once to y's dtype).
void add_channel_bias(Tensor& y, const Tensor& b, const Stream& s);

// db[c] += sum over o, i of dy[o, c, i]; dy f32/f16/bf16, db f32 [C]. Deterministic: fixed
// chunks summed in f32, chunk sums added in order in f64 (the CPU twins sum in f64 too).
void accumulate_channel_sum(const Tensor& dy, Tensor& db, const Stream& s);

// dst = src (accumulate false) or dst += src (true), element by logical [N, C, H, W] index,
// where src and dst have the same shape and dtype but different memory formats.
void convert_format(const Tensor& src, Tensor& dst, bool accumulate, const Stream& s);

// dst += src element by logical [N, C, H, W] index, where dst is f32 and src f32, f16 or bf16
// of the same shape in either memory format: a 16-bit weight gradient added to the FP32 one.
void accumulate_into_f32(const Tensor& src, Tensor& dst, const Stream& s);

// dst = src rounded to dst's dtype (f32, f16, bf16); src f32, same numel.
void cast_from_f32(const Tensor& src, Tensor& dst, const Stream& s);

}  // namespace lancet::cuda
