// Communicators. Run as a plain process (the single-process communicator: every collective
// is the identity) and, where the build has MPI, under `mpirun -np 2` and `-np 3` (the CTest
// entries comm.mpi.np2 / np3): the same assertions then check the MPI backend's results for
// every rank count.
#include <gtest/gtest.h>

#include <cstdlib>
#include <numeric>

#include "comm/communicator.h"
#include "tests/expect_error.h"
#include "tests/job_comm.h"

using namespace lancet;
using namespace lancet::testing;
using lancet::testing::expect_error;

namespace {

const Stream kCpu = Stream::cpu();

// A value only rank r and element i give.
float value(int r, int64_t i) { return static_cast<float>(r * 1000 + i) * 0.5f; }

Tensor rank_tensor(int64_t n) {
  Tensor t = Tensor::empty({n});
  for (int64_t i = 0; i < n; ++i) t.data<float>()[i] = value(comm().rank(), i);
  return t;
}

}  // namespace

TEST(Comm, LauncherAndBackend) {
  const LaunchInfo li = detect_launch();
  EXPECT_EQ(comm().size(), li.size);
  EXPECT_EQ(comm().rank(), li.rank);
  EXPECT_EQ(comm().backend(), li.size > 1 ? "mpi" : "single");
  EXPECT_GE(comm().local_size(), 1);
  EXPECT_LT(comm().local_rank(), comm().local_size());
  if (li.launcher == "mpirun") {
    EXPECT_EQ(std::to_string(li.size), std::getenv("OMPI_COMM_WORLD_SIZE"));
  }
  expect_error([] { make_cpu_communicator("gloo"); }, {"communicator backend 'gloo'", "auto, mpi or single"});
}

TEST(Comm, AllReduceSumMeanMaxMin) {
  const int p = comm().size();
  const int64_t n = 1001;  // odd
  for (ReduceOp op : {ReduceOp::sum, ReduceOp::mean, ReduceOp::max, ReduceOp::min}) {
    Tensor t = rank_tensor(n);
    comm().all_reduce(t, op, kCpu);
    for (int64_t i = 0; i < n; ++i) {
      double sum = 0, mx = -1e30, mn = 1e30;
      for (int r = 0; r < p; ++r) sum += value(r, i), mx = std::max<double>(mx, value(r, i)), mn = std::min<double>(mn, value(r, i));
      const double want = op == ReduceOp::sum ? sum : op == ReduceOp::mean ? sum / p : op == ReduceOp::max ? mx : mn;
      ASSERT_NEAR(t.data<float>()[i], want, 1e-6 * std::abs(want) + 1e-6) << "op " << static_cast<int>(op) << " i " << i;
    }
  }
  // Integers sum exactly.
  Tensor k = Tensor::empty({3}, DType::i64);
  for (int i = 0; i < 3; ++i) k.data<int64_t>()[i] = (comm().rank() + 1) * (i + 1);
  comm().all_reduce(k, ReduceOp::sum, kCpu);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(k.data<int64_t>()[i], int64_t(p * (p + 1) / 2) * (i + 1));
  EXPECT_DOUBLE_EQ(comm().all_reduce_scalar(comm().rank() + 1.0, ReduceOp::sum), p * (p + 1) / 2.0);
  EXPECT_DOUBLE_EQ(comm().all_reduce_scalar(comm().rank(), ReduceOp::max), p - 1);
}

TEST(Comm, AsyncAllReducesCompleteInAnyWaitOrder) {
  const int p = comm().size();
  Tensor a = rank_tensor(5000), b = rank_tensor(7);
  auto wa = comm().all_reduce_async(a, ReduceOp::mean, kCpu);
  auto wb = comm().all_reduce_async(b, ReduceOp::sum, kCpu);
  wb->wait();
  wa->wait();
  EXPECT_TRUE(wa->done());
  for (int64_t i : {int64_t(0), int64_t(4999)}) {
    double sum = 0;
    for (int r = 0; r < p; ++r) sum += value(r, i);
    EXPECT_NEAR(a.data<float>()[i], sum / p, 1e-3);
  }
  double sum6 = 0;
  for (int r = 0; r < p; ++r) sum6 += value(r, 6);
  EXPECT_NEAR(b.data<float>()[6], sum6, 1e-3);
}

