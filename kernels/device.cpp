#include "kernels/device.h"

#include "kernels/error.h"

namespace lancet {

std::string Device::str() const {
  return is_cpu() ? std::string("cpu") : "cuda:" + std::to_string(index);
}

Device parse_device(const std::string& s) {
  if (s == "cpu") return Device::cpu();
  if (s == "cuda" || s == "gpu") return Device::cuda(0);
  if (s.rfind("cuda:", 0) == 0) {
    const std::string idx = s.substr(5);
    LANCET_CHECK(!idx.empty() && idx.find_first_not_of("0123456789") == std::string::npos,
                 "bad device '" << s << "': expected cpu, cuda or cuda:N");
    return Device::cuda(std::stoi(idx));
  }
  LANCET_FAIL("bad device '" << s << "': expected cpu, cuda or cuda:N");
}

#ifndef LANCET_WITH_CUDA
// Without CUDA every stream is a CPU stream (the CUDA build's is in kernels/cuda/runtime.cu).
void synchronize(const Stream& s) {
  LANCET_CHECK(s.device.is_cpu(), "synchronize: stream on " << s.device.str() << " in a build without CUDA");
}
#endif

}  // namespace lancet
