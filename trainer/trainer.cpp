#include "trainer/trainer.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <deque>
#include <filesystem>
#include <functional>
#include <fstream>
#include <iomanip>
#include <map>
#include <numeric>
#include <random>
#include <sstream>
#include <iostream>
#include <thread>

#include "data/device_prefetch.h"
#include "data/image_dataset.h"
#include "data/image_folder.h"
#include "data/loader.h"
#include "data/synth.h"
#include "kernels/conv.h"
#include "kernels/elementwise.h"
#include "kernels/loss.h"
#include "kernels/parallel.h"
#include "kernels/optim.h"
#ifdef LANCET_WITH_CUDA
#include "kernels/cuda/runtime.h"
#endif
#include "kernels/trace.h"
#include "trainer/checkpoint.h"
#include "trainer/ddp.h"
#include "trainer/loss_scaler.h"
#include "trainer/pipeline.h"
#include "trainer/profiler.h"
#include "trainer/run_log.h"
#include "trainer/schedule.h"
#include "trainer/tensorboard.h"
#include "trainer/weights.h"

namespace lancet {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

Loss make_loss(const LossConfig& cfg, int num_classes, Device device) {
  Loss l;
  l.label_smoothing = cfg.label_smoothing;
  if (!cfg.class_weights.empty()) {
    LANCET_CHECK(static_cast<int>(cfg.class_weights.size()) == num_classes,
                 "loss.class_weights has " << cfg.class_weights.size() << " values for " << num_classes << " classes");
    Tensor w = Tensor::from_vector(cfg.class_weights, {num_classes});
    l.class_weights = device.is_cpu() ? w : w.to(device);
  }
  return l;
}

int64_t count_correct(const Tensor& logits, const Tensor& y) {
  const std::vector<float> l = logits.to_vector();
  const Tensor yc = y.device().is_cpu() ? y : y.to(Device::cpu());
  const int64_t n = logits.dim(0), k = logits.dim(1);
  const auto pred = argmax_rows(l.data(), n, k);
  int64_t correct = 0;
  for (int64_t i = 0; i < n; ++i) correct += pred[static_cast<size_t>(i)] == yc.data<int64_t>()[i];
  return correct;
}

float micro_batch_loss(const Tensor& logits, const Tensor& y, const Loss& loss, double weight, float scale,
                       Tensor& dlogits, const Stream& s) {
  dlogits = Tensor::empty(logits.shape(), DType::f32, logits.device());
  Tensor no_probs;
  const float l = softmax_cross_entropy(logits, y, loss.class_weights, loss.label_smoothing, dlogits, no_probs, s);
  if (weight != 1.0) scale_inplace(dlogits, static_cast<float>(weight), s);
  if (scale != 1.f) scale_inplace(dlogits, scale, s);
  return l;
}

void finish_step(Module& model, Optimizer& opt, Communicator& comm, const StepOptions& options, bool synced,
                 StepStats& st, StepProfiler& timer, const Stream& s) {
  LossScaler* scaler = options.loss_scaler && options.loss_scaler->enabled() ? options.loss_scaler : nullptr;
  if (!synced) {
    if (options.grad_sync) {
      auto scope = timer.phase(Phase::grad_sync);
      options.grad_sync->finish(s);
    } else if (comm.size() > 1) {
      auto scope = timer.phase(Phase::grad_sync);
      for (auto& [name, p] : model.named_parameters()) comm.all_reduce(p->grad, ReduceOp::mean, s);
    }
  }
  auto scope = timer.phase(Phase::optimizer);
  // The gradients per device, each group's work on that device's stream: one group for a model
  // on one device; two for pipeline stages on their own devices, where the global norm is the
  // root of the per-device sums and the finite flag their conjunction.
  struct Group {
    Stream s;
    std::vector<Tensor*> grads;
  };
  std::vector<Group> groups;
  {
    const auto params = model.named_parameters();
    std::vector<Device> devices;
    for (const auto& [name, p] : params) devices.push_back(p->grad.device());
    for (const DeviceGroup& dg : group_by_device(devices)) {
      Group& g = groups.emplace_back(Group{stream_on(dg.device, s), {}});
      for (size_t i : dg.index) g.grads.push_back(&params[i].second->grad);
    }
  }
  auto norm = [&groups] {
    auto list = [](const Group& g) { return std::vector<const Tensor*>(g.grads.begin(), g.grads.end()); };
    if (groups.size() == 1) return global_l2_norm(list(groups[0]), groups[0].s);
    double sum = 0;
    for (const Group& g : groups) sum += sum_of_squares(list(g), g.s);
    return std::sqrt(sum);
  };
  // Loss scaling: the gradients here are already averaged over the ranks (GradSync::finish
  // or the all-reduce above), identical everywhere, so every rank finds the same flag and
  // skips or takes the same step. Clipping and the norm see unscaled gradients.
  // On a GPU without clipping the unscale rides in the optimizer step (grad_scale_inv): a
  // read-only finite check replaces the read-write unscale pass, with the same products, and
  // the gradients stay scaled until zero_grad. Clipping needs the unscaled gradients in place,
  // and the CPU keeps the separate pass (its results stay as they were, bit for bit).
  const bool fused_unscale = scaler && !model.device().is_cpu() && options.clip_grad_norm <= 0;
  const float grad_scale_inv = fused_unscale ? scaler->inv_scale() : 1.f;
  bool finite = true;
  if (scaler)
    for (const Group& g : groups) {  // every group unscaled, whatever an earlier one found
      const bool ok = fused_unscale ? scaler->check_finite(g.grads, g.s) : scaler->unscale_and_check(g.grads, g.s);
      finite = finite && ok;
    }
  if (finite) {
    if (options.clip_grad_norm > 0) {
      if (groups.size() == 1) {
        st.grad_norm = clip_grad_norm(groups[0].grads, options.clip_grad_norm, groups[0].s);
      } else {
        const float total = static_cast<float>(norm());
        for (const Group& g : groups) clip_grads_to_norm(g.grads, options.clip_grad_norm, total, g.s);
        st.grad_norm = total;
      }
    } else if (options.compute_grad_norm) {
      // Scaled gradients: the norm times 1/scale (exact for the power-of-two scales).
      st.grad_norm = norm() * grad_scale_inv;
    }
    opt.step(s, grad_scale_inv);
  }
  st.skipped = !finite;
  if (scaler) scaler->update(finite);
  model.zero_grad();
}

StepStats train_step(Module& model, Optimizer& opt, Communicator& comm, const Tensor& x, const Tensor& y,
                     const Loss& loss, const Stream& s, const StepOptions& options, StepProfiler* prof) {
  return train_step_micro(model, opt, comm, {x}, {y}, loss, s, options, prof);
}

StepStats train_step_micro(Module& model, Optimizer& opt, Communicator& comm, const std::vector<Tensor>& xs,
                           const std::vector<Tensor>& ys, const Loss& loss, const Stream& s,
                           const StepOptions& options, StepProfiler* prof) {
  StepProfiler unused;  // phases are timed either way; without a caller's profiler nobody reads them
  StepProfiler& timer = prof ? *prof : unused;
  LANCET_CHECK(!xs.empty() && xs.size() == ys.size(), "train_step: " << xs.size() << " input and " << ys.size()
                                                                     << " label micro-batches");
  int64_t total = 0;
  for (const Tensor& x : xs) total += x.dim(0);
  StepStats st;
  LossScaler* scaler = options.loss_scaler && options.loss_scaler->enabled() ? options.loss_scaler : nullptr;
  if (scaler) st.loss_scale = scaler->scale();
  double loss_sum = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const bool last = i + 1 == xs.size();
    const double weight = xs.size() > 1 ? static_cast<double>(xs[i].dim(0)) / static_cast<double>(total) : 1.0;
    SavedPtr saved;
    Tensor logits, dlogits;
    float l;
    {
      auto scope = timer.phase(Phase::forward);
      logits = model.forward(xs[i], &saved, s);
      l = micro_batch_loss(logits, ys[i], loss, weight, scaler ? scaler->scale() : 1.f, dlogits, s);
    }
    {
      auto scope = timer.phase(Phase::backward);
      if (options.grad_sync) options.grad_sync->begin_backward(/*sync=*/last);
      model.backward(dlogits, *saved, /*need_input_grad=*/false, s);
      saved.reset();  // release activations before the optimizer allocates anything
    }
    loss_sum = std::fma(static_cast<double>(l), weight, loss_sum);  // explicit: no contraction-dependent rounding
    st.correct += count_correct(logits, ys[i]);
  }
  finish_step(model, opt, comm, options, /*synced=*/false, st, timer, s);
  st.loss = loss_sum;
  st.count = total;
  return st;
}

