// The MPI backend for CPU tensors (the role Gloo played in the glaucoma study): Open MPI or
// any MPI-3 library. MPI is initialised on first use (MPI_THREAD_FUNNELED: the training thread
// makes every MPI call) and finalised at exit when lancet initialised it. MPI errors return
// to us (MPI_ERRORS_RETURN) and become one-line lancet::Error messages naming the call.
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <exception>
#include <thread>
#include <vector>

#include "comm/communicator.h"

namespace lancet {
namespace {

std::string mpi_reason(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) return "MPI error " + std::to_string(code);
  return std::string(text, static_cast<size_t>(len));
}

#define LANCET_MPI_CHECK(call)                                                         \
  do {                                                                                 \
    const int lancet_mpi_rc_ = (call);                                                 \
    if (lancet_mpi_rc_ != MPI_SUCCESS) LANCET_FAIL(#call << " failed: " << mpi_reason(lancet_mpi_rc_)); \
  } while (0)

// Initialises MPI once per process and finalises it at exit if we initialised it.
class MpiRuntime {
 public:
  static void ensure() {
    static MpiRuntime runtime;
    (void)runtime;
  }

 private:
  MpiRuntime() {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (initialized) return;
    // Open MPI's nonblocking all-reduce (coll/libnbc, what GradSync's buckets use) picks for two
    // ranks an algorithm that moves large buffers at a third of the speed of its ring (0.7-1.3
    // against 2.7-3 GB/s over shared memory for 4-64 MB here; docs/design.md "Communicators"):
    // ask for the ring unless the user chose (mpirun --mca / OMPI_MCA_*). Read at MPI_Init;
    // other MPIs ignore the variable.
    setenv("OMPI_MCA_coll_libnbc_iallreduce_algorithm", "1", /*overwrite=*/0);
    int provided = 0;
    LANCET_MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided));
    owned_ = true;
  }
  ~MpiRuntime() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (owned_ && !finalized) MPI_Finalize();
  }
  bool owned_ = false;
};

MPI_Datatype mpi_type(const Tensor& t, const char* what) {
  LANCET_CHECK(t.defined(), what << ": undefined tensor");
  LANCET_CHECK(t.device().is_cpu(), what << ": the MPI backend takes CPU tensors, got one on " << t.device().str()
                                         << " (GPU tensors go through NCCL)");
  switch (t.dtype()) {
    case DType::f32: return MPI_FLOAT;
    case DType::i32: return MPI_INT32_T;
    case DType::i64: return MPI_INT64_T;
    case DType::u8: return MPI_UINT8_T;
    default: LANCET_FAIL(what << ": the MPI backend does not reduce " << dtype_name(t.dtype()) << " tensors");
  }
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum:
    case ReduceOp::mean: return MPI_SUM;
    case ReduceOp::max: return MPI_MAX;
    case ReduceOp::min: return MPI_MIN;
  }
  return MPI_SUM;
}

int count_of(const Tensor& t, const char* what) {
  LANCET_CHECK(t.numel() <= static_cast<int64_t>(INT32_MAX),
               what << ": " << t.numel() << " elements exceed one MPI call's count; split the tensor");
  return static_cast<int>(t.numel());
}

// A large all-reduce goes as nonblocking all-reduces of at most this many bytes each, all in
// flight at once: pieces that stay in cache move 1.5-2x faster than one whole 25-64 MB buffer
// (Open MPI over shared memory, measured for docs/design.md), and no count exceeds an int.
constexpr int64_t kAllReduceChunkBytes = int64_t(4) << 20;

// Waits for every request in `reqs` with a deadline (as one). Open MPI progresses nonblocking
// collectives inside MPI calls, so this polls MPI_Testall: spinning for the first millisecond,
// yielding between tests up to 100 ms (a large all-reduce still moving data), then sleeping with
// a growing back-off up to 1 ms. After `timeout_s` (<= 0: never) it throws, naming the call:
// the other ranks did not join it.
void timed_wait(std::vector<MPI_Request>& reqs, const char* what, double timeout_s, int rank, int size) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  int flag = 0;
  auto pause = std::chrono::microseconds(1);
  while (true) {
    LANCET_MPI_CHECK(MPI_Testall(static_cast<int>(reqs.size()), reqs.data(), &flag, MPI_STATUSES_IGNORE));
    if (flag) return;
    const double waited = std::chrono::duration<double>(Clock::now() - start).count();
    if (timeout_s > 0 && waited > timeout_s)
      LANCET_FAIL(what << " on rank " << rank << " of " << size << ": no answer from the other ranks for " << waited
                       << " s (dist.timeout_s " << timeout_s
                       << "): a rank died, hangs, or took another code path; aborting the job");
    // Open MPI advances a nonblocking collective only inside MPI calls: while it moves data
    // (the first 100 ms: a large bucket's all-reduce) keep testing, yielding the core to any
    // process that shares it; then, a peer late or gone, back off to sleeping.
    if (waited > 0.1) {
      std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2, std::chrono::microseconds(1000));
    } else if (waited > 1e-3) {
      std::this_thread::yield();
    }
  }
}

