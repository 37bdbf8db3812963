// lancet bench data — images/s of the data loader (data/loader.h) against its worker count, on
// the configured training source (folder, manifest, .npz or pack) with the configured
// preprocessing recipe and augmentation. The source is first loaded once (decode, recipe,
// resize: the 8-bit cache of data/image_dataset.h; reported as load_*), then each worker
// count builds --batches batches of train.batch_size (augment, normalise, batch) while the
// consumer only takes them: the rate a training step could be fed at.
#include <algorithm>
#include <chrono>
#include <iomanip>
#include <iostream>
#include <memory>
#include <thread>

#include "data/image_dataset.h"
#include "data/loader.h"
#include "kernels/parallel.h"
#include "tools/cli.h"
#include "trainer/trainer.h"

namespace lancet::cli {

namespace {
using Clock = std::chrono::steady_clock;

struct BenchDataArgs {
  std::vector<int> workers{0, 1, 2, 4};
  int batches = 50;
};

void run_bench_data(const BenchDataArgs& a, const ConfigArgs& args, bool json) {
  const Json config = resolve_config(args, default_config());
  const DataConfig dc = data_config(config);
  const TrainConfig tc = train_config(config);
  const int threads = tc.threads > 0 ? tc.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  set_num_threads(threads);
  for (int w : a.workers) LANCET_CHECK(w >= 0, "bench data: --workers-list values must be >= 0, got " << w);

  std::ostream& log = json ? std::cerr : std::cout;
  const auto t_load = Clock::now();
  const DataSplits data = load_data(dc, log);
  const double load_s = std::chrono::duration<double>(Clock::now() - t_load).count();
  const Dataset& ds = *data.train;
  std::vector<int64_t> labels(static_cast<size_t>(ds.size()));
  for (int64_t i = 0; i < ds.size(); ++i) labels[static_cast<size_t>(i)] = ds.label(i);
  const EpochSampler sampler(parse_sampler(dc.sampler), labels, ds.num_classes(), 0, 1, tc.seed);

  LoaderOptions lo;
  lo.prefetch = dc.prefetch;
  lo.seed = tc.seed;
  lo.augment = AugmentConfig::from_json(dc.augment);
  if (lo.augment.enabled()) lo.minority = minority_classes(labels, ds.num_classes());
  const size_t bs = static_cast<size_t>(tc.batch_size);
  Json results = Json::array();
  for (int w : a.workers) {
    lo.workers = w;
    DataLoader loader(ds, lo);
    // Enough epochs of the sampler's order for --batches full batches.
    std::vector<std::vector<int64_t>> batches;
    for (int epoch = 1; static_cast<int>(batches.size()) < a.batches; ++epoch) {
      const auto order = sampler.indices(epoch);
      for (size_t s = 0; s + bs <= order.size() && static_cast<int>(batches.size()) < a.batches; s += bs)
        batches.emplace_back(order.begin() + static_cast<std::ptrdiff_t>(s),
                             order.begin() + static_cast<std::ptrdiff_t>(s + bs));
      LANCET_CHECK(!batches.empty(), "bench data: train.batch_size " << bs << " exceeds the " << order.size()
                                                                      << " samples of an epoch");
    }
    const auto t0 = Clock::now();
    loader.start_epoch(1, std::move(batches));
    int64_t images = 0;
    for (Batch b; loader.next(b);) images += b.x.dim(0);
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    results.push_back({{"workers", w},
                       {"images_per_s", images / std::max(s, 1e-9)},
                       {"batch_ms_mean", s * 1e3 / a.batches},
                       {"images", images}});
    if (!json)
      std::cout << std::fixed << std::setprecision(1) << "bench data: " << w << " worker(s): " << images / std::max(s, 1e-9)
                << " img/s (" << s * 1e3 / a.batches << " ms per batch of " << bs << ")\n";
  }
  const Json j = {{"benchmark", "data"},
                  {"source", data.source},
                  {"train_images", ds.size()},
                  {"load_seconds", load_s},
                  {"load_images_per_s", (ds.size() + data.val->size()) / std::max(load_s, 1e-9)},
                  {"results", results},
                  {"config",
                   {{"image_size", dc.image_size},
                    {"channels", dc.channels},
                    {"batch_size", tc.batch_size},
                    {"batches", a.batches},
                    {"prefetch", dc.prefetch},
                    {"sampler", dc.sampler},
                    {"preprocess", dc.preprocess},
                    {"augment", lo.augment.to_json()},
                    {"threads", threads},
                    {"cores", std::thread::hardware_concurrency()},
                    {"batch_memory", "pageable"}}}};
  if (json)
    std::cout << j.dump() << std::endl;
  else
    std::cout << "bench data: loading " << ds.size() + data.val->size() << " images took " << std::setprecision(2)
              << load_s << " s with " << threads << " thread(s) (" << j["config"].dump() << ")\n";
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
  return [a](const ConfigArgs& args, bool json) { run_bench_data(*a, args, json); };
}

}  // namespace lancet::cli
