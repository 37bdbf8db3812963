#include "trainer/pipeline.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iomanip>
#include <sstream>

#include "kernels/allocator.h"
#include "kernels/elementwise.h"
#include "kernels/parallel.h"
#ifdef LANCET_WITH_CUDA
#include "kernels/cuda/runtime.h"
#endif
#include "kernels/trace.h"
#include "layers/layers.h"
#include "trainer/loss_scaler.h"

namespace lancet {

using Clock = std::chrono::steady_clock;

namespace {
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }
}  // namespace

// ---------------------------------------------------------------------------------------
// Worker threads and mailboxes.

namespace {
// Thrown in a stage that was waiting for the other stage when that one failed.
struct PipelineAborted : std::exception {
  const char* what() const noexcept override { return "pipeline aborted"; }
};
}  // namespace

struct Pipeline::Worker {
  Worker(int threads, int domain) : threads_(threads), domain_(domain), thread_([this] { loop(); }) {}
  ~Worker() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      quit_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  void submit(std::function<void()> job) {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = std::move(job);
    done_ = false;
    error_ = nullptr;
    cv_.notify_all();
  }
  // True when the job has finished (successfully or not) within `timeout`.
  bool wait_for(std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [this] { return done_; });
  }
  std::exception_ptr error() {
    std::lock_guard<std::mutex> lock(mu_);
    return error_;
  }

 private:
  void loop() {
    set_thread_local_threads(threads_);
    MemoryDomainScope domain(domain_);
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [this] { return quit_ || job_; });
      if (quit_) return;
      std::function<void()> job = std::move(job_);
      job_ = nullptr;
      lock.unlock();
      std::exception_ptr err;
      try {
        job();
      } catch (...) {
        err = std::current_exception();
      }
      lock.lock();
      error_ = err;
      done_ = true;
      cv_.notify_all();
    }
  }

  int threads_, domain_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::function<void()> job_;
  bool done_ = true, quit_ = false;
  std::exception_ptr error_;
  std::thread thread_;  // last: starts after the members it uses exist
};

namespace {
// An event recorded on a stage's GPU stream: what the other stage's stream waits for, and what
// the owner of a tensor another stream reads checks before releasing it. On the CPU every op
// has finished when it returns, so there is nothing to record: null events.
class StageEvent {
 public:
  static std::shared_ptr<StageEvent> record(const Stream& s) {
    if (!s.device.is_cuda()) return nullptr;
    auto e = std::make_shared<StageEvent>();
#ifdef LANCET_WITH_CUDA
    e->event_ = std::make_unique<CudaEvent>(s.device);
    e->event_->record(s);
#endif
    return e;
  }
  // Makes `s` wait for the recorded work (on the device; from another device too).
  void wait_on(const Stream& s) const {
#ifdef LANCET_WITH_CUDA
    event_->wait_on(s);
#else
    (void)s;
#endif
  }
  bool done() const {
#ifdef LANCET_WITH_CUDA
    return event_->query();
#else
    return true;
#endif
  }

 private:
#ifdef LANCET_WITH_CUDA
  std::unique_ptr<CudaEvent> event_;
#endif
};

// A tensor one stage sends the other, and the event after which it is complete (null on the CPU).
struct Parcel {
  Tensor t;
  std::shared_ptr<StageEvent> ready;
};
}  // namespace