EvalLoading eval_loading(const DataConfig& data, Device device) {
  EvalLoading l;
  l.workers = data.workers;
  l.prefetch = data.prefetch;
#ifdef LANCET_WITH_CUDA
  if (!device.is_cpu()) l.allocator = &pinned_host_allocator(device);
#else
  (void)device;
#endif
  return l;
}

EvalResult evaluate(Module& model, const Dataset& ds, int batch_size, const Loss& loss, const Stream& s,
                    StepProfiler* prof, const EvalLoading& loading) {
  LANCET_CHECK(batch_size >= 1, "evaluate: batch size " << batch_size << " must be >= 1");
  LANCET_CHECK(s.device == model.device(),
               "evaluate: stream on " << s.device.str() << ", model on " << model.device().str());
  StepProfiler unused;
  StepProfiler& timer = prof ? *prof : unused;
  struct ModeGuard {  // the caller's mode comes back however the pass ends (a bad file, say)
    Module& m;
    bool training;
    ~ModeGuard() { m.train(training); }
  } mode{model, model.training()};
  model.eval();
  EvalResult r;
  r.cm = ConfusionMatrix(ds.num_classes());
  const int64_t n = ds.size();
  std::vector<std::vector<int64_t>> batches;
  for (int64_t start = 0; start < n; start += batch_size) {
    std::vector<int64_t>& idx = batches.emplace_back(static_cast<size_t>(std::min<int64_t>(batch_size, n - start)));
    std::iota(idx.begin(), idx.end(), start);
  }
  const int64_t steps = static_cast<int64_t>(batches.size());
  LoaderOptions lo;  // no augmentation: a batch is make_batch's bytes whatever the worker count
  lo.workers = loading.workers;
  lo.prefetch = loading.prefetch;
  lo.allocator = loading.allocator;
  DataLoader loader(ds, lo);
  loader.start_epoch(0, std::move(batches));
  // As in training: on a GPU batch k+1 is taken from the loader and its copy started on the
  // prefetcher's stream before batch k's forward is queued, so the copy overlaps that forward
  // (and the workers decode further ahead meanwhile); h2d times only the forward's wait for its
  // copy. The CPU takes one batch at a time, passed through.
  DevicePrefetcher prefetcher(s, std::max<int64_t>(1, std::min<int64_t>(batch_size, n)), ds.sample_shape(), 2);
  const bool gpu = !s.device.is_cpu();
  std::deque<Tensor> host_labels;  // the pushed batches' labels on the host, oldest first
  auto fetch = [&] {
    Batch batch;
    {
      auto scope = timer.phase(Phase::data_wait);
      LANCET_CHECK(loader.next(batch), "evaluate: data loader out of step");
    }
    host_labels.push_back(batch.y);
    prefetcher.push(std::move(batch));
  };
  double loss_sum = 0;
  for (int64_t step = 0; step < steps; ++step) {
    timer.begin_step();
    if (prefetcher.queued() == 0) fetch();
    if (gpu && step + 1 < steps) fetch();
    Batch batch;
    if (gpu) {
      auto scope = timer.phase(Phase::h2d);
      batch = prefetcher.pop();
    } else {
      batch = prefetcher.pop();
    }
    Tensor logits;
    {
      auto scope = timer.phase(Phase::forward);
      logits = model.forward(batch.x, nullptr, s);
    }
    timer.end_step();
    const int64_t b = batch.x.dim(0);
    Tensor none1, none2;
    // Unweighted per-batch mean, re-weighted by batch size: the dataset mean of the loss.
    loss_sum += static_cast<double>(softmax_cross_entropy(logits, batch.y, Tensor(), loss.label_smoothing, none1, none2, s)) * b;
    prefetcher.release();  // after the last use of the batch's device buffers (the loss above)
    const Tensor y = std::move(host_labels.front());
    host_labels.pop_front();
    const std::vector<float> l = logits.to_vector();
    const int64_t k = logits.dim(1);
    const auto pred = argmax_rows(l.data(), b, k);
    for (int64_t i = 0; i < b; ++i) {
      const int64_t label = y.data<int64_t>()[i];
      r.cm.add(label, pred[static_cast<size_t>(i)]);
      r.labels.push_back(label);
      // Softmax in double from the row maximum, stored as float.
      const float* row = l.data() + i * k;
      const double mx = row[pred[static_cast<size_t>(i)]];
      double sum = 0;
      for (int64_t j = 0; j < k; ++j) sum += std::exp(static_cast<double>(row[j]) - mx);
      for (int64_t j = 0; j < k; ++j) r.probs.push_back(static_cast<float>(std::exp(row[j] - mx) / sum));
    }
  }
  r.loss = n ? loss_sum / n : 0;
  return r;
}

std::string skipped_report(const Dataset& ds, const std::string& split) {
  const auto* cached = dynamic_cast<const CachedImageDataset*>(&ds);
  if (!cached || cached->skipped().empty()) return "";
  std::string s = "data.on_bad_sample skip: " + std::to_string(cached->skipped().size()) + " bad " + split +
                  " file(s) skipped (not used):";
  for (const auto& e : cached->skipped()) s += "\n  " + e;
  return s;
}

DataSplits load_data(const DataConfig& cfg, std::ostream& log) {
  ImageLoadOptions lo;
  lo.channels = cfg.channels;
  lo.image_size = cfg.image_size;
  lo.bit_depth = cfg.bit_depth;
  lo.mean = cfg.mean;
  lo.std = cfg.std;
  lo.dicom_window = cfg.dicom_window;
  lo.classes = cfg.classes;
  if (!cfg.preprocess.is_null() && !cfg.preprocess.empty())
    lo.recipe = std::make_shared<const PreprocessRecipe>(PreprocessRecipe::from_json(cfg.preprocess));
  std::string dir = cfg.dir;
  DataSplits d;
  if (dir.empty()) {
    SynthOptions so;
    so.train = cfg.synth_train;
    so.val = cfg.synth_val;
    so.image_size = cfg.synth_size;
    so.seed = cfg.synth_seed;
    std::ostringstream name;
    name << "synth-cxr-v2-s" << so.seed << "-n" << so.train << "-" << so.val << "-px" << so.image_size;
    dir = cache_dir() + "/" + name.str();
    if (!fs::exists(fs::path(dir) / "manifest.csv")) {
      log << "generating the synthetic chest X-ray dataset (" << so.train << " train, " << so.val << " val, "
          << so.image_size << "px) in " << dir << "\n";
      fs::create_directories(cache_dir());
      write_synthetic_cxr(dir, so, /*overwrite=*/true);
    }
    d.source = "synthetic chest X-rays in " + dir;
  } else {
    d.source = dir;
  }
  // A folder, a MedMNIST .npz or a pack from lancet prep (whose recipe and hash are checked),
  // cached as 8- or 16-bit images (data/image_dataset.h) that the loader augments and normalises.
  const BadSample on_bad = parse_bad_sample(cfg.on_bad_sample);
  auto load = [&](const std::string& split) {
    std::string note;
    auto ds = load_cached_dataset(dir, split, lo, on_bad, &note, /*stream=*/!cfg.cache);
    if (!note.empty()) log << note << "\n";
    if (!ds->skipped().empty()) log << skipped_report(*ds, split) << "\n";
    return ds;
  };
  d.train = load(cfg.train_split);
  d.val = cfg.val_split == cfg.train_split ? d.train : load(cfg.val_split);
  LANCET_CHECK(d.train->size() > 0, dir << ": no training images (split '" << cfg.train_split << "')");
  LANCET_CHECK(d.train->class_names() == d.val->class_names(),
               dir << ": training and validation splits have different classes");
  return d;
}

