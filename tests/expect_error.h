// expect_error.h — the one check for lancet's error idiom in tests.
#pragma once
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "kernels/error.h"

namespace lancet::testing {

// Runs fn, expecting a lancet::Error whose message is one line and contains every one of
// `parts` (e.g. both offending shapes, or the file and the cause).
template <typename F>
void expect_error(F&& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "expected an error mentioning '" << parts.front() << "'";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "multi-line error: " << msg;
  }
}

}  // namespace lancet::testing