TEST(Comm, BroadcastGatherScatterSendRecv) {
  const int p = comm().size(), me = comm().rank();
  Tensor t = rank_tensor(10);
  comm().broadcast(t, p - 1, kCpu);
  for (int64_t i = 0; i < 10; ++i) EXPECT_EQ(t.data<float>()[i], value(p - 1, i));

  Tensor in = rank_tensor(4), all = Tensor::empty({p * 4});
  comm().all_gather(in, all, kCpu);
  for (int r = 0; r < p; ++r)
    for (int64_t i = 0; i < 4; ++i) EXPECT_EQ(all.data<float>()[r * 4 + i], value(r, i));

  Tensor big = rank_tensor(p * 3), mine = Tensor::empty({3});
  comm().reduce_scatter(big, mine, ReduceOp::sum, kCpu);
  for (int64_t i = 0; i < 3; ++i) {
    double sum = 0;
    for (int r = 0; r < p; ++r) sum += value(r, me * 3 + i);
    EXPECT_NEAR(mine.data<float>()[i], sum, 1e-3);
  }

  if (p > 1) {  // a ring: send to the right, receive from the left
    Tensor out = rank_tensor(6), got = Tensor::empty({6});
    const int right = (me + 1) % p, left = (me + p - 1) % p;
    if (me % 2 == 0) {
      comm().send(out, right, 7);
      comm().recv(got, left, 7);
    } else {
      comm().recv(got, left, 7);
      comm().send(out, right, 7);
    }
    for (int64_t i = 0; i < 6; ++i) EXPECT_EQ(got.data<float>()[i], value(left, i));
  } else {
    expect_error([&] { comm().send(t, 1, 0); }, {"send to rank 1"});
  }
  comm().barrier();
}

TEST(Comm, BadArgumentsAreOneLineErrors) {
  const int p = comm().size();
  Tensor t = rank_tensor(4);
  expect_error([&] { comm().broadcast(t, p, kCpu); }, {"broadcast from rank " + std::to_string(p)});
  Tensor wrong = Tensor::empty({p * 4 + 1});
  expect_error([&] { comm().all_gather(t, wrong, kCpu); }, {"all_gather"});
}

// Which GPU a rank trains on (comm/factory.cpp): pure, so it is checked here without a GPU.
TEST(Comm, CudaDeviceByNodeLocalRank) {
  // "cuda": rank i of a node takes cuda:(i mod GPUs).
  EXPECT_EQ(choose_cuda_device("cuda", 0, 1, 1), 0);
  EXPECT_EQ(choose_cuda_device("cuda", 0, 1, 8), 0);
  for (int r = 0; r < 4; ++r) EXPECT_EQ(choose_cuda_device("cuda", r, 4, 4), r);
  EXPECT_EQ(choose_cuda_device("cuda", 2, 3, 8), 2);
  // One visible GPU per rank (srun --gpus-per-task=1): each rank's cuda:0 is a GPU of its own.
  EXPECT_EQ(choose_cuda_device("cuda", 3, 4, 1), 0);
  // An explicit index is honoured: one rank on the node, or one visible GPU per rank.
  EXPECT_EQ(choose_cuda_device("cuda:3", 0, 1, 4), 3);
  EXPECT_EQ(choose_cuda_device("cuda:0", 1, 2, 1), 0);
  // What would put two ranks on one GPU is refused, naming the way out.
  expect_error([] { choose_cuda_device("cuda", 0, 4, 2); }, {"cuda with 4 ranks on this node but only 2 GPUs", "at most 2 ranks per node"});
  expect_error([] { choose_cuda_device("cuda:1", 0, 2, 4); }, {"cuda:1 with 2 ranks", "one GPU per rank", "train.device cuda"});
  expect_error([] { choose_cuda_device("cuda:4", 0, 1, 4); }, {"train.device cuda:4", "4 CUDA device(s)"});
  expect_error([] { choose_cuda_device("cuda", 0, 1, 0); }, {"no CUDA device"});
  expect_error([] { choose_cuda_device("cpu", 0, 1, 1); }, {"not a CUDA device"});
  EXPECT_EQ(choose_cuda_device("gpu", 1, 2, 2), 1);  // parse_device's other spelling of "cuda"
  expect_error([] { choose_cuda_device("tpu", 0, 1, 1); }, {"bad device 'tpu'"});
}

