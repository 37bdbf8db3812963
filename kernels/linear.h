// linear.h — fully connected layer y = x w^T + b (PyTorch Linear), see conv.h for the contract.
// x [N, in], w [out, in], b [out] (optional), y [N, out]. On a GPU x, w, y, dy, dx, dw share
// one dtype (f32, f16, bf16), or dw is f32 with f16/bf16 operands (mixed precision: the GEMM
// accumulates into the FP32 gradient directly); b and db are f32.
#pragma once
#include "kernels/tensor.h"

namespace lancet {

void linear_forward(const Tensor& x, const Tensor& w, const Tensor& b, Tensor& y, const Stream& s);
// dx overwritten (may be undefined); dw, db accumulated (may be undefined).
void linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor& dx, Tensor& dw, Tensor& db,
                     const Stream& s);

}  // namespace lancet
