// lancet bench train|infer — throughput and step-time figures on random data, as one JSON
// object with --json so scripts and sweeps can consume them.
#include <algorithm>
#include <chrono>
#include <iomanip>
#include <iostream>
#include <thread>
#include <random>

#include "comm/communicator.h"
#include "kernels/blas.h"
#include "kernels/parallel.h"
#include "tools/cli.h"
#include "trainer/trainer.h"
#include "trainer/weights.h"

namespace lancet::cli {

namespace {
using Clock = std::chrono::steady_clock;

struct BenchArgs {
  ConfigArgs config;
  std::string what;
  int warmup = 3, steps = 10;
  bool json = false;
};

double percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  const double pos = q * (v.size() - 1);
  const size_t lo = static_cast<size_t>(pos);
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - lo);
}

void run_bench(const BenchArgs& a) {
  Json defaults = default_config();
  defaults["data"]["channels"] = 3;  // the benchmark of record: 3-channel MedicalCNN
  const Json config = resolve_config(a.config, defaults);
  const DataConfig dc = data_config(config);
  const TrainConfig tc = train_config(config);
  const OptimConfig oc = optim_config(config);
  LANCET_CHECK(tc.precision == "fp32", "bench: --precision " << tc.precision << ": this build computes in fp32 only");
  const Device device = parse_device(tc.device);
  LANCET_CHECK(device.is_cpu(), "bench: device " << device.str() << ": this build has no CUDA compute kernels yet");
  const int threads = tc.threads > 0 ? tc.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  set_num_threads(threads);
  const Stream s{device, nullptr};

  Json model_cfg = config.at("model");
  if (!model_cfg.contains("in_channels")) model_cfg["in_channels"] = dc.channels;
  if (!model_cfg.contains("num_classes")) model_cfg["num_classes"] = 2;
  auto model = make_model(model_cfg, tc.seed);
  const int k = model->config().num_classes;
  const int64_t b = tc.batch_size;
  Tensor x = Tensor::empty({b, dc.channels, dc.image_size, dc.image_size});
  Tensor y = Tensor::empty({b}, DType::i64);
  std::mt19937 rng(static_cast<uint32_t>(tc.seed));
  std::normal_distribution<float> nd;
  for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = nd(rng);
  for (int64_t i = 0; i < b; ++i) y.data<int64_t>()[i] = static_cast<int64_t>(rng() % k);

  auto comm = make_single_process_communicator();
  std::unique_ptr<Optimizer> opt;
  const bool train = a.what == "train";
  if (train) {
    model->train();
    opt = make_optimizer(oc, model->named_parameters());
  } else {
    model->eval();
  }
  const Loss loss = make_loss(loss_config(config), k, device);
  auto step = [&]() {
    if (train)
      train_step(*model, *opt, *comm, x, y, loss, s);
    else
      model->forward(x, nullptr, s);
  };
  for (int i = 0; i < a.warmup; ++i) step();
  Allocator& alloc = allocator_for(device);
  alloc.reset_peak();
  std::vector<double> ms;
  const auto t0 = Clock::now();
  for (int i = 0; i < a.steps; ++i) {
    const auto t = Clock::now();
    step();
    ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t).count());
  }
  const double total_s = std::chrono::duration<double>(Clock::now() - t0).count();
  double mean = 0;
  for (double v : ms) mean += v;
  mean /= ms.size();
  Json j = {{"benchmark", std::string(train ? "train" : "infer")},
            {"images_per_s", b * a.steps / total_s},
            {"step_ms_mean", mean},
            {"step_ms_p50", percentile(ms, 0.5)},
            {"step_ms_p95", percentile(ms, 0.95)},
            {"step_ms_min", *std::min_element(ms.begin(), ms.end())},
            {"peak_bytes", alloc.peak_bytes()},
            {"config",
             {{"model", model->config().to_json()},
              {"parameters", model->num_parameters()},
              {"batch_size", b},
              {"image_size", dc.image_size},
              {"channels", dc.channels},
              {"device", device.str()},
              {"threads", threads},
              {"precision", tc.precision},
              {"optimizer", train ? oc.name : std::string("none")},
              {"warmup", a.warmup},
              {"steps", a.steps},
              {"blas", blas_info()}}}};
  if (a.json) {
    std::cout << j.dump() << std::endl;
  } else {
    std::cout << std::fixed << std::setprecision(1) << "bench " << a.what << ": " << j["images_per_s"].get<double>()
              << " img/s, step " << mean << " ms mean, " << j["step_ms_p50"].get<double>() << " p50, "
              << j["step_ms_p95"].get<double>() << " p95, peak " << std::setprecision(1)
              << alloc.peak_bytes() / 1048576.0 << " MiB (" << j["config"].dump() << ")\n";
  }
}
}  // namespace

void register_bench(CLI::App& app) {
  auto* sub = app.add_subcommand("bench", "benchmarks: `bench train` (training step) or `bench infer` (forward)");
  auto a = std::make_shared<BenchArgs>();
  sub->add_option("what", a->what, "train | infer")->required()->check(CLI::IsMember({"train", "infer"}));
  sub->add_option("--warmup", a->warmup, "untimed steps first")->capture_default_str();
  sub->add_option("--steps", a->steps, "timed steps")->capture_default_str()->check(CLI::PositiveNumber);
  sub->add_flag("--json", a->json, "print one JSON object (images_per_s, step_ms_*, peak_bytes, config)");
  add_config_options(*sub, a->config, /*with_training_flags=*/true);
  sub->callback([a]() { run_bench(*a); });
}

}  // namespace lancet::cli
