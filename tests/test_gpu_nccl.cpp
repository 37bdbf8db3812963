// The NCCL communicator (comm/nccl/), label gpu: skips without a GPU.
//
// One rank on one GPU, in this process: every collective for every dtype against the
// single-process (CPU) communicator's result; the stream contract of all_reduce_async (it
// starts after the caller's earlier work, runs alongside the caller's later work, and wait()
// orders the caller's stream without blocking the host); the watchdog turning a collective that
// never completes into an error within dist.timeout_s; and `lancet train --device cuda` with a
// 1-rank NCCL communicator.
//
// Two ranks, where mpirun and at least two GPUs exist: this binary again under `mpirun -np 2`
// runs the NcclRanks tests (they skip when run directly): the collectives against values
// computed from every rank's data, GradSync's bucketed all-reduce of GPU gradients, and a rank
// that stops joining collectives; plus `mpirun -np 2 lancet train --device cuda` against one
// GPU, and a hung rank ending the job.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <thread>

#include "comm/communicator.h"
#include "kernels/cuda/runtime.h"
#include "tests/cli_util.h"
#include "tests/weights_diff.h"
#include "tests/expect_error.h"
#include "tests/gpu_util.h"
#include "trainer/ddp.h"
#include "trainer/weights.h"

using namespace lancet;
using namespace lancet::testing;
namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;
const std::string kMpiexec = LANCET_MPIEXEC;
const Stream kCpu = Stream::cpu();

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

const DType kDtypes[] = {DType::f32, DType::f16, DType::bf16, DType::i32, DType::i64, DType::u8};
const ReduceOp kOps[] = {ReduceOp::sum, ReduceOp::mean, ReduceOp::max, ReduceOp::min};
bool is_float(DType t) { return t == DType::f32 || t == DType::f16 || t == DType::bf16; }

// Small integers: exact in every dtype, and so are their sums and halves over a few ranks.
double value(int rank, int64_t i, DType t) {
  const int v = static_cast<int>((rank * 7 + i * 3) % 23);
  return t == DType::u8 ? v : v - 5;
}

double get(const Tensor& cpu, int64_t i) {
  switch (cpu.dtype()) {
    case DType::f32: return cpu.data<float>()[i];
    case DType::f16: return static_cast<float>(cpu.data<half_t>()[i]);
    case DType::bf16: return static_cast<float>(cpu.data<bfloat16_t>()[i]);
    case DType::i32: return cpu.data<int32_t>()[i];
    case DType::i64: return static_cast<double>(cpu.data<int64_t>()[i]);
    case DType::u8: return cpu.data<uint8_t>()[i];
  }
  return 0;
}

void set(Tensor& cpu, int64_t i, double v) {
  switch (cpu.dtype()) {
    case DType::f32: cpu.data<float>()[i] = static_cast<float>(v); break;
    case DType::f16: cpu.data<half_t>()[i] = half_t(static_cast<float>(v)); break;
    case DType::bf16: cpu.data<bfloat16_t>()[i] = bfloat16_t(static_cast<float>(v)); break;
    case DType::i32: cpu.data<int32_t>()[i] = static_cast<int32_t>(v); break;
    case DType::i64: cpu.data<int64_t>()[i] = static_cast<int64_t>(v); break;
    case DType::u8: cpu.data<uint8_t>()[i] = static_cast<uint8_t>(v); break;
  }
}

// A CPU tensor holding rank `rank`'s values.
Tensor pattern(DType t, int64_t n, int rank) {
  Tensor x = Tensor::empty({n}, t);
  for (int64_t i = 0; i < n; ++i) set(x, i, value(rank, i, t));
  return x;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.raw_data(), b.raw_data(), a.nbytes()) == 0;
}

// The reduction of every rank's value(r, i).
double reduced(ReduceOp op, int ranks, int64_t i, DType t) {
  double sum = 0, mx = -1e300, mn = 1e300;
  for (int r = 0; r < ranks; ++r) {
    const double v = value(r, i, t);
    sum += v;
    mx = std::max(mx, v);
    mn = std::min(mn, v);
  }
  return op == ReduceOp::sum ? sum : op == ReduceOp::mean ? sum / ranks : op == ReduceOp::max ? mx : mn;
}

const char* op_name(ReduceOp op) {
  return op == ReduceOp::sum ? "sum" : op == ReduceOp::mean ? "mean" : op == ReduceOp::max ? "max" : "min";
}