// Tensors in flight between the stages, keyed by micro-batch, and (GPUs) the sent tensors the
// receiver has handed back with the event of its copy: the sender keeps each alive until that
// event has completed, so its pool never hands the block out while the copy still reads it.
struct Pipeline::Mailbox {
  void put(int micro, Parcel p) {
    std::lock_guard<std::mutex> lock(mu_);
    items_[micro] = std::move(p);
    cv_.notify_all();
  }
  Parcel take(int micro) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return aborted_ || items_.count(micro) > 0; });
    if (aborted_) throw PipelineAborted();
    Parcel p = std::move(items_[micro]);
    items_.erase(micro);
    return p;
  }
  // The receiver: `sent` is read by work recorded in `copied`.
  void hand_back(Tensor sent, std::shared_ptr<StageEvent> copied) {
    std::lock_guard<std::mutex> lock(mu_);
    returned_.push_back({std::move(sent), std::move(copied)});
  }
  // The sender (on its own thread, so the blocks go back to its pool while it alone uses it):
  // drops the sent tensors whose copies have completed.
  void release_copied() {
    std::vector<Parcel> done;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = returned_.begin(); it != returned_.end();) {
        if (it->ready->done()) {
          done.push_back(std::move(*it));
          it = returned_.erase(it);
        } else {
          ++it;
        }
      }
    }
  }
  void abort() {
    std::lock_guard<std::mutex> lock(mu_);
    aborted_ = true;
    cv_.notify_all();
  }
  // Between steps, once both stages' streams are idle (Pipeline::train_step synchronises them).
  void reset() {
    std::lock_guard<std::mutex> lock(mu_);
    items_.clear();
    returned_.clear();
    aborted_ = false;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<int, Parcel> items_;
  std::vector<Parcel> returned_;
  bool aborted_ = false;
};

// GPU stages: each stage's stream, and the event on the training thread's stream that the
// stages' streams wait for at the start of a step.
#ifdef LANCET_WITH_CUDA
struct Pipeline::Gpu {
  std::vector<std::unique_ptr<CudaStream>> streams;
  std::unique_ptr<CudaEvent> step_start;
};
#else
struct Pipeline::Gpu {};
#endif

namespace {
// A stage's forward and backward times: host time on the CPU; on a GPU the CUDA-event time of
// the work on the stage's stream between begin() and end(), read after the stream is idle.
class OpTimes {
 public:
  explicit OpTimes(const Stream& s) : s_(s) {}
  void begin() {
    if (!s_.device.is_cuda()) {
      t0_ = Clock::now();
      return;
    }
#ifdef LANCET_WITH_CUDA
    marks_.push_back({std::make_unique<CudaEvent>(s_.device, /*timing=*/true), nullptr, false});
    marks_.back().start->record(s_);
#endif
  }
  // Host seconds since begin() on the CPU; 0 on a GPU (its times come from seconds()).
  double end(bool forward) {
    if (!s_.device.is_cuda()) {
      const double dt = seconds_since(t0_);
      (forward ? forward_s_ : backward_s_) += dt;
      return dt;
    }
#ifdef LANCET_WITH_CUDA
    marks_.back().stop = std::make_unique<CudaEvent>(s_.device, /*timing=*/true);
    marks_.back().stop->record(s_);
    marks_.back().forward = forward;
#endif
    return 0;
  }
  // After the stage's stream has been synchronised.
  void totals(double* forward_s, double* backward_s) {
#ifdef LANCET_WITH_CUDA
    for (const Mark& m : marks_)
      if (m.stop) (m.forward ? forward_s_ : backward_s_) += m.stop->elapsed_ms_since(*m.start) * 1e-3;
    marks_.clear();
#endif
    *forward_s = forward_s_;
    *backward_s = backward_s_;
  }

 private:
  Stream s_;
  Clock::time_point t0_;
  double forward_s_ = 0, backward_s_ = 0;
#ifdef LANCET_WITH_CUDA
  struct Mark {
    std::unique_ptr<CudaEvent> start, stop;
    bool forward;
  };
  std::vector<Mark> marks_;
#endif
};

// The receiving stage's own copy of what the other stage sent, on its stream `s`: on the CPU a
// clone (allocated in the receiver's memory domain); on a GPU a copy into the receiver's pool,
// ordered after the sender's event, the source handed back to the sender with the copy's event.
Tensor receive(Parcel p, const Stream& s, std::function<void(Tensor, std::shared_ptr<StageEvent>)> hand_back) {
  if (!s.device.is_cuda()) return p.t.to(s.device);  // the receiver's (logical) device
#ifdef LANCET_WITH_CUDA
  p.ready->wait_on(s);
  Tensor mine = Tensor::empty(p.t.shape(), p.t.dtype(), s.device, p.t.format());
  copy_async(mine.raw_data(), mine.device(), p.t.raw_data(), p.t.device(), p.t.nbytes(), s);
  hand_back(std::move(p.t), StageEvent::record(s));
  return mine;
#else
  (void)hand_back;
  LANCET_FAIL("pipeline: a stream on " << s.device.str() << " in a build without CUDA");
#endif
}

// A GPU tensor's copy on the host, through the stage's stream (a legacy-stream copy would also
// wait for the other stage's queued work).
Tensor host_copy(const Tensor& t, const Stream& s) {
  if (t.device().is_cpu()) return t;
  Tensor h = Tensor::empty(t.shape(), t.dtype(), Device::cpu());
#ifdef LANCET_WITH_CUDA
  copy_async(h.raw_data(), h.device(), t.raw_data(), t.device(), t.nbytes(), s);
  synchronize(s);
#else
  (void)s;
#endif
  return h;
}
}  // namespace

