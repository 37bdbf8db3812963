// The data loader (data/loader.h) and the 8-bit (or 16-bit) image cache (data/image_dataset.h):
// the cache gives the float path's tensors; batches are the same bytes whatever the worker
// count, with and without augmentation, at either bit depth; augmentation reaches training samples only; the samplers' class
// frequencies and their split over ranks; bad files are skipped and listed or refused naming
// the file; a worker's error reaches the consumer, stopping early never hangs, and at most
// workers x prefetch batches are in flight.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <opencv2/imgcodecs.hpp>
#include <random>
#include <sstream>
#include <thread>

#include "cli_util.h"
#include "comm/communicator.h"
#include "data/image_dataset.h"
#include "data/loader.h"
#include "data/pack.h"
#include "data/sampler.h"
#include "tests/expect_error.h"
#include "trainer/trainer.h"
#include "trainer/weights.h"

using namespace lancet;
using namespace lancet::testing;
namespace fs = std::filesystem;

namespace {

// <root>/<split>/<class>/iNN.png: random 8-bit images of 20x24 (gray or RGB), `per_class`
// images of each class.
void write_folder(const std::string& root, const std::string& split, const std::vector<int>& per_class, int channels,
                  uint32_t seed) {
  std::mt19937 rng(seed);
  for (size_t k = 0; k < per_class.size(); ++k) {
    const fs::path dir = fs::path(root) / split / ("c" + std::to_string(k));
    fs::create_directories(dir);
    for (int i = 0; i < per_class[k]; ++i) {
      cv::Mat img(20, 24, CV_8UC(channels));
      for (size_t b = 0; b < img.total() * img.elemSize(); ++b) img.data[b] = static_cast<uint8_t>(rng() % 256);
      char name[32];
      std::snprintf(name, sizeof name, "i%02d.png", i);
      ASSERT_TRUE(cv::imwrite((dir / name).string(), img));
    }
  }
}

ImageLoadOptions options(int channels, int size = 16) {
  ImageLoadOptions o;
  o.channels = channels;
  o.image_size = size;
  o.mean = {0.5f};
  o.std = {0.25f};
  return o;
}

std::vector<std::vector<int64_t>> batches_of(const std::vector<int64_t>& order, size_t bs) {
  std::vector<std::vector<int64_t>> out;
  for (size_t s = 0; s < order.size(); s += bs)
    out.emplace_back(order.begin() + static_cast<std::ptrdiff_t>(s),
                     order.begin() + static_cast<std::ptrdiff_t>(std::min(order.size(), s + bs)));
  return out;
}

// Every batch of `epochs` epochs (shuffled, batch 5) as bytes: x then y, batch after batch.
std::vector<uint8_t> run_epochs(const Dataset& ds, LoaderOptions opt, int epochs) {
  DataLoader loader(ds, std::move(opt));
  std::vector<uint8_t> bytes;
  for (int e = 0; e < epochs; ++e) {
    loader.start_epoch(e, batches_of(epoch_permutation(ds.size(), 3, e), 5));
    Batch b;
    while (loader.next(b)) {
      const auto* xp = static_cast<const uint8_t*>(b.x.raw_data());
      bytes.insert(bytes.end(), xp, xp + b.x.nbytes());
      const auto* yp = static_cast<const uint8_t*>(b.y.raw_data());
      bytes.insert(bytes.end(), yp, yp + b.y.nbytes());
    }
  }
  return bytes;
}

AugmentConfig strong_augment() {
  return AugmentConfig::from_json(Json::parse(R"({"hflip": 0.5, "vflip": 0.5, "rotate_deg": 20,
      "random_resized_crop": {"scale": [0.5, 1.0]}, "brightness": 0.3, "contrast": 0.3, "minority_strength": 2})"));
}

// Samples of 1x2x2 floats equal to the index; optionally one index throws, or every get sleeps.
class ToyDataset final : public Dataset {
 public:
  ToyDataset(std::vector<int64_t> labels, int64_t bad = -1, int sleep_ms = 0)
      : labels_(std::move(labels)), bad_(bad), sleep_ms_(sleep_ms) {}
  int64_t size() const override { return static_cast<int64_t>(labels_.size()); }
  Shape sample_shape() const override { return {1, 2, 2}; }
  const std::vector<std::string>& class_names() const override { return classes_; }
  int64_t label(int64_t i) const override { return labels_[static_cast<size_t>(i)]; }
  void get(int64_t i, float* out) const override {
    if (sleep_ms_) std::this_thread::sleep_for(std::chrono::milliseconds(sleep_ms_));
    LANCET_CHECK(i != bad_, "scans/bad_" << i << ".png: cannot decode image (corrupt or unsupported format)");
    for (int k = 0; k < 4; ++k) out[k] = static_cast<float>(i);
  }

