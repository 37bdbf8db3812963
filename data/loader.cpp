#include "data/loader.h"

#include <algorithm>

#include "data/image_dataset.h"
#include "data/sampler.h"
#include "kernels/parallel.h"

namespace lancet {

SamplerKind parse_sampler(const std::string& s) {
  if (s == "shuffle") return SamplerKind::shuffle;
  if (s == "balanced") return SamplerKind::balanced;
  if (s == "oversample") return SamplerKind::oversample;
  LANCET_FAIL("data.sampler must be 'shuffle', 'balanced' or 'oversample', got '" << s << "'");
}

std::vector<int64_t> shard_order(std::vector<int64_t> order, int rank, int world, bool drop_last) {
  LANCET_CHECK(world >= 1 && rank >= 0 && rank < world, "shard_order: rank " << rank << " outside [0, " << world << ")");
  LANCET_CHECK(!order.empty(), "shard_order: empty epoch order");
  const size_t n = order.size(), w = static_cast<size_t>(world);
  LANCET_CHECK(!drop_last || n >= w, "sampler: dist.sampler_drop_last with " << n << " samples for " << world
                                                                               << " ranks leaves every rank empty");
  const size_t total = drop_last ? n / w * w : (n + w - 1) / w * w;
  for (size_t i = n; i < total; ++i) order.push_back(order[(i - n) % n]);  // pad from the start
  order.resize(total);
  std::vector<int64_t> mine;
  mine.reserve(total / w);
  for (size_t i = static_cast<size_t>(rank); i < total; i += w) mine.push_back(order[i]);
  return mine;
}

EpochSampler::EpochSampler(SamplerKind kind, std::vector<int64_t> labels, int num_classes, int rank, int world,
                           uint64_t seed, bool drop_last)
    : kind_(kind),
      labels_(std::move(labels)),
      num_classes_(num_classes),
      rank_(rank),
      world_(world),
      seed_(seed),
      drop_last_(drop_last) {
  LANCET_CHECK(!labels_.empty(), "sampler: no training samples");
  LANCET_CHECK(world >= 1 && rank >= 0 && rank < world, "sampler: rank " << rank << " outside [0, " << world << ")");
  for (int64_t l : labels_)
    LANCET_CHECK(l >= 0 && l < num_classes, "sampler: label " << l << " outside [0, " << num_classes << ")");
  length_ = static_cast<int64_t>(global_order(0).size());
  LANCET_CHECK(!drop_last || length_ >= world, "sampler: dist.sampler_drop_last with " << length_ << " samples for "
                                                                                         << world << " ranks leaves every rank empty");
  per_rank_ = drop_last ? length_ / world : (length_ + world - 1) / world;
}

std::vector<int64_t> EpochSampler::global_order(int epoch) const {
  const int64_t n = static_cast<int64_t>(labels_.size());
  switch (kind_) {
    case SamplerKind::shuffle: return epoch_permutation(n, seed_, epoch);
    case SamplerKind::balanced: return class_balanced_order(labels_, num_classes_, seed_, epoch, n);
    case SamplerKind::oversample: return oversample_minority(labels_, num_classes_, seed_, epoch);
  }
  return {};
}

std::vector<int64_t> EpochSampler::indices(int epoch) const {
  if (kind_ == SamplerKind::shuffle)  // the trainer's order before samplers existed, exactly
    return DistributedSampler(static_cast<int64_t>(labels_.size()), rank_, world_, seed_, drop_last_).indices(epoch);
  return shard_order(global_order(epoch), rank_, world_, drop_last_);
}

// ---- DataLoader -----------------------------------------------------------------------------

DataLoader::DataLoader(const Dataset& ds, LoaderOptions opt)
    : ds_(ds), opt_(std::move(opt)), alloc_(opt_.allocator ? opt_.allocator : &allocator_for(Device::cpu())) {
  LANCET_CHECK(opt_.workers >= 0, "data.workers must be >= 0, got " << opt_.workers);
  LANCET_CHECK(opt_.prefetch >= 1, "data.prefetch must be >= 1, got " << opt_.prefetch);
  LANCET_CHECK(alloc_->device().is_cpu(), "DataLoader: batches must be in host memory, the allocator is on "
                                              << alloc_->device().str());
  if (opt_.augment.enabled()) {
    images_ = dynamic_cast<const CachedImageDataset*>(&ds);
    LANCET_CHECK(images_, "data.augment needs the training images as 8- or 16-bit pixels (a CachedImageDataset), "
                          "this dataset holds normalised floats");
    LANCET_CHECK(static_cast<int>(opt_.minority.size()) == ds.num_classes() || opt_.minority.empty(),
                 "DataLoader: " << opt_.minority.size() << " minority flags for " << ds.num_classes() << " classes");
  }
  window_ = static_cast<size_t>(opt_.workers) * static_cast<size_t>(opt_.prefetch);
  for (int i = 0; i < opt_.workers; ++i) workers_.emplace_back([this] { worker_loop(); });
}

DataLoader::~DataLoader() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void DataLoader::start_epoch(int epoch, std::vector<std::vector<int64_t>> batches) {
  LANCET_CHECK(epoch >= 0, "DataLoader: epoch must be >= 0, got " << epoch);
  const int64_t n = ds_.size();
  for (const auto& b : batches) {
    LANCET_CHECK(!b.empty(), "DataLoader: empty batch");
    for (int64_t i : b) LANCET_CHECK(i >= 0 && i < n, "DataLoader: index " << i << " outside [0, " << n << ")");
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++generation_;
    epoch_ = epoch;
    batches_ = std::move(batches);
    claimed_ = delivered_ = 0;
    ready_.clear();
  }
  work_cv_.notify_all();
}

void DataLoader::build(const std::vector<int64_t>& indices, int epoch, bool parallel, Batch& out) const {
  const Shape ss = ds_.sample_shape();
  const int64_t b = static_cast<int64_t>(indices.size());
  const int64_t per = shape_numel(ss);
  out.x = Tensor::empty({b, ss[0], ss[1], ss[2]}, DType::f32, *alloc_);
  out.y = Tensor::empty({b}, DType::i64, *alloc_);
  out.indices = indices;
  float* xp = out.x.data<float>();
  int64_t* yp = out.y.data<int64_t>();
  auto one = [&](int64_t j) {
    const int64_t i = indices[static_cast<size_t>(j)];
    const int64_t label = ds_.label(i);
    if (images_) {
      const bool minority = !opt_.minority.empty() && opt_.minority[static_cast<size_t>(label)];
      images_->get_augmented(i, opt_.augment, opt_.seed, epoch, minority, xp + j * per);
    } else {
      ds_.get(i, xp + j * per);
    }
    yp[j] = label;
  };
  if (!parallel) {
    for (int64_t j = 0; j < b; ++j) one(j);
    return;
  }
  // Exceptions must not escape an OpenMP region: keep the first row's, rethrow after.
  std::mutex mu;
  int64_t first_bad = b;
  std::exception_ptr error;
  parallel_for(b, 4, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      try {
        one(j);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        if (j < first_bad) first_bad = j, error = std::current_exception();
      }
    }
  });
  if (error) std::rethrow_exception(error);
}

