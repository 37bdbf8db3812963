#include "trainer/scaling.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "kernels/error.h"

namespace lancet {

Link nvlink4_link() { return {"nvlink4", 1e-6, 360e9}; }
Link ib_ndr_link() { return {"ib-ndr400", 5e-6, 45e9}; }

Link parse_link(const std::string& name, const std::string& text) {
  const auto colon = text.find(':');
  Link l{name, 0, 0};
  try {
    LANCET_CHECK(colon != std::string::npos, "");
    size_t used = 0;
    l.alpha_s = std::stod(text.substr(0, colon), &used) * 1e-6;
    LANCET_CHECK(used == colon, "");
    const std::string b = text.substr(colon + 1);
    l.beta_Bps = std::stod(b, &used) * 1e9;
    LANCET_CHECK(used == b.size(), "");
  } catch (const std::exception&) {
    LANCET_FAIL(name << ": '" << text << "' is not ALPHA_US:BETA_GBS (e.g. 1:360 for 1 us and 360 GB/s)");
  }
  LANCET_CHECK(l.alpha_s >= 0 && l.beta_Bps > 0, name << ": '" << text << "': latency must be >= 0 and bandwidth > 0");
  return l;
}

double ring_allreduce_s(double bytes, int p, const Link& l) {
  if (p <= 1) return 0;
  return 2.0 * (p - 1) * l.alpha_s + 2.0 * (p - 1) / p * bytes / l.beta_Bps;
}

double tree_allreduce_s(double bytes, int p, const Link& l) {
  if (p <= 1) return 0;
  return 2.0 * std::ceil(std::log2(static_cast<double>(p))) * l.alpha_s + 2.0 * bytes / l.beta_Bps;
}

namespace {
double best_allreduce_s(double bytes, int p, const Link& l) {
  return std::min(ring_allreduce_s(bytes, p, l), tree_allreduce_s(bytes, p, l));
}
}  // namespace

double allreduce_s(double bytes, int ranks, const Cluster& c) {
  LANCET_CHECK(ranks >= 1 && c.ranks_per_node >= 1, "allreduce_s: ranks " << ranks << ", ranks per node " << c.ranks_per_node);
  if (ranks <= c.ranks_per_node) return best_allreduce_s(bytes, ranks, c.intra);
  const int g = c.ranks_per_node;
  const int k = (ranks + g - 1) / g;
  // Reduce-scatter and all-gather inside the node (ring), all-reduce of a 1/G share across nodes.
  const double half_intra = (g - 1) * c.intra.alpha_s + static_cast<double>(g - 1) / g * bytes / c.intra.beta_Bps;
  return 2 * half_intra + best_allreduce_s(bytes / g, k, c.inter);
}

MeasuredStep MeasuredStep::from_bench_json(const nlohmann::json& j) {
  LANCET_CHECK(j.contains("profile") && j.contains("buckets"),
               "scaling: not the output of `lancet bench train --json` (no profile/buckets)");
  MeasuredStep m;
  m.ranks = j.value("ranks", 1);
  m.per_rank_batch = j.value("per_rank_batch", int64_t{0});
  const auto& ph = j.at("profile").at("phases");
  auto mean = [&](const char* name) { return ph.contains(name) ? ph.at(name).at("mean_ms").get<double>() * 1e-3 : 0.0; };
  m.forward_s = mean("forward");
  m.backward_s = mean("backward");
  m.optimizer_s = mean("optimizer");
  m.other_s = mean("other") + mean("data_wait") + mean("h2d");
  for (const auto& b : j.at("buckets")) {
    Bucket x;
    x.bytes = b.at("bytes").get<int64_t>();
    x.ready_s = std::max(0.0, b.at("ready_ms").get<double>() * 1e-3);
    m.buckets.push_back(x);
  }
  return m;
}

Prediction predict_step(const MeasuredStep& m, int ranks, const Cluster& c, double compute_factor, bool overlap) {
  LANCET_CHECK(ranks >= 1, "predict_step: ranks must be >= 1, got " << ranks);
  LANCET_CHECK(compute_factor >= 1, "predict_step: compute factor must be >= 1, got " << compute_factor);
  Prediction p;
  p.ranks = ranks;
  p.nodes = (ranks + c.ranks_per_node - 1) / c.ranks_per_node;
  const double backward_end = m.backward_s * compute_factor;
  double comm_free = 0;
  for (const auto& b : m.buckets) {
    const double t = allreduce_s(static_cast<double>(b.bytes), ranks, c);
    if (t <= 0) continue;
    const double ready = overlap ? std::min(b.ready_s * compute_factor, backward_end) : backward_end;
    const double start = std::max(ready, comm_free);
    comm_free = start + t;
    p.comm_s += t;
  }
  p.exposed_s = std::max(0.0, comm_free - backward_end);
  p.step_s = (m.forward_s + m.backward_s) * compute_factor + p.exposed_s + m.optimizer_s + m.other_s;
  const double base = m.forward_s + m.backward_s + m.optimizer_s + m.other_s;
  p.images_per_s = p.step_s > 0 ? ranks * static_cast<double>(m.per_rank_batch) / p.step_s : 0;
  p.efficiency = p.step_s > 0 ? base / p.step_s : 0;
  return p;
}

Link fit_ring_link(const std::string& name, const std::vector<std::pair<double, double>>& bytes_seconds, int p) {
  LANCET_CHECK(p >= 2, "fit_ring_link: needs at least 2 ranks, got " << p);
  LANCET_CHECK(bytes_seconds.size() >= 2, "fit_ring_link: needs at least two message sizes");
  // Ordinary least squares of t = a + s * n, then a = 2 (p - 1) alpha, s = 2 (p - 1) / (p beta).
  double sn = 0, st = 0, snn = 0, snt = 0;
  const double k = static_cast<double>(bytes_seconds.size());
  for (const auto& [n, t] : bytes_seconds) {
    sn += n;
    st += t;
    snn += n * n;
    snt += n * t;
  }
  const double den = k * snn - sn * sn;
  LANCET_CHECK(den > 0, "fit_ring_link: the message sizes must differ");
  const double slope = (k * snt - sn * st) / den;
  const double intercept = (st - slope * sn) / k;
  LANCET_CHECK(slope > 0, "fit_ring_link: time does not grow with message size (slope " << slope << " s/B): noisy measurement");
  Link l;
  l.name = name;
  l.alpha_s = std::max(0.0, intercept) / (2.0 * (p - 1));
  l.beta_Bps = 2.0 * (p - 1) / (p * slope);
  return l;
}

}  // namespace lancet