 private:
  std::vector<int64_t> labels_;
  std::vector<std::string> classes_{"normal", "pneumonia"};
  int64_t bad_;
  int sleep_ms_;
};

}  // namespace

TEST(ImageCache, GivesTheFloatPathsTensorsFromFoldersAndPacks) {
  TempDir tmp("loader_cache");
  write_folder(tmp / "src", "train", {5, 4}, 3, 1);
  for (int channels : {1, 3}) {
    const ImageLoadOptions lo = options(channels);
    const auto cached = load_cached_dataset(tmp / "src", "train", lo);
    const auto floats = load_dataset(tmp / "src", "train", lo);
    ASSERT_EQ(cached->size(), floats->size());
    EXPECT_EQ(cached->sample_shape(), floats->sample_shape());
    EXPECT_TRUE(cached->skipped().empty());
    const int64_t per = shape_numel(cached->sample_shape());
    std::vector<float> a(static_cast<size_t>(per)), b(static_cast<size_t>(per));
    for (int64_t i = 0; i < cached->size(); ++i) {
      cached->get(i, a.data());
      floats->get(i, b.data());
      ASSERT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float))) << "sample " << i;
      EXPECT_EQ(cached->label(i), floats->label(i));
    }
  }
  // A pack, at its own size and converted to another one.
  PackOptions po;
  po.load = options(1, 16);
  write_pack(tmp / "src", tmp / "p.h5", po);
  for (int size : {16, 12}) {
    const ImageLoadOptions lo = options(1, size);
    std::string note;
    const auto cached = load_cached_dataset(tmp / "p.h5", "train", lo, BadSample::error, &note);
    EXPECT_NE(note.find("verified"), std::string::npos) << note;
    const auto floats = load_dataset(tmp / "p.h5", "train", lo);
    ASSERT_EQ(cached->size(), floats->size());
    std::vector<float> a(static_cast<size_t>(size * size)), b(a.size());
    for (int64_t i = 0; i < cached->size(); ++i) {
      cached->get(i, a.data());
      floats->get(i, b.data());
      ASSERT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float))) << "size " << size << " sample " << i;
    }
  }
}

