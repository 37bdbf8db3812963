// lancet bench data — images/s of the data loader (data/loader.h) against its worker count, on
// the configured training source (folder, manifest, .npz or pack) with the configured
// preprocessing recipe and augmentation. The source is first loaded once (decode, recipe,
// resize: the 8-bit cache of data/image_dataset.h; reported as load_*), then each worker
// count builds --batches batches of train.batch_size (augment, normalise, batch) while the
// consumer only takes them: the rate a training step could be fed at. Each row first runs one
// untimed prefetch window (workers x data.prefetch batches, at least one): it starts the
// workers and fills the allocators' caches (a cudaHostAlloc takes milliseconds).
//
// The three comparisons of the DataLoader studies in one run: --workers-list; --batch-memory
// pageable,pinned (batches in pageable or in CUDA pinned host memory); --data-list (e.g. an
// image folder and its pack from lancet prep: each replaces data.dir, and labels its rows).
// With --device cuda the consumer also copies each batch to the GPU on a stream of its own and
// waits for the copy — the copy pinned memory speeds up. Its time is a column of its own and is
// part of the row's images/s, as for a step that waits for its batch. Pinned rows need
// --device cuda (on the CPU there is no copy for them to speed up): refused up front otherwise,
// as bench train refuses emulated fp16.
#include <algorithm>
#include <chrono>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <memory>
#include <thread>

#include "data/image_dataset.h"
#include "data/loader.h"
#ifdef LANCET_WITH_CUDA
#include "kernels/cuda/runtime.h"
#endif
#include "kernels/parallel.h"
#include "tools/cli.h"
#include "trainer/trainer.h"

namespace lancet::cli {

namespace {
using Clock = std::chrono::steady_clock;

struct BenchDataArgs {
  std::vector<int> workers{0, 1, 2, 4};
  int batches = 50;
  std::vector<std::string> memory{"pageable"};
  std::vector<std::string> data;  // --data-list; empty: data.dir alone
};

// Where a row's batches live: the CPU allocator (pageable) or the pinned host allocator of the
// GPU they go to. Pinned rows reach here only with a CUDA device (checked up front).
Allocator* batch_allocator(const std::string& memory, Device device) {
  if (memory == "pageable") return nullptr;
#ifdef LANCET_WITH_CUDA
  return &pinned_host_allocator(device);
#else
  LANCET_FAIL("bench data: --batch-memory " << memory << " on " << device.str()
                                            << ": this build of lancet has no CUDA (LANCET_CUDA=OFF)");
#endif
}

// The host->device copy of each batch with --device cuda, into one pair of device buffers, on a
// stream of its own, waited for and timed; nothing on the CPU.
class BatchUpload {
 public:
  // x_shape: a full batch's [B, C, H, W]; every timed batch is full.
  BatchUpload(Device device, const Shape& x_shape) : device_(device) {
    if (!enabled()) return;
#ifdef LANCET_WITH_CUDA
    stream_ = std::make_unique<CudaStream>(device);
    x_ = Tensor::empty(x_shape, DType::f32, device);
    y_ = Tensor::empty({x_shape[0]}, DType::i64, device);
#else
    (void)x_shape;
#endif
  }
  bool enabled() const { return device_.is_cuda(); }
  void operator()(const Batch& b) {
    if (!enabled()) return;
#ifdef LANCET_WITH_CUDA
    const auto t0 = Clock::now();
    copy_async(x_.raw_data(), device_, b.x.raw_data(), Device::cpu(), b.x.nbytes(), stream_->stream());
    copy_async(y_.raw_data(), device_, b.y.raw_data(), Device::cpu(), b.y.nbytes(), stream_->stream());
    stream_->synchronize();
    seconds_ += std::chrono::duration<double>(Clock::now() - t0).count();
    bytes_ += static_cast<double>(b.x.nbytes() + b.y.nbytes());
#else
    (void)b;
#endif
  }
  void reset() { seconds_ = bytes_ = 0; }
  double seconds() const { return seconds_; }
  double bytes() const { return bytes_; }

