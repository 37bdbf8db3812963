#include "data/dataset.h"

#include <cstring>

#include "kernels/parallel.h"

namespace lancet {

InMemoryDataset::InMemoryDataset(Tensor images, std::vector<int64_t> labels, std::vector<std::string> class_names)
    : images_(std::move(images)), labels_(std::move(labels)), class_names_(std::move(class_names)) {
  LANCET_CHECK(images_.defined() && images_.ndim() == 4 && images_.dtype() == DType::f32 &&
                   images_.device().is_cpu() && images_.format() == MemoryFormat::nchw,
               "InMemoryDataset: images must be a CPU float32 NCHW tensor [N, C, H, W], got "
                   << (images_.defined() ? images_.shape_str() + " " + dtype_name(images_.dtype()) + " on " +
                                               images_.device().str()
                                         : std::string("an undefined tensor")));
  LANCET_CHECK(static_cast<int64_t>(labels_.size()) == images_.dim(0),
               "InMemoryDataset: " << labels_.size() << " labels for " << images_.dim(0) << " images");
  const int64_t k = static_cast<int64_t>(class_names_.size());
  for (size_t i = 0; i < labels_.size(); ++i)
    LANCET_CHECK(labels_[i] >= 0 && labels_[i] < k,
                 "InMemoryDataset: label " << labels_[i] << " of sample " << i << " is outside [0, " << k << ")");
}

void InMemoryDataset::get(int64_t i, float* out) const {
  const size_t n = static_cast<size_t>(images_.numel() / images_.dim(0));
  std::memcpy(out, images_.data<float>() + static_cast<size_t>(i) * n, n * sizeof(float));
}

void make_batch(const Dataset& ds, const std::vector<int64_t>& indices, Tensor& x, Tensor& y) {
  const Shape ss = ds.sample_shape();
  const int64_t b = static_cast<int64_t>(indices.size());
  x.check_shape({b, ss[0], ss[1], ss[2]}, "make_batch: x");
  y.check_shape({b}, "make_batch: y");
  LANCET_CHECK(x.device().is_cpu() && y.device().is_cpu() && x.format() == MemoryFormat::nchw,
               "make_batch: x and y must be CPU tensors (x in NCHW)");
  const int64_t n = ds.size();
  for (int64_t i : indices) LANCET_CHECK(i >= 0 && i < n, "make_batch: index " << i << " outside [0, " << n << ")");
  float* xp = x.data<float>();
  int64_t* yp = y.data<int64_t>();
  const int64_t per = shape_numel(ss);
  parallel_for(b, 4, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t i = indices[static_cast<size_t>(j)];
      ds.get(i, xp + j * per);
      yp[j] = ds.label(i);
    }
  });
}

}  // namespace lancet
