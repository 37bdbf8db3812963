#include "data/sampler.h"

#include <numeric>
#include <random>
#include <utility>

#include "kernels/error.h"

namespace lancet {

std::vector<int64_t> epoch_permutation(int64_t n, uint64_t seed, int epoch) {
  std::vector<int64_t> p(static_cast<size_t>(n));
  std::iota(p.begin(), p.end(), 0);
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(epoch) + 1);
  // Fisher-Yates with our own draw so the order is the same on every standard library.
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(rng() % static_cast<uint64_t>(i + 1));
    std::swap(p[static_cast<size_t>(i)], p[static_cast<size_t>(j)]);
  }
  return p;
}

DistributedSampler::DistributedSampler(int64_t n, int rank, int world, uint64_t seed, bool drop_last)
    : n_(n), rank_(rank), world_(world), seed_(seed), drop_last_(drop_last) {
  LANCET_CHECK(n >= 0, "sampler: negative dataset size " << n);
  LANCET_CHECK(world >= 1, "sampler: world size must be at least 1, got " << world);
  LANCET_CHECK(rank >= 0 && rank < world, "sampler: rank " << rank << " outside [0, " << world << ")");
  LANCET_CHECK(!drop_last || n >= world, "sampler: drop_last with " << n << " samples for " << world
                                                                    << " ranks leaves every rank empty");
  per_rank_ = drop_last ? n / world : (n + world - 1) / world;
}

std::vector<int64_t> DistributedSampler::indices(int epoch) const {
  std::vector<int64_t> order = epoch_permutation(n_, seed_, epoch);
  const int64_t total = total_size();
  if (total > n_) {  // pad by repeating from the start (several times when n < world)
    const int64_t missing = total - n_;
    for (int64_t i = 0; i < missing; ++i) order.push_back(order[static_cast<size_t>(i % n_)]);
  }
  order.resize(static_cast<size_t>(total));
  std::vector<int64_t> mine;
  mine.reserve(static_cast<size_t>(per_rank_));
  for (int64_t i = rank_; i < total; i += world_) mine.push_back(order[static_cast<size_t>(i)]);
  return mine;
}

}  // namespace lancet