// What the stages of one step share.
struct Pipeline::StepContext {
  const std::vector<Tensor>* xs = nullptr;
  std::vector<Tensor> labels;  // ys on the last stage's device (copied before the stages start)
  const Loss* loss = nullptr;
  std::vector<double> weight;
  float scale = 1.f;
  Stream main;  // the training thread's stream: the step's inputs were produced on it
  // Written by the last stage, read after the step.
  std::vector<float> losses;
  std::vector<int64_t> correct;
  std::mutex error_mu;
  std::string first_error;  // "stage 1, backward of micro-batch 2: <reason>"
};

// ---------------------------------------------------------------------------------------

Pipeline::Pipeline(Module& model, Units units, const PipelineOptions& options, Communicator& comm)
    : model_(model), units_(std::move(units)), options_(options), comm_(comm),
      activations_(std::make_unique<Mailbox>()), gradients_(std::make_unique<Mailbox>()) {
  const int n = static_cast<int>(units_.size());
  LANCET_CHECK(n >= 2, "a pipeline of two stages needs a model of at least two units, this one has " << n);
  LANCET_CHECK(options_.cut >= 1 && options_.cut < n,
               "pipeline: cut " << options_.cut << " out of range: stage 1 must start at a unit in [1, " << n - 1 << "]");
  LANCET_CHECK(options_.threads_per_stage >= 1, "pipeline: threads_per_stage " << options_.threads_per_stage);
  const Device home = model_.device();
  std::vector<Device> devices = options_.devices.empty() ? std::vector<Device>(2, home) : options_.devices;
  check_pipeline_devices(devices, home);
  for (int i = 0; i < n; ++i) {
    const Device want = devices[i < options_.cut ? 0 : 1];
    const auto& u = units_[static_cast<size_t>(i)];
    LANCET_CHECK(u.second->device() == want, "pipeline: unit " << u.first << " of stage " << (i < options_.cut ? 0 : 1)
                                                               << " is on " << u.second->device().str() << ", its stage on "
                                                               << want.str() << " (place_pipeline_stages first)");
  }
  stages_.resize(2);
  for (int i = 0; i < n; ++i) {
    Stage& st = stages_[i < options_.cut ? 0 : 1];
    st.modules.push_back(units_[static_cast<size_t>(i)].second);
    st.names.push_back(units_[static_cast<size_t>(i)].first);
  }
  if (home.is_cuda()) {
#ifdef LANCET_WITH_CUDA
    gpu_ = std::make_unique<Gpu>();
    gpu_->step_start = std::make_unique<CudaEvent>(home);
#else
    LANCET_FAIL("pipeline: stages on " << home.str() << " in a build without CUDA");
#endif
  }
  for (int s = 0; s < 2; ++s) {
    Stage& st = stages_[static_cast<size_t>(s)];
    st.device = devices[static_cast<size_t>(s)];
    st.stream = Stream{st.device, nullptr};
#ifdef LANCET_WITH_CUDA
    if (gpu_) {  // blocking: legacy-default-stream ops of the stage's layers stay ordered with it
      gpu_->streams.push_back(std::make_unique<CudaStream>(st.device, /*priority=*/0, /*blocking=*/true));
      st.stream = gpu_->streams.back()->stream();
    }
#endif
    st.domain = s + 1;  // memory domain 0 (on a GPU: pool 0) is the training thread's
    workers_.push_back(std::make_unique<Worker>(options_.threads_per_stage, s + 1));
  }
  if (comm_.size() > 1) {
    // Stage 1 on a device of its own reduces over a communicator of its own there (NCCL: one
    // per GPU; MPI: a duplicate), made here by every rank at once.
    if (!(devices[1] == devices[0])) stage1_comm_ = comm_.for_device(devices[1]);
    GradSyncOptions gso;
    gso.bucket_mb = options_.bucket_mb;
    gso.hooks = false;
    for (size_t s = 0; s < stages_.size(); ++s) {
      Communicator& c = s == 1 && stage1_comm_ ? *stage1_comm_ : comm_;
      stages_[s].sync = std::make_unique<GradSync>(stages_[s].modules, c, gso);
    }
  }
  reset_stats();
}