// A host function that holds a stream until the gate opens: the stream's later work waits, as
// behind a long kernel, deterministically. The gate is global so that it outlives any callback.
std::atomic<bool> g_gate_open{true};
void CUDART_CB hold_stream(void*) {
  while (!g_gate_open.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
}
// Closes the gate and holds `s` behind it; opening (here or in the destructor) lets it run.
struct StreamGate {
  explicit StreamGate(const CudaStream& s) : stream(s) {
    g_gate_open.store(false);
    LANCET_CUDA_CHECK(cudaLaunchHostFunc(static_cast<cudaStream_t>(s.stream().native), hold_stream, nullptr));
  }
  void open() {
    g_gate_open.store(true);
    stream.synchronize();
  }
  ~StreamGate() {
    g_gate_open.store(true);
    cudaStreamSynchronize(static_cast<cudaStream_t>(stream.stream().native));
  }
  const CudaStream& stream;
};

std::unique_ptr<Communicator> one_rank_nccl() {
  auto c = make_communicator("nccl", "cuda");
  EXPECT_EQ(c->backend(), "nccl");
  EXPECT_EQ(c->size(), 1);
  return c;
}

}  // namespace

// ---- one rank, this process ----------------------------------------------------------------

TEST(NcclOneRank, AllReduceEveryDtypeAndOpMatchesTheCpuCommunicator) {
  LANCET_REQUIRE_GPU();
  auto nccl = one_rank_nccl();
  auto cpu = make_communicator("single", "cpu");
  const Stream gpu{Device::cuda(0), nullptr};
  for (DType t : kDtypes)
    for (ReduceOp op : kOps) {
      SCOPED_TRACE(std::string(dtype_name(t)) + " " + op_name(op));
      const Tensor host = pattern(t, 1001, 0);
      Tensor dev = host.to(Device::cuda(0));
      if (op == ReduceOp::mean && !is_float(t)) {
        expect_error([&] { nccl->all_reduce(dev, op, gpu); }, {"mean needs a floating-point tensor", dtype_name(t)});
        continue;
      }
      nccl->all_reduce(dev, op, gpu);
      Tensor ref = host.clone();
      cpu->all_reduce(ref, op, kCpu);
      EXPECT_TRUE(same_bytes(dev.to(Device::cpu()), ref));
      auto w = nccl->all_reduce_async(dev, op, gpu);
      w->wait();
      EXPECT_TRUE(same_bytes(dev.to(Device::cpu()), ref));
    }
  // Empty tensors are no collective at all.
  Tensor empty = Tensor::empty({0}, DType::f32, Device::cuda(0));
  nccl->all_reduce(empty, ReduceOp::sum, gpu);
  EXPECT_TRUE(nccl->all_reduce_async(empty, ReduceOp::sum, gpu)->done());
}

TEST(NcclOneRank, BroadcastGatherScatterAndTheHostSide) {
  LANCET_REQUIRE_GPU();
  auto nccl = one_rank_nccl();
  auto cpu = make_communicator("single", "cpu");
  const Stream gpu{Device::cuda(0), nullptr};
  for (DType t : kDtypes) {
    SCOPED_TRACE(dtype_name(t));
    const Tensor host = pattern(t, 777, 0);
    Tensor dev = host.to(Device::cuda(0));
    nccl->broadcast(dev, 0, gpu);
    EXPECT_TRUE(same_bytes(dev.to(Device::cpu()), host));
    // Out of place: the NCCL kernels really copy.
    Tensor gathered = Tensor::zeros({777}, t, Device::cuda(0)), ref = Tensor::zeros({777}, t);
    nccl->all_gather(dev, gathered, gpu);
    cpu->all_gather(host, ref, kCpu);
    EXPECT_TRUE(same_bytes(gathered.to(Device::cpu()), ref));
    Tensor scattered = Tensor::zeros({777}, t, Device::cuda(0));
    const ReduceOp op = is_float(t) ? ReduceOp::mean : ReduceOp::sum;
    nccl->reduce_scatter(dev, scattered, op, gpu);
    cpu->reduce_scatter(host, ref, op, kCpu);
    EXPECT_TRUE(same_bytes(scattered.to(Device::cpu()), ref));
  }
  // CPU tensors and host values go through the host communicator.
  Tensor a = pattern(DType::f32, 10, 0), b = Tensor::zeros({10});
  nccl->all_gather(a, b, kCpu);
  EXPECT_TRUE(same_bytes(a, b));
  double v[2] = {1.5, -2};
  nccl->all_reduce_doubles(v, 2, ReduceOp::sum);
  EXPECT_EQ(v[0], 1.5);
  nccl->barrier();
  // Mistakes are one-line errors naming the call.
  Tensor dev = pattern(DType::f32, 10, 0).to(Device::cuda(0));
  expect_error([&] { nccl->broadcast(dev, 1, gpu); }, {"broadcast from rank 1", "1-rank job"});
  expect_error([&] { nccl->all_reduce(dev, ReduceOp::sum, kCpu); }, {"all_reduce", "stream on cpu"});
  expect_error([&] { nccl->all_gather(a, dev, gpu); }, {"all_gather", "in on cpu but out on cuda:0"});
  Tensor wrong = Tensor::zeros({11}, DType::f32, Device::cuda(0));
  expect_error([&] { nccl->all_gather(dev, wrong, gpu); }, {"all_gather: out [11]", "must hold 1 x in [10]"});
  expect_error([&] { nccl->send(dev, 0, 0); }, {"send to rank 0 from rank 0 of 1"});
  // Still healthy after argument errors.
  nccl->all_reduce(dev, ReduceOp::max, gpu);
  EXPECT_EQ(dev.to_vector(), pattern(DType::f32, 10, 0).to_vector());
}

