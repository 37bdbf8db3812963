// The device prefetcher (data/device_prefetch.h) on a GPU: batches from the loader's pinned
// memory reach the device bit for bit, a partial last batch included; a slot still used by the
// compute stream is not overwritten until the compute stream has passed the release (the
// compute stream is held by a host function that blocks until the test lets it go); training
// through the prefetcher gives the weights that plain Tensor::to copies give; run_training
// on cuda runs through it with micro-batches and a partial last step; and evaluate() on cuda
// gives the same bits with any worker count. Label gpu: skips without a device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <random>
#include <sstream>
#include <thread>

#include "comm/communicator.h"
#include "data/device_prefetch.h"
#include "data/loader.h"
#include "tests/cli_util.h"
#include "tests/gpu_util.h"
#include "trainer/config.h"
#include "trainer/optimizer.h"
#include "trainer/trainer.h"
#include "trainer/weights.h"

using namespace lancet;
using namespace lancet::testing;

namespace {

const Stream kGpu{Device::cuda(0), nullptr};  // the trainer's compute stream: the legacy default one

// A batch in pinned memory, as the loader makes them for a GPU run: random images, labels < 5.
Batch pinned_batch(int64_t rows, const Shape& sample, uint32_t seed) {
  Shape s{rows};
  s.insert(s.end(), sample.begin(), sample.end());
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  Batch b;
  b.x = Tensor::empty(s, DType::f32, pinned_host_allocator());
  for (int64_t i = 0; i < b.x.numel(); ++i) b.x.data<float>()[i] = normal(rng);
  b.y = Tensor::empty({rows}, DType::i64, pinned_host_allocator());
  for (int64_t i = 0; i < rows; ++i) b.y.data<int64_t>()[i] = static_cast<int64_t>(rng() % 5);
  return b;
}

// A private copy (pageable) of a host batch, to compare against after the original was handed over.
Batch keep(const Batch& b) { return Batch{b.x.clone(), b.y.clone(), b.indices}; }

// Bytes of any tensor, fetched to the host (a synchronous copy on the legacy default stream,
// so after everything queued there, including the prefetcher's wait for the copy).
std::vector<unsigned char> bytes_of(const Tensor& t) {
  const Tensor h = t.device().is_cpu() ? t : t.to(Device::cpu());
  const auto* p = static_cast<const unsigned char*>(h.raw_data());
  return std::vector<unsigned char>(p, p + h.nbytes());
}

void expect_same_batch(const Batch& host, const Batch& dev, const std::string& what) {
  EXPECT_TRUE(dev.x.device().is_cuda()) << what;
  EXPECT_EQ(dev.x.shape(), host.x.shape()) << what;
  EXPECT_EQ(dev.y.shape(), host.y.shape()) << what;
  EXPECT_TRUE(bytes_of(dev.x) == bytes_of(host.x)) << what << ": images differ";
  EXPECT_TRUE(bytes_of(dev.y) == bytes_of(host.y)) << what << ": labels differ";
  EXPECT_EQ(dev.indices, host.indices) << what;
}

// Holds a stream with a host function that blocks until open() (or 30 s, so a failing test
// cannot hang the suite). The destructor opens the gate and waits for the stream.
class StreamGate {
 public:
  explicit StreamGate(const Stream& s) : stream_(static_cast<cudaStream_t>(s.native)) {
    EXPECT_EQ(cudaLaunchHostFunc(stream_, &StreamGate::block, this), cudaSuccess);
  }
  ~StreamGate() {
    open();
    cudaStreamSynchronize(stream_);
  }
  StreamGate(const StreamGate&) = delete;
  StreamGate& operator=(const StreamGate&) = delete;
  void open() { open_.store(true); }
  bool entered() const { return entered_.load(); }