Pipeline::~Pipeline() = default;

void Pipeline::broadcast_parameters() {
  for (Stage& st : stages_)
    if (st.sync) st.sync->broadcast_parameters(stream_on(st.device, main_stream()));
}

void Pipeline::broadcast_buffers() {
  for (Stage& st : stages_)
    if (st.sync) st.sync->broadcast_buffers(stream_on(st.device, main_stream()));
}

std::vector<int> Pipeline::buckets_per_stage() const {
  std::vector<int> v;
  for (const Stage& st : stages_)
    if (st.sync) v.push_back(st.sync->num_buckets());
  return v;
}

namespace {
int64_t count_parameters(const std::vector<Module*>& ms) {
  int64_t n = 0;
  for (Module* m : ms) n += m->num_parameters();
  return n;
}
std::string cpu_threads(int threads) {
  return " (" + std::to_string(threads) + " thread" + (threads == 1 ? ")" : "s)");
}
}  // namespace

std::string Pipeline::stage_device(const Stage& st) const {
  return st.device.is_cpu() ? st.device.str() + cpu_threads(options_.threads_per_stage)
                            : st.device.str() + " (own stream and memory pool)";
}

// A CPU stage's bytes are its host memory domain's; a GPU stage's, its pool's on the device.
size_t Pipeline::stage_current_bytes(const Stage& st) const {
  return st.device.is_cpu() ? memory_domain_current_bytes(st.domain) : allocator_for(st.device, st.domain).current_bytes();
}
size_t Pipeline::stage_peak_bytes(const Stage& st) const {
  return st.device.is_cpu() ? memory_domain_peak_bytes(st.domain) : allocator_for(st.device, st.domain).peak_bytes();
}
void Pipeline::reset_stage_peak(const Stage& st) const {
  if (st.device.is_cpu())
    reset_memory_domain_peak(st.domain);
  else
    allocator_for(st.device, st.domain).reset_peak();
}

std::string Pipeline::describe() const {
  std::ostringstream os;
  for (size_t s = 0; s < stages_.size(); ++s) {
    const Stage& st = stages_[s];
    os << "  stage " << s << ": " << st.names.front() << " .. " << st.names.back() << " (" << st.names.size()
       << " units, " << count_parameters(st.modules) << " parameters) on " << stage_device(st) << "\n";
  }
  return os.str();
}

