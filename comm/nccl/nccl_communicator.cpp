// The NCCL backend for CUDA tensors: one GPU per rank, bootstrapped over the MPI (or
// single-process) communicator, which it keeps for host-side work (CPU tensors,
// all_reduce_doubles, barrier).
//
// Streams. Synchronous collectives are enqueued on the caller's stream. all_reduce_async runs
// on the communicator's own stream: an event recorded on the caller's stream orders it after
// the caller's work so far (the gradients it reduces), and Work::wait() makes the caller's
// stream wait for a completion event recorded after it. The host never blocks on a collective.
//
// Failures. The communicator is nonblocking (ncclConfig_t::blocking = 0), so no NCCL call can
// hang the host and ncclCommAbort can always be called. A watchdog thread follows every
// collective's completion event and polls ncclCommGetAsyncError: an asynchronous error (a
// peer that died, a network failure), a CUDA error, or a collective not finished within
// dist.timeout_s (a peer that hangs or took another code path) aborts the communicator, which
// also ends NCCL kernels spinning on the device. The failure is recorded first, and every later
// call on the communicator, Work::wait() and Work::done() throw it as one line naming the
// call, the rank and the reason. NCCL calls are serialised by one mutex, because NCCL requires
// that no thread uses a communicator while another aborts it; the watchdog only ever takes it
// with try_lock, and no NCCL call holds it for longer than the timeout.
//
// Threads: one training thread makes the calls (as with MPI); Works must not outlive the
// communicator.
#include <cuda_runtime.h>
#include <nccl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>

#include "comm/communicator.h"
#include "kernels/cuda/runtime.h"

#if !defined(NCCL_VERSION_CODE) || NCCL_VERSION_CODE < NCCL_VERSION(2, 14, 0)
#error "lancet's NCCL backend needs NCCL 2.14 or newer (nonblocking communicators, ncclCommInitRankConfig)"
#endif

