// cuda/pool.h — the CUDA twins of kernels/pool.h (same arguments and contract; see that
// header). Host-only: no CUDA header, so kernels/pool.cpp can include it.
// Element types: x, y, dy, dx are f32, f16 or bf16, all of one dtype; argmax stays i32.
// Layout: nchw or channels_last, shared by the 4-D tensors of a call (x, y, argmax; dy, argmax,
// dx), else the op throws naming both. maxpool gives the same y, argmax (logical h * W + w) and
// dx in both layouts; global_avgpool's mean may differ in the last bit (another order of the
// double sum). Asynchronous on `s`; nothing synchronises with the host.
#pragma once
#include "kernels/pool.h"
#include "kernels/tensor.h"

namespace lancet::cuda {

// argmax equals the CPU twin's (row-major scan, first maximum wins, a NaN wins over numbers).
void maxpool2d_forward(const MaxPool2dParams& p, const Tensor& x, Tensor& y, Tensor& argmax, const Stream& s);
// A gather: each dx element sums, in row-major window order, the dy of the windows that
// contain it and whose argmax points at it (deterministic, no atomics, and the same float
// additions in the same order as the CPU scatter). argmax must come from maxpool2d_forward
// with the same params: unlike the CPU twin it is not validated (that would need a host
// sync), and an index outside its own window is ignored rather than reported.
void maxpool2d_backward(const MaxPool2dParams& p, const Tensor& dy, const Tensor& argmax, Tensor& dx,
                        const Stream& s);

void global_avgpool_forward(const Tensor& x, Tensor& y, const Stream& s);
void global_avgpool_backward(const Tensor& dy, Tensor& dx, const Stream& s);

}  // namespace lancet::cuda
