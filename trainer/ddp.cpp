#include "trainer/ddp.h"

#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>
#include <thread>

#include "kernels/trace.h"
#ifdef LANCET_WITH_CUDA
#include "kernels/cuda/runtime.h"
#endif

namespace lancet {

namespace {

// dst <- src, same size: on a GPU ordered on stream `s` without blocking the host; on the CPU
// Tensor::copy_from (done when it returns).
void copy_on(Tensor& dst, const Tensor& src, const Stream& s) {
  LANCET_CHECK(dst.nbytes() == src.nbytes() && dst.dtype() == src.dtype(),
               "GradSync: copy of " << src.shape_str() << " " << dtype_name(src.dtype()) << " into " << dst.shape_str()
                                    << " " << dtype_name(dst.dtype()));
#ifdef LANCET_WITH_CUDA
  if (dst.device().is_cuda() || src.device().is_cuda()) {
    copy_async(dst.raw_data(), dst.device(), src.raw_data(), src.device(), dst.nbytes(), s);
    return;
  }
#endif
  dst.copy_from(src);
}

}  // namespace

#ifdef LANCET_WITH_CUDA
// A GPU's bucket timings (see timings() in ddp.h): timing events for one backward, recorded as
// the step is queued and turned into seconds once they have completed. It also owns the comm
// stream the all-reduces are issued from, which is what lets start and done be timed.
struct GradSync::DeviceClock {
  struct Marks {  // one bucket's events, and which of them this backward recorded
    std::unique_ptr<CudaEvent> ready, start, done;
    bool has_ready = false, has_start = false, has_done = false;
  };

  explicit DeviceClock(Device d) : device(d), comm(d), origin(d, /*timing=*/true), order(d), end(d) {}

  void resize(size_t buckets) {
    marks.clear();
    for (size_t i = 0; i < buckets; ++i) {
      Marks m;
      m.ready = std::make_unique<CudaEvent>(device, /*timing=*/true);
      m.start = std::make_unique<CudaEvent>(device, /*timing=*/true);
      m.done = std::make_unique<CudaEvent>(device, /*timing=*/true);
      marks.push_back(std::move(m));
    }
  }

  void begin(const Stream& compute) {
    origin.record(compute);
    for (Marks& m : marks) m.has_ready = m.has_start = m.has_done = false;
    unresolved = true;
  }

  // Called from the gradient-ready hook, which runs after the gradient's kernels were queued.
  void ready(size_t b, const Stream& compute) {
    marks[b].ready->record(compute);
    marks[b].has_ready = true;
  }

  // The comm stream goes on once `s` has passed the bucket's gradients and its own previous
  // all-reduce (it waited for that). Its start event is therefore when NCCL's stream, which
  // waits for the comm stream's work so far and runs one all-reduce at a time, can begin this
  // one; its done event follows the wait for the all-reduce. The host blocks nowhere.
  std::unique_ptr<Work> all_reduce(size_t b, Communicator& c, Tensor& flat, const Stream& s) {
    order.record(s);
    order.wait_on(comm.stream());
    marks[b].start->record(comm.stream());
    marks[b].has_start = true;
    std::unique_ptr<Work> work = c.all_reduce_async(flat, ReduceOp::mean, comm.stream());
    work->wait();
    marks[b].done->record(comm.stream());
    marks[b].has_done = true;
    return work;
  }

  // `s` waits for every all-reduce issued so far (the Works ordered the comm stream, not `s`).
  void order_after_all_reduces(const Stream& s) {
    end.record(comm.stream());
    end.wait_on(s);
  }

  // Seconds since the origin (-1 where not recorded), blocking until each event has completed.
  void resolve(std::vector<BucketTiming>& timings) {
    if (!unresolved) return;
    origin.synchronize();
    auto since_origin = [this](const CudaEvent& e) {
      e.synchronize();
      return e.elapsed_ms_since(origin) * 1e-3;
    };
    for (size_t i = 0; i < timings.size(); ++i) {
      timings[i].ready_s = marks[i].has_ready ? since_origin(*marks[i].ready) : -1;
      timings[i].start_s = marks[i].has_start ? since_origin(*marks[i].start) : -1;
      timings[i].done_s = marks[i].has_done ? since_origin(*marks[i].done) : -1;
    }
    unresolved = false;
  }

