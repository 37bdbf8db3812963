// scaling.h — predicting data-parallel step time beyond the machine at hand.
//
// Input: one measured training step (from `lancet bench train --json`: forward, backward and
// optimizer times, and for every gradient bucket its size and the moment in the backward at
// which it became ready — GradSync::timings()). Output: the step time, images/s and scaling
// efficiency for N ranks on K nodes, under a network model.
//
// Network model (alpha-beta): sending n bytes over a link costs alpha + n / beta. All-reduce of
// n bytes over p ranks on one kind of link:
//   ring  2 (p - 1) alpha + 2 (p - 1) / p * n / beta
//   tree  2 ceil(log2 p) alpha + 2 n / beta               (pipelined double binary tree)
// and the collective library takes the cheaper (NCCL chooses between ring and tree this way).
// On K > 1 nodes of G ranks each, the all-reduce is hierarchical: reduce-scatter inside the
// node, all-reduce of n / G bytes across the K nodes (each rank's share on its own NIC),
// all-gather inside the node:
//   (G - 1) alpha_i + (G - 1) / G * n / beta_i   +   allreduce_inter(n / G, K)   +   same as the first term
//
// Step model (what DDP does): buckets are reduced one after another in bucket order on one
// communication channel; bucket b starts when it is ready and the previous one is done; the
// backward's end is the measured backward time; what communication is left after it is exposed:
//   step(N) = (forward + backward) * c + max(0, comm_end - backward * c) + optimizer + other
// where c >= 1 is a compute-contention factor (CPU ranks sharing cores: ranks x threads over the
// cores; 1 for GPUs). Weak scaling (per-rank batch fixed): images/s = N * batch / step(N),
// efficiency = step(1) / step(N). What the model leaves out: memory-bandwidth sharing between
// ranks on one node, the reduction arithmetic itself competing with compute on CPUs, stragglers
// and jitter, and network contention from other jobs; `lancet sweep --predict` measures its
// error where it can (CPU ranks over MPI on this machine) and prints it.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace lancet {

struct Link {
  std::string name;
  double alpha_s = 0;    // per-message latency, seconds
  double beta_Bps = 1;   // bandwidth, bytes per second
};

// Documented default figures (docs/scaling.md).
Link nvlink4_link();   // NVLink 4 (H100/H200 SXM): alpha 1 us, 360 GB/s all-reduce bus bandwidth
Link ib_ndr_link();    // InfiniBand NDR 400 Gb/s, one NIC per GPU: alpha 5 us, 45 GB/s
// "ALPHA_US:BETA_GBS", e.g. "1:360" (microseconds, gigabytes per second); throws on bad text.
Link parse_link(const std::string& name, const std::string& text);

struct Cluster {
  int ranks_per_node = 8;
  Link intra = nvlink4_link(), inter = ib_ndr_link();
};

double ring_allreduce_s(double bytes, int p, const Link& l);
double tree_allreduce_s(double bytes, int p, const Link& l);
// All-reduce of `bytes` over `ranks` ranks laid out on ceil(ranks / ranks_per_node) nodes.
double allreduce_s(double bytes, int ranks, const Cluster& c);

struct MeasuredStep {
  int ranks = 1;           // ranks of the measured run (predictions start from its per-rank work)
  int64_t per_rank_batch = 0;
  double forward_s = 0, backward_s = 0, optimizer_s = 0, other_s = 0;
  struct Bucket {
    int64_t bytes = 0;
    double ready_s = 0;    // since the backward began
  };
  std::vector<Bucket> buckets;  // in reduction order

  // From `lancet bench train --json` output (its "phases" means and "buckets" list).
  static MeasuredStep from_bench_json(const nlohmann::json& j);
};

struct Prediction {
  int ranks = 0, nodes = 0;
  double step_s = 0, images_per_s = 0, efficiency = 0;
  double comm_s = 0;     // sum of the buckets' all-reduce times
  double exposed_s = 0;  // communication not hidden behind the backward
};

// compute_factor: the contention factor c above (>= 1).
Prediction predict_step(const MeasuredStep& m, int ranks, const Cluster& c, double compute_factor = 1,
                        bool overlap = true);

// Fits alpha and beta of a ring all-reduce to measured (bytes, seconds) pairs for p ranks by
// least squares on t = 2 (p - 1) alpha + 2 (p - 1) / p * n / beta. Throws with fewer than two
// sizes or p < 2.
Link fit_ring_link(const std::string& name, const std::vector<std::pair<double, double>>& bytes_seconds, int p);

}  // namespace lancet