TEST(DataLoader, SameBytesWhateverTheWorkerCount) {
  TempDir tmp("loader_det");
  write_folder(tmp / "src", "train", {9, 4}, 3, 2);
  const auto ds = load_cached_dataset(tmp / "src", "train", options(3));
  for (bool augmented : {false, true}) {
    LoaderOptions opt;
    opt.seed = 11;
    if (augmented) opt.augment = strong_augment(), opt.minority = minority_classes(ds->labels(), 2);
    std::vector<uint8_t> reference;
    for (int workers : {0, 1, 3}) {
      for (int prefetch : {1, 4}) {
        opt.workers = workers;
        opt.prefetch = prefetch;
        const auto bytes = run_epochs(*ds, opt, 2);
        if (reference.empty()) reference = bytes;
        EXPECT_EQ(bytes, reference) << "augmented " << augmented << ", " << workers << " workers, prefetch " << prefetch;
      }
    }
    // Without augmentation the batches are make_batch's.
    if (!augmented) {
      std::vector<uint8_t> expect;
      for (int e = 0; e < 2; ++e)
        for (const auto& idx : batches_of(epoch_permutation(ds->size(), 3, e), 5)) {
          Tensor x = Tensor::empty({static_cast<int64_t>(idx.size()), 3, 16, 16});
          Tensor y = Tensor::empty({static_cast<int64_t>(idx.size())}, DType::i64);
          make_batch(*ds, idx, x, y);
          const auto* xp = static_cast<const uint8_t*>(x.raw_data());
          expect.insert(expect.end(), xp, xp + x.nbytes());
          const auto* yp = static_cast<const uint8_t*>(y.raw_data());
          expect.insert(expect.end(), yp, yp + y.nbytes());
        }
      EXPECT_EQ(reference, expect);
    }
  }
}

TEST(DataLoader, SixteenBitSamplesAreAugmentedAtSixteenBitsWhateverTheWorkerCount) {
  // data.bit_depth 16: 16-bit gray PNGs near the top of the range, whose augmented samples
  // (brightness up to x1.3) saturate at 65535, not at 255, and keep sub-8-bit steps.
  TempDir tmp("loader_16");
  std::mt19937 rng(4);
  for (int i = 0; i < 8; ++i) {
    cv::Mat img(20, 24, CV_16UC1);
    for (size_t k = 0; k < img.total(); ++k) img.ptr<uint16_t>()[k] = static_cast<uint16_t>(40000 + rng() % 20000);
    const fs::path dir = fs::path(tmp / "src") / "train" / (i < 5 ? "c0" : "c1");
    fs::create_directories(dir);
    ASSERT_TRUE(cv::imwrite((dir / ("i" + std::to_string(i) + ".png")).string(), img));
  }
  ImageLoadOptions lo = options(1);
  lo.bit_depth = 16;
  const auto ds = load_cached_dataset(tmp / "src", "train", lo);
  ASSERT_EQ(ds->bits(), 16);
  LoaderOptions opt;
  opt.seed = 11;
  opt.augment = strong_augment(), opt.minority = minority_classes(ds->labels(), 2);
  std::vector<uint8_t> reference;
  for (int workers : {0, 3}) {
    opt.workers = workers;
    const auto bytes = run_epochs(*ds, opt, 2);
    if (reference.empty()) reference = bytes;
    EXPECT_EQ(bytes, reference) << workers << " workers";
  }
  // A sample is augment.h's apply_augment on the cached uint16 pixels, then / 65535.
  for (int64_t i = 0; i < ds->size(); ++i) {
    const std::vector<uint8_t> bytes = ds->image(i);
    PixelImage<uint16_t> img{16, 16, 1, std::vector<uint16_t>(16 * 16)};
    std::memcpy(img.data.data(), bytes.data(), bytes.size());
    const bool minority = opt.minority[static_cast<size_t>(ds->label(i))];
    augment(img, opt.augment, opt.seed, 1, i, minority, 16);
    std::vector<float> got(16 * 16);
    ds->get_augmented(i, opt.augment, opt.seed, 1, minority, got.data());
    for (size_t k = 0; k < got.size(); ++k)
      ASSERT_EQ(got[k], (static_cast<float>(img.data[k]) / 65535.0f - 0.5f) / 0.25f) << i << " pixel " << k;
    EXPECT_GT(*std::max_element(img.data.begin(), img.data.end()), 255) << i;
  }
}