  Device device;
  CudaStream comm;   // non-blocking: its waits for the all-reduces must not hold back the legacy stream
  CudaEvent origin;  // begin_backward, on the compute stream
  CudaEvent order;   // compute stream -> comm stream before each all-reduce (no timing)
  CudaEvent end;     // comm stream -> finish()'s stream
  std::vector<Marks> marks;
  bool unresolved = false;  // events recorded since resolve() last turned them into seconds
};
#else
// Never made (no CUDA, no GPU); the calls only have to compile.
struct GradSync::DeviceClock {
  void resize(size_t) {}
  void begin(const Stream&) {}
  void ready(size_t, const Stream&) {}
  std::unique_ptr<Work> all_reduce(size_t, Communicator&, Tensor&, const Stream&) { return nullptr; }
  void order_after_all_reduces(const Stream&) {}
  void resolve(std::vector<BucketTiming>&) {}
};
#endif

GradSync::GradSync(Module& model, Communicator& comm, const GradSyncOptions& options)
    : GradSync(std::vector<Module*>{&model}, comm, options) {}

GradSync::GradSync(std::vector<Module*> parts, Communicator& comm, const GradSyncOptions& options)
    : parts_(std::move(parts)),
      device_(parts_.empty() ? Device::cpu() : parts_[0]->device()),
      comm_(comm),
      options_(options),
      stream_{device_, nullptr} {
  LANCET_CHECK(options.bucket_mb > 0, "dist.bucket_mb must be positive, got " << options.bucket_mb);
  for (const Module* m : parts_)
    LANCET_CHECK(m->device() == device_, "GradSync: modules on " << device_.str() << " and " << m->device().str());
  auto params = named_parameters();
  std::vector<Parameter*> order;
  // Reverse registration order: the last layers' gradients are ready first (a guess that the
  // first backward then corrects: rebuild()).
  for (auto it = params.rbegin(); it != params.rend(); ++it) {
    LANCET_CHECK(it->second->grad.dtype() == DType::f32, "data parallelism: gradient of "
                                                            << it->first << " is " << dtype_name(it->second->grad.dtype())
                                                            << ", expected f32");
    order.push_back(it->second);
  }
#ifdef LANCET_WITH_CUDA
  if (device_.is_cuda()) clock_ = std::make_unique<DeviceClock>(device_);
#endif
  layout(order);
  if (options_.hooks)
    for (Module* m : parts_) m->set_grad_ready_hook([this](Parameter& p) { on_ready(p); });
}

std::vector<std::pair<std::string, Parameter*>> GradSync::named_parameters() const {
  std::vector<std::pair<std::string, Parameter*>> all;
  for (Module* m : parts_)
    for (auto& e : m->named_parameters()) all.push_back(e);
  return all;
}
std::vector<std::pair<std::string, Tensor*>> GradSync::state_dict() const {
  std::vector<std::pair<std::string, Tensor*>> all;
  for (Module* m : parts_)
    for (auto& e : m->state_dict()) all.push_back(e);
  return all;
}
std::vector<std::pair<std::string, Tensor*>> GradSync::named_buffers() const {
  std::vector<std::pair<std::string, Tensor*>> all;
  for (Module* m : parts_)
    for (auto& e : m->named_buffers()) all.push_back(e);
  return all;
}

void GradSync::layout(const std::vector<Parameter*>& order) {
  const int64_t cap = std::max<int64_t>(1, static_cast<int64_t>(options_.bucket_mb * 1024 * 1024 / sizeof(float)));
  std::vector<std::vector<Parameter*>> groups;
  int64_t filled = 0;
  for (Parameter* p : order) {
    if (groups.empty() || filled + p->grad.numel() > cap) {
      if (groups.empty() || filled > 0) groups.emplace_back();
      filled = 0;
    }
    groups.back().push_back(p);
    filled += p->grad.numel();
  }
  std::vector<Bucket> buckets;
  for (auto& g : groups) {
    Bucket b;
    int64_t n = 0;
    for (Parameter* p : g) n += p->grad.numel();
    b.flat = Tensor::zeros({n}, DType::f32, device_);
    int64_t off = 0;
    for (Parameter* p : g) {
      // The gradient becomes a view of the bucket; keep what it held (accumulated gradients).
      Tensor view = b.flat.narrow(off, p->grad.numel()).view(p->grad.shape());
      copy_on(view, p->grad, stream_);
      p->grad = view;
      off += p->grad.numel();
    }
    b.params = std::move(g);
    buckets.push_back(std::move(b));
  }
  buckets_ = std::move(buckets);
  bucket_of_.clear();
  for (size_t i = 0; i < buckets_.size(); ++i)
    for (Parameter* p : buckets_[i].params) bucket_of_.emplace_back(p, i);
  std::sort(bucket_of_.begin(), bucket_of_.end());
  timings_.assign(buckets_.size(), BucketTiming{});
  for (size_t i = 0; i < buckets_.size(); ++i)
    timings_[i].bytes = buckets_[i].flat.numel() * static_cast<int64_t>(sizeof(float));
  if (clock_) clock_->resize(buckets_.size());
  ++layout_version_;
}

void GradSync::rebuild() {
  rebuilt_ = true;
  std::vector<Parameter*> seen;
  seen.swap(ready_order_);
  // Only a backward that made every gradient ready tells the whole order (a parameter the
  // model did not use keeps the first guess, as in DDP without find_unused_parameters).
  if (seen.size() != bucket_of_.size()) return;
  // Every rank must lay out the same buckets: take rank 0's order (indices into the
  // registration order), which a deterministic backward makes everyone's anyway.
  auto params = named_parameters();
  Tensor idx = Tensor::empty({static_cast<int64_t>(seen.size())}, DType::i64);
  for (size_t i = 0; i < seen.size(); ++i) {
    size_t k = 0;
    while (k < params.size() && params[k].second != seen[i]) ++k;
    idx.data<int64_t>()[i] = static_cast<int64_t>(k);
  }
  if (comm_.size() > 1) comm_.broadcast(idx, 0, Stream{Device::cpu(), nullptr});
  std::vector<Parameter*> order;
  std::vector<bool> used(params.size(), false);
  for (size_t i = 0; i < seen.size(); ++i) {
    const int64_t k = idx.data<int64_t>()[i];
    LANCET_CHECK(k >= 0 && k < static_cast<int64_t>(params.size()) && !used[static_cast<size_t>(k)],
                 "GradSync: rank 0's gradient order names parameter " << k << " twice or out of range");
    used[static_cast<size_t>(k)] = true;
    order.push_back(params[static_cast<size_t>(k)].second);
  }
  layout(order);
}
GradSync::~GradSync() {
  if (options_.hooks)
    for (Module* m : parts_) m->set_grad_ready_hook(nullptr);
  // On a GPU the Works were waited on by the comm stream, so destroying them orders nothing: the
  // compute stream must wait for the all-reduces in flight before the buckets' memory goes back
  // to its pool (as an unwaited Work's destructor would have made it).
  if (clock_ && std::any_of(buckets_.begin(), buckets_.end(), [](const Bucket& b) { return b.work != nullptr; })) {
    try {
      clock_->order_after_all_reduces(stream_);
    } catch (...) {  // a destructor never throws; a broken device has failed the step already
    }
  }
  for (auto& b : buckets_) b.work.reset();  // waits for anything still in flight
}

std::vector<int64_t> GradSync::bucket_elements() const {
  std::vector<int64_t> out;
  for (const auto& b : buckets_) out.push_back(b.flat.numel());
  return out;
}

namespace {

// One collective for many tensors: packed into one flat f32 buffer, broadcast from rank 0,
// unpacked. On a GPU every step is ordered on `s` (the host does not wait); the caching
// allocator may hand `flat` out again once this returns, which is safe for work on `s`.
void broadcast_packed(Communicator& comm, const std::vector<std::pair<std::string, Tensor*>>& tensors, Device device,
                      const Stream& s) {
  int64_t n = 0;
  for (const auto& [name, t] : tensors) {
    LANCET_CHECK(t->dtype() == DType::f32, "broadcast: " << name << " is " << dtype_name(t->dtype()));
    n += t->numel();
  }
  if (n == 0 || comm.size() == 1) return;
  Tensor flat = Tensor::empty({n}, DType::f32, device);
  int64_t off = 0;
  for (const auto& [name, t] : tensors) {
    Tensor part = flat.narrow(off, t->numel());
    copy_on(part, t->view({t->numel()}), s);
    off += t->numel();
  }
  comm.broadcast(flat, 0, s);
  off = 0;
  for (const auto& [name, t] : tensors) {
    copy_on(*t, flat.narrow(off, t->numel()).view(t->shape()), s);
    off += t->numel();
  }
}

}  // namespace

void GradSync::broadcast_parameters(const Stream& s) { broadcast_packed(comm_, state_dict(), device_, s); }

void GradSync::broadcast_buffers(const Stream& s) { broadcast_packed(comm_, named_buffers(), device_, s); }

const std::vector<GradSync::BucketTiming>& GradSync::timings() {
  if (clock_) clock_->resolve(timings_);
  return timings_;
}

double GradSync::since_t0() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
}

