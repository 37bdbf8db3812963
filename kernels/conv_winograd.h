// conv_winograd.h — internal to kernels/conv.cpp: Winograd F(2x2, 3x3) (Lavin & Gray, 2016)
// for 3x3, stride-1, undilated, ungrouped convolutions on the CPU.
//
// Each 2x2 output tile costs 16 multiplies per (input, output) channel pair instead of 36, so
// these layers (most of MedicalCNN's work) need 2.25x fewer multiply-adds than im2col + GEMM;
// every product still goes through sgemm (16 GEMMs, one per transformed tile element).
// Same contract as conv2d_forward / conv2d_backward (y, dx overwritten; dw accumulated);
// work is split by shape only, so results do not depend on the thread count.
#pragma once
#include <cstdint>

#include "kernels/conv.h"

namespace lancet::cpu {

struct WinogradShape {
  int64_t N, C, H, W;  // input
  int64_t Co, Ho, Wo;  // output
  int64_t ph, pw;      // padding
};

// Whether the Winograd path handles this convolution (and is expected to beat im2col).
bool winograd_applies(const Conv2dParams& p, const Shape& x, const Shape& w);

void winograd_forward(const WinogradShape& s, const float* x, const float* w, const float* b, float* y);
void winograd_backward_data(const WinogradShape& s, const float* w, const float* dy, float* dx);
void winograd_backward_weight(const WinogradShape& s, const float* x, const float* dy, float* dw);

}  // namespace lancet::cpu
