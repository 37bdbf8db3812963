// error.h — lancet's one error-handling idiom.
//
// Every failure a caller can act on throws lancet::Error whose what() is a single line:
// "<message> (<file>:<line>)". Library code never calls exit() or abort(); tools/ turns an
// Error into a one-line message on stderr and a non-zero exit status.
//
//   LANCET_CHECK(x.ndim() == 4, "conv2d: input must be 4-D, got " << x.shape_str());
//   LANCET_FAIL("unknown optimizer '" << name << "'");
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace lancet {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
[[noreturn]] void throw_error(const char* file, int line, const std::string& msg);
}  // namespace detail

}  // namespace lancet

#define LANCET_FAIL(msg_stream)                                               \
  do {                                                                        \
    std::ostringstream lancet_err_os_;                                        \
    lancet_err_os_ << msg_stream;                                             \
    ::lancet::detail::throw_error(__FILE__, __LINE__, lancet_err_os_.str());  \
  } while (0)

#define LANCET_CHECK(cond, msg_stream) \
  do {                                 \
    if (!(cond)) LANCET_FAIL(msg_stream); \
  } while (0)