TEST(DataLoader, AugmentationChangesSamplesPerEpochAndFollowsAugmentH) {
  TempDir tmp("loader_aug");
  write_folder(tmp / "src", "train", {4, 4}, 1, 3);
  const auto ds = load_cached_dataset(tmp / "src", "train", options(1));
  LoaderOptions opt;
  opt.workers = 2;
  opt.seed = 5;
  opt.augment = AugmentConfig::from_json(Json::parse(R"({"hflip": 1.0})"));  // always flipped
  DataLoader loader(*ds, opt);
  loader.start_epoch(1, {{0, 1}, {2}});
  Batch b;
  ASSERT_TRUE(loader.next(b));
  std::vector<float> plain(16 * 16);
  ds->get(1, plain.data());
  const float* row1 = b.x.data<float>() + 16 * 16;
  for (int y = 0; y < 16; ++y)
    for (int x = 0; x < 16; ++x) ASSERT_EQ(row1[y * 16 + x], plain[static_cast<size_t>(y * 16 + 15 - x)]);
  EXPECT_EQ(b.indices, (std::vector<int64_t>{0, 1}));
  ASSERT_TRUE(loader.next(b));
  EXPECT_EQ(b.x.dim(0), 1);
  EXPECT_FALSE(loader.next(b));

  // Augmentation needs the 8-bit images.
  const ToyDataset toy({0, 1});
  expect_error([&] { DataLoader l(toy, opt); }, {"data.augment", "8- or 16-bit pixels"});
}

TEST(DataLoader, BalancedAndOversampledClassFrequencies) {
  std::vector<int64_t> labels(90, 0);
  labels.insert(labels.end(), 10, 1);
  const ToyDataset toy(labels);
  const EpochSampler balanced(SamplerKind::balanced, labels, 2, 0, 1, 7);
  const EpochSampler over(SamplerKind::oversample, labels, 2, 0, 1, 7);
  EXPECT_EQ(balanced.num_samples(), 100);
  EXPECT_EQ(over.num_samples(), 180);
  LoaderOptions opt;
  opt.workers = 2;
  DataLoader loader(toy, opt);
  int64_t counts[2] = {0, 0};
  for (int e = 0; e < 20; ++e) {
    loader.start_epoch(e, batches_of(balanced.indices(e), 16));
    for (Batch b; loader.next(b);)
      for (int64_t j = 0; j < b.y.dim(0); ++j) {
        ++counts[b.y.data<int64_t>()[j]];
        EXPECT_EQ(b.x.data<float>()[j * 4], static_cast<float>(b.indices[static_cast<size_t>(j)]));
      }
  }
  const double share = static_cast<double>(counts[1]) / (counts[0] + counts[1]);
  EXPECT_NEAR(share, 0.5, 0.05) << counts[0] << " / " << counts[1];  // 2000 draws: sd 0.011
  loader.start_epoch(0, batches_of(over.indices(0), 16));
  int64_t oc[2] = {0, 0};
  for (Batch b; loader.next(b);)
    for (int64_t j = 0; j < b.y.dim(0); ++j) ++oc[b.y.data<int64_t>()[j]];
  EXPECT_EQ(oc[0], 90);
  EXPECT_EQ(oc[1], 90);
}

TEST(DataLoader, SamplersSplitOneGlobalOrderOverRanks) {
  std::vector<int64_t> labels;
  for (int i = 0; i < 25; ++i) labels.push_back(i % 5 == 0 ? 1 : 0);
  for (int world : {1, 2, 3}) {
    for (int r = 0; r < world; ++r)  // shuffle is DistributedSampler
      EXPECT_EQ(EpochSampler(SamplerKind::shuffle, labels, 2, r, world, 9).indices(4),
                DistributedSampler(25, r, world, 9).indices(4));
    for (SamplerKind kind : {SamplerKind::balanced, SamplerKind::oversample}) {
      const std::vector<int64_t> global = kind == SamplerKind::balanced ? class_balanced_order(labels, 2, 9, 4, 25)
                                                                         : oversample_minority(labels, 2, 9, 4);
      EXPECT_EQ(EpochSampler(kind, labels, 2, 0, 1, 9).indices(4), global);
      std::vector<std::vector<int64_t>> mine;
      for (int r = 0; r < world; ++r) mine.push_back(EpochSampler(kind, labels, 2, r, world, 9).indices(4));
      const size_t per = mine[0].size();
      EXPECT_EQ(per, (global.size() + world - 1) / world);
      // Position p of the padded global order is rank p % world's element p / world.
      for (size_t p = 0; p < per * static_cast<size_t>(world); ++p)
        ASSERT_EQ(mine[p % world][p / world], global[p % global.size()]) << "world " << world << " position " << p;
    }
  }
  expect_error([] { parse_sampler("weighted"); }, {"data.sampler", "weighted", "balanced"});
}