TEST(NcclOneRank, AsyncAllReduceFollowsTheCallersWorkAndWaitDoesNotBlockTheHost) {
  LANCET_REQUIRE_GPU();
  auto nccl = one_rank_nccl();
  CudaStream caller(Device::cuda(0));
  const Tensor host = pattern(DType::f32, 1 << 16, 0);
  Tensor t = host.to(Device::cuda(0));
  {
    // Started behind held work: it waits for the caller's stream; wait() returns at once.
    StreamGate gate(caller);
    auto w = nccl->all_reduce_async(t, ReduceOp::sum, caller.stream());
    const auto t0 = Clock::now();
    w->wait();
    EXPECT_LT(seconds_since(t0), 1.0) << "wait() blocked the host";
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    EXPECT_FALSE(w->done()) << "the all-reduce ran before the caller's earlier work";
    gate.open();
    EXPECT_TRUE(w->done());
  }
  EXPECT_EQ(t.to_vector(), host.to_vector());
  {
    // Started on an idle stream, then the caller's stream is held: the all-reduce finishes on
    // its own stream meanwhile (it overlaps the caller's later work).
    auto w = nccl->all_reduce_async(t, ReduceOp::mean, caller.stream());
    StreamGate gate(caller);
    const auto t0 = Clock::now();
    while (!w->done() && seconds_since(t0) < 20) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    EXPECT_TRUE(w->done()) << "the all-reduce waited for work issued after it";
    w->wait();
    gate.open();
  }
  EXPECT_EQ(t.to_vector(), host.to_vector());
  // Two in flight, waited in either order; destroying an unwaited Work orders the stream too.
  Tensor u = host.to(Device::cuda(0));
  auto wa = nccl->all_reduce_async(t, ReduceOp::max, caller.stream());
  auto wb = nccl->all_reduce_async(u, ReduceOp::min, caller.stream());
  wb->wait();
  wa.reset();
  caller.synchronize();
  EXPECT_TRUE(wb->done());
  EXPECT_EQ(u.to_vector(), host.to_vector());
}