void DataLoader::worker_loop() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    work_cv_.wait(lock, [&] { return stop_ || (claimed_ < batches_.size() && claimed_ < delivered_ + window_); });
    if (stop_) return;
    const size_t k = claimed_++;
    const uint64_t generation = generation_;
    const int epoch = epoch_;
    const std::vector<int64_t> indices = batches_[k];  // batches_ may be replaced meanwhile
    lock.unlock();
    Slot slot;
    try {
      build(indices, epoch, /*parallel=*/false, slot.batch);
    } catch (...) {
      slot.error = std::current_exception();
    }
    lock.lock();
    if (generation != generation_) continue;  // an older epoch's batch: nobody wants it
    ready_.emplace(k, std::move(slot));
    ready_cv_.notify_all();
  }
}

bool DataLoader::next(Batch& out) {
  if (workers_.empty()) {
    if (delivered_ >= batches_.size()) return false;
    const size_t k = delivered_++;
    try {
      build(batches_[k], epoch_, /*parallel=*/true, out);
    } catch (...) {
      delivered_ = batches_.size();  // the epoch ends with the error
      throw;
    }
    return true;
  }
  std::unique_lock<std::mutex> lock(mu_);
  if (delivered_ >= batches_.size()) return false;
  const size_t k = delivered_;
  ready_cv_.wait(lock, [&] { return ready_.count(k) != 0; });
  Slot slot = std::move(ready_.at(k));
  ready_.erase(k);
  ++delivered_;
  if (slot.error) {  // the epoch ends here: drop the rest, let the workers idle
    delivered_ = claimed_ = batches_.size();
    ready_.clear();
    ++generation_;
  }
  lock.unlock();
  work_cv_.notify_all();
  if (slot.error) std::rethrow_exception(slot.error);
  out = std::move(slot.batch);
  return true;
}

}  // namespace lancet