TEST(DataLoader, BadFileIsRefusedNamingItOrSkippedAndListed) {
  TempDir tmp("loader_bad");
  write_folder(tmp / "src", "train", {3, 3}, 1, 4);
  const std::string bad = tmp / "src/train/c1/i01.png";
  std::ofstream(bad, std::ios::trunc) << "not a png at all";
  expect_error([&] { load_cached_dataset(tmp / "src", "train", options(1)); }, {bad, "cannot decode"});
  const auto ds = load_cached_dataset(tmp / "src", "train", options(1), BadSample::skip);
  EXPECT_EQ(ds->size(), 5);
  ASSERT_EQ(ds->skipped().size(), 1u);
  EXPECT_NE(ds->skipped()[0].find(bad), std::string::npos);
  EXPECT_EQ(ds->label(4), 1);  // c1's other two images keep their label
  const std::string report = skipped_report(*ds, "train");
  EXPECT_NE(report.find("1 bad train file(s) skipped"), std::string::npos) << report;
  EXPECT_NE(report.find(bad), std::string::npos) << report;
  expect_error([] { parse_bad_sample("ignore"); }, {"data.on_bad_sample", "ignore"});
}

TEST(DataLoader, WorkerErrorReachesTheConsumerNamingTheFile) {
  const ToyDataset toy(std::vector<int64_t>(40, 0), /*bad=*/13);
  for (int workers : {0, 1, 3}) {
    LoaderOptions opt;
    opt.workers = workers;
    DataLoader loader(toy, opt);
    std::vector<int64_t> order(40);
    for (int64_t i = 0; i < 40; ++i) order[static_cast<size_t>(i)] = i;
    loader.start_epoch(0, batches_of(order, 4));
    Batch b;
    for (int k = 0; k < 3; ++k) ASSERT_TRUE(loader.next(b)) << workers << " workers";  // rows 0..11
    expect_error([&] { loader.next(b); }, {"scans/bad_13.png", "cannot decode"});
    EXPECT_FALSE(loader.next(b)) << "the epoch ends with the error";
    // The next epoch works again.
    loader.start_epoch(1, {{0, 1}});
    ASSERT_TRUE(loader.next(b));
    EXPECT_EQ(b.x.data<float>()[4], 1.f);
  }
}

TEST(DataLoader, StoppingEarlyNeverHangs) {
  const ToyDataset slow(std::vector<int64_t>(64, 1), -1, /*sleep_ms=*/2);
  const auto t0 = std::chrono::steady_clock::now();
  for (int workers : {1, 4}) {
    LoaderOptions opt;
    opt.workers = workers;
    opt.prefetch = 2;
    {
      DataLoader loader(slow, opt);
      loader.start_epoch(0, batches_of(std::vector<int64_t>(64, 3), 4));
      Batch b;
      ASSERT_TRUE(loader.next(b));
    }  // destroyed with batches in flight
    {
      DataLoader loader(slow, opt);  // never started
    }
    {
      DataLoader loader(slow, opt);
      loader.start_epoch(0, batches_of(std::vector<int64_t>(64, 3), 4));
      loader.start_epoch(1, batches_of(std::vector<int64_t>(8, 2), 4));  // drops epoch 0's batches
      Batch b;
      int n = 0;
      while (loader.next(b)) {
        EXPECT_EQ(b.x.data<float>()[0], 2.f);
        ++n;
      }
      EXPECT_EQ(n, 2);
    }
  }
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 10.0);
  expect_error([&] { LoaderOptions o; o.workers = -1; DataLoader l(slow, o); }, {"data.workers"});
  expect_error([&] { LoaderOptions o; o.prefetch = 0; DataLoader l(slow, o); }, {"data.prefetch"});
}

