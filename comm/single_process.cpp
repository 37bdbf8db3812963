#include "comm/communicator.h"

#include <cstdlib>
#include <cstring>

namespace lancet {
namespace {

class DoneWork final : public Work {
 public:
  void wait() override {}
  bool done() override { return true; }
};

void check_same_numel(const Tensor& in, const Tensor& out, const char* what) {
  LANCET_CHECK(in.numel() == out.numel() && in.dtype() == out.dtype(),
               what << ": in " << in.shape_str() << " " << dtype_name(in.dtype()) << " and out " << out.shape_str()
                    << " " << dtype_name(out.dtype()) << " differ in a 1-process job");
}

class SingleProcessCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  int local_rank() const override { return 0; }
  int local_size() const override { return 1; }
  std::string backend() const override { return "single"; }
  void all_reduce(Tensor&, ReduceOp, const Stream&) override {}
  std::unique_ptr<Work> all_reduce_async(Tensor&, ReduceOp, const Stream&) override {
    return std::make_unique<DoneWork>();
  }
  void all_gather(const Tensor& in, Tensor& out, const Stream&) override {
    check_same_numel(in, out, "all_gather");
    if (in.raw_data() != out.raw_data()) out.copy_from(in.view(out.shape()));
  }
  void reduce_scatter(const Tensor& in, Tensor& out, ReduceOp, const Stream&) override {
    check_same_numel(in, out, "reduce_scatter");
    if (in.raw_data() != out.raw_data()) out.copy_from(in.view(out.shape()));
  }
  void send(const Tensor&, int dst, int) override { LANCET_FAIL("send to rank " << dst << " in a 1-process job"); }
  void recv(Tensor&, int src, int) override { LANCET_FAIL("recv from rank " << src << " in a 1-process job"); }
  void broadcast(Tensor&, int root, const Stream&) override {
    LANCET_CHECK(root == 0, "broadcast from rank " << root << " in a 1-process job");
  }
  void barrier() override {}
  void all_reduce_doubles(double*, int, ReduceOp) override {}
  void abort(int) noexcept override {}
  std::unique_ptr<Communicator> for_device(Device) override {
    auto c = std::make_unique<SingleProcessCommunicator>();
    c->set_timeout(timeout_s_);
    return c;
  }
};

}  // namespace

std::unique_ptr<Communicator> make_single_process_communicator() {
  return std::make_unique<SingleProcessCommunicator>();
}

namespace {
bool env_int(const char* name, int& out) {
  const char* v = std::getenv(name);
  if (!v || !*v) return false;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (*end != '\0' || x < 0) return false;
  out = static_cast<int>(x);
  return true;
}
}  // namespace

LaunchInfo detect_launch() {
  LaunchInfo li;
  if (env_int("OMPI_COMM_WORLD_SIZE", li.size) && env_int("OMPI_COMM_WORLD_RANK", li.rank)) {
    li.launcher = "mpirun";
    if (!env_int("OMPI_COMM_WORLD_LOCAL_RANK", li.local_rank)) li.local_rank = li.rank;
    if (!env_int("OMPI_COMM_WORLD_LOCAL_SIZE", li.local_size)) li.local_size = li.size;
  } else if (env_int("SLURM_NTASKS", li.size) && env_int("SLURM_PROCID", li.rank) && std::getenv("SLURM_STEP_ID")) {
    li.launcher = "srun";  // inside a job step (a batch script itself has no SLURM_STEP_ID)
    if (!env_int("SLURM_LOCALID", li.local_rank)) li.local_rank = 0;
    int n = 0;
    li.local_size = env_int("SLURM_STEP_TASKS_PER_NODE", n) ? n : li.size;
  } else if ((env_int("PMIX_SIZE", li.size) || env_int("PMI_SIZE", li.size)) &&
             (env_int("PMIX_RANK", li.rank) || env_int("PMI_RANK", li.rank))) {
    li.launcher = "pmi";
    li.local_rank = li.rank;
    li.local_size = li.size;
  } else {
    li = LaunchInfo{};
  }
  return li;
}

}  // namespace lancet
