// The device prefetcher's ring (data/device_prefetch.h) on the CPU, where it is a pass-through:
// batches come back in push order as the very tensors pushed, partial batches included; the
// ring refuses a push beyond its slots until release(), a pop with nothing queued, and batches
// of the wrong shape, dtype or size, each with one line naming the problem. The copy itself is
// tested on a GPU (tests/test_gpu_prefetch.cpp).
#include <gtest/gtest.h>

#include "data/device_prefetch.h"
#include "tests/expect_error.h"

using namespace lancet;
using namespace lancet::testing;

namespace {

Batch host_batch(int64_t rows, float first, const Shape& sample = {2, 3, 4}) {
  Shape s{rows};
  s.insert(s.end(), sample.begin(), sample.end());
  Batch b;
  b.x = Tensor::empty(s);
  float* p = b.x.data<float>();
  for (int64_t i = 0; i < b.x.numel(); ++i) p[i] = first + static_cast<float>(i);
  b.y = Tensor::empty({rows}, DType::i64);
  for (int64_t i = 0; i < rows; ++i) {
    b.y.data<int64_t>()[i] = i;
    b.indices.push_back(static_cast<int64_t>(first) + i);
  }
  return b;
}

}  // namespace

TEST(DevicePrefetch, CpuPassesBatchesThroughInOrder) {
  DevicePrefetcher pf(Stream::cpu(), 4, {2, 3, 4}, 2);
  EXPECT_EQ(pf.slots(), 2);
  EXPECT_TRUE(pf.device().is_cpu());
  // Prefetch one ahead, as the trainer does on a GPU, over 4 + 4 + 3 (a partial last batch).
  const std::vector<int64_t> rows{4, 4, 3};
  std::vector<Batch> pushed;
  for (size_t k = 0; k < rows.size(); ++k) pushed.push_back(host_batch(rows[k], 100.f * static_cast<float>(k)));
  pf.push(pushed[0]);
  for (size_t k = 0; k < rows.size(); ++k) {
    if (k + 1 < rows.size()) pf.push(pushed[k + 1]);
    EXPECT_EQ(pf.queued(), k + 1 < rows.size() ? 2 : 1);
    const Batch b = pf.pop();
    EXPECT_EQ(pf.in_use(), 1);
    EXPECT_EQ(b.x.raw_data(), pushed[k].x.raw_data()) << "the CPU path copies nothing";
    EXPECT_EQ(b.y.raw_data(), pushed[k].y.raw_data());
    EXPECT_EQ(b.x.shape(), (Shape{rows[k], 2, 3, 4}));
    EXPECT_EQ(b.indices, pushed[k].indices);
    pf.release();
    EXPECT_EQ(pf.in_use(), 0);
  }
  EXPECT_EQ(pf.queued(), 0);
}

TEST(DevicePrefetch, RingRefusesAPushBeyondItsSlotsUntilRelease) {
  DevicePrefetcher pf(Stream::cpu(), 2, {1, 2, 2}, 2);
  pf.push(host_batch(2, 0, {1, 2, 2}));
  pf.push(host_batch(1, 10, {1, 2, 2}));
  expect_error([&] { pf.push(host_batch(2, 20, {1, 2, 2})); }, {"DevicePrefetcher", "all 2 slots taken", "2 queued"});
  EXPECT_EQ(pf.pop().indices, (std::vector<int64_t>{0, 1}));
  // Popped but not released: the slot may still be in use by the step.
  expect_error([&] { pf.push(host_batch(2, 20, {1, 2, 2})); }, {"all 2 slots taken", "1 in use"});
  pf.release();
  pf.push(host_batch(2, 20, {1, 2, 2}));
  EXPECT_EQ(pf.pop().indices, (std::vector<int64_t>{10}));
  EXPECT_EQ(pf.pop().indices, (std::vector<int64_t>{20, 21}));
  expect_error([&] { pf.pop(); }, {"DevicePrefetcher: pop with no batch queued"});
}

TEST(DevicePrefetch, RefusesBadBatchesAndSettings) {
  expect_error([] { DevicePrefetcher(Stream::cpu(), 0, {1, 2, 2}); }, {"max_rows 0"});
  expect_error([] { DevicePrefetcher(Stream::cpu(), 4, {1, 2, 2}, 1); }, {"1 slots", "at least 2"});
  DevicePrefetcher pf(Stream::cpu(), 4, {1, 2, 2});
  expect_error([&] { pf.push(host_batch(5, 0, {1, 2, 2})); }, {"batch [5, 1, 2, 2]", "expected [1..4, 1, 2, 2]"});
  expect_error([&] { pf.push(host_batch(2, 0, {1, 3, 2})); }, {"batch [2, 1, 3, 2]"});
  Batch wrong_labels = host_batch(2, 0, {1, 2, 2});
  wrong_labels.y = Tensor::empty({3}, DType::i64);
  expect_error([&] { pf.push(wrong_labels); }, {"labels [3] for 2 images"});
  Batch int_labels = host_batch(2, 0, {1, 2, 2});
  int_labels.y = Tensor::empty({2}, DType::i32);
  expect_error([&] { pf.push(int_labels); }, {"f32 images and i32 labels", "expected f32 and i64"});
  expect_error([&] { pf.push(Batch()); }, {"push of an empty batch"});
  EXPECT_EQ(pf.queued(), 0) << "a refused batch takes no slot";
}
