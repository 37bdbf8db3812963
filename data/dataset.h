// dataset.h — labelled image samples, and gathering them into batches.
//
// A Dataset hands out samples as float32 CHW arrays that are already normalised: the model
// consumes them as they are. Datasets are read-only after construction, so get() and label()
// may be called from several threads at once.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/tensor.h"

namespace lancet {

class Dataset {
 public:
  virtual ~Dataset() = default;
  virtual int64_t size() const = 0;
  virtual Shape sample_shape() const = 0;  // [C, H, W]
  virtual const std::vector<std::string>& class_names() const = 0;
  int num_classes() const { return static_cast<int>(class_names().size()); }
  // Class index of sample i, in [0, num_classes()). i must be in [0, size()).
  virtual int64_t label(int64_t i) const = 0;
  // Writes sample i (numel(sample_shape()) floats, CHW) to `out`. i must be in [0, size()).
  // Must not throw: make_batch calls it from worker threads.
  virtual void get(int64_t i, float* out) const = 0;
};

// Images kept in memory as float32 [N, C, H, W] (CPU, NCHW), labels in [0, classes).
class InMemoryDataset : public Dataset {
 public:
  // Throws when images is not a CPU f32 4-D tensor, when labels.size() != N, or when a
  // label is outside [0, class_names.size()).
  InMemoryDataset(Tensor images, std::vector<int64_t> labels, std::vector<std::string> class_names);

  int64_t size() const override { return images_.dim(0); }
  Shape sample_shape() const override { return {images_.dim(1), images_.dim(2), images_.dim(3)}; }
  const std::vector<std::string>& class_names() const override { return class_names_; }
  int64_t label(int64_t i) const override { return labels_[static_cast<size_t>(i)]; }
  void get(int64_t i, float* out) const override;

  const Tensor& images() const { return images_; }
  const std::vector<int64_t>& labels() const { return labels_; }

 private:
  Tensor images_;
  std::vector<int64_t> labels_;
  std::vector<std::string> class_names_;
};

// Gathers samples `indices` into x [B, C, H, W] f32 and y [B] i64, B = indices.size(), both
// CPU NCHW tensors preallocated by the caller. Copies run in parallel (parallel_for).
// Throws, before copying anything, on a shape mismatch or an index outside [0, ds.size()).
void make_batch(const Dataset& ds, const std::vector<int64_t>& indices, Tensor& x, Tensor& y);

}  // namespace lancet