void Pipeline::run_stage(int s, StepContext& ctx) {
  Stage& st = stages_[static_cast<size_t>(s)];
  const bool first = s == 0, last = s + 1 == num_stages();
  const Stream& stream = st.stream;
  const bool gpu = stream.device.is_cuda();
#ifdef LANCET_WITH_CUDA
  std::unique_ptr<CudaDeviceGuard> device;
  if (gpu) device = std::make_unique<CudaDeviceGuard>(stream.device.index);
#endif
  Mailbox& in_forward = *activations_;   // stage 1 receives activations
  Mailbox& in_backward = *gradients_;    // stage 0 receives gradients
  Mailbox& sent = first ? *activations_ : *gradients_;  // what this stage sends, handed back
  const int m = static_cast<int>(ctx.xs->size());
  std::vector<SavedPtr> saved(static_cast<size_t>(m));
  std::vector<Tensor> dlogits(static_cast<size_t>(m));
  // What the model's own forward / backward do at its entry and exit (Module::to_compute,
  // from_compute): precision and memory format.
  auto entry = [&](const Tensor& t) { return model_.to_compute(t, stream); };
  auto hand_back = [](Mailbox& box) {
    return [&box](Tensor t, std::shared_ptr<StageEvent> copied) { box.hand_back(std::move(t), std::move(copied)); };
  };
  OpTimes times(stream);
  PipeOp current;
  try {
    for (const PipeOp& op : st.ops) {
      current = op;
      sent.release_copied();  // GPUs: sent tensors the other stage has finished copying
      const size_t i = static_cast<size_t>(op.micro);
      if (op.forward) {
        // The input: the micro-batch, or stage 0's output copied into this stage's memory.
        Tensor x = first ? entry((*ctx.xs)[i]) : receive(in_forward.take(op.micro), stream, hand_back(in_forward));
        const double t0_us = trace_now_us();
        times.begin();
        Tensor h = chain_forward(st.modules, x, &saved[i], stream);
        x = Tensor();
        if (last) {
          h = model_.from_compute(h, stream);  // the model's exit: FP32 logits
          ctx.losses[i] = micro_batch_loss(h, ctx.labels[i], *ctx.loss, ctx.weight[i], ctx.scale, dlogits[i], stream);
          ctx.correct[i] = count_correct(host_copy(h, stream), host_copy(ctx.labels[i], stream));
        } else {
          activations_->put(op.micro, Parcel{std::move(h), StageEvent::record(stream)});
        }
        const double dt = times.end(/*forward=*/true);
        if (trace_enabled() && !gpu) record_trace_event(("F" + std::to_string(op.micro)).c_str(), "pipeline", t0_us, dt * 1e6);
      } else {
        Tensor dy = last ? entry(dlogits[i]) : receive(in_backward.take(op.micro), stream, hand_back(in_backward));
        dlogits[i] = Tensor();
        const double t0_us = trace_now_us();
        times.begin();
        Tensor dx = chain_backward(st.modules, dy, *saved[i], /*need_input_grad=*/!first, stream);
        saved[i].reset();
        dy = Tensor();
        if (!first) gradients_->put(op.micro, Parcel{std::move(dx), StageEvent::record(stream)});
        const double dt = times.end(/*forward=*/false);
        if (trace_enabled() && !gpu) record_trace_event(("B" + std::to_string(op.micro)).c_str(), "pipeline", t0_us, dt * 1e6);
      }
    }
    // The stage's work is done when its stream is: the training thread's work after the step
    // (all-reduce, optimizer) then needs no further ordering, and the event times can be read.
    synchronize(stream);
  } catch (const PipelineAborted&) {
    throw;  // the other stage failed and says why
  } catch (const std::exception& e) {
    {
      std::lock_guard<std::mutex> lock(ctx.error_mu);
      if (ctx.first_error.empty())
        ctx.first_error = "pipeline stage " + std::to_string(s) + ", " + (current.forward ? "forward" : "backward") +
                          " of micro-batch " + std::to_string(current.micro) + ": " + e.what();
    }
    activations_->abort();
    gradients_->abort();
    throw;
  }
  times.totals(&st.forward_s, &st.backward_s);
  st.busy_s = st.forward_s + st.backward_s;
}

