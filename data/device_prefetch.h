// device_prefetch.h — moves the loader's batches to the GPU on a copy stream of their own,
// overlapped with the step computing on the batch before (PyTorch's pin_memory + a CUDA
// prefetcher; llm.c's copy stream).
//
// Contract, on a CUDA device:
// - The prefetcher owns a non-blocking copy stream (kernels/cuda/runtime.h) and a ring of
//   `slots` persistent device buffers, each [max_rows, sample_shape...] f32 images and
//   [max_rows] i64 labels, allocated once at construction. No per-batch device allocation
//   happens, so the caching allocator (which is not stream-aware) never sees memory pass
//   between the copy stream and the compute stream.
// - push(host) queues cudaMemcpyAsync of the batch into the next slot on the copy stream and
//   returns at once. The host tensors should be pinned (LoaderOptions::allocator =
//   pinned_host_allocator()); pageable ones are correct too but the driver stages them, so the
//   copy does not overlap. The prefetcher keeps the host tensors alive until their copy has
//   finished (it waits for that copy before dropping them, when the slot is next filled or at
//   destruction), so a pinned block is never handed back to the loader mid-DMA.
// - Before overwriting a slot, the copy stream waits (cudaStreamWaitEvent, no host block) for
//   the compute stream's event recorded by the release() that followed the slot's last use.
// - pop() makes the compute stream wait for the oldest batch's copy (again on the device, not
//   the host) and returns views of its slot's buffers narrowed to the batch's rows (a partial
//   last batch is fine). The views are valid until release() and the next push into the same
//   slot; work queued on the compute stream before release() may use them (layers saving the
//   input for backward within the step, say), nothing after.
// - release() declares every popped batch done: call it after the step that used them has been
//   queued on the compute stream.
// On the CPU the prefetcher is a pass-through with the same ring bookkeeping: pop() returns the
// pushed tensors themselves, no copy, no buffers.
//
// Batches leave in the order they were pushed; at most `slots` batches are pushed but not yet
// released (push throws beyond that). Prefetching one step of m micro-batches ahead needs
// 2m slots: m in use by the step, m being copied.
//
//   DevicePrefetcher pf(stream, max_rows, sample_shape, 2);
//   pf.push(loader_batch(0));
//   for (k = 0; ...) {
//     if (k + 1 < steps) pf.push(loader_batch(k + 1));   // copies while step k computes
//     Batch b = pf.pop();                                 // stream waits for batch k's copy
//     train_step(model, b.x, b.y, stream);
//     pf.release();                                       // b's buffers free after the step
//   }
//
// Used by one thread (the training loop); not thread-safe.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "data/loader.h"
#include "kernels/device.h"
#include "kernels/tensor.h"

namespace lancet {

class DevicePrefetcher {
 public:
  // `compute`: the stream the batches are used on (its device is where they go). Batches have
  // at most `max_rows` rows of `sample_shape` ([C, H, W]). Throws on max_rows < 1, slots < 2,
  // or a CUDA stream in a build without CUDA.
  DevicePrefetcher(const Stream& compute, int64_t max_rows, const Shape& sample_shape, int slots = 2);
  // Waits for the copy stream (never throws), then frees the buffers.
  ~DevicePrefetcher();
  DevicePrefetcher(const DevicePrefetcher&) = delete;
  DevicePrefetcher& operator=(const DevicePrefetcher&) = delete;

  // Starts moving `host` (CPU tensors: x [B, sample_shape] f32, y [B] i64, 1 <= B <= max_rows)
  // to the device. Throws on another shape, dtype or device, or when all slots are taken.
  void push(Batch host);
  // The oldest pushed batch on the device (see the contract above). Throws when none is queued.
  Batch pop();
  // Every popped batch is done once the compute stream has passed its work queued so far.
  void release();

  int queued() const { return static_cast<int>(pushed_ - popped_); }    // pushed, not popped
  int in_use() const { return static_cast<int>(popped_ - released_); }  // popped, not released
  int slots() const { return static_cast<int>(slots_.size()); }
  Device device() const { return compute_.device; }

 private:
  struct Slot {
    Batch host;        // CPU: the batch itself; GPU: the host tensors of the slot's last copy
    int64_t rows = 0;  // of the batch in the slot
  };
  struct Gpu;  // copy stream, buffers and events (device_prefetch.cpp)

  Stream compute_;
  int64_t max_rows_;
  Shape sample_shape_;
  std::vector<Slot> slots_;
  std::unique_ptr<Gpu> gpu_;  // null on the CPU
  uint64_t pushed_ = 0, popped_ = 0, released_ = 0;  // batch i lives in slot i % slots
};

}  // namespace lancet
