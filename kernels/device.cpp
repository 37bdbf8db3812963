#include "kernels/device.h"

#include "kernels/error.h"

namespace lancet {

std::string Device::str() const {
  if (is_cpu()) return index == 0 ? std::string("cpu") : "cpu:" + std::to_string(index);
  return "cuda:" + std::to_string(index);
}

Device parse_device(const std::string& s) {
  if (s == "cpu") return Device::cpu();
  if (s == "cuda" || s == "gpu") return Device::cuda(0);
  for (const char* prefix : {"cuda:", "cpu:"}) {
    const std::string p = prefix;
    if (s.rfind(p, 0) != 0) continue;
    const std::string idx = s.substr(p.size());
    LANCET_CHECK(!idx.empty() && idx.size() <= 4 && idx.find_first_not_of("0123456789") == std::string::npos,
                 "bad device '" << s << "': expected cpu, cpu:N, cuda or cuda:N");
    const int i = std::stoi(idx);
    return p == "cpu:" ? Device::cpu(i) : Device::cuda(i);
  }
  LANCET_FAIL("bad device '" << s << "': expected cpu, cpu:N, cuda or cuda:N");
}

#ifndef LANCET_WITH_CUDA
// Without CUDA every stream is a CPU stream (the CUDA build's is in kernels/cuda/runtime.cu).
void synchronize(const Stream& s) {
  LANCET_CHECK(s.device.is_cpu(), "synchronize: stream on " << s.device.str() << " in a build without CUDA");
}
#endif

}  // namespace lancet
