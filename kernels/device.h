// device.h — where a tensor lives and where an op runs.
#pragma once
#include <string>

namespace lancet {

enum class DeviceType { cpu, cuda };

// cpu:N for N > 0 is a logical host device: the same memory and threads as cpu, but its own
// identity, so that every kernel's device check (a tensor and its stream on one device) holds
// code that spreads a model over several devices to the rules two GPUs impose — the CPU stand-in
// for a second GPU that a pipeline over [cpu, cpu:1] exercises in tests (trainer/pipeline.h).
struct Device {
  DeviceType type = DeviceType::cpu;
  int index = 0;  // GPU ordinal for cuda; 0 for the host, N for the logical host device cpu:N

  static Device cpu(int i = 0) { return {DeviceType::cpu, i}; }
  static Device cuda(int i = 0) { return {DeviceType::cuda, i}; }
  bool is_cpu() const { return type == DeviceType::cpu; }
  bool is_cuda() const { return type == DeviceType::cuda; }
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
  std::string str() const;  // "cpu", "cpu:1", "cuda:0"
};

Device parse_device(const std::string& s);  // "cpu", "cpu:1", "cuda", "cuda:1"; throws on anything else

// Stream: the ordered queue an op is issued on. On the CPU ops run synchronously on the
// calling thread (and its worker pool) and `native` is null; on CUDA it is a cudaStream_t
// (null = the legacy default stream). Every op takes one, so CPU and CUDA twins share a signature.
struct Stream {
  Device device = Device::cpu();
  void* native = nullptr;

  static Stream cpu() { return Stream{}; }
};

// The stream for work on `d` issued by the thread that works on `s`: `s` itself when it is on
// `d`, else d's default stream (the legacy default stream of that GPU; a CPU stream). A model
// spread over several devices (pipeline stages placed on their own devices) runs each part on it.
inline Stream stream_on(Device d, const Stream& s) { return s.device == d ? s : Stream{d, nullptr}; }

// Blocks the host until everything issued on `s` has finished: a no-op for a CPU stream (CPU
// ops have finished when they return), cudaStreamSynchronize for a CUDA one.
void synchronize(const Stream& s);

}  // namespace lancet
