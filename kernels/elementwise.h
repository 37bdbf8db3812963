// elementwise.h — add, scale, concat/split along channels, SE channel scale, memory-format
// conversion and small tensor utilities (see conv.h for the common contract).
//
// Memory formats: every op takes nchw or channels_last 4-D tensors as long as all the 4-D
// tensors of one call share the format (2-D g / dg [N, C] have none); otherwise it throws
// naming both. On the CPU a channels_last call gives, element by logical index, bit for bit the
// nchw call's result (sum_squares too: it adds in logical order). The CUDA twins state their
// own format support (kernels/cuda/elementwise.h).
#pragma once
#include <vector>

#include "kernels/tensor.h"

namespace lancet {

void fill(Tensor& y, float value, const Stream& s);
void add(const Tensor& a, const Tensor& b, Tensor& y, const Stream& s);   // y = a + b (y may alias a or b)
void add_inplace(Tensor& y, const Tensor& x, const Stream& s);            // y += x
void axpy(float alpha, const Tensor& x, Tensor& y, const Stream& s);      // y += alpha * x
void scale_inplace(Tensor& y, float alpha, const Stream& s);               // y *= alpha

// xs[i]: [N, C_i, H, W] -> y [N, sum C_i, H, W], xs[0] first.
void concat_channels_forward(const std::vector<Tensor>& xs, Tensor& y, const Stream& s);
// dy [N, sum C_i, H, W] -> dxs[i] [N, C_i, H, W] overwritten.
void concat_channels_backward(const Tensor& dy, std::vector<Tensor>& dxs, const Stream& s);

// Squeeze-excitation scale: y[n,c,h,w] = x[n,c,h,w] * g[n,c]; x [N,C,H,W], g [N,C].
void channel_scale_forward(const Tensor& x, const Tensor& g, Tensor& y, const Stream& s);
// dx = dy * g (overwritten, may be undefined); dg[n,c] = sum_hw dy * x (overwritten).
void channel_scale_backward(const Tensor& x, const Tensor& g, const Tensor& dy, Tensor& dx, Tensor& dg,
                            const Stream& s);

// dst = src converted to dst's dtype, element by element over memory: f32, f16 and bf16 in any
// direction, each element rounded once to nearest even (half_t / bfloat16_t, the rounding of
// the CPU emulation in kernels/dtype.h: fp16 overflows to +-inf, keeps subnormals, NaN stays
// NaN — its payload may differ between the devices); a plain copy when the dtypes match. src
// and dst have the same shape and memory format and must not overlap. The model's entry and
// exit under mixed precision on a GPU, and the low-precision weight copies (layers/module.h).
void cast(const Tensor& src, Tensor& dst, const Stream& s);
// src itself when it already has dtype t, else a new tensor of dtype t (same shape, device and
// memory format) filled by cast().
Tensor cast_to(const Tensor& src, DType t, const Stream& s);

// Sum of squares of all elements (f32, computed in double on CPU, in logical nchw order for
// either format); used for gradient norms.
double sum_squares(const Tensor& x, const Stream& s);
// True when every element is finite.
bool all_finite(const Tensor& x, const Stream& s);

// dst = src laid out in dst's memory format: same shape and dtype (any dtype on the CPU; f32,
// f16 or bf16 when the formats differ on a GPU), element copied by logical [N, C, H, W] index;
// a plain copy when the formats match. src and dst must not overlap.
void convert_format(const Tensor& src, Tensor& dst, const Stream& s);
// x itself when it already has format f (a tensor that is not 4-D is always nchw), else a new
// tensor in format f (same shape, dtype and device) filled by convert_format().
Tensor to_format(const Tensor& x, MemoryFormat f, const Stream& s);

}  // namespace lancet
