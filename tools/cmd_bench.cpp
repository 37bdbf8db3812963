// lancet bench train|infer — throughput and step-time figures on random data, as one JSON
// object with --json so scripts and sweeps can consume them.
#include <algorithm>
#include <chrono>
#include <functional>
#include <iomanip>
#include <iostream>
#include <thread>
#include <random>

#include "comm/communicator.h"
#include "kernels/blas.h"
#include "kernels/conv.h"
#ifdef LANCET_WITH_CUDA
#include "kernels/cuda/runtime.h"
#endif
#include "kernels/parallel.h"
#include "tools/cli.h"
#include "tools/rank_error.h"
#include "trainer/ddp.h"
#include "trainer/loss_scaler.h"
#include "trainer/pipeline.h"
#include "trainer/profiler.h"
#include "trainer/scaling.h"
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

// The GPU's name and the CUDA / cuDNN / cuBLAS versions and settings a GPU figure depends on;
// null on the CPU.
Json gpu_info(Device device, const TrainConfig& tc) {
  if (!device.is_cuda()) return nullptr;
#ifdef LANCET_WITH_CUDA
  const auto gpus = cuda_devices();
  const auto& g = gpus.at(static_cast<size_t>(device.index));
  return {{"name", g.name},
          {"compute_capability", std::to_string(g.cc_major) + "." + std::to_string(g.cc_minor)},
          {"memory_bytes", static_cast<int64_t>(g.total_bytes)},
          {"cuda_runtime", cuda_runtime_version()},
          {"cudnn", cudnn_version_string()},
          {"cublas", cublas_version_string()},
          {"cudnn_autotune", tc.cudnn_autotune},
          {"allow_tf32", tc.allow_tf32}};
#else
  (void)tc;
  return nullptr;
#endif
}

// Percentiles as the step profiler computes them (numpy's linear interpolation).
double p50(const std::vector<double>& v) { return compute_stats(v).p50_s; }
double p95(const std::vector<double>& v) { return compute_stats(v).p95_s; }

constexpr const char* kEmulatedPrecision =
    "bench: fp16/bf16 on the CPU are emulated (rounding in software, for correctness, not speed); benchmark them "
    "with --device cuda";

