// The epoch order and its split over data-parallel ranks (DistributedSampler semantics).
#include <gtest/gtest.h>

#include <algorithm>
#include <map>

#include "data/augment.h"
#include "data/loader.h"
#include "data/sampler.h"
#include "tests/expect_error.h"

using namespace lancet;
using lancet::testing::expect_error;

TEST(Sampler, EpochPermutationIsSeededAndComplete) {
  const auto a = epoch_permutation(1000, 7, 1);
  EXPECT_EQ(a, epoch_permutation(1000, 7, 1));
  EXPECT_NE(a, epoch_permutation(1000, 7, 2));
  EXPECT_NE(a, epoch_permutation(1000, 8, 1));
  auto sorted = a;
  std::sort(sorted.begin(), sorted.end());
  for (int64_t i = 0; i < 1000; ++i) EXPECT_EQ(sorted[static_cast<size_t>(i)], i);
}

// With per-rank batch b, the ranks' step-k batches together are the single-process step-k batch
// of size b * R (as sets), for every step, rank count and both drop_last settings.
TEST(Sampler, RankBatchesUnionToTheSingleProcessBatch) {
  for (int64_t n : {96, 100, 7}) {
    for (int world : {1, 2, 3, 4}) {
      for (bool drop : {false, true}) {
        if (drop && n < world) continue;
        SCOPED_TRACE("n " + std::to_string(n) + " world " + std::to_string(world) + (drop ? " drop" : " pad"));
        const int64_t b = 4;
        std::vector<int64_t> order = epoch_permutation(n, 5, 3);
        const DistributedSampler first(n, 0, world, 5, drop);
        // The padded / cut global order the ranks share.
        while (static_cast<int64_t>(order.size()) < first.total_size())
          order.push_back(order[order.size() - static_cast<size_t>(n)]);
        order.resize(static_cast<size_t>(first.total_size()));
        std::vector<std::vector<int64_t>> shards;
        for (int r = 0; r < world; ++r) {
          const DistributedSampler s(n, r, world, 5, drop);
          shards.push_back(s.indices(3));
          EXPECT_EQ(static_cast<int64_t>(shards.back().size()), first.num_samples());  // equal lengths
        }
        const int64_t steps = (first.num_samples() + b - 1) / b;
        for (int64_t k = 0; k < steps; ++k) {
          std::vector<int64_t> uni, want;
          for (int r = 0; r < world; ++r)
            for (int64_t j = k * b; j < std::min((k + 1) * b, first.num_samples()); ++j)
              uni.push_back(shards[static_cast<size_t>(r)][static_cast<size_t>(j)]);
          const int64_t lo = k * b * world, hi = std::min((k + 1) * b * world, first.total_size());
          want.assign(order.begin() + lo, order.begin() + hi);
          std::sort(uni.begin(), uni.end());
          std::sort(want.begin(), want.end());
          EXPECT_EQ(uni, want) << "step " << k;
        }
      }
    }
  }
}

TEST(Sampler, EverySampleOncePerEpochPaddedOrDropped) {
  const int64_t n = 10;
  const int world = 3;
  std::map<int64_t, int> seen_pad, seen_drop;
  for (int r = 0; r < world; ++r) {
    for (int64_t i : DistributedSampler(n, r, world, 1, false).indices(2)) ++seen_pad[i];
    for (int64_t i : DistributedSampler(n, r, world, 1, true).indices(2)) ++seen_drop[i];
  }
  // Padding: 12 slots, every sample at least once, exactly two seen twice.
  int twice = 0;
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_GE(seen_pad[i], 1);
    twice += seen_pad[i] == 2;
  }
  EXPECT_EQ(twice, 2);
  // Dropping: 9 slots, 9 distinct samples.
  EXPECT_EQ(seen_drop.size(), 9u);
  for (auto& [i, c] : seen_drop) EXPECT_EQ(c, 1);
}

TEST(Sampler, BadArguments) {
  expect_error([] { DistributedSampler(10, 3, 3, 0); }, {"rank 3 outside [0, 3)"});
  expect_error([] { DistributedSampler(10, 0, 0, 0); }, {"world size must be at least 1"});
  expect_error([] { DistributedSampler(2, 0, 3, 0, true); }, {"drop_last with 2 samples for 3 ranks"});
  EXPECT_EQ(DistributedSampler(2, 2, 3, 0, false).indices(1).size(), 1u);  // padded from the start
}

// dist.sampler_drop_last reaches every epoch order (EpochSampler): shuffle is DistributedSampler
// with the same drop_last; balanced and oversample orders are cut to a multiple of the ranks
// likewise, so the ranks together take the order's first floor(L / R) * R positions, each once.
TEST(Sampler, EpochSamplersDropTheTailWhenAsked) {
  std::vector<int64_t> labels;
  for (int i = 0; i < 25; ++i) labels.push_back(i % 5 == 0 ? 1 : 0);
  for (int world : {1, 2, 3, 4}) {
    SCOPED_TRACE("world " + std::to_string(world));
    for (int r = 0; r < world; ++r) {
      const EpochSampler s(SamplerKind::shuffle, labels, 2, r, world, 9, true);
      EXPECT_EQ(s.indices(4), DistributedSampler(25, r, world, 9, true).indices(4));
      EXPECT_EQ(s.num_samples(), 25 / world);
      EXPECT_EQ(s.padding(), 25 / world * world - 25);  // dropped: negative
      EXPECT_EQ(EpochSampler(SamplerKind::shuffle, labels, 2, r, world, 9, false).padding(),
                (25 + world - 1) / world * world - 25);
    }
    for (SamplerKind kind : {SamplerKind::balanced, SamplerKind::oversample}) {
      const std::vector<int64_t> global = kind == SamplerKind::balanced ? class_balanced_order(labels, 2, 9, 4, 25)
                                                                         : oversample_minority(labels, 2, 9, 4);
      const size_t per = global.size() / static_cast<size_t>(world);
      std::vector<std::vector<int64_t>> mine;
      for (int r = 0; r < world; ++r) {
        const EpochSampler s(kind, labels, 2, r, world, 9, true);
        mine.push_back(s.indices(4));
        ASSERT_EQ(mine.back().size(), per);
        EXPECT_EQ(s.num_samples(), static_cast<int64_t>(per));
        EXPECT_EQ(mine.back(), shard_order(global, r, world, true));
      }
      for (size_t p = 0; p < per * static_cast<size_t>(world); ++p)
        ASSERT_EQ(mine[p % static_cast<size_t>(world)][p / static_cast<size_t>(world)], global[p]) << "position " << p;
    }
  }
  expect_error([&] { EpochSampler(SamplerKind::oversample, {0, 1}, 2, 0, 3, 0, true); },
               {"dist.sampler_drop_last with 2 samples for 3 ranks"});
  expect_error([] { shard_order({4, 5}, 0, 3, true); }, {"dist.sampler_drop_last with 2 samples for 3 ranks"});
  EXPECT_EQ(shard_order({4, 5}, 2, 3, false), std::vector<int64_t>{4});  // padded from the start
}