void timed_wait(MPI_Request& req, const char* what, double timeout_s, int rank, int size) {
  std::vector<MPI_Request> one{req};
  timed_wait(one, what, timeout_s, rank, size);
  req = one[0];
}

// Starts the all-reduce of t in place as chunks of kAllReduceChunkBytes (one call, of count 0,
// for an empty tensor: every rank issues the same calls).
std::vector<MPI_Request> start_all_reduce(Tensor& t, ReduceOp op, MPI_Comm comm, const char* what) {
  const MPI_Datatype type = mpi_type(t, what);
  const int64_t elem = static_cast<int64_t>(dtype_size(t.dtype()));
  const int64_t chunk = std::max<int64_t>(1, kAllReduceChunkBytes / elem);
  char* base = static_cast<char*>(t.raw_data());
  std::vector<MPI_Request> reqs;
  int64_t offset = 0;
  do {
    const int n = static_cast<int>(std::min(chunk, t.numel() - offset));
    reqs.emplace_back();
    LANCET_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, base + offset * elem, n, type, mpi_op(op), comm, &reqs.back()));
    offset += n;
  } while (offset < t.numel());
  return reqs;
}

// Divides by the number of ranks after a sum (mean); integer tensors are not averaged.
void finish_mean(Tensor& t, ReduceOp op, int size) {
  if (op != ReduceOp::mean || size == 1) return;
  LANCET_CHECK(t.dtype() == DType::f32, "all_reduce mean needs an f32 tensor, got " << dtype_name(t.dtype()));
  float* p = t.data<float>();
  const float inv = 1.0f / static_cast<float>(size);
  for (int64_t i = 0; i < t.numel(); ++i) p[i] *= inv;
}

class MpiWork final : public Work {
 public:
  MpiWork(std::vector<MPI_Request> reqs, Tensor t, ReduceOp op, int rank, int size, double timeout_s)
      : reqs_(std::move(reqs)), t_(std::move(t)), op_(op), rank_(rank), size_(size), timeout_s_(timeout_s) {}
  ~MpiWork() override {
    if (!finished_) {
      finished_ = true;
      if (std::uncaught_exceptions() > 0) {
        // Unwinding an error that ends the job (the caller aborts it): do not wait for ranks
        // that may never come, and keep the buffer alive in case MPI still writes it.
        new Tensor(t_);  // NOLINT: deliberately leaked
        return;
      }
      try {  // a destructor must not throw: on a timeout, leave the request as above
        timed_wait(reqs_, "all_reduce_async", timeout_s_, rank_, size_);
      } catch (...) {
        new Tensor(t_);  // NOLINT: deliberately leaked
      }
    }
  }
  void wait() override {
    if (finished_) return;
    timed_wait(reqs_, "all_reduce_async", timeout_s_, rank_, size_);
    finished_ = true;
    finish_mean(t_, op_, size_);
  }
  bool done() override {
    if (finished_) return true;
    int flag = 0;
    LANCET_MPI_CHECK(MPI_Testall(static_cast<int>(reqs_.size()), reqs_.data(), &flag, MPI_STATUSES_IGNORE));
    if (flag) {
      finished_ = true;
      finish_mean(t_, op_, size_);
    }
    return finished_;
  }