void GradSync::begin_backward(bool sync) {
  sync_ = sync && comm_.size() > 1;
  next_to_start_ = 0;
  started_in_backward_ = 0;
  // After the first backward: buckets in the order the gradients really became ready (DDP
  // rebuilds its buckets the same way), so each bucket is complete as early as possible.
  if (!rebuilt_ && !ready_order_.empty()) rebuild();
  t0_ = std::chrono::steady_clock::now();
  for (auto& t : timings_) t.ready_s = t.start_s = t.done_s = -1;
  for (auto& b : buckets_) {
    LANCET_CHECK(!b.work, "GradSync: begin_backward while a reduction is still in flight (finish() was not called)");
    b.pending = static_cast<int>(b.params.size());
  }
  if (clock_) clock_->begin(stream_);
}

void GradSync::start(size_t b, const Stream& s) {
  TraceScope trace("all_reduce", "comm");
  if (clock_) {
    buckets_[b].work = clock_->all_reduce(b, comm_, buckets_[b].flat, s);
    return;
  }
  timings_[b].start_s = since_t0();
  buckets_[b].work = comm_.all_reduce_async(buckets_[b].flat, ReduceOp::mean, s);
}

void GradSync::on_ready(Parameter& p) {
  auto it = std::lower_bound(bucket_of_.begin(), bucket_of_.end(), std::make_pair(&p, size_t{0}));
  if (it == bucket_of_.end() || it->first != &p) return;  // not a bucketed parameter (frozen)
  if (!rebuilt_) ready_order_.push_back(&p);
  Bucket& b = buckets_[it->second];
  if (--b.pending > 0) return;
  if (clock_)
    clock_->ready(it->second, stream_);
  else
    timings_[it->second].ready_s = since_t0();
  if (!sync_ || !options_.overlap) return;
  // Start complete buckets in bucket order only, so every rank issues the same sequence.
  while (next_to_start_ < buckets_.size() && buckets_[next_to_start_].pending <= 0) {
    start(next_to_start_++, stream_);
    ++started_in_backward_;
  }
  progress();
}

