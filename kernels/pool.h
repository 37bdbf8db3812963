// pool.h — MaxPool2d and global average pooling (see conv.h for the common contract).
// Memory formats: the 4-D tensors of one call (x, y, argmax; dy, argmax, dx) are all nchw or
// all channels_last; on the CPU channels_last results equal the nchw ones bit for bit. The
// [N, C] tensors of global average pooling have no format (either for its 4-D side).
#pragma once
#include "kernels/tensor.h"

namespace lancet {

struct MaxPool2dParams {
  int kernel = 3, stride = 2, pad = 1;  // square windows; padding is -inf as in PyTorch
};

Shape maxpool2d_output_shape(const MaxPool2dParams& p, const Shape& x);

// x [N, C, H, W] -> y [N, C, Ho, Wo]; argmax [N, C, Ho, Wo] i32 holds the flat h*W+w index of
// the chosen input element within its (n, c) plane (first maximum wins, as in PyTorch), in
// either memory format (argmax is laid out like y; the index is logical, not a memory offset).
void maxpool2d_forward(const MaxPool2dParams& p, const Tensor& x, Tensor& y, Tensor& argmax, const Stream& s);
// dx [N, C, H, W] overwritten.
void maxpool2d_backward(const MaxPool2dParams& p, const Tensor& dy, const Tensor& argmax, Tensor& dx,
                        const Stream& s);

// x [N, C, H, W] -> y [N, C] (mean over H, W). Used by the head and by SE's squeeze.
void global_avgpool_forward(const Tensor& x, Tensor& y, const Stream& s);
// dy [N, C] -> dx [N, C, H, W] overwritten (dy / (H*W) broadcast).
void global_avgpool_backward(const Tensor& dy, Tensor& dx, const Stream& s);

}  // namespace lancet
