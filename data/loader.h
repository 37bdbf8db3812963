// loader.h — the training data loader: epoch orders (shuffle, class-balanced, minority
// oversampling) split over data-parallel ranks, and worker threads that build batches ahead
// of the training step into a bounded prefetch queue (torch.utils.data.DataLoader's shape).
//
// Determinism: a batch's bytes depend only on (dataset, its indices, epoch, seed, augment
// config), never on the worker count or on which worker built it — augmentation draws from
// (seed, epoch, sample index) (data/augment.h) — and batches are delivered in order. So a
// run is bit-identical with 0, 1 or 16 workers, and with augmentation off and the shuffle
// sampler it is the run make_batch gave.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "data/augment.h"
#include "data/dataset.h"
#include "kernels/allocator.h"

namespace lancet {

class CachedImageDataset;  // data/image_dataset.h

// ---- epoch orders ---------------------------------------------------------------------------

enum class SamplerKind {
  shuffle,     // epoch_permutation (data/sampler.h): every sample once
  balanced,    // class_balanced_order, n draws: every class equally likely (with replacement)
  oversample,  // oversample_minority: every class topped up to the largest one's count
};
// "shuffle", "balanced" or "oversample"; anything else throws naming data.sampler.
SamplerKind parse_sampler(const std::string& s);

// Rank `rank`'s share of a global epoch order, as DistributedSampler (data/sampler.h) splits
// it: the order made a multiple of `world` long — padded by repeating its first elements
// (drop_last false) or cut to floor(n / world) * world (drop_last true) — then every world-th
// element starting at rank. Throws on an empty order, a bad rank, or drop_last with fewer
// elements than ranks.
std::vector<int64_t> shard_order(std::vector<int64_t> order, int rank, int world, bool drop_last = false);

// The per-rank epoch order of a sampler. Every epoch's global order is the same on every rank
// (a function of labels, seed and epoch) and has the same length, so num_samples() is fixed.
// kind shuffle gives exactly DistributedSampler(n, rank, world, seed, drop_last).indices(epoch).
// drop_last (dist.sampler_drop_last): the tail of the global order that does not fill a whole
// round of ranks is dropped instead of padded, so no sample repeats within an epoch.
class EpochSampler {
 public:
  // Throws on no samples, a label outside [0, num_classes), a bad rank / world, or drop_last
  // with fewer samples than ranks.
  EpochSampler(SamplerKind kind, std::vector<int64_t> labels, int num_classes, int rank, int world, uint64_t seed,
               bool drop_last = false);
  std::vector<int64_t> indices(int epoch) const;
  int64_t num_samples() const { return per_rank_; }  // per rank, per epoch
  int64_t epoch_length() const { return length_; }   // the global order's length before padding / dropping
  // Over all ranks, per epoch: positions repeated by padding (> 0) or dropped (< 0).
  int64_t padding() const { return per_rank_ * world_ - length_; }

 private:
  std::vector<int64_t> global_order(int epoch) const;
  SamplerKind kind_;
  std::vector<int64_t> labels_;
  int num_classes_, rank_, world_;
  uint64_t seed_;
  bool drop_last_;
  int64_t length_ = 0, per_rank_ = 0;
};

// ---- the loader -----------------------------------------------------------------------------

struct LoaderOptions {
  // Threads that build batches; 0 = build each batch in next(), in the calling thread (its
  // samples in parallel over lancet's threads).
  int workers = 2;
  // Batches prepared ahead per worker (torch's prefetch_factor): at most workers * prefetch
  // batches are being built or waiting at any time. >= 1.
  int prefetch = 2;
  // Where batch buffers come from; null = the CPU allocator. A pinned host allocator
  // (kernels/cuda/runtime.h) makes the host->device copy asynchronous-capable. Every batch
  // is a fresh allocation (the consumer may keep a batch as long as it likes), so such an
  // allocator should cache its blocks. Must outlive the batches.
  Allocator* allocator = nullptr;
  // Training augmentation (off by default). When enabled the dataset must be a
  // CachedImageDataset (data/image_dataset.h): augmentation works on its 8- or 16-bit images.
  AugmentConfig augment;
  uint64_t seed = 0;              // train.seed: the augmentation's draws
  std::vector<bool> minority;     // per class: augmented with minority_strength (minority_classes)
};

struct Batch {
  Tensor x;  // [B, C, H, W] f32, NCHW, from LoaderOptions::allocator
  Tensor y;  // [B] i64 labels
  std::vector<int64_t> indices;  // the dataset indices of its rows
};

class DataLoader {
 public:
  // Starts the workers (idle until start_epoch). `ds` must outlive the loader. Throws on bad
  // options (workers < 0, prefetch < 1, augmentation on a dataset without 8- or 16-bit images).
  DataLoader(const Dataset& ds, LoaderOptions opt);
  // Stops the workers and joins them: a worker finishes the batch it is building, nothing
  // more. Safe whenever the consumer stops (an exception, max_steps, early stopping).
  ~DataLoader();
  DataLoader(const DataLoader&) = delete;
  DataLoader& operator=(const DataLoader&) = delete;

  // Begins delivering `batches` (each a list of dataset indices; sizes may differ) of `epoch`
  // (>= 0), dropping whatever remains of the previous epoch. Throws on an index outside
  // [0, ds.size()) or an empty batch.
  void start_epoch(int epoch, std::vector<std::vector<int64_t>> batches);
  // The next batch in order; false when the epoch's batches are all delivered. Blocks until
  // it is ready. A worker's error (e.g. "<file>: <reason>" from the dataset) is rethrown here
  // when its batch is due, and ends the epoch.
  bool next(Batch& out);

  const LoaderOptions& options() const { return opt_; }

 private:
  struct Slot {
    Batch batch;
    std::exception_ptr error;
  };
  void build(const std::vector<int64_t>& indices, int epoch, bool parallel, Batch& out) const;
  void worker_loop();

  const Dataset& ds_;
  LoaderOptions opt_;
  Allocator* alloc_;
  const CachedImageDataset* images_ = nullptr;  // when augmenting
  size_t window_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable work_cv_, ready_cv_;
  bool stop_ = false;
  uint64_t generation_ = 0;  // start_epoch count: results of an older epoch are dropped
  int epoch_ = 0;
  std::vector<std::vector<int64_t>> batches_;
  size_t claimed_ = 0, delivered_ = 0;
  std::map<size_t, Slot> ready_;
};

}  // namespace lancet