void GradSync::progress() {
  // Open MPI moves nonblocking collectives along inside MPI calls: test what is in flight. (On a
  // GPU the done events time them; done() still reports a failed communicator.)
  for (size_t i = 0; i < next_to_start_; ++i)
    if (buckets_[i].work && timings_[i].done_s < 0 && buckets_[i].work->done() && !clock_)
      timings_[i].done_s = since_t0();
}

void GradSync::start_all(const Stream& s) {
  if (!sync_) return;
  while (next_to_start_ < buckets_.size()) start(next_to_start_++, s);
}

double GradSync::finish(const Stream& s) {
  if (!sync_) return 0;
  const auto t0 = std::chrono::steady_clock::now();
  while (next_to_start_ < buckets_.size()) start(next_to_start_++, s);
  for (size_t i = 0; i < buckets_.size(); ++i) {
    buckets_[i].work->wait();
    buckets_[i].work.reset();
    if (timings_[i].done_s < 0 && !clock_) timings_[i].done_s = since_t0();
  }
  if (clock_) clock_->order_after_all_reduces(s);
  sync_ = false;
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

namespace {

void broadcast_string(Communicator& comm, std::string& text, int root) {
  const Stream cpu{Device::cpu(), nullptr};
  Tensor len = Tensor::from_labels({static_cast<int64_t>(text.size())});
  comm.broadcast(len, root, cpu);
  const int64_t n = len.data<int64_t>()[0];
  Tensor bytes = Tensor::zeros({std::max<int64_t>(n, 1)}, DType::u8);
  if (comm.rank() == root && n > 0) std::memcpy(bytes.raw_data(), text.data(), static_cast<size_t>(n));
  comm.broadcast(bytes, root, cpu);
  text.assign(static_cast<const char*>(bytes.raw_data()), static_cast<size_t>(n));
}

}  // namespace

void check_same_on_all_ranks(Communicator& comm, const std::vector<std::pair<std::string, std::string>>& fields) {
  if (comm.size() == 1) return;
  // Rank 0's values, one per line (values never hold newlines: they are JSON dumps or numbers).
  std::string mine;
  for (const auto& [name, value] : fields) mine += value + "\n";
  std::string root = mine;
  broadcast_string(comm, root, 0);
  std::vector<std::string> root_values;
  for (size_t start = 0, end; (end = root.find('\n', start)) != std::string::npos; start = end + 1)
    root_values.push_back(root.substr(start, end - start));
  int first = -1;
  if (root_values.size() != fields.size()) {
    first = 0;
  } else {
    for (size_t i = 0; i < fields.size() && first < 0; ++i)
      if (fields[i].second != root_values[i]) first = static_cast<int>(i);
  }
  // The lowest (field, rank) that differs, known to all.
  const double none = std::numeric_limits<double>::max();
  const double code = first < 0 ? none : static_cast<double>(first) * comm.size() + comm.rank();
  const double lowest = comm.all_reduce_scalar(code, ReduceOp::min);
  if (lowest == none) return;
  const int field = static_cast<int>(lowest) / comm.size();
  const int rank = static_cast<int>(lowest) % comm.size();
  std::string theirs = comm.rank() == rank ? fields[static_cast<size_t>(field)].second : std::string();
  broadcast_string(comm, theirs, rank);
  const std::string ours = static_cast<size_t>(field) < root_values.size() ? root_values[static_cast<size_t>(field)] : "?";
  LANCET_FAIL("the ranks disagree on " << fields[static_cast<size_t>(field)].first << ": rank 0 has " << ours << ", rank "
                                       << rank << " has " << theirs
                                       << " (every rank must run the same configuration on the same data)");
}

const std::vector<std::string>& per_rank_settings() {
  // Each changes neither the samples a rank sees nor the arithmetic of a step (its results are
  // bit-identical either way), and none decides when a collective runs:
  static const std::vector<std::string> settings = {
      "data.dir",       // a node may read its own copy; the data itself is compared by the trainer
      "data.workers",   // loader threads and how far they work ahead: batches are bit-identical
      "data.prefetch",  //   for any count (data/loader.h)
      "data.cache",     // decoded images kept in memory or read again: the same bytes either way
      "train.threads",  // a rank's cores (CPU reductions add in a fixed order for any count)
      "dist.bind",
      "pipeline.threads_per_stage",
      "train.device",       // the GPU index each rank names; the kind (cpu, cuda) is compared
      "train.log_every",    // output: only rank 0 logs and writes the run folder, and each
      "train.tensorboard",  //   process writes its own trace or Nsight capture
      "train.profile",
      "train.nsys_steps",
  };
  // Everything else must agree. Some would make the ranks train apart silently (clip norm,
  // normalisation, loss, schedule), others would make them call different collectives and
  // fail far from the cause (drop_last, early stopping, checkpoint steps, buckets, SyncBatchNorm).
  // train.out and train.resume too: every rank resumes from the checkpoint they name.
  return settings;
}

namespace {

// A value as one line that is equal for equal settings: integral numbers without a fraction
// (a float setting given as 1 and as 1.0), others as JSON's shortest form.
std::string setting_text(const Json& v) {
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 1e15) return std::to_string(static_cast<int64_t>(d));
    return v.dump();
  }
  if (v.is_array()) {
    std::string out = "[";
    for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + setting_text(v[i]);
    return out + "]";
  }
  if (v.is_object()) {
    std::string out = "{";
    for (auto it = v.begin(); it != v.end(); ++it)
      out += (it == v.begin() ? "" : ", ") + Json(it.key()).dump() + ": " + setting_text(it.value());
    return out + "}";
  }
  return v.dump();  // strings quoted and escaped (never a newline), integers, booleans, null
}

