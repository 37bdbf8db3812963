#include "kernels/tensor.h"

#include <cstring>
#include <sstream>

namespace lancet {

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << '[';
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << ']';
  return os.str();
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) {
    LANCET_CHECK(d >= 0, "negative dimension in shape " << shape_str(s));
    n *= d;
  }
  return n;
}

Storage::Storage(size_t bytes, Device device) : bytes_(bytes), device_(device) {
  allocator_ = &allocator_for(device);
  ptr_ = allocator_->allocate(bytes);
}

Storage::Storage(size_t bytes, Allocator& a) : bytes_(bytes), device_(a.device()), allocator_(&a) {
  ptr_ = allocator_->allocate(bytes);
}

Storage::~Storage() {
  if (ptr_) allocator_->deallocate(ptr_, bytes_);
}

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device, MemoryFormat format) {
  LANCET_CHECK(format == MemoryFormat::nchw || shape.size() == 4,
               "channels_last needs a 4-D shape, got " << lancet::shape_str(shape));
  Tensor t;
  t.shape_ = shape;
  t.numel_ = shape_numel(shape);
  t.dtype_ = dtype;
  t.device_ = device;
  t.format_ = format;
  t.storage_ = std::make_shared<Storage>(t.nbytes(), device);
  return t;
}

Tensor Tensor::empty(const Shape& shape, DType dtype, Allocator& a) {
  Tensor t;
  t.shape_ = shape;
  t.numel_ = shape_numel(shape);
  t.dtype_ = dtype;
  t.device_ = a.device();
  t.storage_ = std::make_shared<Storage>(t.nbytes(), a);
  return t;
}

const char* memory_format_name(MemoryFormat f) { return f == MemoryFormat::channels_last ? "channels_last" : "nchw"; }

Tensor Tensor::empty_like(const Tensor& t) { return empty_like(t, t.shape()); }

Tensor Tensor::empty_like(const Tensor& t, const Shape& shape) {
  LANCET_CHECK(t.defined(), "empty_like of an undefined tensor");
  return empty(shape, t.dtype(), t.device(), shape.size() == 4 ? t.format() : MemoryFormat::nchw);
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  t.zero_();
  return t;
}

Tensor Tensor::full(const Shape& shape, float value, Device device) {
  Tensor t = empty(shape, DType::f32, Device::cpu());
  t.fill_(value);
  return device.is_cpu() ? t : t.to(device);
}

Tensor Tensor::from_vector(const std::vector<float>& values, const Shape& shape) {
  LANCET_CHECK(static_cast<int64_t>(values.size()) == shape_numel(shape),
               "from_vector: " << values.size() << " values do not fill shape " << lancet::shape_str(shape));
  Tensor t = empty(shape, DType::f32);
  std::memcpy(t.raw_data(), values.data(), t.nbytes());
  return t;
}

Tensor Tensor::from_labels(const std::vector<int64_t>& values) {
  Tensor t = empty({static_cast<int64_t>(values.size())}, DType::i64);
  std::memcpy(t.raw_data(), values.data(), t.nbytes());
  return t;
}

int64_t Tensor::dim(int i) const {
  const int n = ndim();
  const int j = i < 0 ? i + n : i;
  LANCET_CHECK(j >= 0 && j < n, "dim " << i << " out of range for shape " << shape_str());
  return shape_[j];
}

void* Tensor::raw_data() const {
  LANCET_CHECK(defined(), "access to an undefined tensor");
  return static_cast<char*>(storage_->data()) + offset_;
}

void Tensor::check_dtype(DType t) const {
  LANCET_CHECK(t == dtype_, "tensor " << shape_str() << " holds " << dtype_name(dtype_) << ", accessed as "
                                      << dtype_name(t));
}

Tensor Tensor::view(const Shape& shape) const {
  LANCET_CHECK(defined(), "view of an undefined tensor");
  LANCET_CHECK(format_ == MemoryFormat::nchw, "view of a channels_last tensor " << shape_str());
  LANCET_CHECK(shape_numel(shape) == numel_, "view: shape " << lancet::shape_str(shape) << " does not match "
                                                           << shape_str() << " (" << numel_ << " elements)");
  Tensor t = *this;
  t.shape_ = shape;
  return t;
}

