// tensor.h — an n-dimensional array on a device.
//
// A Tensor is a cheap handle: copies share the same storage (like torch.Tensor). Storage is
// reference counted and freed through the allocator of its device when the last handle goes.
// Data is always dense; `format` says how a 4-D tensor's dims map to memory:
//   MemoryFormat::nchw           — dims [N, C, H, W] stored in that order (the default)
//   MemoryFormat::channels_last  — dims [N, C, H, W] stored as N, H, W, C (for tensor cores)
// Shapes are always reported in logical NCHW order whatever the format.
// data<T>() on a CUDA tensor returns a device pointer; nothing here syncs implicitly.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "kernels/allocator.h"
#include "kernels/device.h"
#include "kernels/dtype.h"
#include "kernels/error.h"

namespace lancet {

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);  // "[2, 3, 4]"
int64_t shape_numel(const Shape& s);

enum class MemoryFormat : uint8_t { nchw, channels_last };
const char* memory_format_name(MemoryFormat f);  // "nchw" | "channels_last"

// Owns one allocation on one device.
class Storage {
 public:
  Storage(size_t bytes, Device device);
  // From a specific allocator (e.g. pinned host memory for a data loader's batches); the
  // storage's device is the allocator's, and it is freed through it. `a` must outlive it.
  Storage(size_t bytes, Allocator& a);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  void* data() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  Device device_;
  Allocator* allocator_ = nullptr;
};

class Tensor {
 public:
  Tensor() = default;  // undefined: defined() is false

  static Tensor empty(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu(),
                      MemoryFormat format = MemoryFormat::nchw);
  // An nchw tensor whose memory comes from `a` (on a.device()); `a` must outlive the storage.
  static Tensor empty(const Shape& shape, DType dtype, Allocator& a);
  // Same dtype, device and memory format as `t`; with `shape`, that shape instead of t's (the
  // format is kept for a 4-D shape, nchw otherwise). How layers allocate outputs and gradients,
  // so a channels_last activation stays channels_last through the model.
  static Tensor empty_like(const Tensor& t);
  static Tensor empty_like(const Tensor& t, const Shape& shape);
  static Tensor zeros(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
  static Tensor full(const Shape& shape, float value, Device device = Device::cpu());
  // A CPU f32 tensor holding a copy of `values` (numel must match).
  static Tensor from_vector(const std::vector<float>& values, const Shape& shape);
  // A CPU i64 tensor holding a copy of `values`.
  static Tensor from_labels(const std::vector<int64_t>& values);

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  std::string shape_str() const { return lancet::shape_str(shape_); }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const;  // negative i counts from the end; throws when out of range
  int64_t numel() const { return numel_; }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  MemoryFormat format() const { return format_; }
  size_t nbytes() const { return static_cast<size_t>(numel_) * dtype_size(dtype_); }

  // Typed access; throws when T does not match dtype().
  template <typename T> T* data() {
    check_dtype(dtype_of<T>::value);
    return static_cast<T*>(raw_data());
  }
  template <typename T> const T* data() const {
    check_dtype(dtype_of<T>::value);
    return static_cast<const T*>(raw_data());
  }
  void* raw_data() const;

  // Views share storage. view(): same numel, new shape (nchw only). narrow(): rows
  // [start, start + length) of dim 0, e.g. a micro-batch of a batch.
  Tensor view(const Shape& shape) const;
  Tensor narrow(int64_t start, int64_t length) const;

  // Copies.
  Tensor clone() const;
  Tensor to(Device device) const;  // always a new tensor (a copy even when already there)
  void copy_from(const Tensor& src);  // same shape and dtype; any devices
  std::vector<float> to_vector() const;  // f32 only; copies to host

  void zero_();
  void fill_(float value);  // f32 only

  // Throws "what: expected [..] got [..]" when shapes differ.
  void check_shape(const Shape& expected, const char* what) const;
  void check_same_shape(const Tensor& other, const char* what) const;

 private:
  void check_dtype(DType t) const;
  std::shared_ptr<Storage> storage_;
  size_t offset_ = 0;  // bytes from the start of storage
  Shape shape_;
  int64_t numel_ = 0;
  DType dtype_ = DType::f32;
  Device device_;
  MemoryFormat format_ = MemoryFormat::nchw;
};

// Low-level copy between any two devices (CUDA backend provides the device side).
void device_copy(void* dst, Device dst_dev, const void* src, Device src_dev, size_t bytes);
void device_memset_zero(void* dst, Device dev, size_t bytes);

}  // namespace lancet
