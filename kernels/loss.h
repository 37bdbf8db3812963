// loss.h — softmax cross-entropy with PyTorch's nn.CrossEntropyLoss semantics, mean reduction.
//
// logits [N, K] f32, labels [N] i64 in [0, K) (out-of-range labels throw naming the index and
// value), class_weights [K] optional (undefined = all ones), label_smoothing in [0, 1).
// With weights w and smoothing e, per sample i with label y_i and log-probabilities lp:
//   l_i = (1 - e) * w[y_i] * (-lp[y_i]) + (e / K) * sum_k w[k] * (-lp[k])
// and the loss is sum_i l_i / sum_i w[y_i] (= mean when unweighted), as in torch.
// dlogits [N, K] (overwritten; may be undefined) is d loss / d logits.
// probs [N, K] (optional, overwritten) receives the softmax probabilities.
#pragma once
#include "kernels/tensor.h"

namespace lancet {

float softmax_cross_entropy(const Tensor& logits, const Tensor& labels, const Tensor& class_weights,
                            float label_smoothing, Tensor& dlogits, Tensor& probs, const Stream& s);

}  // namespace lancet