namespace {
// Batch k is the one sample {k}: get(k) starting means batch k is being built. Records the
// highest batch started and whether one started beyond `bound` (exclusive), which the consumer
// raises as it takes batches.
class InFlightProbe final : public Dataset {
 public:
  explicit InFlightProbe(int64_t n) : n_(n) {}
  int64_t size() const override { return n_; }
  Shape sample_shape() const override { return {1, 1, 1}; }
  const std::vector<std::string>& class_names() const override { return classes_; }
  int64_t label(int64_t) const override { return 0; }
  void get(int64_t i, float* out) const override {
    if (i >= bound.load()) overstep.store(i);
    int64_t m = max_started.load();
    while (i > m && !max_started.compare_exchange_weak(m, i)) {
    }
    out[0] = static_cast<float>(i);
  }
  mutable std::atomic<int64_t> max_started{-1}, overstep{-1};
  std::atomic<int64_t> bound{0};

 private:
  int64_t n_;
  std::vector<std::string> classes_{"only"};
};
}  // namespace

TEST(DataLoader, NeverMoreThanWorkersTimesPrefetchBatchesInFlight) {
  const int64_t n = 24;
  for (const auto& [workers, prefetch] : std::vector<std::pair<int, int>>{{1, 1}, {1, 3}, {3, 1}, {2, 2}}) {
    const int64_t window = workers * prefetch;
    InFlightProbe probe(n);
    probe.bound = window;  // before any batch is taken: batches 0 .. window-1
    LoaderOptions opt;
    opt.workers = workers, opt.prefetch = prefetch;
    DataLoader loader(probe, opt);
    std::vector<std::vector<int64_t>> batches;
    for (int64_t k = 0; k < n; ++k) batches.push_back({k});
    loader.start_epoch(0, batches);
    Batch b;
    for (int64_t d = 0; d < n; ++d) {
      // The workers fill the window (batches d .. d+window-1), and go no further.
      const int64_t full = std::min(d + window, n) - 1;
      const auto t0 = std::chrono::steady_clock::now();
      while (probe.max_started.load() < full && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(20))
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      ASSERT_GE(probe.max_started.load(), full) << "the loader did not prefetch; workers " << workers;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));  // a chance to overstep
      ASSERT_EQ(probe.overstep.load(), -1) << "batch " << probe.overstep.load() << " started with batch " << d
                                           << " not yet taken: workers " << workers << ", prefetch " << prefetch;
      probe.bound = d + 1 + window;  // taking batch d frees one place
      ASSERT_TRUE(loader.next(b));
      EXPECT_EQ(b.x.data<float>()[0], static_cast<float>(d));
    }
    EXPECT_FALSE(loader.next(b));
    EXPECT_EQ(probe.overstep.load(), -1);
  }
}

namespace {
Json tiny_job(const std::string& data, const std::string& out) {
  Json c = default_config();
  apply_override(c, "model.widths=[4, 8, 8, 8]");
  apply_override(c, "model.depths=[1, 1, 1, 1]");
  apply_override(c, "model.head_hidden=8");
  apply_override(c, "data.dir=" + data);
  apply_override(c, "data.image_size=16");
  apply_override(c, "train.epochs=2");
  apply_override(c, "train.batch_size=4");
  apply_override(c, "train.threads=1");
  apply_override(c, "train.tensorboard=false");
  apply_override(c, "train.out=" + out);
  return c;
}
}  // namespace