StepStats Pipeline::train_step(Optimizer& opt, const std::vector<Tensor>& xs, const std::vector<Tensor>& ys,
                               const Loss& loss, const StepOptions& options, StepProfiler* prof) {
  StepProfiler unused;
  StepProfiler& timer = prof ? *prof : unused;
  LANCET_CHECK(!xs.empty() && xs.size() == ys.size(),
               "pipeline step: " << xs.size() << " input and " << ys.size() << " label micro-batches");
  LANCET_CHECK(!options.grad_sync, "pipeline step: StepOptions::grad_sync must be null (stages synchronise themselves)");
  const int m = static_cast<int>(xs.size());
  int64_t total = 0;
  for (const Tensor& x : xs) total += x.dim(0);

  StepContext ctx;
  ctx.xs = &xs;
  for (const Tensor& x : xs) ctx.weight.push_back(m > 1 ? static_cast<double>(x.dim(0)) / static_cast<double>(total) : 1.0);
  LossScaler* scaler = options.loss_scaler && options.loss_scaler->enabled() ? options.loss_scaler : nullptr;
  ctx.scale = scaler ? scaler->scale() : 1.f;
  ctx.main = main_stream();
  ctx.losses.assign(static_cast<size_t>(m), 0.f);
  const Device last_device = stages_.back().device;
  for (const Tensor& y : ys) ctx.labels.push_back(y.device() == last_device ? y : y.to(last_device));
  Loss last_loss = loss;  // its class weights, too, where the last stage computes the loss
  if (last_loss.class_weights.defined() && last_loss.class_weights.device() != last_device)
    last_loss.class_weights = last_loss.class_weights.to(last_device);
  ctx.loss = &last_loss;
  ctx.correct.assign(static_cast<size_t>(m), 0);

  if (micro_batches_ != m) {  // statistics are per micro-batch count
    reset_stats();
    micro_batches_ = m;
  }
  std::vector<int64_t> base(stages_.size());
  for (size_t s = 0; s < stages_.size(); ++s) {
    Stage& st = stages_[s];
    st.ops = stage_schedule(options_.schedule, static_cast<int>(s), num_stages(), m);
    st.busy_s = st.forward_s = st.backward_s = 0;
    reset_stage_peak(st);
    base[s] = static_cast<int64_t>(stage_current_bytes(st));
  }
  activations_->reset();
  gradients_->reset();
#ifdef LANCET_WITH_CUDA
  if (gpu_) {  // the stages start after the training thread's work so far (input batches, last step)
    gpu_->step_start->record(ctx.main);
    for (const Stage& st : stages_) gpu_->step_start->wait_on(st.stream);
  }
#endif

  // Run the stages; from the last to the first, as each finishes, start its gradient
  // all-reduce (data parallelism) while the earlier stages still compute.
  const auto t0 = Clock::now();
  double wall = 0;
  {
    TraceScope trace("pipeline", "phase");
    // CPU stages: each stage's BLAS calls with the stage's threads (kernels/parallel.h).
    BlasThreadsScope blas(gpu_ ? 0 : options_.threads_per_stage);
    for (size_t s = 0; s < stages_.size(); ++s) {
      const int stage = static_cast<int>(s);
      workers_[s]->submit([this, stage, &ctx] { run_stage(stage, ctx); });
    }
    bool failed = false;
    for (size_t s = stages_.size(); s-- > 0;) {
      while (!workers_[s]->wait_for(std::chrono::milliseconds(1))) {
        for (const Stage& later : stages_)
          if (later.sync) later.sync->progress();  // Open MPI moves collectives inside MPI calls
      }
      if (workers_[s]->error()) failed = true;
      if (!failed && stages_[s].sync) {
        stages_[s].sync->begin_backward(/*sync=*/true);
        stages_[s].sync->start_all(stream_on(stages_[s].device, ctx.main));
      }
    }
    wall = seconds_since(t0);
    if (failed) {
      // A failed stage may have left work queued: let both streams finish before the tensors
      // in flight go back to their pools (a sticky CUDA error is reported by the stage already).
      for (const Stage& st : stages_) {
        try {
          synchronize(st.stream);
        } catch (const std::exception&) {
        }
      }
      activations_->reset();
      gradients_->reset();
      for (Stage& st : stages_)
        if (st.sync) st.sync->finish(stream_on(st.device, ctx.main));  // collectives started must complete on every rank
      std::string why;
      {
        std::lock_guard<std::mutex> lock(ctx.error_mu);
        why = ctx.first_error;
      }
      if (!why.empty()) LANCET_FAIL(why);
      for (auto& w : workers_)
        if (auto e = w->error()) std::rethrow_exception(e);
    }
  }
  timer.add(Phase::pipeline, wall);

  activations_->reset();  // both streams are idle: the sent tensors' copies are done
  gradients_->reset();
  StepStats out;
  if (scaler) out.loss_scale = scaler->scale();
  if (stages_.front().sync) {
    auto scope = timer.phase(Phase::grad_sync);
    for (size_t s = stages_.size(); s-- > 0;) stages_[s].sync->finish(stream_on(stages_[s].device, ctx.main));
  }
  finish_step(model_, opt, comm_, options, /*synced=*/stages_.front().sync != nullptr, out, timer, ctx.main);
  double loss_sum = 0;
  for (int i = 0; i < m; ++i) {
    loss_sum = std::fma(static_cast<double>(ctx.losses[static_cast<size_t>(i)]), ctx.weight[static_cast<size_t>(i)], loss_sum);  // as train_step_micro
    out.correct += ctx.correct[static_cast<size_t>(i)];
  }
  out.loss = loss_sum;
  out.count = total;

  ++steps_;
  step_sum_s_ += wall;
  for (size_t s = 0; s < stages_.size(); ++s) {
    const Stage& st = stages_[s];
    busy_sum_s_[s] += st.busy_s;
    forward_sum_s_[s] += st.forward_s;
    backward_sum_s_[s] += st.backward_s;
    idle_sum_[s] += wall > 0 ? std::max(0.0, 1.0 - st.busy_s / wall) : 0.0;
    peak_bytes_[s] = std::max(peak_bytes_[s], static_cast<int64_t>(stage_peak_bytes(st)) - base[s]);
  }
  return out;
}