namespace lancet {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

std::string one_line(const char* text) {
  std::string s = text ? text : "";
  std::replace(s.begin(), s.end(), '\n', ' ');
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

// ncclGetErrorString and, when NCCL has one, its last detailed message.
std::string nccl_reason(ncclResult_t rc, ncclComm_t comm) {
  std::string r = ncclGetErrorString(rc);
  const std::string last = one_line(ncclGetLastError(comm));
  if (!last.empty()) r += " (" + last + ")";
  return r;
}

// For calls outside a communicator's life (ncclGetUniqueId): throws naming the call and NCCL's reason.
#define LANCET_NCCL_CHECK(call)                                                                  \
  do {                                                                                           \
    const ncclResult_t lancet_nccl_rc_ = (call);                                                 \
    if (lancet_nccl_rc_ != ncclSuccess) LANCET_FAIL(#call << " failed: " << nccl_reason(lancet_nccl_rc_, nullptr)); \
  } while (0)

ncclDataType_t nccl_type(DType t, const char* what) {
  switch (t) {
    case DType::f32: return ncclFloat32;
    case DType::f16: return ncclFloat16;
    case DType::bf16: return ncclBfloat16;
    case DType::i32: return ncclInt32;
    case DType::i64: return ncclInt64;
    case DType::u8: return ncclUint8;
  }
  LANCET_FAIL(what << ": the NCCL backend does not reduce " << dtype_name(t) << " tensors");
}

ncclRedOp_t nccl_op(ReduceOp op, DType t, const char* what) {
  switch (op) {
    case ReduceOp::sum: return ncclSum;
    case ReduceOp::max: return ncclMax;
    case ReduceOp::min: return ncclMin;
    case ReduceOp::mean:
      // As the MPI backend: integers are not averaged (ncclAvg would divide them, truncating).
      LANCET_CHECK(t == DType::f32 || t == DType::f16 || t == DType::bf16,
                   what << " mean needs a floating-point tensor, got " << dtype_name(t));
      return ncclAvg;
  }
  return ncclSum;
}

// Switches the calling thread to `index` for a scope and back, ignoring every status: for
// destructors and the watchdog, which must not throw (CudaDeviceGuard throws).
class QuietDeviceSwitch {
 public:
  explicit QuietDeviceSwitch(int index) {
    switched_ = cudaGetDevice(&prev_) == cudaSuccess && prev_ != index && cudaSetDevice(index) == cudaSuccess;
  }
  ~QuietDeviceSwitch() {
    if (switched_ && cuda_device_initialized(prev_)) cudaSetDevice(prev_);  // as CudaDeviceGuard
    cudaGetLastError();
  }
  QuietDeviceSwitch(const QuietDeviceSwitch&) = delete;
  QuietDeviceSwitch& operator=(const QuietDeviceSwitch&) = delete;

 private:
  int prev_ = 0;
  bool switched_ = false;
};

// A collective the watchdog follows until its completion event has passed.
struct Pending {
  std::shared_ptr<CudaEvent> done;
  const char* what;
  Clock::time_point since;
  double timeout_s;  // <= 0: never overdue
};

// For a zero-element all_reduce_async: nothing was enqueued.
class NoWork final : public Work {
 public:
  void wait() override {}
  bool done() override { return true; }
};

class NcclCommunicator;

class NcclWork final : public Work {
 public:
  NcclWork(NcclCommunicator& comm, std::shared_ptr<CudaEvent> done, Tensor t, Stream caller)
      : comm_(comm), done_(std::move(done)), t_(std::move(t)), caller_(caller) {}
  ~NcclWork() override;
  void wait() override;
  bool done() override;

 private:
  NcclCommunicator& comm_;
  std::shared_ptr<CudaEvent> done_;
  Tensor t_;  // the buffer NCCL reads and writes, alive until the caller's stream is ordered after it
  Stream caller_;
  bool waited_ = false;
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(std::unique_ptr<Communicator> host, Device device)
      : host_(std::move(host)), device_(device), stream_(device), ready_(device) {
    timeout_s_ = host_->timeout();
    check_one_gpu_per_rank();
    ncclUniqueId id = broadcast_unique_id();
    CudaDeviceGuard guard(device_.index);  // NCCL binds the communicator to the current device
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;  // every call returns at once (ncclInProgress): abortable, bounded waits
    ncclResult_t rc = ncclCommInitRankConfig(&comm_, size(), id, rank(), &config);
    double waited = 0;
    // Nonblocking: the communicator joins the other ranks in the background; it is ready when
    // its state turns from ncclInProgress to ncclSuccess (polled whatever the call returned).
    if (comm_ && (rc == ncclSuccess || rc == ncclInProgress)) rc = await_state(waited);
    if (rc != ncclSuccess || !comm_) {
      std::ostringstream msg;
      msg << "ncclCommInitRankConfig on rank " << rank() << " of " << size() << " (" << device_.str() << ") ";
      if (rc == ncclInProgress)
        msg << "not complete after " << waited << " s (dist.timeout_s " << timeout_s_
            << "): did every rank start, with a GPU of its own?";
      else
        msg << "failed: " << nccl_reason(rc, comm_);
      if (comm_) ncclCommAbort(comm_);
      comm_ = nullptr;
      LANCET_FAIL(msg.str());
    }
    watchdog_ = std::thread([this] { watchdog_loop(); });
  }

  ~NcclCommunicator() override {
    {
      std::lock_guard<std::mutex> lock(watch_mu_);
      stop_ = true;
    }
    watch_cv_.notify_all();
    if (watchdog_.joinable()) watchdog_.join();
    std::lock_guard<std::mutex> lock(nccl_mu_);
    if (!comm_) return;
    QuietDeviceSwitch dev(device_.index);
    // While an error unwinds, the other ranks may never come: abort. Otherwise finalize (it
    // flushes what is in flight and synchronises with the other ranks), bounded by the
    // timeout, then destroy; abort if that fails.
    bool clean = std::uncaught_exceptions() == 0 && !failed_.load();
    if (clean) {
      // A successful ncclCommFinalize leaves the state ncclInProgress until it is done.
      ncclResult_t rc = ncclCommFinalize(comm_);
      double waited = 0;
      if (rc == ncclSuccess || rc == ncclInProgress) rc = await_state(waited);
      clean = rc == ncclSuccess;
    }
    if (clean)
      ncclCommDestroy(comm_);
    else
      ncclCommAbort(comm_);
    comm_ = nullptr;
  }

  int rank() const override { return host_->rank(); }
  int size() const override { return host_->size(); }
  int local_rank() const override { return host_->local_rank(); }
  int local_size() const override { return host_->local_size(); }
  std::string backend() const override { return "nccl"; }

  void all_reduce(Tensor& t, ReduceOp op, const Stream& s) override {
    if (!on_device(t, s, "all_reduce")) return host().all_reduce(t, op, s);
    const ncclDataType_t type = nccl_type(t.dtype(), "all_reduce");
    const ncclRedOp_t nop = nccl_op(op, t.dtype(), "all_reduce");
    if (t.numel() == 0) return;
    void* p = t.raw_data();
    const size_t n = static_cast<size_t>(t.numel());
    enqueue("all_reduce", "ncclAllReduce", __FILE__, __LINE__, s,
            [&] { return ncclAllReduce(p, p, n, type, nop, comm_, native(s)); });
  }

  std::unique_ptr<Work> all_reduce_async(Tensor& t, ReduceOp op, const Stream& s) override {
    if (!on_device(t, s, "all_reduce_async")) return host().all_reduce_async(t, op, s);
    const ncclDataType_t type = nccl_type(t.dtype(), "all_reduce_async");
    const ncclRedOp_t nop = nccl_op(op, t.dtype(), "all_reduce_async");
    if (t.numel() == 0) return std::make_unique<NoWork>();
    throw_if_failed("all_reduce_async");
    // Our stream starts after everything issued on the caller's so far (t's values included).
    // One event serves every call: a stream wait takes the event's state when it is issued.
    ready_.record(s);
    ready_.wait_on(stream_.stream());
    void* p = t.raw_data();
    const size_t n = static_cast<size_t>(t.numel());
    auto done = enqueue("all_reduce_async", "ncclAllReduce", __FILE__, __LINE__, stream_.stream(),
                        [&] { return ncclAllReduce(p, p, n, type, nop, comm_, native(stream_.stream())); });
    return std::make_unique<NcclWork>(*this, std::move(done), t, s);
  }

  void broadcast(Tensor& t, int root, const Stream& s) override {
    if (!on_device(t, s, "broadcast")) return host().broadcast(t, root, s);
    LANCET_CHECK(root >= 0 && root < size(), "broadcast from rank " << root << " in a " << size() << "-rank job");
    const ncclDataType_t type = nccl_type(t.dtype(), "broadcast");
    if (t.numel() == 0) return;
    void* p = t.raw_data();
    const size_t n = static_cast<size_t>(t.numel());
    enqueue("broadcast", "ncclBroadcast", __FILE__, __LINE__, s,
            [&] { return ncclBroadcast(p, p, n, type, root, comm_, native(s)); });
  }

  void all_gather(const Tensor& in, Tensor& out, const Stream& s) override {
    if (!on_device(in, out, s, "all_gather")) return host().all_gather(in, out, s);
    const ncclDataType_t type = nccl_type(in.dtype(), "all_gather");
    LANCET_CHECK(out.dtype() == in.dtype() && out.numel() == in.numel() * size(),
                 "all_gather: out " << out.shape_str() << " " << dtype_name(out.dtype()) << " must hold " << size()
                                    << " x in " << in.shape_str() << " " << dtype_name(in.dtype()));
    if (in.numel() == 0) return;
    const void* src = in.raw_data();
    void* dst = out.raw_data();
    const size_t n = static_cast<size_t>(in.numel());
    enqueue("all_gather", "ncclAllGather", __FILE__, __LINE__, s,
            [&] { return ncclAllGather(src, dst, n, type, comm_, native(s)); });
  }

  void reduce_scatter(const Tensor& in, Tensor& out, ReduceOp op, const Stream& s) override {
    if (!on_device(in, out, s, "reduce_scatter")) return host().reduce_scatter(in, out, op, s);
    const ncclDataType_t type = nccl_type(in.dtype(), "reduce_scatter");
    const ncclRedOp_t nop = nccl_op(op, in.dtype(), "reduce_scatter");
    LANCET_CHECK(out.dtype() == in.dtype() && in.numel() == out.numel() * size(),
                 "reduce_scatter: in " << in.shape_str() << " must hold " << size() << " x out " << out.shape_str());
    if (out.numel() == 0) return;
    const void* src = in.raw_data();
    void* dst = out.raw_data();
    const size_t n = static_cast<size_t>(out.numel());
    enqueue("reduce_scatter", "ncclReduceScatter", __FILE__, __LINE__, s,
            [&] { return ncclReduceScatter(src, dst, n, type, nop, comm_, native(s)); });
  }

  void send(const Tensor& t, int dst, int tag) override {
    const Stream s{device_, nullptr};
    if (!on_device(t, s, "send")) return host().send(t, dst, tag);
    LANCET_CHECK(dst >= 0 && dst < size() && dst != rank(), "send to rank " << dst << " from rank " << rank() << " of " << size());
    const ncclDataType_t type = nccl_type(t.dtype(), "send");
    if (t.numel() == 0) return;
    const void* p = t.raw_data();
    const size_t n = static_cast<size_t>(t.numel());
    enqueue("send", "ncclSend", __FILE__, __LINE__, s, [&] { return ncclSend(p, n, type, dst, comm_, native(s)); });
  }

  void recv(Tensor& t, int src, int tag) override {
    const Stream s{device_, nullptr};
    if (!on_device(t, s, "recv")) return host().recv(t, src, tag);
    LANCET_CHECK(src >= 0 && src < size() && src != rank(), "recv from rank " << src << " on rank " << rank() << " of " << size());
    const ncclDataType_t type = nccl_type(t.dtype(), "recv");
    if (t.numel() == 0) return;
    void* p = t.raw_data();
    const size_t n = static_cast<size_t>(t.numel());
    enqueue("recv", "ncclRecv", __FILE__, __LINE__, s, [&] { return ncclRecv(p, n, type, src, comm_, native(s)); });
  }

  void barrier() override { host().barrier(); }
  void all_reduce_doubles(double* v, int n, ReduceOp op) override { host().all_reduce_doubles(v, n, op); }

  // Another NCCL communicator, on `d`, bootstrapped over a duplicate of the host; for a CPU
  // device, the host's duplicate alone.
  std::unique_ptr<Communicator> for_device(Device d) override {
    std::unique_ptr<Communicator> host_dup = host().for_device(Device::cpu());
    if (d.is_cpu()) return host_dup;
    return std::make_unique<NcclCommunicator>(std::move(host_dup), d);
  }

  void abort(int code) noexcept override {
    if (size() == 1) return;
    {
      // Best effort: the job ends with the host's abort (MPI_Abort) either way.
      std::unique_lock<std::mutex> lock(nccl_mu_, std::try_to_lock);
      if (lock.owns_lock()) fail_locked("abort requested on rank " + std::to_string(rank()));
    }
    host_->abort(code);
  }

  // Throws the recorded failure (the watchdog's or an earlier call's), naming `what`.
  void throw_if_failed(const char* what) const {
    if (!failed_.load()) return;
    std::string error;
    {
      std::lock_guard<std::mutex> lock(error_mu_);
      error = error_;
    }
    LANCET_FAIL(error << " [seen in " << what << "]");
  }

 private:
  static cudaStream_t native(const Stream& s) { return static_cast<cudaStream_t>(s.native); }

  // The host communicator, with this communicator's timeout; refuses to run after a failure.
  Communicator& host() {
    throw_if_failed("a host-side collective");
    host_->set_timeout(timeout_s_);
    return *host_;
  }

  std::string where() const {
    return "on rank " + std::to_string(rank()) + " of " + std::to_string(size()) + " (" + device_.str() + ")";
  }

  // False for a CPU tensor (the host communicator's); true for one on this rank's GPU with a
  // stream there; throws for anything else.
  bool on_device(const Tensor& t, const Stream& s, const char* what) const {
    LANCET_CHECK(t.defined(), what << ": undefined tensor");
    if (t.device().is_cpu()) return false;
    LANCET_CHECK(t.device() == device_, what << ": a tensor on " << t.device().str() << ", but this rank's NCCL communicator is on "
                                             << device_.str());
    LANCET_CHECK(s.device == device_,
                 what << ": a tensor on " << device_.str() << " with a stream on " << s.device.str() << " (NCCL runs on a stream of the tensor's GPU)");
    return true;
  }
  bool on_device(const Tensor& in, const Tensor& out, const Stream& s, const char* what) const {
    const bool a = on_device(in, s, what), b = on_device(out, s, what);
    LANCET_CHECK(a == b, what << ": in on " << in.device().str() << " but out on " << out.device().str());
    return a;
  }

  // Polls the communicator's state while a nonblocking call completes in the background
  // (ncclInProgress), for at most the timeout. Returns the final state, or ncclInProgress when
  // the timeout passed. Called with nccl_mu_ held (or before the watchdog exists).
  ncclResult_t await_state(double& waited) {
    const auto start = Clock::now();
    auto pause = std::chrono::microseconds(1);
    while (true) {
      ncclResult_t state = ncclInProgress;
      const ncclResult_t rc = ncclCommGetAsyncError(comm_, &state);
      if (rc != ncclSuccess) return rc;
      if (state != ncclInProgress) return state;
      waited = seconds_since(start);
      if (timeout_s_ > 0 && waited > timeout_s_) return ncclInProgress;
      std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2, std::chrono::microseconds(1000));
    }
  }

  // Issues one NCCL call under the lock on `s`, then records a completion event there that
  // the watchdog follows (returned, for a Work). An error aborts the communicator (except
  // ncclInvalidArgument: the call had no effect) and throws naming the call and file:line.
  template <class Call>
  std::shared_ptr<CudaEvent> enqueue(const char* what, const char* call_name, const char* file, int line,
                                     const Stream& s, Call&& call) {
    std::unique_lock<std::mutex> lock(nccl_mu_);
    throw_if_failed(what);
    ncclResult_t rc;
    double waited = 0;
    {
      CudaDeviceGuard guard(device_.index);
      rc = call();
      // A nonblocking communicator may still be enqueuing (e.g. connecting to the peers on first
      // use); CUDA work on the stream must wait until it has (NCCL's rule).
      if (rc == ncclInProgress) rc = await_state(waited);
    }
    if (rc != ncclSuccess) {
      std::ostringstream msg;
      msg << what << " " << where() << ": " << call_name;
      if (rc == ncclInProgress)
        msg << " still enqueuing after " << waited << " s (dist.timeout_s " << timeout_s_
            << "): a rank died, hangs, or took another code path";
      else
        msg << " failed: " << nccl_reason(rc, comm_);
      if (rc != ncclInvalidArgument) {
        msg << "; the NCCL communicator was aborted";
        fail_locked(msg.str());
      }
      detail::throw_error(file, line, msg.str());
    }
    lock.unlock();
    auto done = std::make_shared<CudaEvent>(device_);
    done->record(s);
    {
      std::lock_guard<std::mutex> watch(watch_mu_);
      pending_.push_back({done, what, Clock::now(), timeout_s_});
    }
    return done;
  }

  // Records the failure (first one wins), then aborts the communicator. nccl_mu_ held.
  void fail_locked(const std::string& message) noexcept {
    {
      std::lock_guard<std::mutex> lock(error_mu_);
      if (error_.empty()) error_ = message;
    }
    failed_.store(true);
    if (comm_) {
      QuietDeviceSwitch dev(device_.index);
      ncclCommAbort(comm_);  // also ends NCCL kernels still spinning on the device
      comm_ = nullptr;
    }
  }

  void watchdog_loop() noexcept {
    std::unique_lock<std::mutex> lock(watch_mu_);
    while (!stop_) {
      watch_cv_.wait_for(lock, std::chrono::milliseconds(50), [this] { return stop_; });
      if (stop_ || failed_.load()) continue;
      lock.unlock();
      watchdog_check();
      lock.lock();
    }
  }

  // Drops the finished collectives, then fails the communicator on an asynchronous NCCL error,
  // a CUDA error, or a collective older than its timeout.
  void watchdog_check() noexcept {
    std::string problem;
    try {
      std::lock_guard<std::mutex> lock(watch_mu_);
      QuietDeviceSwitch dev(device_.index);
      pending_.erase(std::remove_if(pending_.begin(), pending_.end(), [](const Pending& p) { return p.done->query(); }),
                     pending_.end());
      for (const Pending& p : pending_) {
        const double age = seconds_since(p.since);
        if (p.timeout_s > 0 && age > p.timeout_s) {
          std::ostringstream msg;
          msg << p.what << " " << where() << ": not complete after " << age << " s (dist.timeout_s " << p.timeout_s
              << "): a rank died, hangs, or took another code path; the NCCL communicator was aborted";
          problem = msg.str();
          break;
        }
      }
    } catch (const std::exception& e) {  // a CUDA error from an event query
      problem = std::string("waiting for a collective ") + where() + ": " + e.what() + "; the NCCL communicator was aborted";
    }
    std::unique_lock<std::mutex> lock(nccl_mu_, std::try_to_lock);
    if (!lock.owns_lock() || !comm_) return;  // a call in progress bounds its own wait
    if (problem.empty()) {
      ncclResult_t state = ncclSuccess;
      const ncclResult_t rc = ncclCommGetAsyncError(comm_, &state);
      const ncclResult_t bad = rc != ncclSuccess ? rc : state;
      if (bad != ncclSuccess && bad != ncclInProgress)
        problem = "NCCL " + where() + " reported an asynchronous error: " + nccl_reason(bad, comm_) +
                  " (a rank died or the network failed); the NCCL communicator was aborted";
    }
    if (!problem.empty()) fail_locked(problem);
  }

  // Every rank gathers every rank's GPU (UUID, host, index): two ranks on one GPU, which NCCL
  // does not support, fail on every rank with the same message instead of hanging.
  void check_one_gpu_per_rank() {
    constexpr int64_t kRecord = 16 + 64 + 4;
    cudaDeviceProp prop{};
    LANCET_CUDA_CHECK(cudaGetDeviceProperties(&prop, device_.index));
    Tensor mine = Tensor::zeros({kRecord}, DType::u8);
    uint8_t* m = mine.data<uint8_t>();
    std::memcpy(m, prop.uuid.bytes, 16);
    char hostname[64] = {0};
    gethostname(hostname, sizeof(hostname) - 1);
    std::memcpy(m + 16, hostname, 63);
    const int32_t index = device_.index;
    std::memcpy(m + 80, &index, 4);
    Tensor all = Tensor::zeros({kRecord * size()}, DType::u8);
    host_->all_gather(mine, all, Stream::cpu());
    const uint8_t* a = all.data<uint8_t>();
    for (int i = 0; i < size(); ++i)
      for (int j = i + 1; j < size(); ++j) {
        if (std::memcmp(a + i * kRecord, a + j * kRecord, 16) != 0) continue;
        int32_t gpu = 0;
        std::memcpy(&gpu, a + i * kRecord + 80, 4);
        const std::string host(reinterpret_cast<const char*>(a + i * kRecord + 16));
        LANCET_FAIL("ranks " << i << " and " << j << " both use GPU cuda:" << gpu << " on " << host
                             << ": NCCL needs one GPU per rank; start at most as many ranks per node as it has GPUs "
                                "(train.device cuda gives rank i of a node cuda:(i mod GPUs))");
      }
  }

  // Rank 0 creates the id and broadcasts it over the host communicator with a flag, so that a
  // failure there stops every rank at once rather than leaving them waiting.
  ncclUniqueId broadcast_unique_id() {
    ncclUniqueId id;
    std::memset(&id, 0, sizeof(id));
    Tensor buf = Tensor::zeros({1 + static_cast<int64_t>(sizeof(id))}, DType::u8);
    std::string error;
    if (rank() == 0) {
      try {
        LANCET_NCCL_CHECK(ncclGetUniqueId(&id));
        buf.data<uint8_t>()[0] = 1;
        std::memcpy(buf.data<uint8_t>() + 1, &id, sizeof(id));
      } catch (const Error& e) {
        error = e.what();
      }
    }
    host_->broadcast(buf, 0, Stream::cpu());
    if (buf.data<uint8_t>()[0] != 1) {
      if (rank() == 0) LANCET_FAIL(error);
      LANCET_FAIL("rank 0 could not create the NCCL unique id (its message says why)");
    }
    std::memcpy(&id, buf.data<uint8_t>() + 1, sizeof(id));
    return id;
  }

  std::unique_ptr<Communicator> host_;  // destroyed last: MPI outlives NCCL
  Device device_;
  CudaStream stream_;  // all_reduce_async's stream (non-blocking: no implicit sync with the legacy stream)
  CudaEvent ready_;    // the caller's stream, recorded for all_reduce_async
  ncclComm_t comm_ = nullptr;
  std::mutex nccl_mu_;  // every NCCL call on comm_, and its abort

  std::atomic<bool> failed_{false};
  mutable std::mutex error_mu_;
  std::string error_;  // the first failure, one line

  std::mutex watch_mu_;
  std::condition_variable watch_cv_;
  std::deque<Pending> pending_;
  bool stop_ = false;
  std::thread watchdog_;
};

NcclWork::~NcclWork() {
  if (waited_) return;
  try {  // as wait(), without throwing: order the caller's stream after the collective
    done_->wait_on(caller_);
  } catch (...) {
  }
}

void NcclWork::wait() {
  if (waited_) return;
  comm_.throw_if_failed("all_reduce_async wait");
  done_->wait_on(caller_);
  waited_ = true;
}

bool NcclWork::done() {
  comm_.throw_if_failed("all_reduce_async done");
  return done_->query();
}

}  // namespace

bool nccl_available() { return true; }

std::string nccl_version() {
  int v = 0;
  if (ncclGetVersion(&v) != ncclSuccess) return "unknown";
  // NCCL >= 2.9 encodes major*10000 + minor*100 + patch.
  return std::to_string(v / 10000) + "." + std::to_string((v % 10000) / 100) + "." + std::to_string(v % 100);
}

std::unique_ptr<Communicator> make_nccl_communicator(std::unique_ptr<Communicator> host, Device device) {
  LANCET_CHECK(host, "make_nccl_communicator: no host communicator");
  LANCET_CHECK(device.is_cuda(), "the NCCL communicator needs a CUDA device, got " << device.str());
  return std::make_unique<NcclCommunicator>(std::move(host), device);
}

}  // namespace lancet
