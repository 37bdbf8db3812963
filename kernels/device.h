// device.h — where a tensor lives and where an op runs.
#pragma once
#include <string>

namespace lancet {

enum class DeviceType { cpu, cuda };

struct Device {
  DeviceType type = DeviceType::cpu;
  int index = 0;  // GPU ordinal for cuda; always 0 for cpu

  static Device cpu() { return {DeviceType::cpu, 0}; }
  static Device cuda(int i = 0) { return {DeviceType::cuda, i}; }
  bool is_cpu() const { return type == DeviceType::cpu; }
  bool is_cuda() const { return type == DeviceType::cuda; }
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
  std::string str() const;  // "cpu", "cuda:0"
};

Device parse_device(const std::string& s);  // "cpu", "cuda", "cuda:1"; throws on anything else

// Stream: the ordered queue an op is issued on. On the CPU ops run synchronously on the
// calling thread (and its worker pool) and `native` is null; on CUDA it is a cudaStream_t
// (null = the legacy default stream). Every op takes one, so CPU and CUDA twins share a signature.
struct Stream {
  Device device = Device::cpu();
  void* native = nullptr;

  static Stream cpu() { return Stream{}; }
};

// Blocks the host until everything issued on `s` has finished: a no-op for a CPU stream (CPU
// ops have finished when they return), cudaStreamSynchronize for a CUDA one.
void synchronize(const Stream& s);

}  // namespace lancet
