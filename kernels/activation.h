// activation.h — ReLU, sigmoid, dropout (see conv.h for the common contract).
// Any shape; x and y (and dy, dx) have the same shape. y may alias x (in place) for forward.
#pragma once
#include <cstdint>

#include "kernels/tensor.h"

namespace lancet {

void relu_forward(const Tensor& x, Tensor& y, const Stream& s);
// Uses the forward OUTPUT y (y > 0 <=> x > 0), so x need not be kept. dx may alias dy.
void relu_backward(const Tensor& y, const Tensor& dy, Tensor& dx, const Stream& s);

void sigmoid_forward(const Tensor& x, Tensor& y, const Stream& s);
void sigmoid_backward(const Tensor& y, const Tensor& dy, Tensor& dx, const Stream& s);  // dx = dy*y*(1-y)

// Inverted dropout: keep element i when uniform(seed, offset + i) >= p, scaling kept values by
// 1/(1-p). The uniform comes from a counter-based hash of (seed, counter), so the same
// (seed, offset) gives the same mask on every device and thread count. mask: u8, same shape.
// p == 0 copies x and sets the mask to all ones.
float dropout_uniform(uint64_t seed, uint64_t counter);  // in [0, 1)
void dropout_forward(float p, uint64_t seed, uint64_t offset, const Tensor& x, Tensor& y, Tensor& mask,
                     const Stream& s);
void dropout_backward(float p, const Tensor& mask, const Tensor& dy, Tensor& dx, const Stream& s);

}  // namespace lancet