 private:
  std::vector<MPI_Request> reqs_;
  Tensor t_;  // keeps the buffer alive while MPI writes it
  ReduceOp op_;
  int rank_, size_;
  double timeout_s_;
  bool finished_ = false;
};

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator() {
    MpiRuntime::ensure();
    LANCET_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &comm_));
    LANCET_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
    LANCET_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    LANCET_MPI_CHECK(MPI_Comm_size(comm_, &size_));
    MPI_Comm node;
    LANCET_MPI_CHECK(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node));
    MPI_Comm_rank(node, &local_rank_);
    MPI_Comm_size(node, &local_size_);
    MPI_Comm_free(&node);
  }
  // A duplicate of `parent`'s communicator (MPI_Comm_idup: the wait for the other ranks is
  // bounded by the timeout like every collective's).
  explicit MpiCommunicator(const MpiCommunicator& parent)
      : rank_(parent.rank_), size_(parent.size_), local_rank_(parent.local_rank_), local_size_(parent.local_size_) {
    timeout_s_ = parent.timeout_s_;
    MPI_Request req;
    LANCET_MPI_CHECK(MPI_Comm_idup(parent.comm_, &comm_, &req));
    wait(req, "for_device (MPI_Comm_idup)");
    LANCET_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  }
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_rank() const override { return local_rank_; }
  int local_size() const override { return local_size_; }
  std::string backend() const override { return "mpi"; }

  void all_reduce(Tensor& t, ReduceOp op, const Stream&) override {
    std::vector<MPI_Request> reqs = start_all_reduce(t, op, comm_, "all_reduce");
    timed_wait(reqs, "all_reduce", timeout_s_, rank_, size_);
    finish_mean(t, op, size_);
  }

  std::unique_ptr<Work> all_reduce_async(Tensor& t, ReduceOp op, const Stream&) override {
    return std::make_unique<MpiWork>(start_all_reduce(t, op, comm_, "all_reduce_async"), t, op, rank_, size_, timeout_s_);
  }

  void broadcast(Tensor& t, int root, const Stream&) override {
    LANCET_CHECK(root >= 0 && root < size_, "broadcast from rank " << root << " in a " << size_ << "-rank job");
    MPI_Request req;
    LANCET_MPI_CHECK(MPI_Ibcast(t.raw_data(), count_of(t, "broadcast"), mpi_type(t, "broadcast"), root, comm_, &req));
    wait(req, "broadcast");
  }

  void all_gather(const Tensor& in, Tensor& out, const Stream&) override {
    const MPI_Datatype type = mpi_type(in, "all_gather");
    mpi_type(out, "all_gather");
    LANCET_CHECK(out.dtype() == in.dtype() && out.numel() == in.numel() * size_,
                 "all_gather: out " << out.shape_str() << " " << dtype_name(out.dtype()) << " must hold " << size_
                                    << " x in " << in.shape_str() << " " << dtype_name(in.dtype()));
    MPI_Request req;
    LANCET_MPI_CHECK(MPI_Iallgather(in.raw_data(), count_of(in, "all_gather"), type, out.raw_data(),
                                    count_of(in, "all_gather"), type, comm_, &req));
    wait(req, "all_gather");
  }

  void reduce_scatter(const Tensor& in, Tensor& out, ReduceOp op, const Stream&) override {
    const MPI_Datatype type = mpi_type(in, "reduce_scatter");
    mpi_type(out, "reduce_scatter");
    LANCET_CHECK(out.dtype() == in.dtype() && in.numel() == out.numel() * size_,
                 "reduce_scatter: in " << in.shape_str() << " must hold " << size_ << " x out " << out.shape_str());
    MPI_Request req;
    LANCET_MPI_CHECK(MPI_Ireduce_scatter_block(in.raw_data(), out.raw_data(), count_of(out, "reduce_scatter"), type,
                                               mpi_op(op), comm_, &req));
    wait(req, "reduce_scatter");
    finish_mean(out, op, size_);
  }

  void send(const Tensor& t, int dst, int tag) override {
    LANCET_CHECK(dst >= 0 && dst < size_ && dst != rank_, "send to rank " << dst << " from rank " << rank_ << " of " << size_);
    MPI_Request req;
    LANCET_MPI_CHECK(MPI_Isend(t.raw_data(), count_of(t, "send"), mpi_type(t, "send"), dst, tag, comm_, &req));
    wait(req, "send");
  }

  void recv(Tensor& t, int src, int tag) override {
    LANCET_CHECK(src >= 0 && src < size_ && src != rank_, "recv from rank " << src << " on rank " << rank_ << " of " << size_);
    MPI_Request req;
    LANCET_MPI_CHECK(MPI_Irecv(t.raw_data(), count_of(t, "recv"), mpi_type(t, "recv"), src, tag, comm_, &req));
    MPI_Status status;
    // The status is needed for the count: poll with MPI_Test's status form.
    {
      using Clock = std::chrono::steady_clock;
      const auto start = Clock::now();
      int flag = 0;
      while (true) {
        LANCET_MPI_CHECK(MPI_Test(&req, &flag, &status));
        if (flag) break;
        const double waited = std::chrono::duration<double>(Clock::now() - start).count();
        LANCET_CHECK(timeout_s_ <= 0 || waited <= timeout_s_,
                     "recv from rank " << src << " on rank " << rank_ << ": nothing for " << waited
                                       << " s (dist.timeout_s " << timeout_s_ << "): did rank " << src << " die or hang?");
        if (waited > 1e-3) std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
    }
    int got = 0;
    MPI_Get_count(&status, mpi_type(t, "recv"), &got);
    LANCET_CHECK(got == t.numel(), "recv from rank " << src << ": got " << got << " elements, expected " << t.numel());
  }

  void barrier() override {
    MPI_Request req;
    LANCET_MPI_CHECK(MPI_Ibarrier(comm_, &req));
    wait(req, "barrier");
  }

  void all_reduce_doubles(double* v, int n, ReduceOp op) override {
    LANCET_CHECK(n >= 0, "all_reduce_doubles: negative count " << n);
    MPI_Request req;
    LANCET_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, v, n, MPI_DOUBLE, mpi_op(op), comm_, &req));
    wait(req, "all_reduce");
    if (op == ReduceOp::mean)
      for (int i = 0; i < n; ++i) v[i] /= size_;
  }

  void abort(int code) noexcept override { MPI_Abort(comm_, code); }

  std::unique_ptr<Communicator> for_device(Device d) override {
    LANCET_CHECK(d.is_cpu(), "for_device " << d.str() << ": the MPI communicator reduces CPU tensors");
    return std::make_unique<MpiCommunicator>(*this);
  }

 private:
  void wait(MPI_Request& req, const char* what) { timed_wait(req, what, timeout_s_, rank_, size_); }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1, local_rank_ = 0, local_size_ = 1;
};

}  // namespace

bool mpi_available() { return true; }

std::unique_ptr<Communicator> make_mpi_communicator() { return std::make_unique<MpiCommunicator>(); }

}  // namespace lancet
