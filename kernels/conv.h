// conv.h — 2-D convolution (PyTorch Conv2d semantics), forward and backward.
//
// Contract (all ops in kernels/ follow it):
//   * outputs are preallocated by the caller with the documented shape; forward outputs and
//     activation gradients (dx) are OVERWRITTEN; parameter gradients (dw, db) ACCUMULATE (+=)
//     so gradient accumulation over micro-batches needs no extra code.
//   * an undefined Tensor for an optional input/output means "none"/"don't compute".
//   * every op takes the Stream it runs on; the device comes from the tensors, which must
//     all be on the stream's device. CPU ops run synchronously on the calling thread's pool.
//   * f32 on CPU; on a GPU x, w, y, dy, dx, dw are f32, f16 or bf16 (all one dtype, computed in
//     f32), b and db stay f32. Mixed precision: with f16/bf16 operands dw may also be f32 (the
//     FP32 master weight's gradient; the 16-bit gradient is added to it).
// Layout: x [N, Cin, H, W], w [Cout, Cin/groups, KH, KW], b [Cout], y [N, Cout, Ho, Wo].
// Memory formats: x, y, dy, dx share one (nchw or channels_last); w and dw may each be either.
// On the CPU channels_last operands give bit for bit the nchw results (computed on nchw copies).
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

// ---- GPU convolution settings (process-wide; read by the CUDA twins, harmless without CUDA) ----
// Autotune: on a GPU, benchmark cuDNN's algorithms once per shape (input, weight, parameters,
// dtype, memory format, device, direction) and keep the fastest, like
// torch.backends.cudnn.benchmark; off (the default), cuDNN's heuristics choose, also once per
// shape. Either choice is cached for the life of the process.
void set_conv_autotune(bool on);
bool conv_autotune();
// TF32 tensor-core math for f32 convolutions (cuDNN) and f32 GEMMs (cuBLAS, Linear). PyTorch
// allows it for cuDNN convolutions by default; lancet does not (default off) so that f32 on a
// GPU matches the CPU reference at f32 tolerances. f16/bf16 always use tensor cores.
void set_allow_tf32(bool on);
bool allow_tf32();

}  // namespace lancet