TEST(NcclOneRank, ACollectiveThatNeverCompletesFailsWithinTheTimeout) {
  LANCET_REQUIRE_GPU();
  auto nccl = one_rank_nccl();
  nccl->set_timeout(1.0);
  CudaStream caller(Device::cuda(0));
  Tensor t = pattern(DType::f32, 100, 0).to(Device::cuda(0));
  std::string message;
  double seconds = 0;
  {
    // The all-reduce is enqueued behind work that does not finish, as behind a peer that hangs.
    StreamGate gate(caller);
    nccl->all_reduce(t, ReduceOp::sum, caller.stream());
    const auto t0 = Clock::now();
    while (message.empty() && seconds_since(t0) < 20) {
      try {
        nccl->barrier();  // any call reports the watchdog's finding
      } catch (const Error& e) {
        message = e.what();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    seconds = seconds_since(t0);
    gate.open();
  }
  EXPECT_NE(message.find("all_reduce on rank 0 of 1 (cuda:0): not complete after"), std::string::npos) << message;
  EXPECT_NE(message.find("dist.timeout_s 1"), std::string::npos) << message;
  EXPECT_NE(message.find("aborted"), std::string::npos) << message;
  EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  EXPECT_GT(seconds, 0.5);
  EXPECT_LT(seconds, 10.0);
  // The communicator stays failed: every later call says why.
  expect_error([&] { nccl->all_reduce(t, ReduceOp::sum, Stream{Device::cuda(0), nullptr}); }, {"not complete after", "all_reduce"});
  expect_error([&] { nccl->all_reduce_doubles(nullptr, 0, ReduceOp::sum); }, {"not complete after"});
}

// for_device: the communicator a pipeline's stage 1 on its own GPU reduces over — another NCCL
// communicator (on this GPU again here, on cuda:1 where there is one), or the host's for a CPU.
TEST(NcclOneRank, ASecondCommunicatorOnAnotherDevice) {
  LANCET_REQUIRE_GPU();
  auto nccl = one_rank_nccl();
  nccl->set_timeout(40);
  std::vector<Device> devices = {Device::cuda(0)};
  if (cuda_devices().size() > 1) devices.push_back(Device::cuda(1));
  for (const Device d : devices) {
    SCOPED_TRACE(d.str());
    auto other = nccl->for_device(d);
    EXPECT_EQ(other->backend(), "nccl");
    EXPECT_EQ(other->size(), 1);
    EXPECT_EQ(other->timeout(), 40);
    const Stream s{d, nullptr};
    Tensor t = pattern(DType::f32, 257, 0).to(d);
    other->all_reduce_async(t, ReduceOp::mean, s)->wait();
    other->all_reduce(t, ReduceOp::sum, s);
    EXPECT_EQ(t.to_vector(), pattern(DType::f32, 257, 0).to_vector());
    if (d.index != 0) expect_error([&] { nccl->all_reduce(t, ReduceOp::sum, s); }, {"this rank's NCCL communicator is on cuda:0"});
  }
  auto host = nccl->for_device(Device::cpu(1));
  EXPECT_EQ(host->backend(), "single");
  EXPECT_DOUBLE_EQ(host->all_reduce_scalar(2.5, ReduceOp::sum), 2.5);
}

TEST(NcclOneRank, TrainWithAOneRankNcclCommunicator) {
  LANCET_REQUIRE_GPU();
  TempDir tmp("nccl_train");
  const RunResult r = run_lancet("train --device cuda --max-steps 4 --epochs 1 --batch-size 8 --image-size 32 "
                                 "--set dist.backend=nccl --set data.synth.train=64 --set data.synth.val=16 --out " +
                                 tmp.path.string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("cuda:0"), std::string::npos) << r.output;
  EXPECT_TRUE(fs::exists(tmp / "final.h5"));
  // dist.backend nccl on the CPU is refused up front.
  const RunResult cpu = run_lancet("train --device cpu --max-steps 1 --set dist.backend=nccl");
  EXPECT_NE(cpu.status, 0);
  EXPECT_NE(cpu.output.find("dist.backend nccl needs train.device cuda"), std::string::npos) << cpu.output;
}

// ---- two ranks: this binary under mpirun -----------------------------------------------------

namespace {

// Run by the NcclTwoGpus tests below as `mpirun -np 2` of this binary; skip when run directly.
bool in_mpirun_child() { return std::getenv("LANCET_NCCL_RANKS") != nullptr; }
#define LANCET_REQUIRE_MPIRUN_CHILD()                                                                \
  do {                                                                                               \
    if (!in_mpirun_child()) GTEST_SKIP() << "runs under mpirun from the NcclTwoGpus tests";         \
    LANCET_REQUIRE_GPU();                                                                            \
  } while (0)

std::vector<float> flat_grads(Module& m) {
  std::vector<float> g;
  for (auto& [name, p] : m.named_parameters()) {
    const auto v = p->grad.to_vector();
    g.insert(g.end(), v.begin(), v.end());
  }
  return g;
}

Tensor random_input(const Shape& shape, uint64_t seed) {
  Tensor t = Tensor::empty(shape);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd;
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = nd(rng);
  return t;
}

}  // namespace

TEST(NcclRanks, CollectivesMatchEveryRanksData) {
  LANCET_REQUIRE_MPIRUN_CHILD();
  auto comm = make_communicator("nccl", "cuda");
  ASSERT_EQ(comm->backend(), "nccl");
  const int p = comm->size(), r = comm->rank();
  const Device dev = rank_device("cuda", *comm);
  const Stream s{dev, nullptr};
  const int64_t n = 1003;
  for (DType t : kDtypes)
    for (ReduceOp op : kOps) {
      if (op == ReduceOp::mean && !is_float(t)) continue;
      SCOPED_TRACE(std::string(dtype_name(t)) + " " + op_name(op));
      Tensor x = pattern(t, n, r).to(dev);
      comm->all_reduce(x, op, s);
      const Tensor got = x.to(Device::cpu());
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(get(got, i), reduced(op, p, i, t)) << "element " << i;
      Tensor y = pattern(t, n, r).to(dev);
      comm->all_reduce_async(y, op, s)->wait();
      EXPECT_TRUE(same_bytes(y.to(Device::cpu()), got));
    }
  // Broadcast from the last rank; all-gather in rank order; reduce-scatter of blocks.
  Tensor b = pattern(DType::f32, n, r).to(dev);
  comm->broadcast(b, p - 1, s);
  EXPECT_EQ(b.to_vector(), pattern(DType::f32, n, p - 1).to_vector());
  Tensor all = Tensor::zeros({n * p}, DType::bf16, dev);
  comm->all_gather(pattern(DType::bf16, n, r).to(dev), all, s);
  const Tensor all_cpu = all.to(Device::cpu());
  for (int q = 0; q < p; ++q)
    for (int64_t i = 0; i < n; i += 97) ASSERT_EQ(get(all_cpu, q * n + i), value(q, i, DType::bf16));
  Tensor in = pattern(DType::i64, n * p, r).to(dev), out = Tensor::zeros({n}, DType::i64, dev);
  comm->reduce_scatter(in, out, ReduceOp::sum, s);
  const Tensor out_cpu = out.to(Device::cpu());
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(get(out_cpu, i), reduced(ReduceOp::sum, p, r * n + i, DType::i64));
  // Point to point between ranks 0 and 1, both ways.
  if (r < 2) {
    Tensor mine = pattern(DType::f32, 64, r).to(dev), theirs = Tensor::zeros({64}, DType::f32, dev);
    if (r == 0) {
      comm->send(mine, 1, 0);
      comm->recv(theirs, 1, 0);
    } else {
      comm->recv(theirs, 0, 0);
      comm->send(mine, 0, 0);
    }
    EXPECT_EQ(theirs.to_vector(), pattern(DType::f32, 64, 1 - r).to_vector());
  }
  comm->barrier();
}

TEST(NcclRanks, GradSyncAveragesGpuGradientsDuringTheBackward) {
  LANCET_REQUIRE_MPIRUN_CHILD();
  auto comm = make_communicator("nccl", "cuda");
  const int p = comm->size(), r = comm->rank();
  const Device dev = rank_device("cuda", *comm);
  const Stream s{dev, nullptr};
  auto model = make_model(Json::parse(R"({"name": "medicalcnn", "in_channels": 1, "num_classes": 3,
      "widths": [8, 16, 16, 16], "depths": [1, 1, 1, 1], "head_hidden": 16, "dropout": [0.0, 0.0]})"),
                          1 + static_cast<uint64_t>(r));  // rank-dependent weights: the broadcast must fix them
  model->to(dev);
  model->train();
  GradSyncOptions o;
  o.bucket_mb = 0.01;  // several buckets
  GradSync sync(*model, *comm, o);
  sync.broadcast_parameters(s);
  const Tensor x = random_input({4, 1, 32, 32}, 100 + r).to(dev);
  const Tensor dy = random_input({4, 3}, 200 + r).to(dev);
  auto backward = [&] {
    SavedPtr saved;
    const Tensor y = model->forward(x, &saved, s);
    model->backward(dy, *saved, false, s);
  };
  // The local gradients, then their mean over the ranks (gathered on the host).
  sync.begin_backward(false);
  backward();
  sync.finish(s);
  const std::vector<float> local = flat_grads(*model);
  const int64_t m = static_cast<int64_t>(local.size());
  Tensor gathered = Tensor::empty({m * p});
  comm->all_gather(Tensor::from_vector(local, {m}), gathered, kCpu);
  std::vector<float> mean(local.size(), 0.f);
  for (int q = 0; q < p; ++q)
    for (int64_t i = 0; i < m; ++i) mean[static_cast<size_t>(i)] += gathered.data<float>()[q * m + i] / p;
  // Synchronised: every bucket starts during the backward, on NCCL's stream.
  model->zero_grad();
  sync.begin_backward(true);
  backward();
  EXPECT_EQ(sync.buckets_started_in_backward(), sync.num_buckets());
  sync.finish(s);
  const std::vector<float> got = flat_grads(*model);
  ASSERT_EQ(got.size(), mean.size());
  for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], mean[i], 1e-4 * std::fabs(mean[i]) + 1e-6) << "element " << i;
}