Tensor Tensor::narrow(int64_t start, int64_t length) const {
  LANCET_CHECK(defined() && ndim() >= 1, "narrow of an undefined or 0-d tensor");
  LANCET_CHECK(start >= 0 && length >= 0 && start + length <= shape_[0],
               "narrow: rows [" << start << ", " << start + length << ") out of range for " << shape_str());
  Tensor t = *this;
  const size_t row_bytes = shape_[0] == 0 ? 0 : nbytes() / static_cast<size_t>(shape_[0]);
  t.offset_ += static_cast<size_t>(start) * row_bytes;
  t.shape_[0] = length;
  t.numel_ = shape_numel(t.shape_);
  return t;
}

Tensor Tensor::clone() const { return to(device_); }

Tensor Tensor::to(Device device) const {
  LANCET_CHECK(defined(), "copy of an undefined tensor");
  Tensor t = empty(shape_, dtype_, device, format_);
  device_copy(t.raw_data(), device, raw_data(), device_, nbytes());
  return t;
}

void Tensor::copy_from(const Tensor& src) {
  check_same_shape(src, "copy_from");
  LANCET_CHECK(src.dtype_ == dtype_, "copy_from: dtype " << dtype_name(src.dtype_) << " into " << dtype_name(dtype_));
  LANCET_CHECK(src.format_ == format_, "copy_from: memory formats differ for " << shape_str());
  device_copy(raw_data(), device_, src.raw_data(), src.device_, nbytes());
}

std::vector<float> Tensor::to_vector() const {
  check_dtype(DType::f32);
  std::vector<float> v(static_cast<size_t>(numel_));
  device_copy(v.data(), Device::cpu(), raw_data(), device_, nbytes());
  return v;
}

void Tensor::zero_() {
  if (numel_ > 0) device_memset_zero(raw_data(), device_, nbytes());
}

void Tensor::fill_(float value) {
  check_dtype(DType::f32);
  LANCET_CHECK(device_.is_cpu(), "fill_ on " << device_.str() << " (use the fill kernel)");
  float* p = data<float>();
  for (int64_t i = 0; i < numel_; ++i) p[i] = value;
}

void Tensor::check_shape(const Shape& expected, const char* what) const {
  LANCET_CHECK(defined(), what << ": expected " << lancet::shape_str(expected) << ", got an undefined tensor");
  LANCET_CHECK(shape_ == expected, what << ": expected shape " << lancet::shape_str(expected) << ", got "
                                        << shape_str());
}

void Tensor::check_same_shape(const Tensor& other, const char* what) const {
  LANCET_CHECK(defined() && other.defined(), what << ": undefined tensor");
  LANCET_CHECK(shape_ == other.shape_, what << ": shape mismatch " << shape_str() << " vs " << other.shape_str());
}

#ifdef LANCET_WITH_CUDA
void cuda_copy(void* dst, Device dst_dev, const void* src, Device src_dev, size_t bytes);  // kernels/cuda
void cuda_memset_zero(void* dst, Device dev, size_t bytes);
#endif

void device_copy(void* dst, Device dst_dev, const void* src, Device src_dev, size_t bytes) {
  if (bytes == 0) return;
  if (dst_dev.is_cpu() && src_dev.is_cpu()) {
    std::memcpy(dst, src, bytes);
    return;
  }
#ifdef LANCET_WITH_CUDA
  cuda_copy(dst, dst_dev, src, src_dev, bytes);
#else
  LANCET_FAIL("copy between " << src_dev.str() << " and " << dst_dev.str() << " needs a CUDA build");
#endif
}

void device_memset_zero(void* dst, Device dev, size_t bytes) {
  if (dev.is_cpu()) {
    std::memset(dst, 0, bytes);
    return;
  }
#ifdef LANCET_WITH_CUDA
  cuda_memset_zero(dst, dev, bytes);
#else
  LANCET_FAIL("memset on " << dev.str() << " needs a CUDA build");
#endif
}

}  // namespace lancet
