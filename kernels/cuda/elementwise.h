// cuda/elementwise.h — the CUDA twins of kernels/elementwise.h (same arguments and contract;
// see that header). Host-only: no CUDA header, so kernels/elementwise.cpp can include it.
// Element types: every float tensor of a call is f32, f16 or bf16, all of one dtype (cast
// excepted)
// (arithmetic in float; sums of products accumulate in double like the CPU twins).
// Elementwise ops (fill, add, axpy, ...) need one memory format across their tensors; the
// per-channel ops (concat, channel_scale) take nchw or channels_last, shared by all their 4-D
// tensors (g, dg [N, C] have none), and give the nchw results (dg: up to the order of its
// double sum) — channels_last reads run along C.
// All ops are asynchronous on `s` except sum_squares and all_finite, which return a host
// value: they copy 8 (4) bytes back and synchronise `s` only.
#pragma once
#include <vector>

#include "kernels/tensor.h"

namespace lancet::cuda {

void fill(Tensor& y, float value, const Stream& s);
void add(const Tensor& a, const Tensor& b, Tensor& y, const Stream& s);
void add_inplace(Tensor& y, const Tensor& x, const Stream& s);
void axpy(float alpha, const Tensor& x, Tensor& y, const Stream& s);
void scale_inplace(Tensor& y, float alpha, const Stream& s);

// Any of f32, f16, bf16 into any (see kernels/elementwise.h); same shape and memory format.
void cast(const Tensor& src, Tensor& dst, const Stream& s);

void concat_channels_forward(const std::vector<Tensor>& xs, Tensor& y, const Stream& s);
void concat_channels_backward(const Tensor& dy, std::vector<Tensor>& dxs, const Stream& s);

// g, dg have x's dtype (the gate comes from the same precision as the features).
void channel_scale_forward(const Tensor& x, const Tensor& g, Tensor& y, const Stream& s);
void channel_scale_backward(const Tensor& x, const Tensor& g, const Tensor& dy, Tensor& dx, Tensor& dg,
                            const Stream& s);

// Deterministic: a fixed grid (by numel only) of double partials, summed in a fixed order.
double sum_squares(const Tensor& x, const Stream& s);
bool all_finite(const Tensor& x, const Stream& s);

}  // namespace lancet::cuda
