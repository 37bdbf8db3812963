#include "kernels/error.h"

#include <cstring>

namespace lancet::detail {

void throw_error(const char* file, int line, const std::string& msg) {
  // Keep only the path from the project's top folder: "kernels/tensor.cpp", not the build path.
  const char* short_file = file;
  for (const char* top : {"/kernels/", "/layers/", "/comm/", "/data/", "/trainer/", "/tools/", "/tests/"}) {
    if (const char* p = std::strstr(file, top)) { short_file = p + 1; break; }
  }
  throw Error(msg + " (" + short_file + ":" + std::to_string(line) + ")");
}

}  // namespace lancet::detail