 private:
  static void CUDART_CB block(void* p) {  // runs on a CUDA thread: no CUDA calls in here
    auto* g = static_cast<StreamGate*>(p);
    g->entered_.store(true);
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (!g->open_.load() && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  cudaStream_t stream_;
  std::atomic<bool> open_{false}, entered_{false};
};

}  // namespace

// The loader (2 workers, pinned batches) -> the prefetcher, one batch ahead as the trainer
// runs it, over two epochs of 23 images in batches of 6 (the last one 5): every device batch is
// the host batch's bytes.
TEST(GpuPrefetch, BatchesEqualTheHostBatchesBitForBit) {
  LANCET_REQUIRE_GPU();
  const int64_t n = 23, bs = 6;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  Tensor images = Tensor::empty({n, 3, 17, 19});
  for (int64_t i = 0; i < images.numel(); ++i) images.data<float>()[i] = normal(rng);
  std::vector<int64_t> labels;
  for (int64_t i = 0; i < n; ++i) labels.push_back(i % 3);
  InMemoryDataset ds(images, labels, {"a", "b", "c"});
  LoaderOptions lo;
  lo.workers = 2;
  lo.allocator = &pinned_host_allocator();
  DataLoader loader(ds, lo);
  DevicePrefetcher pf(kGpu, bs, ds.sample_shape(), 2);
  for (int epoch = 0; epoch < 2; ++epoch) {
    std::vector<std::vector<int64_t>> batches;
    for (int64_t s = 0; s < n; s += bs) {
      std::vector<int64_t> idx;
      for (int64_t i = s; i < std::min(n, s + bs); ++i) idx.push_back((i * 7 + epoch) % n);
      batches.push_back(idx);
    }
    const size_t steps = batches.size();
    loader.start_epoch(epoch, batches);
    std::vector<Batch> host;  // private copies of what was pushed
    auto fetch = [&] {
      Batch b;
      ASSERT_TRUE(loader.next(b));
      host.push_back(keep(b));
      pf.push(std::move(b));
    };
    fetch();
    for (size_t k = 0; k < steps; ++k) {
      if (k + 1 < steps) fetch();
      const Batch d = pf.pop();
      expect_same_batch(host[k], d, "epoch " + std::to_string(epoch) + " batch " + std::to_string(k));
      pf.release();
    }
    EXPECT_EQ(host.back().x.dim(0), n % bs);
    Batch none;
    EXPECT_FALSE(loader.next(none));
  }
}

// Slots 0 and 1 hold batches A and B, both used by the "step"; the compute stream is held by a
// host function, and release() is queued behind it. A push of C goes to slot 0: its copy must
// wait for the compute stream, so A's bytes stay in slot 0 while the stream is held (read on a
// third stream), and C arrives once it is let go.
TEST(GpuPrefetch, ASlotInUseIsNotOverwrittenBeforeTheComputeStreamReleasesIt) {
  LANCET_REQUIRE_GPU();
  const Shape sample{2, 32, 32};
  DevicePrefetcher pf(kGpu, 4, sample, 2);
  Batch a = pinned_batch(4, sample, 1), b = pinned_batch(4, sample, 2), c = pinned_batch(3, sample, 3);
  const Batch a_kept = keep(a), c_kept = keep(c);
  pf.push(std::move(a));
  pf.push(std::move(b));
  const Batch da = pf.pop();
  pf.pop();  // B: in use by the same step
  synchronize(kGpu);  // both copies have landed
  expect_same_batch(a_kept, da, "A before the hold");

  // Everything that allocates or creates comes before the hold (allocations may synchronise).
  CudaStream side(Device::cuda(0));
  Tensor seen = Tensor::empty(da.x.shape(), DType::f32, pinned_host_allocator());
  {
    StreamGate gate(kGpu);
    pf.release();         // recorded behind the held host function
    pf.push(std::move(c));  // into slot 0, A's
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    EXPECT_TRUE(gate.entered()) << "the host function did not start: the test proves nothing";
    copy_async(seen.raw_data(), Device::cpu(), da.x.raw_data(), Device::cuda(0), da.x.nbytes(), side.stream());
    side.synchronize();
    EXPECT_TRUE(bytes_of(seen) == bytes_of(a_kept.x)) << "slot 0 was overwritten while the compute stream still held it";
    gate.open();
  }
  const Batch dc = pf.pop();
  EXPECT_EQ(dc.x.raw_data(), da.x.raw_data()) << "C should reuse A's slot";
  expect_same_batch(c_kept, dc, "C after the hold (3 of 4 rows)");
  pf.release();
}

namespace {

// A tiny MedicalCNN trained with SGD + momentum on the GPU, fed either through plain Tensor::to
// or through the prefetcher one step ahead (as run_training does), 2 micro-batches per step,
// steps of 6, 6 and 5 rows (micro-batches 3+3, 3+3, 3+2).
std::vector<std::vector<unsigned char>> train_tiny(bool prefetch) {
  auto model = make_model(Json{{"widths", {8, 8, 16, 16}}, {"depths", {1, 1, 1, 1}}, {"head_hidden", 16},
                               {"in_channels", 1}, {"num_classes", 5}},
                          11);
  model->to(Device::cuda(0));
  model->train();
  Json c = default_config();
  apply_override(c, "optim.name=sgd");
  apply_override(c, "optim.lr=0.05");
  auto opt = make_optimizer(optim_config(c), model->named_parameters());
  auto comm = make_single_process_communicator();
  const Shape sample{1, 24, 24};
  const std::vector<std::vector<int64_t>> steps{{3, 3}, {3, 3}, {3, 2}};
  std::vector<std::vector<Batch>> host(steps.size());
  uint32_t seed = 40;
  for (size_t k = 0; k < steps.size(); ++k)
    for (int64_t rows : steps[k]) host[k].push_back(pinned_batch(rows, sample, seed++));

  DevicePrefetcher pf(kGpu, 3, sample, 4);
  auto fetch = [&](size_t k) {
    for (const Batch& b : host[k]) pf.push(b);
  };
  if (prefetch) fetch(0);
  for (size_t k = 0; k < steps.size(); ++k) {
    std::vector<Tensor> xs, ys;
    if (prefetch) {
      if (k + 1 < steps.size()) fetch(k + 1);
      for (size_t m = 0; m < steps[k].size(); ++m) {
        const Batch d = pf.pop();
        xs.push_back(d.x);
        ys.push_back(d.y);
      }
    } else {
      for (const Batch& b : host[k]) {
        xs.push_back(b.x.to(Device::cuda(0)));
        ys.push_back(b.y.to(Device::cuda(0)));
      }
    }
    train_step_micro(*model, *opt, *comm, xs, ys, Loss{}, kGpu);
    if (prefetch) pf.release();
  }
  std::vector<std::vector<unsigned char>> out;
  for (auto& [name, p] : model->named_parameters()) out.push_back(bytes_of(p->value));
  for (auto& [name, t] : model->named_buffers()) out.push_back(bytes_of(*t));
  for (auto& [name, t] : opt->state()) out.push_back(bytes_of(*t));
  return out;
}

}  // namespace

// Same stream order, same kernels: the same bits. Should the plain runs themselves differ (a
// non-deterministic cuDNN algorithm picked by the heuristics), bitwise equality cannot be
// asked of the prefetched one either, and the test says so instead of failing.
TEST(GpuPrefetch, TrainingThroughThePrefetcherGivesThePlainCopysWeights) {
  LANCET_REQUIRE_GPU();
  const auto plain = train_tiny(false);
  const auto again = train_tiny(false);
  const auto prefetched = train_tiny(true);
  ASSERT_EQ(plain.size(), prefetched.size());
  if (plain != again) GTEST_SKIP() << "two plain runs already differ (non-deterministic cuDNN algorithm): nothing to compare bitwise";
  for (size_t i = 0; i < plain.size(); ++i) EXPECT_TRUE(plain[i] == prefetched[i]) << "tensor " << i << " differs";
}

// run_training on cuda: 70 images in steps of 16 as 2 micro-batches (the last step 6 = 3 + 3)
// over 2 epochs, through the prefetcher; the profile has an h2d phase.
TEST(GpuPrefetch, RunTrainingOnCudaGoesThroughThePrefetcher) {
  LANCET_REQUIRE_GPU();
  TempDir tmp("gpu_prefetch_train");
  setenv("LANCET_CACHE", (tmp / "cache").c_str(), 1);
  Json c = default_config();
  apply_override(c, "model.widths=[8, 8, 16, 16]");
  apply_override(c, "model.depths=[1, 1, 1, 1]");
  apply_override(c, "model.head_hidden=16");
  apply_override(c, "data.image_size=32");
  apply_override(c, "data.synth.train=70");
  apply_override(c, "data.synth.val=16");
  apply_override(c, "data.synth.size=32");
  apply_override(c, "train.epochs=2");
  apply_override(c, "train.batch_size=16");
  apply_override(c, "train.grad_accum_steps=2");
  apply_override(c, "train.device=cuda");
  apply_override(c, "train.out=" + (tmp / "run"));
  auto comm = make_single_process_communicator();
  std::ostringstream log;
  const TrainSummary s = run_training(c, *comm, log);
  SCOPED_TRACE(log.str());
  EXPECT_EQ(s.steps, 2 * 5);
  EXPECT_TRUE(std::isfinite(s.final_eval.loss));
  EXPECT_NE(log.str().find("h2d"), std::string::npos);
}

// evaluate() on cuda, fed by the loader through the prefetcher (batch k+1 copied during batch
// k's forward): 23 images in batches of 6 (the last one 5) give the same bits with 0 workers and
// with 2 or 3, pinned or pageable; each batch is a profiled step; the labels
// are the dataset's in order and the loss is the CPU evaluation's up to rounding.
TEST(GpuPrefetch, EvaluateOnCudaIsTheSameForAnyWorkerCount) {
  LANCET_REQUIRE_GPU();
  const int64_t n = 23;
  std::mt19937 rng(9);
  std::normal_distribution<float> normal;
  Tensor images = Tensor::empty({n, 1, 24, 24});
  for (int64_t i = 0; i < images.numel(); ++i) images.data<float>()[i] = normal(rng);
  std::vector<int64_t> labels;
  for (int64_t i = 0; i < n; ++i) labels.push_back(i * 3 % 5);
  const InMemoryDataset ds(images, labels, {"a", "b", "c", "d", "e"});
  auto model = make_model(Json{{"widths", {8, 8, 16, 16}}, {"depths", {1, 1, 1, 1}}, {"head_hidden", 16},
                               {"in_channels", 1}, {"num_classes", 5}},
                          11);
  const EvalResult cpu = evaluate(*model, ds, 6, Loss{}, Stream::cpu());
  model->to(Device::cuda(0));
  EvalLoading pinned;
  pinned.allocator = &pinned_host_allocator();
  const EvalResult plain = evaluate(*model, ds, 6, Loss{}, kGpu, nullptr, pinned);
  const EvalResult again = evaluate(*model, ds, 6, Loss{}, kGpu, nullptr, pinned);
  EXPECT_EQ(plain.labels, labels);
  EXPECT_NEAR(plain.loss, cpu.loss, 1e-4 * std::abs(cpu.loss) + 1e-5);
  if (plain.probs != again.probs || plain.loss != again.loss)
    GTEST_SKIP() << "two evaluations with 0 workers already differ (non-deterministic cuDNN algorithm): nothing to "
                    "compare bitwise";
  for (int workers : {2, 3}) {
    for (bool pin : {true, false}) {
      const std::string what = std::to_string(workers) + " workers, " + (pin ? "pinned" : "pageable");
      EvalLoading loading;
      loading.workers = workers;
      loading.allocator = pin ? &pinned_host_allocator() : nullptr;
      StepProfiler prof;
      prof.set_stream(kGpu);
      const EvalResult r = evaluate(*model, ds, 6, Loss{}, kGpu, &prof, loading);
      EXPECT_EQ(r.loss, plain.loss) << what;
      EXPECT_TRUE(r.probs == plain.probs) << what << ": probabilities differ";
      EXPECT_EQ(r.labels, plain.labels) << what;
      for (int a = 0; a < 5; ++a)
        for (int p = 0; p < 5; ++p) EXPECT_EQ(r.cm.at(a, p), plain.cm.at(a, p)) << what;
      EXPECT_EQ(prof.steps(), 4) << what;
      EXPECT_GT(prof.stats(Phase::forward).total_s, 0.0) << what;
    }
  }
}
