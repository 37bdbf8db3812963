// dtype.h — element types a Tensor can hold, and the 16-bit float storage types.
//
// half_t and bfloat16_t are storage types: arithmetic happens in float (convert on load,
// round-to-nearest-even on store), which is how the CPU emulates mixed precision and how
// CUDA kernels treat them too.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

namespace lancet {

enum class DType : uint8_t { f32, f16, bf16, i32, i64, u8 };

size_t dtype_size(DType t);
const char* dtype_name(DType t);     // "f32", "f16", ...
DType parse_dtype(const std::string& s);  // throws on unknown names

struct half_t {
  uint16_t bits = 0;
  half_t() = default;
  explicit half_t(float f);
  explicit operator float() const;
};

struct bfloat16_t {
  uint16_t bits = 0;
  bfloat16_t() = default;
  explicit bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) { bits = static_cast<uint16_t>((u >> 16) | 0x40); return; }  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    bits = static_cast<uint16_t>(u >> 16);
  }
  explicit operator float() const {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

// Emulated low-precision storage for float buffers: every element becomes the float nearest to
// it that the 16-bit type holds (round to nearest even, as half_t / bfloat16_t round), in
// place. fp16: |x| >= 65520 becomes +-inf, subnormals keep 2^-24 steps, NaN stays NaN; bf16:
// float's exponent range, 8 significant bits. Loops without branches, so they vectorise.
void round_to_fp16_inplace(float* x, int64_t n);
void round_to_bf16_inplace(float* x, int64_t n);
// Either of the two by dtype (f16, bf16); f32 leaves x as it is; any other dtype throws.
void round_to_dtype_inplace(float* x, int64_t n, DType t);

template <typename T> struct dtype_of;
template <> struct dtype_of<float> { static constexpr DType value = DType::f32; };
template <> struct dtype_of<half_t> { static constexpr DType value = DType::f16; };
template <> struct dtype_of<bfloat16_t> { static constexpr DType value = DType::bf16; };
template <> struct dtype_of<int32_t> { static constexpr DType value = DType::i32; };
template <> struct dtype_of<int64_t> { static constexpr DType value = DType::i64; };
template <> struct dtype_of<uint8_t> { static constexpr DType value = DType::u8; };

}  // namespace lancet
