// activation.h — ReLU, sigmoid, dropout (see conv.h for the common contract).
// Any shape; x and y (and dy, dx, mask) have the same shape and memory format (nchw or
// channels_last: the ops work element by element over memory). y may alias x (in place) for
// forward.
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
// p == 0 copies x and sets the mask to all ones. The counter i is the element's MEMORY position,
// so a channels_last 4-D tensor draws a different mask than its nchw twin (MedicalCNN drops out
// only the 2-D head features, which have no memory format).
// Exactly (so CUDA and CPU masks agree bit for bit), with mix64 = splitmix64's finaliser
//   z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31
// and all arithmetic mod 2^64:
//   u = (mix64(mix64(seed) + (counter + 1) * 0x9E3779B97F4A7C15) >> 40) * 2^-24
float dropout_uniform(uint64_t seed, uint64_t counter);  // in [0, 1), a multiple of 2^-24
void dropout_forward(float p, uint64_t seed, uint64_t offset, const Tensor& x, Tensor& y, Tensor& mask,
                     const Stream& s);
void dropout_backward(float p, const Tensor& mask, const Tensor& dy, Tensor& dx, const Stream& s);

}  // namespace lancet