TEST(DataLoader, TrainingAugmentsTrainOnlySkipsBadFilesAndIgnoresWorkerCount) {
  TempDir tmp("loader_train");
  write_folder(tmp / "src", "train", {8, 4}, 1, 5);
  write_folder(tmp / "src", "val", {3, 3}, 1, 6);
  const std::string bad = tmp / "src/train/c0/i03.png";
  std::ofstream(bad, std::ios::trunc) << "truncated";
  auto run = [&](const std::string& name, int workers) {
    Json c = tiny_job(tmp / "src", tmp / name);
    apply_override(c, "data.on_bad_sample=skip");
    apply_override(c, "data.sampler=balanced");
    apply_override(c, "data.augment={hflip: 0.5, rotate_deg: 10, brightness: 0.2}");
    apply_override(c, "train.grad_accum_steps=2");
    apply_override(c, "train.drop_last=true");  // no micro-batch of one row (BatchNorm)
    apply_override(c, "data.workers=" + std::to_string(workers));
    auto comm = make_single_process_communicator();
    std::ostringstream log;
    const TrainSummary s = run_training(c, *comm, log);
    return std::make_pair(s, log.str());
  };
  const auto [a, log_a] = run("a", 0);
  const auto [b, log_b] = run("b", 3);
  SCOPED_TRACE(log_a);
  // Bit-identical runs whatever the worker count.
  auto ma = load_model(tmp / "a/final.h5"), mb = load_model(tmp / "b/final.h5");
  const auto sa = ma->state_dict(), sb = mb->state_dict();
  for (size_t i = 0; i < sa.size(); ++i) EXPECT_EQ(sa[i].second->to_vector(), sb[i].second->to_vector()) << sa[i].first;
  EXPECT_EQ(a.final_eval.loss, b.final_eval.loss);
  // The bad file is listed at load and at the end of each epoch.
  size_t listed = 0;
  for (size_t p = 0; (p = log_a.find(bad, p)) != std::string::npos; ++p) ++listed;
  EXPECT_EQ(listed, 3u);
  EXPECT_NE(log_a.find("augmentation {"), std::string::npos);
  // Validation saw the plain images: the float path's val set gives the same evaluation.
  const auto val = load_dataset(tmp / "src", "val", options(1));
  const EvalResult again = evaluate(*ma, *val, 64, Loss{}, Stream::cpu());
  EXPECT_EQ(again.loss, a.final_eval.loss);
  EXPECT_EQ(again.probs, a.final_eval.probs);
}