void Pipeline::reset_stats() {
  steps_ = 0;
  step_sum_s_ = 0;
  busy_sum_s_.assign(stages_.size(), 0.0);
  forward_sum_s_.assign(stages_.size(), 0.0);
  backward_sum_s_.assign(stages_.size(), 0.0);
  idle_sum_.assign(stages_.size(), 0.0);
  peak_bytes_.assign(stages_.size(), 0);
}

PipelineStats Pipeline::stats() const {
  PipelineStats p;
  p.steps = steps_;
  p.stages = num_stages();
  p.micro_batches = micro_batches_;
  p.schedule = pipe_schedule_name(options_.schedule);
  const double n = std::max<int64_t>(steps_, 1);
  p.step_s = step_sum_s_ / n;
  p.bubble_theory = micro_batches_ > 0 ? theoretical_bubble(num_stages(), micro_batches_) : 0;
  for (size_t s = 0; s < stages_.size(); ++s) {
    const Stage& st = stages_[s];
    PipelineStageStats q;
    q.first_unit = st.names.front();
    q.last_unit = st.names.back();
    q.units = static_cast<int>(st.names.size());
    q.parameters = count_parameters(st.modules);
    q.device = stage_device(st);
    q.busy_s = busy_sum_s_[s] / n;
    q.forward_s = forward_sum_s_[s] / n;
    q.backward_s = backward_sum_s_[s] / n;
    q.idle = idle_sum_[s] / n;
    q.max_in_flight =
        micro_batches_ > 0 ? max_in_flight(stage_schedule(options_.schedule, static_cast<int>(s), num_stages(), micro_batches_)) : 0;
    q.peak_bytes = peak_bytes_[s];
    p.bubble += q.idle / static_cast<double>(stages_.size());
    p.stage.push_back(q);
  }
  return p;
}

void check_pipeline_devices(const std::vector<Device>& devices, Device model_device) {
  LANCET_CHECK(devices.size() == 2, "pipeline.devices: " << devices.size() << " device(s) for 2 stages");
  LANCET_CHECK(devices[0] == model_device, "pipeline.devices [" << devices[0].str() << ", " << devices[1].str()
                                                                << "]: stage 0 must be on the model's device (train.device "
                                                                << model_device.str() << "), where the batches arrive");
  LANCET_CHECK(devices[1].type == devices[0].type,
               "pipeline.devices [" << devices[0].str() << ", " << devices[1].str() << "]: both stages on CPUs or both on GPUs");
#ifdef LANCET_WITH_CUDA
  if (devices[1].is_cuda()) {
    const int n = static_cast<int>(cuda_devices().size());
    LANCET_CHECK(devices[1].index < n, "pipeline.devices names " << devices[1].str() << " but " << n
                                                                 << " CUDA device(s) are visible to this process");
  }
#endif
}