void flatten_settings(const Json& v, const std::string& path, std::vector<std::pair<std::string, std::string>>& out) {
  const auto& skip = per_rank_settings();
  if (std::find(skip.begin(), skip.end(), path) != skip.end()) return;
  if (v.is_object() && !v.empty()) {
    for (auto it = v.begin(); it != v.end(); ++it)
      flatten_settings(it.value(), path.empty() ? it.key() : path + "." + it.key(), out);
    return;
  }
  out.emplace_back(path, setting_text(v));
}

}  // namespace

std::vector<std::pair<std::string, std::string>> config_fields(const Json& config) {
  std::vector<std::pair<std::string, std::string>> out;
  flatten_settings(config, "", out);
  return out;
}

namespace {

uint64_t fnv1a(const void* data, size_t n, uint64_t h = 0xcbf29ce484222325ull) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

}  // namespace

std::string check_parameters_identical(Communicator& comm, const std::vector<std::pair<std::string, Parameter*>>& params) {
  const int64_t n = static_cast<int64_t>(params.size());
  Tensor mine = Tensor::empty({std::max<int64_t>(n, 1)}, DType::i64);
  mine.data<int64_t>()[0] = 0;
  uint64_t all = 0xcbf29ce484222325ull;
  for (int64_t i = 0; i < n; ++i) {
    const Tensor& v = params[static_cast<size_t>(i)].second->value;
    const Tensor host = v.device().is_cpu() ? v : v.to(Device::cpu());
    const uint64_t h = fnv1a(host.raw_data(), host.nbytes());
    all = fnv1a(&h, sizeof(h), all);
    std::memcpy(mine.data<int64_t>() + i, &h, sizeof(h));
  }
  std::ostringstream hex;
  hex << std::hex << all;
  if (comm.size() == 1) return "parameters: checksum " + hex.str() + " (one rank)";
  // The same model on every rank was checked at start; a different count would still be a
  // difference, not a mismatched broadcast.
  const double fewest = comm.all_reduce_scalar(static_cast<double>(n), ReduceOp::min);
  const double most = comm.all_reduce_scalar(static_cast<double>(n), ReduceOp::max);
  LANCET_CHECK(fewest == most, "the ranks' models have " << fewest << " to " << most << " parameters after training");
  Tensor root = mine.to(Device::cpu());
  comm.broadcast(root, 0, Stream{Device::cpu(), nullptr});
  int64_t first = -1, differing = 0;
  for (int64_t i = 0; i < n; ++i)
    if (mine.data<int64_t>()[i] != root.data<int64_t>()[i]) {
      if (first < 0) first = i;
      ++differing;
    }
  // The lowest (parameter, rank) that differs, and how many ranks drifted, known to all.
  const double none = std::numeric_limits<double>::max();
  const double code = first < 0 ? none : static_cast<double>(first) * comm.size() + comm.rank();
  const double lowest = comm.all_reduce_scalar(code, ReduceOp::min);
  const double ranks_differing = comm.all_reduce_scalar(first < 0 ? 0.0 : 1.0, ReduceOp::sum);
  if (lowest == none)
    return "parameters identical on all " + std::to_string(comm.size()) + " ranks (checksum " + hex.str() + ")";
  const int64_t param = static_cast<int64_t>(lowest) / comm.size();
  const int rank = static_cast<int>(static_cast<int64_t>(lowest) % comm.size());
  const double count = comm.all_reduce_scalar(comm.rank() == rank ? static_cast<double>(differing) : 0.0, ReduceOp::sum);
  LANCET_FAIL("rank " << rank << "'s parameters differ from rank 0's after training: " << count << " of " << n
                      << " tensors, the first " << params[static_cast<size_t>(param)].first << " (" << ranks_differing
                      << " of " << comm.size()
                      << " ranks drifted): the replicas trained apart (a setting, the data or the arithmetic differed "
                         "between the ranks)");
}