// bench train with pipeline.stages 2: the two-stage pipeline against one device (the same
// model and batch, unpipelined, on stage 0's device and, on the CPU, one stage's threads) and,
// on the CPU, against the unpipelined model on all the threads, one after the other in this
// process, on the same random batch. On GPUs the stages are both on train.device (the one-GPU
// mode) or, with pipeline.devices [cuda:0, cuda:1], on two GPUs: the glaucoma study's
// model-parallel speedup. Mixed precision as lancet train runs it (fp16 with the loss scaler).
void run_bench_pipeline(const BenchArgs& a, const Json& config) {
  const DataConfig dc = data_config(config);
  const TrainConfig tc = train_config(config);
  const OptimConfig oc = optim_config(config);
  const PipelineConfig pc = pipeline_config(config);
  auto single = make_single_process_communicator();
  const Device device = rank_device(tc.device, *single);
  const DType precision = parse_dtype(tc.precision);
  LANCET_CHECK(precision == DType::f32 || device.is_cuda(), kEmulatedPrecision << " (" << tc.precision << ")");
  check_train_device(device, precision, 1);
  set_conv_autotune(tc.cudnn_autotune);
  set_allow_tf32(tc.allow_tf32);
  const MemoryFormat format = resolve_memory_format(tc.memory_format, device, precision);
  const std::vector<Device> devices = pipeline_devices(pc.devices, device);
  const bool gpu = device.is_cuda();
  const int threads = threads_per_rank(tc.threads, *single);
  const int stage_threads = pc.threads_per_stage > 0 ? pc.threads_per_stage : std::max(1, threads / 2);
  const Stream s{device, nullptr};
  // A step's end on a GPU: every device the step ran on has finished its work.
  auto synchronize_devices = [&] {
    for (const Device& d : devices) synchronize(Stream{d, nullptr});
  };
  Json model_cfg = config.at("model");
  if (!model_cfg.contains("in_channels")) model_cfg["in_channels"] = dc.channels;
  if (!model_cfg.contains("num_classes")) model_cfg["num_classes"] = 2;
  auto make_on_device = [&] {
    auto m = make_model(model_cfg, tc.seed);
    m->to(device);
    m->train();
    m->set_precision(precision);
    m->set_memory_format(format);
    return m;
  };
  const int64_t b = tc.batch_size;
  const int m = pc.micro_batches;
  LANCET_CHECK(m <= b, "bench: pipeline.micro_batches " << m << " exceeds train.batch_size " << b);
  std::mt19937 rng(static_cast<uint32_t>(tc.seed + 17));
  std::normal_distribution<float> nd;
  std::vector<Tensor> xs, ys;
  const int64_t mb = (b + m - 1) / m;
  const int k = MedicalCNNConfig::from_json(model_cfg).num_classes;
  for (int64_t r0 = 0; r0 < b; r0 += mb) {
    const int64_t n = std::min(mb, b - r0);
    Tensor x = Tensor::empty({n, dc.channels, dc.image_size, dc.image_size});
    Tensor y = Tensor::empty({n}, DType::i64);
    for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = nd(rng);
    for (int64_t i = 0; i < n; ++i) y.data<int64_t>()[i] = static_cast<int64_t>(rng() % k);
    xs.push_back(x);
    ys.push_back(y);
  }
  Tensor x_all = Tensor::empty({b, dc.channels, dc.image_size, dc.image_size}), y_all = Tensor::empty({b}, DType::i64);
  for (int64_t off = 0, i = 0; i < static_cast<int64_t>(xs.size()); off += xs[static_cast<size_t>(i)].dim(0), ++i) {
    x_all.narrow(off, xs[static_cast<size_t>(i)].dim(0)).copy_from(xs[static_cast<size_t>(i)]);
    y_all.narrow(off, ys[static_cast<size_t>(i)].dim(0)).copy_from(ys[static_cast<size_t>(i)]);
  }
  // On a GPU the batch lives there from the start (the step is timed, not the host->device copy).
  if (gpu) {
    for (Tensor& t : xs) t = t.to(device);
    for (Tensor& t : ys) t = t.to(device);
    x_all = x_all.to(device);
    y_all = y_all.to(device);
  }
  const Loss loss = make_loss(loss_config(config), k, device);
  const LossScalerConfig lsc = loss_scaler_config(config);

  // Times `step` (warm-up first); the mean and percentiles in ms.
  auto time_steps = [&](const std::function<void()>& step, const std::function<void()>& after_warmup) {
    for (int i = 0; i < a.warmup; ++i) step();
    synchronize_devices();
    if (after_warmup) after_warmup();
    std::vector<double> ms;
    for (int i = 0; i < a.steps; ++i) {
      const auto t = Clock::now();
      step();
      synchronize_devices();  // a GPU step's time is its kernels' time, not the time to queue them
      ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t).count());
    }
    double mean = 0;
    for (double v : ms) mean += v;
    mean /= static_cast<double>(ms.size());
    return Json{{"images_per_s", static_cast<double>(b) / (mean / 1e3)},
                {"step_ms_mean", mean},
                {"step_ms_p50", p50(ms)},
                {"step_ms_p95", p95(ms)}};
  };
  // Unpipelined on stage 0's device (on the CPU with `t` threads): the whole batch per step.
  auto unpipelined = [&](int t) {
    set_num_threads(t);
    auto model = make_on_device();
    auto opt = make_optimizer(oc, model->named_parameters());
    LossScaler scaler(lsc);
    StepOptions so;
    so.loss_scaler = &scaler;
    Allocator& alloc = allocator_for(device);
    const size_t before = alloc.current_bytes();
    alloc.reset_peak();
    Json r = time_steps([&] { train_step(*model, *opt, *single, x_all, y_all, loss, s, so); }, nullptr);
    r["device"] = device.str();
    r["threads"] = t;
    r["peak_bytes"] = static_cast<int64_t>(alloc.peak_bytes() - before);  // activations and workspaces
    return r;
  };

  auto model = make_on_device();
  std::string basis;
  const int cut = choose_cut(pc.cut, pc.balance, model->units(), make_on_device, xs[0], s, stage_threads, &basis);
  set_num_threads(threads);
  place_pipeline_stages(model->units(), cut, devices);
  auto opt = make_optimizer(oc, model->named_parameters());
  LossScaler scaler(lsc);
  StepOptions so;
  so.loss_scaler = &scaler;
  PipelineOptions po;
  po.schedule = parse_pipe_schedule(pc.schedule);
  po.cut = cut;
  po.threads_per_stage = stage_threads;
  po.devices = devices;
  Pipeline pipe(*model, model->units(), po, *single);
  // The pipeline's report covers the timed steps only; so does the peak memory: on the CPU the
  // host allocator's (every stage, the weights and optimizer state too), as plain bench train
  // reports it; on GPUs the sum of the pools' peaks — each device's training-thread pool
  // (weights, optimizer state) and each stage's own — an upper bound of what was held at once.
  const std::vector<Allocator*> pools = training_memory_pools(devices[0], devices);
  Json piped = time_steps([&] { pipe.train_step(*opt, xs, ys, loss, so); },
                          [&] {
                            pipe.reset_stats();
                            for (Allocator* al : pools) al->reset_peak();
                          });
  int64_t peak = 0;
  for (Allocator* al : pools) peak += static_cast<int64_t>(al->peak_bytes());
  const PipelineStats st = pipe.stats();
  Json one = unpipelined(stage_threads);
  Json all = !gpu && threads != stage_threads ? unpipelined(threads) : one;
  Json j = {{"benchmark", "train_pipeline"},
            {"images_per_s", piped["images_per_s"]},
            {"step_ms_mean", piped["step_ms_mean"]},
            {"step_ms_p50", piped["step_ms_p50"]},
            {"step_ms_p95", piped["step_ms_p95"]},
            {"peak_bytes", peak},
            {"ranks", 1},
            {"per_rank_batch", b},
            {"pipeline", st.to_json()},
            {"cut", model->units()[static_cast<size_t>(cut)].first},
            {"cut_by", basis},
            {"one_device", one},
            {"unpipelined_all_threads", all},
            {"speedup_vs_one_device", one["step_ms_mean"].get<double>() / piped["step_ms_mean"].get<double>()},
            {"speedup_vs_all_threads", all["step_ms_mean"].get<double>() / piped["step_ms_mean"].get<double>()},
            {"config",
             {{"model", model->config().to_json()},
              {"parameters", model->num_parameters()},
              {"batch_size", b},
              {"micro_batches", m},
              {"schedule", pc.schedule},
              {"image_size", dc.image_size},
              {"channels", dc.channels},
              {"threads", threads},
              {"threads_per_stage", stage_threads},
              {"devices", {devices[0].str(), devices[1].str()}},
              {"precision", tc.precision},
              {"memory_format", memory_format_name(format)},
              {"optimizer", oc.name},
              {"warmup", a.warmup},
              {"steps", a.steps},
              {"blas", blas_info()},
              {"gpu", gpu_info(device, tc)}}}};
  if (a.json) {
    std::cout << j.dump() << std::endl;
    return;
  }
  std::cout << std::fixed << std::setprecision(1) << "bench train, 2-stage pipeline (" << pc.schedule << ", " << m
            << " micro-batches, cut before " << j["cut"].get<std::string>() << "): " << j["images_per_s"].get<double>()
            << " img/s, step " << j["step_ms_mean"].get<double>() << " ms mean\n"
            << st.text() << "one device (" << device.str();
  if (!gpu) std::cout << ", " << stage_threads << " thread" << (stage_threads == 1 ? "" : "s");
  std::cout << ", no pipeline): " << one["images_per_s"].get<double>() << " img/s, step "
            << one["step_ms_mean"].get<double>() << " ms, peak " << one["peak_bytes"].get<int64_t>() / 1048576.0
            << " MiB -> pipeline speedup " << std::setprecision(2) << j["speedup_vs_one_device"].get<double>() << "x\n";
  if (!gpu)
    std::cout << std::setprecision(1) << "all " << threads << " threads, no pipeline: " << all["images_per_s"].get<double>()
              << " img/s, step " << all["step_ms_mean"].get<double>() << " ms -> pipeline speedup " << std::setprecision(2)
              << j["speedup_vs_all_threads"].get<double>() << "x\n";
}

