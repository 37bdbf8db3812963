// dicom.h — DICOM images through DCMTK (dcmdata with the JPEG, JPEG-LS and RLE decoders).
//
// What is read: the first frame of a file's Pixel Data (multi-frame files: frame 0 only),
// in any transfer syntax DCMTK decodes — implicit/explicit VR little endian, explicit VR big
// endian, deflated, RLE lossless, JPEG baseline/extended/lossless, JPEG-LS. JPEG 2000
// (1.2.840.10008.1.2.4.90-93) is refused: the free DCMTK has no JPEG 2000 decoder.
// Monochrome images: 8-, 12- and 16-bit stored values (Bits Stored <= Bits Allocated, 8 or
// 16), unsigned or signed (Pixel Representation 1). Colour images: RGB (either planar
// configuration) and YBR_FULL / YBR_FULL_422 (converted to RGB, by the JPEG decoder or here).
// Refused with one line "<file>: <reason>": no Pixel Data (an RT plan, a structured report),
// a truncated or corrupt file, Bits Allocated other than 8 or 16 (e.g. 1-bit segmentations),
// float pixel data, PALETTE COLOR and other photometric interpretations.
//
// From stored values to a display image (dicom_to_display), as DICOM PS3.3 C.11 defines it:
//   1. the modality LUT: m = stored * RescaleSlope + RescaleIntercept (slope 1, intercept 0
//      when absent; in enhanced multi-frame files taken from the functional groups);
//   2. the VOI window (centre c, width w >= 1), first that applies: the configured window,
//      the file's first WindowCenter/WindowWidth pair, else min-max of the frame's m. The
//      window maps m linearly (PS3.3 C.11.2.1.2.1: m <= c - 0.5 - (w-1)/2 -> 0,
//      m > c - 0.5 + (w-1)/2 -> max, else ((m - (c - 0.5)) / (w - 1) + 0.5) * max, rounded
//      half up) to [0, max], max = 255 or 65535; min-max maps [min m, max m] to [0, max]
//      (a constant frame gives 0). VOI LUT Sequences are not applied.
//   3. MONOCHROME1 is inverted (out = max - out), so that bright always means dense.
// Colour images are not windowed: 8-bit samples are kept (16-bit output: v * 257); 16-bit
// colour samples are scaled to 8-bit output by v / 257, rounded.
//
// Thread safety: every function may be called from several threads at once (codecs are
// registered once, on first use). Without DCMTK (the build found no DCMTK package) the file
// readers throw "<file>: DICOM support is not built in ...", and dicom_supported() is false.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace lancet {

struct DicomWindow {
  double centre = 0;
  double width = 0;  // >= 1
};

// What the file says about its pixels (after decoding: the photometric interpretation a
// decoder converted to, e.g. RGB for a YBR_FULL_422 JPEG).
struct DicomInfo {
  std::string transfer_syntax;  // UID, e.g. "1.2.840.10008.1.2.5"
  std::string transfer_syntax_name;
  std::string photometric;      // MONOCHROME1, MONOCHROME2 or RGB (after any YBR conversion)
  int rows = 0, cols = 0, samples = 1, frames = 1;
  int bits_allocated = 0, bits_stored = 0;
  bool is_signed = false;       // Pixel Representation 1
  double slope = 1, intercept = 0;
  std::optional<DicomWindow> window;  // the file's first VOI window, when it has a valid one
};

// Frame 0 as stored values: rows x cols x samples, row-major, channel-interleaved (planar
// files are interleaved here), sign-extended when signed. Monochrome: before the modality
// LUT, window and MONOCHROME1 inversion. Colour: RGB.
struct DicomFrame {
  DicomInfo info;
  std::vector<int32_t> values;
};

struct DicomOptions {
  std::optional<DicomWindow> window;  // overrides the file's window; width >= 1
  int bits = 8;                       // output depth: 8 or 16
};

// A display image: rows x cols x channels (1 gray, 3 RGB), row-major, interleaved; `u8` is
// filled when bits == 8, `u16` when bits == 16.
struct DicomPixels {
  int rows = 0, cols = 0, channels = 1;
  int bits = 8;
  std::vector<uint8_t> u8;
  std::vector<uint16_t> u16;
};

// True when this build reads DICOM files (it found DCMTK).
bool dicom_supported();
// "DCMTK 3.6.7", or "none".
std::string dicom_backend();
// True for the names the image loaders treat as DICOM: *.dcm and *.dicom (case-insensitive).
bool is_dicom_path(const std::string& path);

// Reads and decodes frame 0 of `path`. Errors: see above.
DicomFrame read_dicom_frame(const std::string& path);
// Steps 1-3 above. Throws on bad options (bits, window width < 1) and inconsistent frames.
DicomPixels dicom_to_display(const DicomFrame& frame, const DicomOptions& opt);
// read_dicom_frame, then dicom_to_display; errors name the file.
DicomPixels read_dicom(const std::string& path, const DicomOptions& opt = {});

// Writes a single-frame DICOM (Secondary Capture) with frame.values as stored values and the
// attributes of frame.info (rows, cols, samples 1 or 3, bits allocated 8/16, bits stored,
// signedness, photometric MONOCHROME1/MONOCHROME2/RGB, slope/intercept and window when set),
// in explicit VR little endian, or RLE lossless when `rle`. For tests and synthetic data.
void write_dicom(const std::string& path, const DicomFrame& frame, bool rle = false);

}  // namespace lancet
