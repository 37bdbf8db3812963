#include "data/device_prefetch.h"

#include <utility>

#include "kernels/error.h"
#ifdef LANCET_WITH_CUDA
#include "kernels/cuda/runtime.h"
#endif

namespace lancet {

#ifdef LANCET_WITH_CUDA
struct DevicePrefetcher::Gpu {
  struct Slot {
    Slot(Device d, int64_t rows, const Shape& sample_shape) : copied(d), released(d) {
      Shape xs{rows};
      xs.insert(xs.end(), sample_shape.begin(), sample_shape.end());
      x = Tensor::empty(xs, DType::f32, d);
      y = Tensor::empty({rows}, DType::i64, d);
    }
    Tensor x, y;               // the persistent buffers, max_rows rows
    CudaEvent copied;          // recorded on the copy stream after the slot's last copy
    CudaEvent released;        // recorded on the compute stream by release() after its last use
    bool ever_released = false;
  };
  explicit Gpu(Device d) : copy(d) {}
  CudaStream copy;
  std::vector<std::unique_ptr<Slot>> slots;
};
#else
struct DevicePrefetcher::Gpu {};
#endif

DevicePrefetcher::DevicePrefetcher(const Stream& compute, int64_t max_rows, const Shape& sample_shape, int slots)
    : compute_(compute), max_rows_(max_rows), sample_shape_(sample_shape) {
  LANCET_CHECK(max_rows >= 1, "DevicePrefetcher: max_rows " << max_rows << " must be >= 1");
  LANCET_CHECK(slots >= 2, "DevicePrefetcher: " << slots << " slots; at least 2 (one in use, one being copied)");
  slots_.resize(static_cast<size_t>(slots));
  if (compute.device.is_cpu()) return;
#ifdef LANCET_WITH_CUDA
  gpu_ = std::make_unique<Gpu>(compute.device);
  for (int i = 0; i < slots; ++i) gpu_->slots.push_back(std::make_unique<Gpu::Slot>(compute.device, max_rows, sample_shape));
#else
  LANCET_FAIL("DevicePrefetcher on " << compute.device.str() << ": this build has no CUDA");
#endif
}

DevicePrefetcher::~DevicePrefetcher() {
#ifdef LANCET_WITH_CUDA
  // The host tensors (slots_) may be pinned blocks that the allocator hands out again once
  // freed, and the device buffers go back to the caching allocator for the compute stream: both
  // only after every copy into them has finished. Never throws: after a device fault the
  // synchronize fails, and then nothing more can run on the device anyway.
  if (gpu_) {
    try {
      gpu_->copy.synchronize();
    } catch (...) {
    }
  }
#endif
}

void DevicePrefetcher::push(Batch host) {
  LANCET_CHECK(pushed_ - released_ < slots_.size(), "DevicePrefetcher: push with all "
                                                        << slots_.size() << " slots taken (" << queued() << " queued, "
                                                        << in_use() << " in use): pop and release first");
  LANCET_CHECK(host.x.defined() && host.y.defined(), "DevicePrefetcher: push of an empty batch");
  Shape expect{host.x.ndim() > 0 ? host.x.dim(0) : 0};
  expect.insert(expect.end(), sample_shape_.begin(), sample_shape_.end());
  const int64_t rows = expect[0];
  LANCET_CHECK(host.x.device().is_cpu() && host.y.device().is_cpu(),
               "DevicePrefetcher: batch on " << host.x.device().str() << ", expected host tensors");
  LANCET_CHECK(host.x.dtype() == DType::f32 && host.y.dtype() == DType::i64,
               "DevicePrefetcher: batch of " << dtype_name(host.x.dtype()) << " images and " << dtype_name(host.y.dtype())
                                             << " labels, expected f32 and i64");
  LANCET_CHECK(host.x.shape() == expect && rows >= 1 && rows <= max_rows_,
               "DevicePrefetcher: batch " << host.x.shape_str() << ", expected [1.." << max_rows_ << ", "
                                          << shape_str(sample_shape_).substr(1));
  LANCET_CHECK(host.y.shape() == Shape{rows},
               "DevicePrefetcher: labels " << host.y.shape_str() << " for " << rows << " images");
  Slot& slot = slots_[pushed_ % slots_.size()];
#ifdef LANCET_WITH_CUDA
  if (gpu_) {
    Gpu::Slot& g = *gpu_->slots[pushed_ % slots_.size()];
    const Stream copy = gpu_->copy.stream();
    // The slot's previous host tensors may go back to the loader only after their copy (done
    // long ago in a training loop: the compute stream waited for it a step or more back).
    if (slot.host.x.defined()) g.copied.synchronize();
    // The slot owns the host tensors before any copy from them is queued, so they outlive it
    // even when a later call here throws (the destructor waits for the copy stream).
    slot.host = std::move(host);
    // Not before the compute stream is done with what the slot held.
    if (g.ever_released) g.released.wait_on(copy);
    const Batch& h = slot.host;
    copy_async(g.x.raw_data(), compute_.device, h.x.raw_data(), Device::cpu(), h.x.nbytes(), copy);
    copy_async(g.y.raw_data(), compute_.device, h.y.raw_data(), Device::cpu(), h.y.nbytes(), copy);
    g.copied.record(copy);
  }
#endif
  if (!gpu_) slot.host = std::move(host);
  slot.rows = rows;
  ++pushed_;
}

Batch DevicePrefetcher::pop() {
  LANCET_CHECK(popped_ < pushed_, "DevicePrefetcher: pop with no batch queued");
  Slot& slot = slots_[popped_ % slots_.size()];
  Batch out;
#ifdef LANCET_WITH_CUDA
  if (gpu_) {
    Gpu::Slot& g = *gpu_->slots[popped_ % slots_.size()];
    g.copied.wait_on(compute_);  // on the device: the host goes on queueing the step
    out.x = g.x.narrow(0, slot.rows);
    out.y = g.y.narrow(0, slot.rows);
    out.indices = slot.host.indices;  // the host tensors stay in the slot until the copy is known done
  }
#endif
  if (!gpu_) out = std::move(slot.host);
  ++popped_;
  return out;
}

void DevicePrefetcher::release() {
#ifdef LANCET_WITH_CUDA
  if (gpu_)
    for (uint64_t i = released_; i < popped_; ++i) {
      Gpu::Slot& g = *gpu_->slots[i % slots_.size()];
      g.released.record(compute_);
      g.ever_released = true;
    }
#endif
  released_ = popped_;
}

}  // namespace lancet