TEST(NcclRanks, HangOfAPeerEndsWithAnError) {
  LANCET_REQUIRE_MPIRUN_CHILD();
  auto comm = make_communicator("nccl", "cuda");
  const Device dev = rank_device("cuda", *comm);
  const Stream s{dev, nullptr};
  Tensor t = pattern(DType::f32, 4096, comm->rank()).to(dev);
  comm->all_reduce(t, ReduceOp::sum, s);  // connects the ranks
  synchronize(s);
  comm->set_timeout(3);
  if (comm->rank() != 0) {
    std::this_thread::sleep_for(std::chrono::seconds(8));  // never joins rank 0's next all-reduce
    return;
  }
  std::string message;
  const auto t0 = Clock::now();
  try {
    auto w = comm->all_reduce_async(t, ReduceOp::sum, s);
    while (!w->done() && seconds_since(t0) < 30) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  } catch (const Error& e) {
    message = e.what();
  }
  EXPECT_NE(message.find("all_reduce_async on rank 0 of"), std::string::npos) << message;
  EXPECT_NE(message.find("dist.timeout_s 3"), std::string::npos) << message;
  EXPECT_LT(seconds_since(t0), 15);
}

namespace {

// `mpirun -np 2` of this binary, running the NcclRanks tests that `filter` selects.
RunResult run_ranks(const std::string& filter) {
  const std::string self = fs::read_symlink("/proc/self/exe").string();
  return run_command("env LANCET_NCCL_RANKS=1 " + kMpiexec + " --allow-run-as-root --oversubscribe -np 2 " + self +
                     " --gtest_filter='" + filter + "'");
}

class NcclTwoGpus : public ::testing::Test {
 protected:
  void SetUp() override {
    LANCET_REQUIRE_GPU();
    if (kMpiexec.empty()) GTEST_SKIP() << "this build has no MPI (libopenmpi-dev) or no mpirun";
    if (cuda_devices().size() < 2) GTEST_SKIP() << "2-rank NCCL tests need 2 GPUs; " << cuda_devices().size() << " visible";
  }
};

}  // namespace

