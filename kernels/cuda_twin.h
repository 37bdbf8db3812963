// cuda_twin.h — how an op in kernels/*.cpp hands CUDA tensors to its CUDA twin.
//
// Every op has one public entry point (declared in kernels/<family>.h). The CPU code lives in
// kernels/<family>.cpp; the CUDA twin, with the same arguments, in kernels/cuda/<family>.cu,
// declared in namespace lancet::cuda by kernels/cuda/<family>.h. The entry point's first line
//   LANCET_CUDA_TWIN(x, conv2d_forward(p, x, w, b, y, s));
// returns the twin's result when the dispatch tensor `x` is on a GPU. Without a CUDA build no
// tensor can be on a GPU (the allocator refuses), so the line compiles to nothing.
#pragma once

#ifdef LANCET_WITH_CUDA
#define LANCET_CUDA_TWIN(dispatch_tensor, call) \
  if ((dispatch_tensor).defined() && (dispatch_tensor).device().is_cuda()) return ::lancet::cuda::call
#else
#define LANCET_CUDA_TWIN(dispatch_tensor, call) static_cast<void>(0)
#endif