 private:
  Device device_;
#ifdef LANCET_WITH_CUDA
  std::unique_ptr<CudaStream> stream_;
#endif
  Tensor x_, y_;
  double seconds_ = 0, bytes_ = 0;
};

// One row: the loader with `lo` delivering `batches` (after the warm-up window), each batch
// uploaded when the upload is enabled.
Json time_loader(const Dataset& ds, const LoaderOptions& lo, const std::vector<std::vector<int64_t>>& batches,
                 BatchUpload& upload) {
  DataLoader loader(ds, lo);
  const size_t warm = std::min(batches.size(), static_cast<size_t>(std::max(1, lo.workers) * lo.prefetch));
  loader.start_epoch(0, std::vector<std::vector<int64_t>>(batches.begin(), batches.begin() + static_cast<std::ptrdiff_t>(warm)));
  for (Batch b; loader.next(b);) upload(b);
  upload.reset();
  const auto t0 = Clock::now();
  loader.start_epoch(1, batches);
  int64_t images = 0;
  for (Batch b; loader.next(b);) {
    images += b.x.dim(0);
    upload(b);
  }
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  const double n = static_cast<double>(batches.size());
  Json row = {{"workers", lo.workers},
              {"images_per_s", images / std::max(s, 1e-9)},
              {"batch_ms_mean", s * 1e3 / n},
              {"images", images}};
  if (upload.enabled()) {
    row["h2d_ms_per_batch"] = upload.seconds() * 1e3 / n;
    row["h2d_gb_per_s"] = upload.bytes() / std::max(upload.seconds(), 1e-12) / 1e9;
  }
  return row;
}

void print_table(const Json& results, bool h2d) {
  size_t width = 6;
  for (const Json& r : results) width = std::max(width, r["source"].get<std::string>().size());
  std::cout << std::left << std::setw(static_cast<int>(width)) << "source" << std::right << "  memory    workers"
            << std::setw(11) << "img/s" << std::setw(10) << "ms/batch";
  if (h2d) std::cout << std::setw(14) << "h2d ms/batch" << std::setw(10) << "h2d GB/s";
  std::cout << "\n" << std::fixed;
  for (const Json& r : results) {
    std::cout << std::left << std::setw(static_cast<int>(width)) << r["source"].get<std::string>() << "  "
              << std::setw(8) << r["batch_memory"].get<std::string>() << std::right << std::setw(9)
              << r["workers"].get<int>() << std::setprecision(1) << std::setw(11) << r["images_per_s"].get<double>()
              << std::setprecision(2) << std::setw(10) << r["batch_ms_mean"].get<double>();
    if (h2d)
      std::cout << std::setprecision(3) << std::setw(14) << r["h2d_ms_per_batch"].get<double>() << std::setprecision(2)
                << std::setw(10) << r["h2d_gb_per_s"].get<double>();
    std::cout << "\n";
  }
}

void run_bench_data(const BenchDataArgs& a, const ConfigArgs& args, bool json) {
  const Json config = resolve_config(args, default_config());
  const DataConfig dc = data_config(config);
  const TrainConfig tc = train_config(config);
  const int threads = tc.threads > 0 ? tc.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  set_num_threads(threads);
  for (int w : a.workers) LANCET_CHECK(w >= 0, "bench data: --workers-list values must be >= 0, got " << w);
  LANCET_CHECK(a.data.empty() || std::none_of(args.flags.begin(), args.flags.end(),
                                              [](const auto& f) { return f.first == "data.dir"; }),
               "bench data: give --data or --data-list, not both");
  const Device device = parse_device(tc.device);
  const bool pinned = std::find(a.memory.begin(), a.memory.end(), "pinned") != a.memory.end();
  LANCET_CHECK(!pinned || device.is_cuda(), "bench data: --batch-memory pinned needs --device cuda (pinned memory "
                                            "only speeds up the host->device copy, which is timed there)");
  check_train_device(device, DType::f32, 1);  // a CUDA build, and the GPU exists
  for (const std::string& dir : a.data)  // before the first source's rows take their time
    LANCET_CHECK(std::filesystem::exists(dir), "bench data: --data-list " << dir << ": no such file or folder");

  std::ostream& log = json ? std::cerr : std::cout;
  const size_t bs = static_cast<size_t>(tc.batch_size);
  LoaderOptions lo;
  lo.prefetch = dc.prefetch;
  lo.seed = tc.seed;
  lo.augment = AugmentConfig::from_json(dc.augment);
  Json sources = Json::array(), results = Json::array();
  for (const std::string& dir : a.data.empty() ? std::vector<std::string>{dc.dir} : a.data) {
    const std::string label = dir.empty() ? "synthetic" : dir;
    DataConfig sdc = dc;
    sdc.dir = dir;
    const auto t_load = Clock::now();
    const DataSplits data = load_data(sdc, log);
    const double load_s = std::chrono::duration<double>(Clock::now() - t_load).count();
    const Dataset& ds = *data.train;
    const int64_t loaded = ds.size() + data.val->size();
    sources.push_back({{"source", label},
                       {"path", data.source},
                       {"train_images", ds.size()},
                       {"load_seconds", load_s},
                       {"load_images_per_s", loaded / std::max(load_s, 1e-9)}});
    log << std::fixed << std::setprecision(2) << "bench data: " << label << ": loading " << loaded << " images took "
        << load_s << " s with " << threads << " thread(s)\n";

    std::vector<int64_t> labels(static_cast<size_t>(ds.size()));
    for (int64_t i = 0; i < ds.size(); ++i) labels[static_cast<size_t>(i)] = ds.label(i);
    const EpochSampler sampler(parse_sampler(dc.sampler), labels, ds.num_classes(), 0, 1, tc.seed);
    lo.minority = lo.augment.enabled() ? minority_classes(labels, ds.num_classes()) : std::vector<bool>{};
    // Enough epochs of the sampler's order for --batches full batches.
    std::vector<std::vector<int64_t>> batches;
    for (int epoch = 1; static_cast<int>(batches.size()) < a.batches; ++epoch) {
      const auto order = sampler.indices(epoch);
      for (size_t s = 0; s + bs <= order.size() && static_cast<int>(batches.size()) < a.batches; s += bs)
        batches.emplace_back(order.begin() + static_cast<std::ptrdiff_t>(s),
                             order.begin() + static_cast<std::ptrdiff_t>(s + bs));
      LANCET_CHECK(!batches.empty(), "bench data: " << label << ": train.batch_size " << bs << " exceeds the "
                                                    << order.size() << " samples of an epoch");
    }
    Shape x_shape = ds.sample_shape();
    x_shape.insert(x_shape.begin(), static_cast<int64_t>(bs));
    BatchUpload upload(device, x_shape);
    for (const std::string& memory : a.memory) {
      lo.allocator = batch_allocator(memory, device);
      for (int w : a.workers) {
        lo.workers = w;
        Json row = time_loader(ds, lo, batches, upload);
        row["source"] = label;
        row["batch_memory"] = memory;
        results.push_back(std::move(row));
      }
    }
  }
  const Json j = {{"benchmark", "data"},
                  {"device", device.str()},
                  {"sources", sources},
                  {"results", results},
                  {"config",
                   {{"image_size", dc.image_size},
                    {"channels", dc.channels},
                    {"bit_depth", dc.bit_depth},
                    {"batch_size", tc.batch_size},
                    {"batches", a.batches},
                    {"prefetch", dc.prefetch},
                    {"cache", dc.cache},
                    {"sampler", dc.sampler},
                    {"preprocess", dc.preprocess},
                    {"augment", lo.augment.to_json()},
                    {"threads", threads},
                    {"cores", std::thread::hardware_concurrency()},
                    {"batch_memory", a.memory}}}};
  if (json) {
    std::cout << j.dump() << std::endl;
    return;
  }
  print_table(results, device.is_cuda());
  std::cout << "bench data: batches of " << bs << " on " << device.str() << " (" << j["config"].dump() << ")\n";
}
}  // namespace

std::function<void(const ConfigArgs&, bool)> add_bench_data(CLI::App& bench) {
  auto a = std::make_shared<BenchDataArgs>();
  bench.add_option("--workers-list", a->workers, "bench data: loader worker counts to measure, e.g. 0,1,2,4")
      ->delimiter(',')
      ->capture_default_str();
  bench.add_option("--batches", a->batches, "bench data: batches timed per worker count")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  bench.add_option("--batch-memory", a->memory,
                   "bench data: batch memory to measure, pageable and/or pinned (CUDA pinned host memory; needs "
                   "--device cuda, where each batch's host->device copy is timed too)")
      ->delimiter(',')
      ->capture_default_str()
      ->check(CLI::IsMember({"pageable", "pinned"}));
  bench.add_option("--data-list", a->data,
                   "bench data: sources to compare in one run, e.g. an image folder and its pack (each replaces "
                   "data.dir; instead of --data)")
      ->delimiter(',');
  return [a](const ConfigArgs& args, bool json) { run_bench_data(*a, args, json); };
}

}  // namespace lancet::cli