TEST_F(NcclTwoGpus, CollectivesAndGradSync) {
  const RunResult r = run_ranks("NcclRanks.*:-NcclRanks.HangOfAPeerEndsWithAnError");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("[  PASSED  ] 2 tests"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("SKIPPED"), std::string::npos) << r.output;
}

TEST_F(NcclTwoGpus, APeerThatHangsIsReported) {
  const RunResult r = run_ranks("NcclRanks.HangOfAPeerEndsWithAnError");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output.find("FAILED"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("SKIPPED"), std::string::npos) << r.output;
}

TEST_F(NcclTwoGpus, TrainingMatchesOneGpuAndAHungRankEndsTheJob) {
  TempDir dir("nccl_ddp");
  const std::string env = "env LANCET_CACHE=" + (dir / "cache") + " ";
  const std::string mpi = kMpiexec + " --allow-run-as-root --oversubscribe -np 2 ";
  auto args = [&](const std::string& out) {
    return " train --device cuda --set model.widths=[8,16,16,16] --set model.depths=[1,1,1,1] --set model.head_hidden=16 "
           "--set model.dropout=[0.0,0.0] --set data.image_size=32 --set data.synth.size=32 --set data.synth.train=256 "
           "--set data.synth.val=64 --set train.epochs=1 --set train.batch_size=32 --set optim.name=sgd "
           "--set optim.lr=0.05 --set train.tensorboard=false --set dist.sync_bn=true --set dist.bucket_mb=0.01 --out " +
           out;
  };
  const RunResult one = run_command(env + lancet_binary() + args(dir / "one"));
  ASSERT_EQ(one.status, 0) << one.output;
  const RunResult two = run_command(env + mpi + lancet_binary() + args(dir / "two"));
  ASSERT_EQ(two.status, 0) << two.output;
  EXPECT_NE(two.output.find("data parallel: 2 ranks (nccl"), std::string::npos) << two.output;
  // Same samples per step, global BatchNorm statistics, averaged gradients: the same weights up
  // to float summation order (NCCL's and cuDNN's).
  EXPECT_LT(max_difference(dir / "one/final.h5", dir / "two/final.h5"), 1e-3);
  // Rank 1 hangs after step 2: rank 0 gives up after dist.timeout_s and the job ends.
  const auto t0 = Clock::now();
  const RunResult hung = run_command(env + "LANCET_FAULT=1:2:hang " + mpi + lancet_binary() + args(dir / "hung") +
                                     " --set dist.timeout_s=3");
  EXPECT_NE(hung.status, 0) << hung.output;
  EXPECT_NE(hung.output.find("dist.timeout_s 3"), std::string::npos) << hung.output;
  EXPECT_LT(seconds_since(t0), 120) << hung.output;
}

