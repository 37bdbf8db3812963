// communicator.h — the seam through which the trainer talks to other processes.
//
// Collectives operate in place on tensors of any device the backend supports. The
// single-process communicator (rank 0 of 1) makes every collective the identity, so the
// trainer is written once: the MPI (CPU) and NCCL (GPU) backends drop in behind this interface.
#pragma once
#include <memory>
#include <string>

#include "kernels/tensor.h"

namespace lancet {

enum class ReduceOp { sum, mean, max, min };

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;  // "single", "mpi", "nccl"

  virtual void all_reduce(Tensor& t, ReduceOp op, const Stream& s) = 0;
  virtual void broadcast(Tensor& t, int root, const Stream& s) = 0;
  virtual void barrier() = 0;
  // Reduces a host scalar (metrics, losses); every rank gets the result.
  virtual double all_reduce_scalar(double v, ReduceOp op) = 0;

  bool is_root() const { return rank() == 0; }
};

// One process: rank 0 of 1.
std::unique_ptr<Communicator> make_single_process_communicator();

}  // namespace lancet