namespace {

// Samples [begin, end) of another dataset.
class RangeDataset final : public Dataset {
 public:
  RangeDataset(const Dataset& base, int64_t begin, int64_t end) : base_(base), begin_(begin), end_(end) {}
  int64_t size() const override { return end_ - begin_; }
  Shape sample_shape() const override { return base_.sample_shape(); }
  const std::vector<std::string>& class_names() const override { return base_.class_names(); }
  int64_t label(int64_t i) const override { return base_.label(begin_ + i); }
  void get(int64_t i, float* out) const override { base_.get(begin_ + i, out); }

 private:
  const Dataset& base_;
  int64_t begin_, end_;
};

}  // namespace

EvalResult evaluate_sharded(Module& model, const Dataset& ds, int batch_size, const Loss& loss, const Stream& s,
                            Communicator& comm, const EvalLoading& loading) {
  const int R = comm.size();
  if (R == 1) return evaluate(model, ds, batch_size, loss, s, nullptr, loading);
  // Rank r evaluates the contiguous shard [n r / R, n (r + 1) / R); the shards are gathered
  // (padded to the largest) and joined in rank order, i.e. dataset order.
  const int64_t n = ds.size(), k = ds.num_classes();
  auto lo = [&](int r) { return n * r / R; };
  const RangeDataset shard(ds, lo(comm.rank()), lo(comm.rank() + 1));
  EvalResult mine = evaluate(model, shard, batch_size, loss, s, nullptr, loading);
  const int64_t most = (n + R - 1) / R;
  const Stream cpu{Device::cpu(), nullptr};
  Tensor probs = Tensor::zeros({most * k}), all_probs = Tensor::empty({R * most * k});
  Tensor labels = Tensor::zeros({most}, DType::i64), all_labels = Tensor::empty({R * most}, DType::i64);
  std::copy(mine.probs.begin(), mine.probs.end(), probs.data<float>());
  std::copy(mine.labels.begin(), mine.labels.end(), labels.data<int64_t>());
  comm.all_gather(probs, all_probs, cpu);
  comm.all_gather(labels, all_labels, cpu);
  const double loss_sum = comm.all_reduce_scalar(mine.loss * static_cast<double>(shard.size()), ReduceOp::sum);
  EvalResult r;
  r.cm = ConfusionMatrix(static_cast<int>(k));
  for (int q = 0; q < R; ++q) {
    const int64_t count = lo(q + 1) - lo(q);
    const float* p = all_probs.data<float>() + q * most * k;
    const int64_t* l = all_labels.data<int64_t>() + q * most;
    r.probs.insert(r.probs.end(), p, p + count * k);
    r.labels.insert(r.labels.end(), l, l + count);
    const auto pred = argmax_rows(p, count, k);
    for (int64_t i = 0; i < count; ++i) r.cm.add(l[i], pred[static_cast<size_t>(i)]);
  }
  r.loss = n ? loss_sum / static_cast<double>(n) : 0;
  return r;
}

namespace {

// Replaces `path` (atomically: temporary file and rename) by the lines `keep` accepts, so a
// resumed run does not repeat what it redoes. A torn last line from a crash is dropped.
void keep_lines(const std::string& path, const std::function<bool(const std::string&)>& keep) {
  if (!fs::exists(path)) return;
  std::ifstream in(path);
  std::ostringstream kept;
  for (std::string line; std::getline(in, line);)
    if (!line.empty() && keep(line)) kept << line << "\n";
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << kept.str();
    LANCET_CHECK(out.good(), "cannot write " << tmp);
  }
  fs::rename(tmp, path);
}

// JSON-lines records whose `key` is below `limit`.
std::function<bool(const std::string&)> json_below(const char* key, int64_t limit) {
  return [key, limit](const std::string& line) {
    try {
      return Json::parse(line).at(key).get<int64_t>() < limit;
    } catch (const Json::exception&) {
      return false;
    }
  };
}

// The metric `name` (see monitorable_metrics()) of an epoch.
double epoch_metric(const std::string& name, double train_loss, double train_acc, const EvalResult& ev,
                    const ClassificationReport& report) {
  if (name == "val_loss") return ev.loss;
  if (name == "val_accuracy") return ev.cm.accuracy();
  if (name == "val_balanced_accuracy") return ev.cm.balanced_accuracy();
  if (name == "val_auroc") return report.auroc;  // NaN when undefined: never an improvement
  if (name == "train_loss") return train_loss;
  if (name == "train_accuracy") return train_acc;
  LANCET_FAIL("unknown metric '" << name << "' to monitor");
}

}  // namespace

// What a CUDA run needs that is not there yet fails here, before any data is read, naming the
// setting. The GPU path: one GPU per process (fp32, fp16 or bf16; a pipeline's second stage on
// it or on a second GPU), several ranks only with the NCCL backend built (comm/nccl/).
void check_train_device(Device device, DType precision, int ranks) {
  if (device.is_cpu()) return;
#ifdef LANCET_WITH_CUDA
  const auto gpus = cuda_devices();
  LANCET_CHECK(device.index < static_cast<int>(gpus.size()),
               "train.device " << device.str() << ": " << gpus.size() << " CUDA device(s) visible on this machine");
#else
  LANCET_FAIL("train.device " << device.str() << ": this build of lancet has no CUDA (LANCET_CUDA=OFF)");
#endif
  // fp16 / bf16 run with 16-bit activations and tensor-core GEMMs there (layers/module.h).
  LANCET_CHECK(precision == DType::f32 || precision == DType::f16 || precision == DType::bf16,
               "train.precision " << dtype_name(precision) << " on " << device.str()
                                  << ": expected fp32, fp16 or bf16");
  LANCET_CHECK(ranks == 1 || nccl_available(), "train.device " << device.str() << " with " << ranks
                                                                << " ranks: this build of lancet has no NCCL (GPU gradients "
                                                                   "across ranks need it); use --device cpu");
  // Pipeline stages run both on this GPU (each with its own stream and memory pool) or, with
  // pipeline.devices, stage 1 on a second GPU (checked with the pipeline settings).
}

MemoryFormat resolve_memory_format(const std::string& setting, Device device, DType precision) {
  if (setting == "nchw") return MemoryFormat::nchw;
  if (setting == "channels_last") return MemoryFormat::channels_last;
  LANCET_CHECK(setting == "auto", "train.memory_format must be auto, nchw or channels_last, got '" << setting << "'");
  return device.is_cuda() && precision != DType::f32 ? MemoryFormat::channels_last : MemoryFormat::nchw;
}

int gpus_per_rank(const Json& config) {
  const PipelineConfig pc = pipeline_config(config);
  return pc.stages > 1 && rank_picks_gpu(train_config(config).device) ? pipeline_gpus_per_rank(pc.devices) : 1;
}

