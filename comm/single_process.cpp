#include "comm/communicator.h"

namespace lancet {
namespace {

class SingleProcessCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string backend() const override { return "single"; }
  void all_reduce(Tensor&, ReduceOp, const Stream&) override {}
  void broadcast(Tensor&, int root, const Stream&) override {
    LANCET_CHECK(root == 0, "broadcast from rank " << root << " in a 1-process job");
  }
  void barrier() override {}
  double all_reduce_scalar(double v, ReduceOp) override { return v; }
};

}  // namespace

std::unique_ptr<Communicator> make_single_process_communicator() {
  return std::make_unique<SingleProcessCommunicator>();
}

}  // namespace lancet