std::vector<Device> pipeline_devices(const std::vector<std::string>& names, Device model_device, bool rank_relative) {
  std::vector<Device> devices;
  for (const std::string& d : names) {
    Device dev = parse_device(d);
    if (rank_relative && dev.is_cuda() && model_device.is_cuda()) {
      LANCET_CHECK(!devices.empty() || dev.index == 0,
                   "pipeline.devices starts with " << d << " but with train.device cuda the GPUs count from each rank's first GPU "
                                              << "(cuda:" << model_device.index << " here), where stage 0 runs: write [cuda:0, cuda:1]");
      dev.index += model_device.index;
    }
    devices.push_back(dev);
  }
  if (devices.empty()) devices.assign(2, model_device);
  check_pipeline_devices(devices, model_device);
  return devices;
}

std::vector<Allocator*> training_memory_pools(Device device, const std::vector<Device>& stage_devices) {
  if (device.is_cpu()) return {&allocator_for(Device::cpu(), 0)};
  std::vector<Allocator*> v{&allocator_for(device, 0)};
  for (size_t s = 0; s < stage_devices.size(); ++s) {
    v.push_back(&allocator_for(stage_devices[s], 0));
    v.push_back(&allocator_for(stage_devices[s], static_cast<int>(s) + 1));
  }
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  return v;
}

int pipeline_gpus_per_rank(const std::vector<std::string>& names) {
  int k = 1;
  for (const std::string& d : names) {
    const Device dev = parse_device(d);
    if (dev.is_cuda()) k = std::max(k, dev.index + 1);
  }
  return k;
}

void place_pipeline_stages(const Units& units, int cut, const std::vector<Device>& devices) {
  LANCET_CHECK(cut >= 1 && cut < static_cast<int>(units.size()),
               "pipeline: cut " << cut << " out of range: stage 1 must start at a unit in [1, " << units.size() - 1 << "]");
  LANCET_CHECK(devices.size() == 2, "pipeline.devices: " << devices.size() << " device(s) for 2 stages");
  for (size_t i = 0; i < units.size(); ++i) units[i].second->to(devices[static_cast<int>(i) < cut ? 0 : 1]);
}

Json PipelineStats::to_json() const {
  Json st = Json::array();
  for (const auto& q : stage)
    st.push_back({{"first_unit", q.first_unit},
                  {"last_unit", q.last_unit},
                  {"units", q.units},
                  {"parameters", q.parameters},
                  {"device", q.device},
                  {"busy_ms", q.busy_s * 1e3},
                  {"forward_ms", q.forward_s * 1e3},
                  {"backward_ms", q.backward_s * 1e3},
                  {"idle", q.idle},
                  {"max_in_flight", q.max_in_flight},
                  {"peak_bytes", q.peak_bytes}});
  return {{"steps", steps},           {"stages", stages}, {"micro_batches", micro_batches},
          {"schedule", schedule},     {"step_ms", step_s * 1e3}, {"bubble", bubble},
          {"bubble_theory", bubble_theory}, {"stage", st}};
}

std::string PipelineStats::text() const {
  std::ostringstream os;
  os << std::fixed << std::setprecision(1) << "pipeline " << schedule << ", " << micro_batches
     << " micro-batches: forward+backward " << step_s * 1e3 << " ms per step, bubble " << bubble * 100
     << "% measured (" << bubble_theory * 100 << "% for equal stages)\n";
  for (size_t s = 0; s < stage.size(); ++s) {
    const auto& q = stage[s];
    os << "  stage " << s << " (" << q.first_unit << " .. " << q.last_unit << "): busy " << q.busy_s * 1e3
       << " ms (forward " << q.forward_s * 1e3 << ", backward " << q.backward_s * 1e3 << "), idle " << q.idle * 100
       << "%, peak " << q.peak_bytes / 1048576.0 << " MiB (" << q.max_in_flight << " micro-batch"
       << (q.max_in_flight == 1 ? "" : "es") << " in flight)\n";
  }
  return os.str();
}

}  // namespace lancet