// data.cache false: nothing decoded at load, every read decodes (folder) or reads one chunk
// (pack); the batches are the cached dataset's bytes, with augmentation, for any worker count;
// a bad file fails the read that meets it, naming the file; training is bit-identical.
TEST(DataLoader, StreamedDatasetsGiveTheCachedBytes) {
  TempDir tmp("loader_stream");
  write_folder(tmp / "src", "train", {6, 5}, 3, 8);
  write_folder(tmp / "src", "val", {2, 2}, 3, 9);
  PackOptions po;
  po.load = options(3, 20);
  write_pack(tmp / "src", tmp / "p.h5", po);
  for (const std::string& source : {tmp / "src", tmp / "p.h5"}) {
    for (int size : {16, 20}) {
      SCOPED_TRACE(source + " at " + std::to_string(size));
      std::string note;
      const auto cached = load_cached_dataset(source, "train", options(3, size));
      const auto streamed = load_cached_dataset(source, "train", options(3, size), BadSample::error, &note, true);
      EXPECT_TRUE(streamed->streaming());
      EXPECT_FALSE(cached->streaming());
      if (source.size() > 3 && source.substr(source.size() - 3) == ".h5") {
        EXPECT_NE(note.find("verified; images read from the pack as needed"), std::string::npos) << note;
      }
      ASSERT_EQ(streamed->size(), cached->size());
      EXPECT_EQ(streamed->labels(), cached->labels());
      for (int64_t i = 0; i < cached->size(); ++i) EXPECT_EQ(streamed->image(i), cached->image(i)) << i;
      expect_error([&] { streamed->pixels(0); }, {"streams its samples"});
      LoaderOptions opt;
      opt.seed = 3;
      opt.augment = strong_augment();
      opt.workers = 0;
      const auto reference = run_epochs(*cached, opt, 2);
      for (int workers : {0, 2}) {
        opt.workers = workers;
        EXPECT_EQ(run_epochs(*streamed, opt, 2), reference) << workers << " workers";
      }
    }
  }
  // Bad input: found by the read, or refused with skip.
  const std::string bad = tmp / "src/train/c1/i02.png";
  std::ofstream(bad, std::ios::trunc) << "not a png";
  const auto streamed = load_cached_dataset(tmp / "src", "train", options(3), BadSample::error, nullptr, true);
  std::vector<float> out(3 * 16 * 16);
  expect_error([&] { streamed->get(8, out.data()); }, {bad, "cannot decode"});
  expect_error([&] { load_cached_dataset(tmp / "src", "train", options(3), BadSample::skip, nullptr, true); },
               {"data.on_bad_sample skip needs data.cache true"});
  std::filesystem::remove(bad);
  write_folder(tmp / "src2", "train", {6, 5}, 3, 8);
  write_folder(tmp / "src2", "val", {2, 2}, 3, 9);
  // Training from the stream equals training from the cache.
  auto run = [&](const std::string& name, bool cache) {
    Json c = tiny_job(tmp / "src2", tmp / name);
    apply_override(c, "data.channels=3");
    apply_override(c, "data.augment={hflip: 0.5, rotate_deg: 10}");
    apply_override(c, std::string("data.cache=") + (cache ? "true" : "false"));
    auto comm = make_single_process_communicator();
    std::ostringstream log;
    return run_training(c, *comm, log);
  };
  const TrainSummary a = run("cached", true), b = run("streamed", false);
  auto ma = load_model(tmp / "cached/final.h5"), mb = load_model(tmp / "streamed/final.h5");
  const auto sa = ma->state_dict(), sb = mb->state_dict();
  for (size_t i = 0; i < sa.size(); ++i) EXPECT_EQ(sa[i].second->to_vector(), sb[i].second->to_vector()) << sa[i].first;
  EXPECT_EQ(a.final_eval.loss, b.final_eval.loss);
}

TEST(DataLoader, ConfigKeysAreChecked) {
  Json c = default_config();
  EXPECT_EQ(data_config(c).workers, 2);
  EXPECT_EQ(data_config(c).sampler, "shuffle");
  EXPECT_FALSE(AugmentConfig::from_json(data_config(c).augment).enabled());
  apply_override(c, "data.augment.hflip=0.5");
  EXPECT_DOUBLE_EQ(AugmentConfig::from_json(data_config(c).augment).hflip, 0.5);
  apply_override(c, "data.augment.random_resized_crop={scale: [0.5, 1]}");
  EXPECT_TRUE(AugmentConfig::from_json(data_config(c).augment).crop);
  expect_error([&] { Json d = c; apply_override(d, "data.augment.hflip=2"); data_config(d); }, {"data.augment.hflip"});
  expect_error([&] { Json d = c; apply_override(d, "data.sampler=weighted"); data_config(d); }, {"data.sampler"});
  expect_error([&] { Json d = c; apply_override(d, "data.on_bad_sample=ignore"); data_config(d); },
               {"data.on_bad_sample"});
  expect_error([&] { Json d = c; apply_override(d, "data.workers=-1"); data_config(d); }, {"data.workers"});
  expect_error([&] { Json d = c; apply_override(d, "data.prefetch=0"); data_config(d); }, {"data.prefetch"});
}
