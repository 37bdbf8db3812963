#include "kernels/dtype.h"

#include "kernels/error.h"

namespace lancet {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f16: return 2;
    case DType::bf16: return 2;
    case DType::i32: return 4;
    case DType::i64: return 8;
    case DType::u8: return 1;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::f16: return "f16";
    case DType::bf16: return "bf16";
    case DType::i32: return "i32";
    case DType::i64: return "i64";
    case DType::u8: return "u8";
  }
  return "?";
}

DType parse_dtype(const std::string& s) {
  for (DType t : {DType::f32, DType::f16, DType::bf16, DType::i32, DType::i64, DType::u8})
    if (s == dtype_name(t)) return t;
  if (s == "float32" || s == "fp32") return DType::f32;
  if (s == "float16" || s == "fp16") return DType::f16;
  if (s == "bfloat16") return DType::bf16;
  LANCET_FAIL("unknown dtype '" << s << "' (expected f32, f16, bf16, i32, i64 or u8)");
}

// IEEE binary16 conversion with round-to-nearest-even, subnormals, inf and NaN.
half_t::half_t(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) {  // inf or NaN
    bits = static_cast<uint16_t>(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0u));
    return;
  }
  if (absx >= 0x477ff000u) {  // rounds to >= 65520: overflow to inf
    bits = static_cast<uint16_t>(sign | 0x7c00u);
    return;
  }
  if (absx < 0x38800000u) {  // result is subnormal (or zero) in half
    const int e = static_cast<int>(absx >> 23);  // biased float exponent
    if (e < 102) { bits = static_cast<uint16_t>(sign); return; }  // below half of the smallest subnormal
    uint32_t mant = (absx & 0x7fffffu) | 0x800000u;
    // value = mant * 2^(e-150); in units of the smallest subnormal (2^-24): mant >> (126 - e).
    const int shift = 126 - e;
    const uint32_t q = mant >> (shift);
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half_way = 1u << (shift - 1);
    uint32_t r = q + ((rem > half_way || (rem == half_way && (q & 1u))) ? 1u : 0u);
    bits = static_cast<uint16_t>(sign | r);
    return;
  }
  // Normal: rebias exponent 127 -> 15, round mantissa 23 -> 10 bits.
  uint32_t r = absx - 0x38000000u;  // rebias
  r += 0xfffu + ((r >> 13) & 1u);
  bits = static_cast<uint16_t>(sign | (r >> 13));
}

half_t::operator float() const {
  const uint32_t sign = (static_cast<uint32_t>(bits) & 0x8000u) << 16;
  const uint32_t exp = (bits >> 10) & 0x1fu;
  const uint32_t mant = bits & 0x3ffu;
  uint32_t out;
  if (exp == 0) {
    if (mant == 0) {
      out = sign;
    } else {  // subnormal: normalise
      int e = -1;
      uint32_t m = mant;
      do { m <<= 1; ++e; } while ((m & 0x400u) == 0);
      out = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((m & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    out = sign | 0x7f800000u | (mant << 13);
  } else {
    out = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &out, 4);
  return f;
}

void round_to_fp16_inplace(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, &x[i], 4);
    const uint32_t sign = u & 0x80000000u, a = u & 0x7fffffffu;
    float mag;
    std::memcpy(&mag, &a, 4);
    // Subnormal range (|x| < 2^-14): 0.5f's ulp is 2^-24, half's subnormal step, so adding and
    // removing 0.5f rounds to that step (to nearest even, in float's own rounding).
    const float sub = (mag + 0.5f) - 0.5f;
    uint32_t sub_bits;
    std::memcpy(&sub_bits, &sub, 4);
    // Normal range: drop 13 of float's 23 mantissa bits, rounding to nearest even.
    const uint32_t normal = (a + 0xfffu + ((a >> 13) & 1u)) & ~0x1fffu;
    uint32_t r = a < 0x38800000u ? sub_bits : normal;
    r = a >= 0x477ff000u ? 0x7f800000u : r;      // rounds to >= 65520: inf
    r = a > 0x7f800000u ? 0x7fc00000u : r;        // NaN stays NaN (quiet, as half_t keeps it)
    r |= sign;
    std::memcpy(&x[i], &r, 4);
  }
}

void round_to_bf16_inplace(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, &x[i], 4);
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    const uint32_t out = nan ? ((u | 0x400000u) & 0xffff0000u) : r;
    std::memcpy(&x[i], &out, 4);
  }
}

void round_to_dtype_inplace(float* x, int64_t n, DType t) {
  switch (t) {
    case DType::f32: return;
    case DType::f16: round_to_fp16_inplace(x, n); return;
    case DType::bf16: round_to_bf16_inplace(x, n); return;
    default: LANCET_FAIL("round_to_dtype_inplace: " << dtype_name(t) << " is not a floating-point storage type");
  }
}

}  // namespace lancet