// A pipeline over two GPUs per rank (pipeline.devices [cuda:0, cuda:1], train.device cuda):
// rank i of a node owns GPUs [2i, 2i + 2), or the two it sees.
TEST(Comm, CudaDevicesOfARankWithTwoGpus) {
  for (int r = 0; r < 4; ++r) EXPECT_EQ(choose_cuda_device("cuda", r, 4, 8, 2), 2 * r);
  EXPECT_EQ(choose_cuda_device("cuda", 1, 2, 8, 2), 2);  // a node of 8 GPUs, 2 ranks: cuda:2 and cuda:3 for rank 1
  EXPECT_EQ(choose_cuda_device("cuda", 0, 1, 2, 2), 0);  // one process, two GPUs
  EXPECT_EQ(choose_cuda_device("cuda", 0, 1, 8, 2), 0);
  EXPECT_EQ(choose_cuda_device("cuda", 3, 4, 2, 2), 0);  // srun --gpus-per-task=2: each rank sees its own two
  EXPECT_EQ(choose_cuda_device("gpu", 1, 2, 4, 2), 2);
  expect_error([] { choose_cuda_device("cuda", 0, 1, 1, 2); }, {"2 GPUs per rank", "1 GPU(s) are visible"});
  expect_error([] { choose_cuda_device("cuda", 1, 2, 3, 2); },
               {"2 ranks on this node (2 GPUs per rank) but only 3 GPUs", "at most 1 ranks per node"});
  expect_error([] { choose_cuda_device("cuda", 0, 4, 6, 2); }, {"4 ranks on this node", "at most 3 ranks per node"});
  expect_error([] { choose_cuda_device("cuda:0", 1, 2, 4, 2); }, {"cuda:0 with 2 ranks", "2 GPUs per rank", "cuda:(i*2) onwards"});
  expect_error([] { choose_cuda_device("cuda", 0, 1, 2, 0); }, {"0 GPUs per rank"});
  // One GPU per rank is the default, unchanged.
  EXPECT_EQ(choose_cuda_device("cuda", 3, 4, 8, 1), choose_cuda_device("cuda", 3, 4, 8));
  EXPECT_TRUE(rank_picks_gpu("cuda") && rank_picks_gpu("gpu") && !rank_picks_gpu("cuda:0") && !rank_picks_gpu("cpu"));
}

// for_device: the communicator a pipeline's second stage reduces over. Its own message space
// (MPI: a duplicate), the same ranks and timeout; collectives on both interleave freely.
TEST(Comm, ASecondCommunicatorForAnotherDevice) {
  const int p = comm().size();
  auto base = make_communicator("auto", "cpu", 33);
  auto other = base->for_device(Device::cpu(1));
  EXPECT_EQ(other->backend(), base->backend());
  EXPECT_EQ(other->rank(), base->rank());
  EXPECT_EQ(other->size(), p);
  EXPECT_EQ(other->local_rank(), base->local_rank());
  EXPECT_EQ(other->timeout(), 33);
  // Async all-reduces in flight on both at once, waited for in the other order.
  Tensor a = rank_tensor(3000), b = rank_tensor(5).to(Device::cpu(1));
  const Stream s1 = stream_on(Device::cpu(1), kCpu);
  auto wa = base->all_reduce_async(a, ReduceOp::sum, kCpu);
  auto wb = other->all_reduce_async(b, ReduceOp::mean, s1);
  wb->wait();
  wa->wait();
  for (int64_t i : {int64_t(0), int64_t(4)}) {
    double sum = 0;
    for (int r = 0; r < p; ++r) sum += value(r, i);
    EXPECT_NEAR(a.data<float>()[i], sum, 1e-3);
    EXPECT_NEAR(b.data<float>()[i], sum / p, 1e-3);
  }
  EXPECT_DOUBLE_EQ(other->all_reduce_scalar(1.0, ReduceOp::sum), p);
  auto third = other->for_device(Device::cpu());  // of a duplicate, again
  EXPECT_DOUBLE_EQ(third->all_reduce_scalar(comm().rank(), ReduceOp::max), p - 1);
  if (base->backend() == "mpi")
    expect_error([&] { base->for_device(Device::cuda(0)); }, {"for_device cuda:0", "MPI communicator reduces CPU tensors"});
}

TEST(Comm, CommunicatorForTheTrainingDevice) {
  auto cpu = make_communicator("auto", "cpu");  // every rank calls it: an MPI communicator is collective
  EXPECT_EQ(cpu->backend(), comm().size() > 1 ? "mpi" : "single");
  EXPECT_EQ(cpu->size(), comm().size());
  EXPECT_TRUE(rank_device("cpu", *cpu) == Device::cpu());
  EXPECT_EQ(make_communicator("auto", "cpu", 42.5)->timeout(), 42.5);  // dist.timeout_s from the start
  EXPECT_EQ(make_communicator("auto", "cuda", 7)->timeout(), 7);      // (NCCL's bootstrap waits that long)
  if (comm().size() == 1) {
    // One process on a GPU: nothing to reduce, no NCCL; its GPU is cuda:0 (also where none is
    // visible: the trainer's device check then names the problem).
    auto one = make_communicator("auto", "cuda");
    EXPECT_EQ(one->backend(), "single");
    EXPECT_TRUE(rank_device("cuda", *one) == Device::cuda(0));
  }
  expect_error([] { make_communicator("nccl", "cpu"); }, {"dist.backend nccl needs train.device cuda", "cpu"});
  expect_error([] { make_communicator("gloo", "cpu"); }, {"communicator backend 'gloo'", "auto, mpi, single or nccl"});
  expect_error([] { make_communicator("auto", "tpu"); }, {"bad device 'tpu'"});
}
