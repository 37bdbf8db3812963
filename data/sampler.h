// sampler.h — which samples each step sees: the seed-determined epoch order, and its split over
// data-parallel ranks with torch.utils.data.DistributedSampler's semantics.
//
// Every epoch has one global order, epoch_permutation(n, seed, epoch), the same on every rank.
// With R ranks, the order is first made a multiple of R long — padded by repeating its first
// elements (drop_last false, torch's default) or cut (drop_last true) — and rank r takes
// every R-th index starting at r. Consequence, the property data parallelism relies on: with a
// per-rank batch b, the union of the ranks' step-k batches is exactly positions
// [k*b*R, (k+1)*b*R) of the (padded) global order, i.e. the single-process step-k batch of size
// b*R.
#pragma once
#include <cstdint>
#include <vector>

namespace lancet {

// A permutation of [0, n) determined by (seed, epoch) alone, the same on every standard library.
std::vector<int64_t> epoch_permutation(int64_t n, uint64_t seed, int epoch);

class DistributedSampler {
 public:
  // Throws (one line) on n < 0, world < 1, rank outside [0, world), or drop_last with n < world.
  DistributedSampler(int64_t n, int rank, int world, uint64_t seed, bool drop_last = false);
  // This rank's indices for `epoch`, in order; num_samples() long.
  std::vector<int64_t> indices(int epoch) const;
  int64_t num_samples() const { return per_rank_; }     // per rank, per epoch
  int64_t total_size() const { return per_rank_ * world_; }  // after padding or dropping

 private:
  int64_t n_;
  int rank_, world_;
  uint64_t seed_;
  bool drop_last_;
  int64_t per_rank_;
};

}  // namespace lancet