// Data parallel when launched with several tasks (mpirun, srun): train.batch_size is the
// global batch, split over the ranks as `lancet train` splits it; rank 0 prints the figures.
void run_bench(const BenchArgs& a, Communicator& comm) {
  Json defaults = default_config();
  defaults["data"]["channels"] = 3;  // the benchmark of record: 3-channel MedicalCNN
  const Json config = resolve_config(a.config, defaults);
  if (pipeline_config(config).stages > 1) {
    LANCET_CHECK(a.what == "train" && comm.size() == 1,
                 "bench: pipeline.stages > 1 is benchmarked by `bench train` in one process (launched with "
                     << comm.size() << " tasks); data parallelism over pipelines runs in lancet train");
    return run_bench_pipeline(a, config);
  }
  const DataConfig dc = data_config(config);
  const TrainConfig tc = train_config(config);
  const OptimConfig oc = optim_config(config);
  const DistConfig dist = dist_config(config);
  comm.set_timeout(dist.timeout_s);
  const Device device = rank_device(tc.device, comm);  // "cuda": this rank's own GPU on its node
  const DType precision = parse_dtype(tc.precision);
  LANCET_CHECK(precision == DType::f32 || device.is_cuda(), kEmulatedPrecision << " (" << tc.precision << ")");
  const int ranks = comm.size();
  check_train_device(device, precision, ranks);
  set_conv_autotune(tc.cudnn_autotune);
  set_allow_tf32(tc.allow_tf32);
  const int threads = threads_per_rank(tc.threads, comm);
  const std::string binding = bind_rank_threads(dist.bind, comm, threads);
  set_num_threads(threads);
  const Stream s{device, nullptr};
  const bool train = a.what == "train";
  LANCET_CHECK(train || ranks == 1, "bench infer runs in one process (launched with " << ranks << " tasks)");
  LANCET_CHECK(tc.batch_size % ranks == 0, "bench: train.batch_size " << tc.batch_size << " (the global batch) is not a multiple of the "
                                                                      << ranks << " ranks");
  // The same job on every rank: every setting but the per-rank ones, as the trainer compares
  // them (trainer/ddp.h), plus the resolved thread count (a rank's share of the cores decides
  // the figures) and the bench's own step counts.
  auto same = config_fields(config);
  same.push_back({"train.threads (resolved)", std::to_string(threads)});
  same.push_back({"steps", std::to_string(a.warmup) + "+" + std::to_string(a.steps)});
  check_same_on_all_ranks(comm, same);

  Json model_cfg = config.at("model");
  if (!model_cfg.contains("in_channels")) model_cfg["in_channels"] = dc.channels;
  if (!model_cfg.contains("num_classes")) model_cfg["num_classes"] = 2;
  auto model = make_model(model_cfg, tc.seed);
  const int k = model->config().num_classes;
  const int64_t b = tc.batch_size / ranks;
  Tensor x = Tensor::empty({b, dc.channels, dc.image_size, dc.image_size});
  Tensor y = Tensor::empty({b}, DType::i64);
  std::mt19937 rng(static_cast<uint32_t>(tc.seed + 7919u * static_cast<uint32_t>(comm.rank())));
  std::normal_distribution<float> nd;
  for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = nd(rng);
  for (int64_t i = 0; i < b; ++i) y.data<int64_t>()[i] = static_cast<int64_t>(rng() % k);
  // On a GPU the batch lives there from the start: like the CPU figures, these time the step,
  // not the host->device copy (lancet train's phase table has that).
  model->to(device);
  x = x.to(device);
  y = y.to(device);
  if (precision != DType::f32) model->set_precision(precision);
  const MemoryFormat format = resolve_memory_format(tc.memory_format, device, precision);
  model->set_memory_format(format);

  std::unique_ptr<Optimizer> opt;
  std::unique_ptr<GradSync> sync;
  if (train) {
    model->train();
    // Always through GradSync, one rank too: its hooks time when each bucket is ready, which
    // the scaling prediction (lancet sweep --predict) starts from.
    sync = std::make_unique<GradSync>(*model, comm, GradSyncOptions{dist.bucket_mb, dist.overlap});
    sync->broadcast_parameters(s);
    opt = make_optimizer(oc, model->named_parameters());
  } else {
    model->eval();
  }
  const Loss loss = make_loss(loss_config(config), k, device);
  StepProfiler prof;
  prof.set_stream(s);
  std::vector<GradSync::BucketTiming> bucket_sum(train ? static_cast<size_t>(sync->num_buckets()) : 0,
                                                 GradSync::BucketTiming{0, 0, 0, 0});
  int64_t layout_seen = train ? sync->layout_version() : 0, bucket_steps = 0;
  LossScaler scaler(loss_scaler_config(config));  // fp16: as lancet train and PyTorch AMP's GradScaler
  auto step = [&](bool timed) {
    if (train) {
      StepOptions so;
      so.grad_sync = sync.get();
      so.loss_scaler = &scaler;
      if (timed) prof.begin_step();
      train_step(*model, *opt, comm, x, y, loss, s, so, timed ? &prof : nullptr);
      if (timed) prof.end_step();
    } else {
      model->forward(x, nullptr, s);
    }
  };
  // After a timed step, once its stream is synchronised: on a GPU timings() resolves the step's
  // CUDA events, which must not cost the step a host wait of its own.
  auto add_bucket_times = [&] {
    if (!train) return;
    const auto& t = sync->timings();
    if (sync->layout_version() != layout_seen) {  // buckets laid out anew: start the sums again
      layout_seen = sync->layout_version();
      bucket_sum.assign(t.size(), GradSync::BucketTiming{0, 0, 0, 0});
      bucket_steps = 0;
    }
    ++bucket_steps;
    for (size_t i = 0; i < t.size(); ++i) {
      bucket_sum[i].bytes = t[i].bytes;
      bucket_sum[i].ready_s += t[i].ready_s;
      bucket_sum[i].start_s += t[i].start_s;
      bucket_sum[i].done_s += t[i].done_s;
    }
  };
  for (int i = 0; i < a.warmup; ++i) step(false);
  synchronize(s);
  Allocator& alloc = allocator_for(device);
  alloc.reset_peak();
  comm.barrier();
  std::vector<double> ms;
  const auto t0 = Clock::now();
  for (int i = 0; i < a.steps; ++i) {
    const auto t = Clock::now();
    step(true);
    synchronize(s);  // a GPU step's time is its kernels' time, not the time to queue them
    ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t).count());
    add_bucket_times();
  }
  const double total_s = std::chrono::duration<double>(Clock::now() - t0).count();
  double mean = 0;
  for (double v : ms) mean += v;
  mean /= ms.size();
  // The job's figures: the slowest rank's wall time and the largest peak.
  const double job_s = comm.all_reduce_scalar(total_s, ReduceOp::max);
  const double peak = comm.all_reduce_scalar(static_cast<double>(alloc.peak_bytes()), ReduceOp::max);
  Json buckets = Json::array();
  for (const auto& t : bucket_sum)
    buckets.push_back({{"bytes", t.bytes},
                       {"ready_ms", t.ready_s / std::max<int64_t>(1, bucket_steps) * 1e3},
                       {"start_ms", ranks > 1 ? t.start_s / std::max<int64_t>(1, bucket_steps) * 1e3 : -1.0},
                       {"done_ms", ranks > 1 ? t.done_s / std::max<int64_t>(1, bucket_steps) * 1e3 : -1.0}});
  Json j = {{"benchmark", std::string(train ? "train" : "infer")},
            {"images_per_s", static_cast<double>(tc.batch_size) * a.steps / job_s},
            {"step_ms_mean", mean},
            {"step_ms_p50", p50(ms)},
            {"step_ms_p95", p95(ms)},
            {"step_ms_min", *std::min_element(ms.begin(), ms.end())},
            {"peak_bytes", static_cast<int64_t>(peak)},
            {"ranks", ranks},
            {"per_rank_batch", b},
            {"config",
             {{"model", model->config().to_json()},
              {"parameters", model->num_parameters()},
              {"batch_size", tc.batch_size},
              {"image_size", dc.image_size},
              {"channels", dc.channels},
              {"device", device.str()},
              {"threads", threads},
              {"ranks", ranks},
              {"binding", binding},
              {"precision", tc.precision},
              {"memory_format", memory_format_name(format)},
              {"optimizer", train ? oc.name : std::string("none")},
              {"bucket_mb", dist.bucket_mb},
              {"overlap", dist.overlap},
              {"warmup", a.warmup},
              {"steps", a.steps},
              {"blas", blas_info()},
              {"gpu", gpu_info(device, tc)}}}};
  if (train) {
    j["profile"] = prof.to_json();
    j["buckets"] = buckets;
    // The buckets' times (ms since the backward began): the host's clock on a CPU, CUDA events'
    // on a GPU (GradSync::timings).
    j["bucket_clock"] = sync->device_timed() ? "device" : "host";
  }
  if (!comm.is_root()) return;
  if (a.json) {
    std::cout << j.dump() << std::endl;
  } else {
    std::cout << std::fixed << std::setprecision(1) << "bench " << a.what << ": " << j["images_per_s"].get<double>()
              << " img/s, step " << mean << " ms mean, " << j["step_ms_p50"].get<double>() << " p50, "
              << j["step_ms_p95"].get<double>() << " p95, peak " << std::setprecision(1) << peak / 1048576.0
              << " MiB (" << j["config"].dump() << ")\n";
    if (train) std::cout << prof.table();
  }
}

