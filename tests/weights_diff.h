// Comparing two weight files (interchange HDF5) written by training runs.
#pragma once
#include <algorithm>
#include <cmath>
#include <string>

#include "trainer/weights.h"

namespace lancet::testing {

// Largest |a - b| over every parameter and buffer of two weight files.
inline double max_difference(const std::string& a, const std::string& b) {
  auto ma = load_model(a), mb = load_model(b);
  auto sa = ma->state_dict(), sb = mb->state_dict();
  double worst = 0;
  for (size_t i = 0; i < sa.size(); ++i) {
    const auto va = sa[i].second->to_vector(), vb = sb[i].second->to_vector();
    for (size_t j = 0; j < va.size(); ++j) worst = std::max(worst, std::fabs(static_cast<double>(va[j]) - vb[j]));
  }
  return worst;
}

}  // namespace lancet::testing
