// conv.h — 2-D convolution (PyTorch Conv2d semantics), forward and backward.
//
// Contract (all ops in kernels/ follow it):
//   * outputs are preallocated by the caller with the documented shape; forward outputs and
//     activation gradients (dx) are OVERWRITTEN; parameter gradients (dw, db) ACCUMULATE (+=)
//     so gradient accumulation over micro-batches needs no extra code.
//   * an undefined Tensor for an optional input/output means "none"/"don't compute".
//   * every op takes the Stream it runs on; the device comes from the tensors, which must
//     all be on the stream's device. CPU ops run synchronously on the calling thread's pool.
//   * f32 on CPU (half/bf16 arrive with mixed precision).
// Layout: x [N, Cin, H, W], w [Cout, Cin/groups, KH, KW], b [Cout], y [N, Cout, Ho, Wo].
#pragma once
#include "kernels/tensor.h"

namespace lancet {

struct Conv2dParams {
  int stride_h = 1, stride_w = 1;
  int pad_h = 0, pad_w = 0;
  int dilation_h = 1, dilation_w = 1;
  int groups = 1;
};

// [N, Cout, Ho, Wo] for the given input and weight shapes; throws naming both shapes on a
// mismatch (channel count, groups, or a kernel larger than the padded input).
Shape conv2d_output_shape(const Conv2dParams& p, const Shape& x, const Shape& w);

void conv2d_forward(const Conv2dParams& p, const Tensor& x, const Tensor& w, const Tensor& b, Tensor& y,
                    const Stream& s);

// dx (overwritten) may be undefined to skip the input gradient (e.g. the first layer);
// dw, db (accumulated) may be undefined to skip them.
void conv2d_backward(const Conv2dParams& p, const Tensor& x, const Tensor& w, const Tensor& dy, Tensor& dx,
                     Tensor& dw, Tensor& db, const Stream& s);

}  // namespace lancet