TrainSummary run_training(const Json& config, Communicator& comm, std::ostream& log) {
  const DataConfig dc = data_config(config);
  const TrainConfig tc = train_config(config);
  const OptimConfig oc = optim_config(config);
  const LossConfig lc = loss_config(config);
  const DistConfig dist = dist_config(config);
  const PipelineConfig pc = pipeline_config(config);
  const bool pipelined = pc.stages > 1;
  comm.set_timeout(dist.timeout_s);
  const int ranks = comm.size();
  const LossScalerConfig lsc = loss_scaler_config(config);
  const DType precision = parse_dtype(tc.precision);
  // "cuda": this rank's own GPU on its node, the first of its own pair for a pipeline over two GPUs.
  const Device device = rank_device(tc.device, comm, gpus_per_rank(config));
  check_train_device(device, precision, ranks);
  set_conv_autotune(tc.cudnn_autotune);
  set_allow_tf32(tc.allow_tf32);
  // Threads: all cores for one process; 1 per rank when several ranks share a node.
  const int threads = threads_per_rank(tc.threads, comm);
  const int stage_threads = pc.threads_per_stage > 0 ? pc.threads_per_stage : std::max(1, threads / 2);
  if (pipelined) {
    LANCET_CHECK(tc.grad_accum_steps == 1, "train.grad_accum_steps " << tc.grad_accum_steps << " with pipeline.stages "
                                                                     << pc.stages << ": the pipeline splits each step into "
                                                                        "pipeline.micro_batches micro-batches itself; set one of them");
    LANCET_CHECK(!dist.sync_bn, "dist.sync_bn with pipeline.stages " << pc.stages
                                                                     << ": SyncBatchNorm inside pipeline stages is not supported");
  }
  // The stages' devices, checked before any data is read.
  const std::vector<Device> stage_devices =
      pipelined ? pipeline_devices(pc.devices, device, rank_picks_gpu(tc.device)) : std::vector<Device>{};
  const std::string binding = bind_rank_threads(dist.bind, comm, threads);
  set_num_threads(threads);
  const Stream stream{device, nullptr};

  // Rank 0 first: it may generate the synthetic dataset's cache, which the others then read.
  if (!comm.is_root()) comm.barrier();
  DataSplits data = load_data(dc, log);
  if (comm.is_root() && ranks > 1) comm.barrier();
  const int num_classes = data.train->num_classes();
  Json model_cfg = config.at("model");
  if (!model_cfg.contains("in_channels")) model_cfg["in_channels"] = dc.channels;
  if (!model_cfg.contains("num_classes")) model_cfg["num_classes"] = num_classes;
  LANCET_CHECK(model_cfg["in_channels"].get<int>() == dc.channels,
               "model.in_channels " << model_cfg["in_channels"] << " but data.channels " << dc.channels);
  LANCET_CHECK(model_cfg["num_classes"].get<int>() == num_classes,
               "model.num_classes " << model_cfg["num_classes"] << " but " << data.source << " has " << num_classes
                                    << " classes " << class_list_text(data.train->class_names())
                                    << " (leave model.num_classes out to take it from the data)");
  auto model = make_model(model_cfg, tc.seed);
  model_cfg = model->config().to_json();
  // Every rank draws its own dropout masks (rank 0's are the single-process ones).
  model->set_dropout_seed((tc.seed ^ 0xD7u) + static_cast<uint64_t>(comm.rank()) * 0x9E3779B97F4A7C15ull);
  model->to(device);
  model->train();
  // fp16 / bf16: emulated on the CPU (layers/module.h); FP32 master weights and optimizer state.
  model->set_precision(precision);
  const MemoryFormat format = resolve_memory_format(tc.memory_format, device, precision);
  model->set_memory_format(format);
  LossScaler scaler(lsc);
  const Loss loss = make_loss(lc, num_classes, device);

  // Data parallelism: train.batch_size is the global batch; rank r takes every R-th sample of
  // the epoch order (DistributedSampler), bs / R per step, so the ranks' step-k batches
  // together are the single-process step-k batch.
  const int64_t n = data.train->size();
  const int64_t global_bs = tc.batch_size;
  LANCET_CHECK(global_bs % ranks == 0, "train.batch_size " << global_bs << " is the global batch and must be a multiple of the "
                                                           << ranks << " ranks (each takes batch_size / ranks)");
  const int64_t bs = global_bs / ranks;  // per rank
  // Micro-batches per step: gradient accumulation's, or the pipeline's.
  const int micro = pipelined ? pc.micro_batches : tc.grad_accum_steps;
  LANCET_CHECK(micro <= bs, (pipelined ? "pipeline.micro_batches " : "train.grad_accum_steps ")
                                << micro << " exceeds the " << bs << " samples each rank takes per step");
  // Every rank must run the same job (compared before the first other collective: the cut):
  // every setting but the per-rank ones (per_rank_settings, trainer/ddp.cpp), the model as
  // resolved, and the data as read.
  if (ranks > 1) {
    Json job = config;
    job["model"] = model_cfg;
    auto fields = config_fields(job);
    fields.push_back({"the training data", std::to_string(n) + " images, " + shape_str(data.train->sample_shape()) +
                                               ", classes " + Json(data.train->class_names()).dump()});
    fields.push_back({"the validation data", std::to_string(data.val->size()) + " images"});
    fields.push_back({"train.device", device.is_cpu() ? "cpu" : "cuda"});
    check_same_on_all_ranks(comm, fields);
  }
  // Pipeline stages: the cut, and each stage's units on its device, before the optimizer makes
  // its state on the parameters' devices (the Pipeline itself comes after a resume's loading).
  std::string cut_basis;
  PipelineOptions po;
  if (pipelined) {
    // Auto: costs measured on a scratch copy of the model, on a random micro-batch of the
    // step's size; every rank cuts where rank 0's measurement says.
    auto make_scratch = [&] {
      auto m = make_model(model_cfg, tc.seed);
      m->to(device);
      m->set_precision(precision);
      m->set_memory_format(format);
      return m;
    };
    const Shape ss = data.train->sample_shape();
    Tensor x = Tensor::empty({(bs + micro - 1) / micro, ss[0], ss[1], ss[2]});
    std::mt19937 rng(static_cast<uint32_t>(tc.seed));
    std::normal_distribution<float> nd;
    for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = nd(rng);
    if (!device.is_cpu()) x = x.to(device);
    int cut = choose_cut(pc.cut, pc.balance, model->units(), make_scratch, x, stream, stage_threads, &cut_basis);
    if (ranks > 1 && pc.cut == "auto") cut = static_cast<int>(comm.all_reduce_scalar(comm.is_root() ? cut : 0, ReduceOp::sum));
    po.schedule = parse_pipe_schedule(pc.schedule);
    po.cut = cut;
    po.threads_per_stage = stage_threads;
    po.devices = stage_devices;
    po.bucket_mb = dist.bucket_mb;
    place_pipeline_stages(model->units(), po.cut, po.devices);
  }
  auto opt = make_optimizer(oc, model->named_parameters());

  // data.sampler's epoch order (shuffle: DistributedSampler's), split over the ranks likewise.
  std::vector<int64_t> train_labels(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) train_labels[static_cast<size_t>(i)] = data.train->label(i);
  const EpochSampler sampler(parse_sampler(dc.sampler), train_labels, num_classes, comm.rank(), ranks, tc.seed,
                             dist.sampler_drop_last);
  const int64_t per_rank = sampler.num_samples();
  const int64_t steps_per_epoch = tc.drop_last ? per_rank / bs : (per_rank + bs - 1) / bs;
  LANCET_CHECK(steps_per_epoch > 0, "train.batch_size " << global_bs << " exceeds the " << n << " training images with drop_last");
  int64_t total_steps = steps_per_epoch * tc.epochs;
  if (tc.max_steps > 0) total_steps = std::min(total_steps, tc.max_steps);

  // Resume: the state of the run the checkpoint was taken from.
  TrainState state;
  state.train_size = n;
  std::string resume_from = tc.resume;
  if (resume_from == "auto") {
    resume_from = newest_valid_checkpoint(tc.out, log);
    if (resume_from.empty()) log << "resume: no checkpoint in " << checkpoint_dir(tc.out) << "; starting a fresh run\n";
  }
  if (!resume_from.empty()) {
    state = load_checkpoint(resume_from, *model, *opt, oc.name, config);
    LANCET_CHECK(state.train_size == n, resume_from << ": cannot resume: the checkpoint's run had " << state.train_size
                                                    << " training images, this data has " << n);
    log << "resumed from " << resume_from << " at epoch " << state.epoch << ", step " << state.global_step << "\n";
  }

  // Temporary files of a writer killed mid-write (never renamed into place, never read).
  if (!tc.out.empty() && comm.is_root())
    for (const auto& f : remove_stale_temp_files(tc.out)) log << "removed " << f << " (left by a killed writer)\n";

  // A fresh run never mixes its checkpoints with an earlier run's (pruning keeps the highest
  // steps, and --resume auto would pick the other run's): refuse rather than delete them.
  if (resume_from.empty() && !tc.out.empty() && comm.is_root()) {
    const auto old = list_checkpoints(tc.out);
    LANCET_CHECK(old.empty(), checkpoint_dir(tc.out) << " holds " << old.size() << " checkpoint(s) of an earlier run (newest "
                                                     << fs::path(old.empty() ? "" : old.back()).filename().string()
                                                     << "): continue it with --resume auto, or train into another --out");
  }

  // Schedule and early stopping span the configured epochs (max_steps only cuts a run short).
  LrSchedule schedule(config.at("schedule"), oc.lr, steps_per_epoch * tc.epochs);
  EarlyStopping stopper(config.at("early_stopping"));
  if (!resume_from.empty()) {
    if (!state.schedule.empty()) schedule.load_state(state.schedule);
    if (!state.early_stopping.empty()) stopper.load_state(state.early_stopping);
    if (!state.loss_scaler.empty()) scaler.load_state(state.loss_scaler, resume_from);
  }

  // Every rank must have resumed from the same step (the job itself was compared above); then
  // all start from rank 0's weights.
  if (ranks > 1) check_same_on_all_ranks(comm, {{"the resumed step", std::to_string(state.global_step)}});
  std::unique_ptr<GradSync> grad_sync;
  std::unique_ptr<Pipeline> pipeline;
  if (pipelined) pipeline = std::make_unique<Pipeline>(*model, model->units(), po, comm);
  // Peak memory per epoch and over the run, per device.
  const std::vector<Allocator*> pools = training_memory_pools(device, stage_devices);
  std::map<std::string, size_t> peak_by_device;
  if (ranks > 1) {
    if (pipeline) {
      pipeline->broadcast_parameters();
    } else {
      GradSyncOptions gso;
      gso.bucket_mb = dist.bucket_mb;
      gso.overlap = dist.overlap;
      grad_sync = std::make_unique<GradSync>(*model, comm, gso);
      grad_sync->broadcast_parameters(stream);
    }
    if (dist.sync_bn)
      model->apply([&comm](const std::string&, Module& m) {
        if (auto* bn = dynamic_cast<BatchNorm2d*>(&m))
          bn->set_replica_sum([&comm](std::vector<double>& v) {
            comm.all_reduce_doubles(v.data(), static_cast<int>(v.size()), ReduceOp::sum);
          });
      });
  }
  auto sync_buffers = [&]() {  // rank 0's BatchNorm statistics everywhere (validation, checkpoints)
    if (grad_sync) grad_sync->broadcast_buffers(stream);
    if (pipeline) pipeline->broadcast_buffers();
  };

  // Run folder: logs append on resume after dropping what the resumed run will redo.
  const bool writes = !tc.out.empty() && comm.is_root();
  std::unique_ptr<RunLog> logs;
  std::unique_ptr<TensorBoardWriter> tb;
  if (writes) {
    fs::create_directories(tc.out);
    std::ofstream(tc.out + "/config.json") << config.dump(2) << "\n";
    const bool resuming = !resume_from.empty();
    if (resuming) {
      keep_lines(tc.out + "/metrics.jsonl", json_below("epoch", state.epoch));
      keep_lines(tc.out + "/steps.jsonl", json_below("step", state.global_step + 1));
      bool header = true;
      keep_lines(tc.out + "/epochs.csv", [&](const std::string& line) {
        if (header) return !(header = false);
        try {
          return std::stoi(line) < state.epoch;  // the first column is the epoch
        } catch (const std::exception&) {
          return false;
        }
      });
    }
    logs = std::make_unique<RunLog>(tc.out, resuming);
    if (tc.tensorboard) {
      tb = std::make_unique<TensorBoardWriter>(tc.out + "/tensorboard");
      // Steps a crashed run logged after its checkpoint are redone: TensorBoard drops the old ones.
      if (resuming) tb->add_session_start(state.global_step + 1);
    }
  }
  if (!tc.profile.empty()) {
    clear_trace();
    set_trace_enabled(true);
  }
  log << "data: " << data.source << ": " << n << " train / " << data.val->size() << " val images, " << num_classes
      << " classes, " << shape_str(data.train->sample_shape()) << "\n";
  log << "model: medicalcnn " << model_cfg.dump() << ", " << model->num_parameters() << " parameters\n";
  log << "training: " << total_steps << " steps, batch " << global_bs;
  if (ranks > 1) log << " (" << ranks << " ranks x " << bs << ")";
  if (micro > 1) log << " in " << micro << " micro-batches";
  log << ", " << oc.name << " lr " << oc.lr << " (" << schedule.name() << " schedule), " << num_threads()
      << " thread(s) " << (ranks > 1 ? "per rank " : "") << "on " << device.str() << "\n";
  if (precision != DType::f32)
    log << "precision: " << tc.precision
        << (device.is_cpu() ? " emulated on the CPU (activations and conv/linear operands rounded"
                            : " on " + device.str() + " (16-bit activations, tensor-core convolutions and GEMMs")
        << ", FP32 master weights, BatchNorm and loss); loss scaling "
        << (scaler.enabled() ? "dynamic from " + Json(scaler.scale()).dump() : std::string("off")) << "\n";
  if (format != MemoryFormat::nchw)
    log << "memory format: " << memory_format_name(format) << " activations inside the model (converted at its input; "
        << "weights and checkpoints stay nchw)\n";
  if (pipeline)
    log << "pipeline: 2 stages, " << pc.schedule << " schedule, " << micro << " micro-batches per step"
        << (ranks > 1 ? " per rank" : "") << "; cut before " << model->units()[static_cast<size_t>(pipeline->cut())].first
        << " (" << cut_basis << ")\n"
        << pipeline->describe();
  if (ranks > 1 && pipeline) {
    const auto b = pipeline->buckets_per_stage();
    log << "data parallel: " << ranks << " ranks (" << comm.backend() << ", " << comm.local_size()
        << " on this node), each a two-stage pipeline; each stage's gradients (" << b[0] << " and " << b[1]
        << " bucket(s) of <= " << dist.bucket_mb << " MB) all-reduced when the stage's backward ends; threads "
        << binding << "\n";
  } else if (ranks > 1) {
    const auto sizes = grad_sync->bucket_elements();
    log << "data parallel: " << ranks << " ranks (" << comm.backend() << ", " << comm.local_size()
        << " on this node), gradients in " << sizes.size() << " bucket(s) of <= " << dist.bucket_mb << " MB"
        << (dist.overlap ? " all-reduced during the backward" : " all-reduced after the backward")
        << (dist.sync_bn ? ", SyncBatchNorm" : ", per-rank BatchNorm statistics") << "; threads " << binding << "\n";
  }
  if (ranks > 1) {  // how the epoch's order (sampler.epoch_length() positions) met the rank count
    log << "epoch split: " << sampler.epoch_length() << " samples over " << ranks << " ranks, " << per_rank << " per rank";
    if (sampler.padding() > 0) log << " (" << sampler.padding() << " repeated to pad; dist.sampler_drop_last drops instead)";
    if (sampler.padding() < 0) log << " (" << -sampler.padding() << " dropped: dist.sampler_drop_last)";
    log << "\n";
  }

  auto write_checkpoint = [&](TrainState snapshot, const std::string& path) {
    if (!writes) return;
    snapshot.dropout_counters.clear();  // a resumed run's state holds the counters it loaded
    for (const Dropout* d : model->dropouts()) snapshot.dropout_counters.push_back(d->counter());
    snapshot.schedule = schedule.state();
    snapshot.early_stopping = stopper.state();
    if (scaler.enabled()) snapshot.loss_scaler = scaler.state();
    fs::create_directories(fs::path(path).parent_path());
    save_checkpoint(path, *model, model_cfg, *opt, oc.name, snapshot, config);
    if (path != tc.out + "/best.h5") prune_checkpoints(tc.out, tc.keep_checkpoints);
  };
  auto step_checkpoint = [&](const TrainState& snapshot) {
    if (writes) write_checkpoint(snapshot, checkpoint_path(tc.out, snapshot.global_step));
  };

  TrainSummary summary;
  ProgressDisplay progress(log, tc.log_every);
  StepProfiler prof;
  {  // on a GPU: phases timed by CUDA events (trainer/profiler.h), joining a second GPU's stages
    std::vector<Stream> also;
    for (const Device& d : stage_devices)
      if (d.is_cuda() && d != device) also.push_back(stream_on(d, stream));
    prof.set_stream(stream, also);
  }
  StepOptions step_options;
  step_options.clip_grad_norm = tc.clip_grad_norm;
  step_options.compute_grad_norm = writes;  // logged per step
  step_options.grad_sync = grad_sync.get();
  step_options.loss_scaler = &scaler;
  const FaultInjection fault = fault_injection_from_env(comm.rank());
  // Worker threads build the (micro-)batches ahead of the step, augmented when configured;
  // minority classes (under half the largest class) get augment.minority_strength.
  LoaderOptions loader_options;
  loader_options.workers = dc.workers;
  loader_options.prefetch = dc.prefetch;
  loader_options.seed = tc.seed;
  loader_options.augment = AugmentConfig::from_json(dc.augment);
  if (loader_options.augment.enabled()) loader_options.minority = minority_classes(train_labels, num_classes);
#ifdef LANCET_WITH_CUDA
  if (!device.is_cpu()) loader_options.allocator = &pinned_host_allocator(device);
#endif
  DataLoader loader(*data.train, loader_options);
  log << "data loader: " << dc.workers << " worker(s), prefetch " << dc.prefetch << ", sampler " << dc.sampler
      << ", augmentation " << (loader_options.augment.enabled() ? loader_options.augment.to_json().dump() : "off") << "\n";
  // Batches reach a GPU through the prefetcher's own copy stream, overlapped with the step
  // before (data/device_prefetch.h); on the CPU it passes them through. Two slots per
  // micro-batch: one step's in use while the next step's are copied.
  DevicePrefetcher prefetcher(stream, (bs + micro - 1) / micro, data.train->sample_shape(), 2 * micro);
  // Takes step `step`'s micro-batches (cut as the epoch's batch list below cuts them) from the
  // loader into the prefetcher, which starts their host->device copies on a GPU.
  auto fetch_step = [&](int64_t step) {
    const int64_t start = step * bs, b = std::min(bs, per_rank - start);
    const int64_t mb = (b + micro - 1) / micro;
    for (int64_t m0 = 0; m0 < b; m0 += mb) {
      Batch batch;
      {
        auto scope = prof.phase(Phase::data_wait);
        LANCET_CHECK(loader.next(batch) && batch.x.dim(0) == std::min(mb, b - m0), "data loader out of step");
      }
      prefetcher.push(std::move(batch));
    }
  };
  const auto t_start = Clock::now();
  const int64_t images_at_start = state.images, step_at_start = state.global_step;
  // A resumed run that had already ended (stopped early, or all its steps done: killed after
  // its last checkpoint but before final.h5, or simply run again) trains no further: it
  // validates and writes final.h5 from the checkpoint's weights, the ones the run ended with.
  bool stop_early = stopper.should_stop();
  if (!resume_from.empty() && (stop_early || state.global_step >= total_steps || state.epoch > tc.epochs)) {
    log << "resume: ";
    if (stop_early)
      log << "early stopping ended this run after epoch " << state.epoch - 1 << " (" << stopper.monitor()
          << " had not improved for " << stopper.bad_epochs() << " epochs)";
    else
      log << "the run's " << total_steps << " steps are done";
    log << "; nothing left to train\n";
  }
  // train.nsys_steps A:B: cudaProfilerStart before step A, cudaProfilerStop after step B. A
  // resumed run that starts inside the window opens it before its first step (the rest of the
  // window is captured); one that starts after B captures nothing. A run ending inside the
  // window closes it after its last step.
  bool nsys_open = false;
  auto nsys_capture = [&](bool start, int64_t step, const std::string& note) {
#ifdef LANCET_WITH_CUDA
    start ? cuda_profiler_start() : cuda_profiler_stop();
#else
    LANCET_FAIL("train.nsys_steps: this build has no CUDA");  // train_config refuses it earlier
#endif
    nsys_open = start;
    progress.end_line();
    log << "nsys capture: " << (start ? "cudaProfilerStart before step " : "cudaProfilerStop after step ") << step
        << note << "\n";
  };
  if (tc.nsys_first > 0 && step_at_start >= tc.nsys_last)
    log << "nsys capture: none (train.nsys_steps " << tc.nsys_first << ":" << tc.nsys_last
        << " lies before the resumed run's first step, " << step_at_start + 1 << ")\n";
  int64_t last_skip_line = -1;  // the step whose skip the log last reported (-1: none yet)
  for (; state.epoch <= tc.epochs && state.global_step < total_steps && !stop_early; ++state.epoch) {
    const auto order = sampler.indices(state.epoch);
    const auto t_epoch = Clock::now();
    const int64_t epoch_end = std::min(steps_per_epoch, state.step_in_epoch + (total_steps - state.global_step));
    {  // the epoch's micro-batches, in the order the steps below take them
      std::vector<std::vector<int64_t>> batches;
      for (int64_t step = state.step_in_epoch; step < epoch_end; ++step) {
        const int64_t start = step * bs, b = std::min(bs, per_rank - start);
        const int64_t mb = (b + micro - 1) / micro;
        for (int64_t m0 = 0; m0 < b; m0 += mb)
          batches.emplace_back(order.begin() + start + m0, order.begin() + start + m0 + std::min(mb, b - m0));
      }
      loader.start_epoch(state.epoch, std::move(batches));
    }
    int64_t images_this_session = 0;
    prof.reset();
    if (pipeline) pipeline->reset_stats();
    for (Allocator* a : pools) a->reset_peak();
    while (state.step_in_epoch < epoch_end) {
      prof.begin_step();
      const int64_t start = state.step_in_epoch * bs;
      const int64_t b = std::min(bs, per_rank - start);
      // Micro-batches of ceil(b / micro) rows (the last ones smaller or absent).
      const int64_t mb = (b + micro - 1) / micro;
      // On a GPU the next step's micro-batches are fetched before this step is queued, so their
      // copies (on the prefetcher's stream) overlap this step's compute, and h2d times only the
      // compute stream's wait for this step's copies: what the overlap did not hide. The CPU
      // takes one step at a time, as the prefetcher passes its batches through.
      if (prefetcher.queued() == 0) fetch_step(state.step_in_epoch);
      if (!device.is_cpu() && state.step_in_epoch + 1 < epoch_end) fetch_step(state.step_in_epoch + 1);
      std::vector<Tensor> xs, ys;
      for (int64_t m0 = 0; m0 < b; m0 += mb) {
        Batch batch;
        if (device.is_cpu()) {
          batch = prefetcher.pop();
        } else {
          auto scope = prof.phase(Phase::h2d);
          batch = prefetcher.pop();  // views of the prefetcher's buffers, valid until release()
        }
        LANCET_CHECK(batch.x.dim(0) == std::min(mb, b - m0), "data loader out of step");
        xs.push_back(batch.x);
        ys.push_back(batch.y);
      }
      if (tc.nsys_first > 0 && !nsys_open && state.global_step + 1 >= tc.nsys_first &&
          state.global_step + 1 <= tc.nsys_last)
        nsys_capture(true, state.global_step + 1,
                     state.global_step + 1 > tc.nsys_first ? " (resumed inside train.nsys_steps)" : "");
      const float lr = schedule.lr_for_step(state.global_step);
      opt->set_lr(lr);
      StepStats st = pipeline ? pipeline->train_step(*opt, xs, ys, loss, step_options, &prof)
                              : train_step_micro(*model, *opt, comm, xs, ys, loss, stream, step_options, &prof);
      prefetcher.release();  // the step is queued: its batches' buffers may be refilled after it
      if (ranks > 1) {  // the global batch's loss, accuracy and size
        double v[3] = {st.loss * static_cast<double>(st.count), static_cast<double>(st.correct),
                       static_cast<double>(st.count)};
        comm.all_reduce_doubles(v, 3, ReduceOp::sum);
        st.loss = v[0] / v[2];
        st.correct = static_cast<int64_t>(v[1]);
        st.count = static_cast<int64_t>(v[2]);
      }
      prof.end_step();
      fault.maybe_fail(state.global_step + 1, *model);
      if (nsys_open && state.global_step + 1 == tc.nsys_last) nsys_capture(false, state.global_step + 1, "");
      // fp16's narrow range is the usual culprit at the first steps (inputs of a large scale
      // overflow the activations); bf16 and fp32 have float's.
      LANCET_CHECK(std::isfinite(st.loss),
                   "training diverged: the loss is "
                       << st.loss << " at step " << state.global_step + 1
                       << (precision == DType::f16 ? " in fp16: activations beyond fp16's range (max 65504) are a likely "
                                                     "cause; try train.precision=bf16, check data.mean/std (the inputs' "
                                                     "scale), or a lower optim.lr"
                                                   : " (try a lower optim.lr)"));
      if (st.skipped && log_skipped_step(scaler.skipped_steps(),
                                         last_skip_line < 0 ? -1 : state.global_step + 1 - last_skip_line)) {
        progress.end_line();  // every skip is in steps.jsonl; the log reports them sparingly
        log << scaler.skip_message(state.global_step + 1, st.loss_scale) << "\n";
        last_skip_line = state.global_step + 1;
      }
      state.epoch_loss_sum += st.loss * st.count;
      state.epoch_correct += st.correct;
      state.epoch_seen += st.count;
      state.epoch_skipped += st.skipped ? 1 : 0;
      state.images += st.count;
      images_this_session += st.count;
      ++state.step_in_epoch;
      ++state.global_step;
      const double elapsed = std::chrono::duration<double>(Clock::now() - t_start).count();
      const double img_s = (state.images - images_at_start) / std::max(elapsed, 1e-9);
      const double eta = (total_steps - state.global_step) * (elapsed / (state.global_step - step_at_start));
      progress.update({state.epoch, tc.epochs, state.step_in_epoch, steps_per_epoch,
                       state.epoch_loss_sum / state.epoch_seen,
                       static_cast<double>(state.epoch_correct) / state.epoch_seen, lr, img_s, eta});
      if (logs) {
        Json j = {{"step", state.global_step}, {"epoch", state.epoch}, {"loss", st.loss}, {"lr", lr},
                  {"batch_accuracy", static_cast<double>(st.correct) / st.count}, {"images_per_s", img_s}};
        if (std::isfinite(st.grad_norm)) j["grad_norm"] = st.grad_norm;
        if (scaler.enabled()) {
          j["loss_scale"] = st.loss_scale;
          j["skipped"] = st.skipped;
        }
        logs->steps.write(j);
      }
      if (tb) {
        tb->add_scalar("train/loss", st.loss, state.global_step);
        tb->add_scalar("train/lr", lr, state.global_step);
        if (std::isfinite(st.grad_norm)) tb->add_scalar("train/grad_norm", st.grad_norm, state.global_step);
        if (scaler.enabled()) tb->add_scalar("train/loss_scale", st.loss_scale, state.global_step);
      }
      if (tc.checkpoint_every > 0 && state.global_step % tc.checkpoint_every == 0 && state.step_in_epoch < steps_per_epoch) {
        TrainState snapshot = state;
        snapshot.train_seconds += std::chrono::duration<double>(Clock::now() - t_epoch).count();
        step_checkpoint(snapshot);
      }
    }
    progress.end_line();
    const double epoch_s = std::chrono::duration<double>(Clock::now() - t_epoch).count();
    state.train_seconds += epoch_s;
    if (state.step_in_epoch < steps_per_epoch) {  // stopped by max_steps inside the epoch
      if (scaler.enabled())  // no epoch summary follows: the skips so far
        log << "loss scale " << loss_scale_str(scaler.scale()) << ", " << state.epoch_skipped << " step"
            << (state.epoch_skipped == 1 ? "" : "s") << " skipped in this epoch's first " << state.step_in_epoch
            << " (inf/NaN gradients), " << scaler.skipped_steps() << " in the run\n";
      break;
    }
    sync_buffers();
    EvalResult ev = evaluate_sharded(*model, *data.val, std::max<int>(tc.batch_size, 64), loss, stream, comm,
                                     eval_loading(dc, device));
    const double train_loss = state.epoch_loss_sum / state.epoch_seen;
    const double train_acc = static_cast<double>(state.epoch_correct) / state.epoch_seen;
    const ClassificationReport report =
        classification_report(ev.probs, ev.labels, num_classes, data.val->class_names());
    const double lr_used = opt->lr();
    schedule.on_epoch_end(state.epoch, epoch_metric(schedule.monitor(), train_loss, train_acc, ev, report));
    stop_early = stopper.update(state.epoch, epoch_metric(stopper.monitor(), train_loss, train_acc, ev, report));
    log << "epoch " << state.epoch << ": train loss " << std::fixed << std::setprecision(4) << train_loss
        << "  val loss " << ev.loss << std::setprecision(3) << "  val acc " << ev.cm.accuracy()
        << "  val balanced acc " << ev.cm.balanced_accuracy();
    if (std::isfinite(report.auroc)) log << "  val AUROC " << report.auroc;
    log << "  (" << std::setprecision(1) << epoch_s << " s, " << images_this_session / epoch_s << " img/s)\n";
    if (scaler.enabled())
      log << "loss scale " << loss_scale_str(scaler.scale()) << ", " << state.epoch_skipped << " step"
          << (state.epoch_skipped == 1 ? "" : "s") << " skipped this epoch (inf/NaN gradients), "
          << scaler.skipped_steps() << " in the run\n";
    if (prof.steps() > 0) log << prof.table();
    if (pipeline && pipeline->stats().steps > 0) log << pipeline->stats().text();
    // This epoch's peaks, per device (the sum of its pools': training thread's and stages').
    std::map<std::string, size_t> epoch_peak;
    for (Allocator* a : pools) epoch_peak[a->device().str()] += a->peak_bytes();
    size_t epoch_peak_sum = 0;
    for (const auto& [dev, b] : epoch_peak) {
      peak_by_device[dev] = std::max(peak_by_device[dev], b);
      epoch_peak_sum += b;
    }
    summary.peak_bytes = std::max(summary.peak_bytes, epoch_peak_sum);
    if (const std::string skipped = skipped_report(*data.train, dc.train_split); !skipped.empty()) log << skipped << "\n";
    if (logs) {
      Json m = {{"epoch", state.epoch},
                {"step", state.global_step},
                {"train_loss", train_loss},
                {"train_accuracy", train_acc},
                {"images_per_s", images_this_session / epoch_s},
                {"epoch_seconds", epoch_s},
                {"lr", lr_used},
                {"val_loss", ev.loss},
                {"val", report.to_json()},
                {"phases", prof.to_json()},
                // This rank's allocator peak over the epoch: weights, optimizer state, activations
                // (a pipeline over two devices: both, and each in peak_bytes_by_device).
                {"peak_bytes", static_cast<int64_t>(epoch_peak_sum)}};
      if (epoch_peak.size() > 1) m["peak_bytes_by_device"] = epoch_peak;
      if (pipeline) m["pipeline"] = pipeline->stats().to_json();
      if (scaler.enabled()) {  // the scale at the epoch's end and the steps it skipped
        m["loss_scale"] = scaler.scale();
        m["skipped_steps"] = state.epoch_skipped;
      }
      logs->metrics.write(m);
      logs->epochs.write_row({{"epoch", state.epoch},
                              {"step", static_cast<double>(state.global_step)},
                              {"lr", lr_used},
                              {"train_loss", train_loss},
                              {"train_accuracy", train_acc},
                              {"val_loss", ev.loss},
                              {"val_accuracy", ev.cm.accuracy()},
                              {"val_balanced_accuracy", ev.cm.balanced_accuracy()},
                              {"val_auroc", report.auroc},
                              {"epoch_seconds", epoch_s},
                              {"images_per_s", images_this_session / epoch_s},
                              {"step_ms_mean", prof.step_stats().mean_s * 1e3},
                              {"data_wait_ms_mean", prof.stats(Phase::data_wait).mean_s * 1e3}});
    }
    if (tb) {
      // On the global-step axis like the per-step scalars (as PyTorch Lightning logs them), so
      // that a resumed run's restart marker replaces exactly what it logs again; epoch/epoch
      // maps steps to epochs.
      const int64_t at = state.global_step;
      tb->add_scalar("epoch/epoch", state.epoch, at);
      tb->add_scalar("epoch/train_loss", train_loss, at);
      tb->add_scalar("epoch/train_accuracy", train_acc, at);
      tb->add_scalar("epoch/val_loss", ev.loss, at);
      tb->add_scalar("epoch/val_accuracy", ev.cm.accuracy(), at);
      tb->add_scalar("epoch/val_balanced_accuracy", ev.cm.balanced_accuracy(), at);
      if (std::isfinite(report.auroc)) tb->add_scalar("epoch/val_auroc", report.auroc, at);
      tb->add_scalar("epoch/lr", lr_used, at);
    }
    summary.final_eval = std::move(ev);
    // The next epoch starts here: a checkpoint taken now resumes at its first step.
    state.step_in_epoch = 0;
    state.epoch_loss_sum = 0;
    state.epoch_correct = state.epoch_seen = 0;
    state.epoch_skipped = 0;
    TrainState next = state;
    ++next.epoch;
    if (stopper.is_best()) {
      write_checkpoint(next, tc.out + "/best.h5");
      if (writes) log << "new best " << stopper.monitor() << " " << std::setprecision(4) << stopper.best() << ": wrote " << tc.out << "/best.h5\n";
    }
    step_checkpoint(next);
    if (stop_early)
      log << "early stopping: " << stopper.monitor() << " has not improved for " << stopper.bad_epochs()
          << " epochs (best " << std::setprecision(4) << stopper.best() << " at epoch " << stopper.best_epoch() << ")\n";
  }
  if (nsys_open)
    nsys_capture(false, state.global_step, " (the run ended before step " + std::to_string(tc.nsys_last) + ")");
  else if (tc.nsys_first > 0 && state.global_step < tc.nsys_first)
    log << "nsys capture: none (the run ended after step " << state.global_step << ", before train.nsys_steps "
        << tc.nsys_first << ":" << tc.nsys_last << ")\n";
  if (tc.checkpoint_every > 0 && state.step_in_epoch > 0 && state.step_in_epoch < steps_per_epoch &&
      state.global_step % tc.checkpoint_every != 0 && state.global_step > step_at_start)
    step_checkpoint(state);  // stopped by max_steps mid-epoch: keep the exact position
  summary.steps = state.global_step;
  summary.seconds = state.train_seconds;
  summary.images_per_s = state.images / std::max(state.train_seconds, 1e-9);
  summary.stopped_early = stop_early;
  if (summary.final_eval.cm.total() == 0) {  // nothing was validated in this session
    sync_buffers();
    summary.final_eval = evaluate_sharded(*model, *data.val, std::max<int>(tc.batch_size, 64), loss, stream, comm,
                                          eval_loading(dc, device));
  }

  // Final validation report, indented under its title.
  const ClassificationReport report = classification_report(summary.final_eval.probs, summary.final_eval.labels,
                                                            num_classes, data.val->class_names());
  log << "\nvalidation report\n";
  std::istringstream lines(report.to_text());
  for (std::string line; std::getline(lines, line);) log << (line.empty() ? "" : "  ") << line << "\n";
  if (summary.peak_bytes > 0) {  // per precision: the memory a mixed-precision run saves shows here
    // "peak memory on cuda:0 (fp16 training): 812.3 MiB"; a pipeline over two GPUs lists both.
    log << "peak memory on " << std::fixed << std::setprecision(1);
    const char* sep = "";
    for (const auto& [dev, b] : peak_by_device) {
      log << sep << dev << (peak_by_device.size() == 1 ? " (" + tc.precision + " training)" : "") << ": "
          << static_cast<double>(b) / (1 << 20) << " MiB";
      sep = ", ";
    }
    if (peak_by_device.size() > 1) log << " (" << tc.precision << " training)";
    log << " (weights, optimizer state, activations, workspaces)\n";
  }
  // Every replica must have ended with rank 0's weights: a silent drift fails here, before
  // final.h5 (rank 0's) is taken for the job's result.
  if (ranks > 1) log << check_parameters_identical(comm, model->named_parameters()) << "\n";
  if (writes) {
    model->to(Device::cpu());
    save_weights(tc.out + "/final.h5", *model, model_cfg, config);  // config: eval's preprocessing
    log << "wrote " << tc.out << "/final.h5, metrics.jsonl, steps.jsonl, epochs.csv"
        << (tb ? ", " + fs::path(tb->path()).lexically_relative(tc.out).string() : std::string()) << "\n";
  }
  if (!tc.profile.empty()) {
    set_trace_enabled(false);
    write_chrome_trace(tc.profile);
    log << "wrote the trace of phases and layers to " << tc.profile << " (chrome://tracing or ui.perfetto.dev)\n";
  }
  return summary;
}

}  // namespace lancet