int threads_per_rank(int configured, const Communicator& comm) {
  if (configured > 0) return configured;
  return comm.local_size() > 1 ? 1 : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

std::string bind_rank_threads(const std::string& mode, const Communicator& comm, int threads) {
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return "not pinned (sched_getaffinity failed)";
  std::vector<int> cpus;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &allowed)) cpus.push_back(c);
  const int online = static_cast<int>(std::max(1L, sysconf(_SC_NPROCESSORS_ONLN)));
  std::ostringstream out;
  const bool launcher_bound = static_cast<int>(cpus.size()) < online;
  if (mode == "none" || (mode == "auto" && (comm.local_size() == 1 || launcher_bound))) {
    out << "not pinned by lancet (" << cpus.size() << " CPU(s) allowed" << (launcher_bound ? " by the launcher" : "") << ")";
    if (launcher_bound && static_cast<int>(cpus.size()) < threads)
      out << "; WARNING: " << threads << " threads share " << cpus.size()
          << " CPU(s): give each rank more cores (mpirun --map-by slot:PE=" << threads
          << " or --bind-to none; srun --cpus-per-task=" << threads << ") or lower train.threads";
    return out.str();
  }
  cpu_set_t mine;
  CPU_ZERO(&mine);
  std::vector<int> chosen;
  for (int t = 0; t < threads; ++t) {
    const int c = cpus[static_cast<size_t>((comm.local_rank() * threads + t) % static_cast<int>(cpus.size()))];
    if (!CPU_ISSET(c, &mine)) chosen.push_back(c);
    CPU_SET(c, &mine);
  }
  if (sched_setaffinity(0, sizeof(mine), &mine) != 0) return "not pinned (sched_setaffinity failed)";
  out << "pinned to CPU(s)";
  for (int c : chosen) out << " " << c;
  if (comm.local_size() * threads > static_cast<int>(cpus.size()))
    out << " (" << comm.local_size() << " ranks x " << threads << " threads oversubscribe " << cpus.size() << " CPUs)";
  return out.str();
}