// Data parallelism over pipelines of two GPUs each (the glaucoma study's DDP + model
// parallelism): 2 ranks, rank i on cuda:2i and cuda:2i+1 (train.device cuda, pipeline.devices
// [cuda:0, cuda:1] counted from each rank's first GPU), stage 1's gradients reduced over a
// second NCCL communicator per rank. Trains like the same 2 ranks with 2-step gradient
// accumulation on one GPU each. Skips unless 4 GPUs are visible.
TEST(NcclFourGpus, EachRankAPipelineOverTwoGpus) {
  LANCET_REQUIRE_GPU();
  if (kMpiexec.empty()) GTEST_SKIP() << "this build has no MPI (libopenmpi-dev) or no mpirun";
  if (cuda_devices().size() < 4) GTEST_SKIP() << "needs 4 GPUs (2 ranks x 2 stages); " << cuda_devices().size() << " visible";
  TempDir dir("nccl_pipe");
  const std::string run = "env LANCET_CACHE=" + (dir / "cache") + " " + kMpiexec + " --allow-run-as-root --oversubscribe -np 2 " +
                          lancet_binary() +
                          " train --device cuda --set model.widths=[8,16,16,16] --set model.depths=[1,1,1,1] "
                          "--set model.head_hidden=16 --set model.dropout=[0.0,0.0] --set data.image_size=32 "
                          "--set data.synth.size=32 --set data.synth.train=256 --set data.synth.val=64 --set train.epochs=1 "
                          "--set train.batch_size=32 --set optim.name=sgd --set optim.lr=0.05 --set train.tensorboard=false "
                          "--set dist.bucket_mb=0.01 ";
  const RunResult acc = run_command(run + "--set train.grad_accum_steps=2 --out " + (dir / "acc"));
  ASSERT_EQ(acc.status, 0) << acc.output;
  const RunResult piped = run_command(run + "--set pipeline.stages=2 --set pipeline.micro_batches=2 "
                                            "--set pipeline.cut=stages.2.0 --set pipeline.devices=[cuda:0,cuda:1] --out " +
                                      (dir / "pipe"));
  ASSERT_EQ(piped.status, 0) << piped.output;
  EXPECT_NE(piped.output.find("each a two-stage pipeline"), std::string::npos) << piped.output;
  EXPECT_NE(piped.output.find("on cuda:1"), std::string::npos) << piped.output;  // rank 0's stage 1
  EXPECT_NE(piped.output.find("peak memory on cuda:0: "), std::string::npos) << piped.output;
  EXPECT_LT(max_difference(dir / "acc/final.h5", dir / "pipe/final.h5"), 1e-3);
  // A node with too few GPUs for 2 per rank is refused by name.
  const RunResult three = run_command("env CUDA_VISIBLE_DEVICES=0,1,2 " + run + "--set pipeline.stages=2 "
                                      "--set pipeline.devices=[cuda:0,cuda:1] --out " + (dir / "three"));
  EXPECT_NE(three.status, 0);
  EXPECT_NE(three.output.find("2 GPUs per rank) but only 3 GPUs"), std::string::npos) << three.output;
}
