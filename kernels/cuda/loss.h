// cuda/loss.h — the CUDA twin of kernels/loss.h (same arguments and contract; see that header).
// Host-only: no CUDA header, so kernels/loss.cpp can include it.
// logits, dlogits, probs: f32, f16 or bf16 (one dtype; math in double like the CPU twin);
// labels i64 and class_weights f32 on the same GPU.
// Returns the loss on the host: one 48-byte copy back and one synchronisation of `s`, after
// every kernel of the op has been issued. An out-of-range label is found on the device and
// throws after that sync with the CPU twin's message (the first bad sample); dlogits and
// probs are then unspecified (the CPU twin leaves them untouched).
#pragma once
#include "kernels/tensor.h"

namespace lancet::cuda {

float softmax_cross_entropy(const Tensor& logits, const Tensor& labels, const Tensor& class_weights,
                            float label_smoothing, Tensor& dlogits, Tensor& probs, const Stream& s);

}  // namespace lancet::cuda