void FaultInjection::maybe_fail(int64_t step, Module& model) const {
  if (what_ == What::none || step != step_) return;
  switch (what_) {
    case What::perturb: {
      const auto params = model.named_parameters();
      if (params.empty()) break;
      Parameter& p = *params.front().second;
      Tensor host = p.value.to(Device::cpu());
      host.data<float>()[0] += 1e-3f;
      p.value.copy_from(host);
      ++p.version;  // derived 16-bit copies are rebuilt
      break;
    }
    case What::kill:
      std::fflush(nullptr);
      raise(SIGKILL);
      break;
    case What::hang:
      for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
    case What::error:
      LANCET_FAIL("LANCET_FAULT: injected error after step " << step);
    case What::none:
      break;
  }
}

FaultInjection fault_injection_from_env(int rank) {
  const char* v = std::getenv("LANCET_FAULT");
  if (!v || !*v) return {};
  const std::string spec = v;
  int r = -1;
  long long step = -1;
  char what[16] = {0};
  LANCET_CHECK(std::sscanf(spec.c_str(), "%d:%lld:%15s", &r, &step, what) == 3 && step >= 1,
               "LANCET_FAULT '" << spec << "': expected RANK:STEP:kill|hang|error|perturb");
  const std::string w = what;
  FaultInjection::What kind = w == "kill" ? FaultInjection::What::kill
                              : w == "hang" ? FaultInjection::What::hang
                              : w == "error" ? FaultInjection::What::error
                              : w == "perturb" ? FaultInjection::What::perturb
                                               : FaultInjection::What::none;
  LANCET_CHECK(kind != FaultInjection::What::none,
               "LANCET_FAULT '" << spec << "': expected kill, hang, error or perturb, got '" << w << "'");
  if (r != rank) return {};
  return {kind, step};
}

}  // namespace lancet