// bench comm: all-reduce time against message size over the launched ranks, and the fitted
// latency/bandwidth of a ring all-reduce (the link figures lancet sweep --predict uses).
void run_bench_comm(const BenchArgs& a, Communicator& comm) {
  const Json config = resolve_config(a.config);
  comm.set_timeout(dist_config(config).timeout_s);
  LANCET_CHECK(comm.size() >= 2, "bench comm needs at least 2 ranks: launch it with mpirun -np N or srun -n N");
  const Stream s{Device::cpu(), nullptr};
  Json sizes = Json::array();
  std::vector<std::pair<double, double>> fit;
  for (int64_t bytes = 4096; bytes <= (int64_t{64} << 20); bytes *= 4) {
    Tensor t = Tensor::zeros({bytes / 4});
    for (int i = 0; i < a.warmup; ++i) comm.all_reduce(t, ReduceOp::sum, s);
    std::vector<double> sec;
    for (int i = 0; i < a.steps; ++i) {
      comm.barrier();
      const auto t0 = Clock::now();
      comm.all_reduce(t, ReduceOp::sum, s);
      sec.push_back(comm.all_reduce_scalar(std::chrono::duration<double>(Clock::now() - t0).count(), ReduceOp::max));
    }
    const double med = p50(sec);
    fit.emplace_back(static_cast<double>(bytes), med);
    sizes.push_back({{"bytes", bytes}, {"ms_p50", med * 1e3}, {"ms_min", *std::min_element(sec.begin(), sec.end()) * 1e3},
                     {"bus_GBps", 2.0 * (comm.size() - 1) / comm.size() * bytes / med / 1e9}});
  }
  const Link l = fit_ring_link("measured", fit, comm.size());
  Json j = {{"benchmark", "comm"},
            {"ranks", comm.size()},
            {"sizes", sizes},
            {"fit", {{"alpha_us", l.alpha_s * 1e6}, {"beta_GBps", l.beta_Bps / 1e9}}}};
  if (!comm.is_root()) return;
  if (a.json) {
    std::cout << j.dump() << std::endl;
    return;
  }
  std::cout << "all-reduce (sum, f32) over " << comm.size() << " ranks\n      bytes    p50 ms   bus GB/s\n";
  for (const auto& r : sizes)
    std::cout << std::setw(11) << r["bytes"].get<int64_t>() << std::fixed << std::setprecision(3) << std::setw(10)
              << r["ms_p50"].get<double>() << std::setprecision(2) << std::setw(11) << r["bus_GBps"].get<double>() << "\n";
  std::cout << "ring fit: alpha " << std::setprecision(1) << l.alpha_s * 1e6 << " us, beta " << std::setprecision(2)
            << l.beta_Bps / 1e9 << " GB/s\n";
}

void run_bench_any(const BenchArgs& a) {
  const Json config = resolve_config(a.config);
  // bench comm measures the CPU (MPI) all-reduce; train/infer take the device's communicator
  // (NCCL between GPU ranks).
  auto comm = a.what == "comm" ? make_cpu_communicator(dist_config(config).backend)
                               : make_communicator(dist_config(config).backend, train_config(config).device,
                                                  dist_config(config).timeout_s, gpus_per_rank(config));
  try {
    if (a.what == "comm")
      run_bench_comm(a, *comm);
    else
      run_bench(a, *comm);
  } catch (const std::exception& e) {
    if (comm->size() == 1) throw;
    report_and_abort_job("bench", *comm, e);
    throw;
  }
}
}  // namespace

void register_bench(CLI::App& app) {
  auto* sub = app.add_subcommand(
      "bench", "benchmarks: `bench train` (training step; data-parallel under mpirun/srun), `bench infer` (forward), "
               "`bench comm` (all-reduce latency and bandwidth between ranks)");
  auto a = std::make_shared<BenchArgs>();
  sub->add_option("what", a->what, "train | infer | comm | data")
      ->required()
      ->check(CLI::IsMember({"train", "infer", "comm", "data"}));
  auto bench_data = add_bench_data(*sub);  // tools/cmd_bench_data.cpp
  sub->add_option("--warmup", a->warmup, "untimed steps first")->capture_default_str();
  sub->add_option("--steps", a->steps, "timed steps")->capture_default_str()->check(CLI::PositiveNumber);
  sub->add_flag("--json", a->json, "print one JSON object (images_per_s, step_ms_*, peak_bytes, config)");
  add_config_options(*sub, a->config, /*with_training_flags=*/true);
  sub->callback([a, bench_data]() { a->what == "data" ? bench_data(a->config, a->json) : run_bench_any(*a); });
}

}  // namespace lancet::cli
