#include "data/dicom.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "kernels/error.h"

#ifdef LANCET_WITH_DCMTK
#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmdata/dcdict.h>
#include <dcmtk/dcmdata/dcrledrg.h>
#include <dcmtk/dcmdata/dcrleerg.h>
#include <dcmtk/dcmdata/dctk.h>
#include <dcmtk/dcmdata/dcuid.h>
#include <dcmtk/dcmjpeg/djdecode.h>
#include <dcmtk/dcmjpls/djdecode.h>
#include <dcmtk/oflog/oflog.h>

#include <mutex>
#endif

namespace lancet {

bool is_dicom_path(const std::string& path) {
  std::string ext = std::filesystem::path(path).extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return ext == ".dcm" || ext == ".dicom";
}

DicomPixels dicom_to_display(const DicomFrame& frame, const DicomOptions& opt) {
  const DicomInfo& in = frame.info;
  LANCET_CHECK(opt.bits == 8 || opt.bits == 16, "DICOM output depth must be 8 or 16 bits, got " << opt.bits);
  LANCET_CHECK(!opt.window || opt.window->width >= 1,
               "DICOM window width must be at least 1, got " << (opt.window ? opt.window->width : 0.0));
  LANCET_CHECK(in.samples == 1 || in.samples == 3, "DICOM frame with " << in.samples << " samples per pixel");
  const size_t n = static_cast<size_t>(in.rows) * static_cast<size_t>(in.cols);
  LANCET_CHECK(in.rows > 0 && in.cols > 0 && frame.values.size() == n * static_cast<size_t>(in.samples),
               "DICOM frame of " << in.rows << "x" << in.cols << "x" << in.samples << " holds " << frame.values.size()
                                 << " values");
  DicomPixels out;
  out.rows = in.rows, out.cols = in.cols, out.channels = in.samples, out.bits = opt.bits;
  const double ymax = opt.bits == 8 ? 255.0 : 65535.0;
  std::vector<double> y(frame.values.size());
  if (in.samples == 3) {
    // Colour: no window; rescale only between 8- and 16-bit sample ranges.
    const double scale = in.bits_stored > 8 ? (opt.bits == 8 ? 1.0 / 257.0 : 1.0) : (opt.bits == 8 ? 1.0 : 257.0);
    for (size_t i = 0; i < y.size(); ++i) y[i] = std::clamp(frame.values[i] * scale, 0.0, ymax);
  } else {
    for (size_t i = 0; i < n; ++i) y[i] = frame.values[i] * in.slope + in.intercept;  // modality LUT
    const std::optional<DicomWindow> w = opt.window ? opt.window : in.window;
    if (w) {
      const double c = w->centre - 0.5, half = (w->width - 1) / 2;
      for (double& m : y) {
        if (m <= c - half) m = 0;
        else if (m > c + half) m = ymax;
        else m = ((m - c) / (w->width - 1) + 0.5) * ymax;
      }
    } else {
      const auto [lo, hi] = std::minmax_element(y.begin(), y.end());
      const double mn = *lo, range = *hi - *lo;
      for (double& m : y) m = range > 0 ? (m - mn) / range * ymax : 0.0;
    }
    if (in.photometric == "MONOCHROME1")
      for (double& m : y) m = ymax - m;
  }
  if (opt.bits == 8) {
    out.u8.resize(y.size());
    for (size_t i = 0; i < y.size(); ++i) out.u8[i] = static_cast<uint8_t>(std::floor(std::clamp(y[i], 0.0, ymax) + 0.5));
  } else {
    out.u16.resize(y.size());
    for (size_t i = 0; i < y.size(); ++i) out.u16[i] = static_cast<uint16_t>(std::floor(std::clamp(y[i], 0.0, ymax) + 0.5));
  }
  return out;
}

DicomPixels read_dicom(const std::string& path, const DicomOptions& opt) {
  const DicomFrame f = read_dicom_frame(path);
  try {
    return dicom_to_display(f, opt);
  } catch (const Error& e) {
    LANCET_FAIL(path << ": " << e.what());
  }
}

#ifndef LANCET_WITH_DCMTK

bool dicom_supported() { return false; }
std::string dicom_backend() { return "none"; }

DicomFrame read_dicom_frame(const std::string& path) {
  LANCET_FAIL(path << ": DICOM support is not built in (install DCMTK, Debian: libdcmtk-dev, and reconfigure)");
}

void write_dicom(const std::string& path, const DicomFrame&, bool) {
  LANCET_FAIL(path << ": DICOM support is not built in (install DCMTK, Debian: libdcmtk-dev, and reconfigure)");
}

#else

bool dicom_supported() { return true; }
std::string dicom_backend() { return std::string("DCMTK ") + OFFIS_DCMTK_VERSION_STRING; }

namespace {

// Codecs and logging, once per process. DCMTK's own log lines are switched off: errors reach
// the user as lancet::Error messages.
void init_dcmtk() {
  static std::once_flag once;
  std::call_once(once, [] {
    OFLog::configure(OFLogger::FATAL_LOG_LEVEL);
    DcmRLEDecoderRegistration::registerCodecs();
    DcmRLEEncoderRegistration::registerCodecs();
    DJDecoderRegistration::registerCodecs();  // converts YCbCr JPEGs to RGB
    DJLSDecoderRegistration::registerCodecs();
  });
  LANCET_CHECK(dcmDataDict.isDictionaryLoaded(),
               "the DCMTK data dictionary is not loaded (set DCMDICTPATH to dicom.dic; Debian: libdcmtk17 installs "
               "/usr/share/libdcmtk17/dicom.dic)");
}

std::string one_line(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  return s;
}

bool is_jpeg2000(const std::string& uid) {
  return uid == "1.2.840.10008.1.2.4.90" || uid == "1.2.840.10008.1.2.4.91" || uid == "1.2.840.10008.1.2.4.92" ||
         uid == "1.2.840.10008.1.2.4.93" || uid.rfind("1.2.840.10008.1.2.4.20", 0) == 0;  // 201-203: HTJ2K
}

// A DS/US/IS attribute as a double: the top-level one, else (enhanced multi-frame files) the
// first one in a nested functional group.
std::optional<double> find_number(DcmDataset* ds, const DcmTagKey& tag) {
  Float64 v = 0;
  if (ds->findAndGetFloat64(tag, v, 0).good()) return v;
  if (ds->findAndGetFloat64(tag, v, 0, OFTrue).good()) return v;
  return std::nullopt;
}

uint16_t need_u16(DcmDataset* ds, const DcmTagKey& tag, const char* name, const std::string& path) {
  Uint16 v = 0;
  LANCET_CHECK(ds->findAndGetUint16(tag, v).good(), path << ": missing or invalid " << name);
  return v;
}

}  // namespace

DicomFrame read_dicom_frame(const std::string& path) {
  init_dcmtk();
  std::error_code ec;
  LANCET_CHECK(!std::filesystem::is_directory(path, ec), path << ": a directory, not a DICOM file");
  LANCET_CHECK(std::filesystem::is_regular_file(path, ec), path << ": cannot read: no such file");
  DcmFileFormat ff;
  OFCondition st = ff.loadFile(path.c_str(), EXS_Unknown, EGL_noChange, DCM_MaxReadLength, ERM_autoDetect);
  LANCET_CHECK(st.good(), path << ": not a readable DICOM file (truncated or corrupt): " << one_line(st.text()));
  DcmDataset* ds = ff.getDataset();
  const DcmXfer xfer(ds->getOriginalXfer());
  DicomFrame f;
  DicomInfo& in = f.info;
  in.transfer_syntax = xfer.getXferID();
  in.transfer_syntax_name = xfer.getXferName();
  const std::string ts = in.transfer_syntax_name + " (" + in.transfer_syntax + ")";
  LANCET_CHECK(!ds->tagExists(DCM_FloatPixelData) && !ds->tagExists(DCM_DoubleFloatPixelData),
               path << ": float pixel data is not supported");
  LANCET_CHECK(ds->tagExists(DCM_PixelData), path << ": no pixel data (not an image; SOP class "
                                                  << [&] {
                                                       OFString s;
                                                       ds->findAndGetOFString(DCM_SOPClassUID, s);
                                                       return s.empty() ? std::string("unknown") : std::string(s.c_str());
                                                     }()
                                                  << ")");
  const bool encapsulated = xfer.isEncapsulated();
  if (encapsulated) {
    LANCET_CHECK(!is_jpeg2000(in.transfer_syntax),
                 path << ": transfer syntax " << ts << " is not supported (DCMTK has no free JPEG 2000 decoder)");
    st = ds->chooseRepresentation(EXS_LittleEndianExplicit, nullptr);
    LANCET_CHECK(st.good() && ds->canWriteXfer(EXS_LittleEndianExplicit),
                 path << ": cannot decode transfer syntax " << ts << ": " << one_line(st.text()));
  }

  in.rows = need_u16(ds, DCM_Rows, "Rows", path);
  in.cols = need_u16(ds, DCM_Columns, "Columns", path);
  in.samples = need_u16(ds, DCM_SamplesPerPixel, "SamplesPerPixel", path);
  in.bits_allocated = need_u16(ds, DCM_BitsAllocated, "BitsAllocated", path);
  in.bits_stored = need_u16(ds, DCM_BitsStored, "BitsStored", path);
  Uint16 high_bit = static_cast<Uint16>(in.bits_stored - 1), pixel_rep = 0, planar = 0;
  ds->findAndGetUint16(DCM_HighBit, high_bit);
  ds->findAndGetUint16(DCM_PixelRepresentation, pixel_rep);
  ds->findAndGetUint16(DCM_PlanarConfiguration, planar);
  in.is_signed = pixel_rep == 1;
  Sint32 frames = 1;
  if (ds->findAndGetSint32(DCM_NumberOfFrames, frames).good() && frames >= 1) in.frames = frames;
  OFString pi;
  ds->findAndGetOFString(DCM_PhotometricInterpretation, pi);
  in.photometric = pi.c_str();
  LANCET_CHECK(in.rows > 0 && in.cols > 0, path << ": empty image (" << in.rows << "x" << in.cols << ")");
  LANCET_CHECK(in.bits_allocated == 8 || in.bits_allocated == 16,
               path << ": unsupported bit depth: " << in.bits_allocated << " bits allocated (8 or 16 are supported)");
  LANCET_CHECK(in.bits_stored >= 1 && in.bits_stored <= in.bits_allocated && high_bit < in.bits_allocated &&
                   high_bit + 1 >= in.bits_stored,
               path << ": inconsistent bits stored " << in.bits_stored << " / high bit " << high_bit << " for "
                    << in.bits_allocated << " bits allocated");
  const bool mono = in.photometric == "MONOCHROME1" || in.photometric == "MONOCHROME2";
  const bool ybr = in.photometric == "YBR_FULL" || (in.photometric == "YBR_FULL_422" && encapsulated);
  LANCET_CHECK((in.samples == 1 && mono) || (in.samples == 3 && (in.photometric == "RGB" || ybr)),
               path << ": unsupported photometric interpretation '" << in.photometric << "' with " << in.samples
                    << " samples per pixel (MONOCHROME1, MONOCHROME2, RGB and YBR_FULL are supported)");
  LANCET_CHECK(!ybr || in.bits_allocated == 8, path << ": " << in.photometric << " with " << in.bits_allocated
                                                    << "-bit samples is not supported");

  const size_t n = static_cast<size_t>(in.rows) * static_cast<size_t>(in.cols);
  const size_t need = n * static_cast<size_t>(in.samples);
  const Uint8* p8 = nullptr;
  const Uint16* p16 = nullptr;
  unsigned long count = 0;
  st = in.bits_allocated == 8 ? ds->findAndGetUint8Array(DCM_PixelData, p8, &count)
                              : ds->findAndGetUint16Array(DCM_PixelData, p16, &count);
  LANCET_CHECK(st.good() && (p8 || p16), path << ": cannot read the pixel data: " << one_line(st.text()));
  LANCET_CHECK(count >= need, path << ": truncated pixel data: " << count << " samples, frame 0 of " << in.rows << "x"
                                   << in.cols << "x" << in.samples << " needs " << need);

  const int shift = high_bit + 1 - in.bits_stored;
  const uint32_t mask = in.bits_stored >= 32 ? 0xFFFFFFFFu : (1u << in.bits_stored) - 1u;
  const int32_t sign = 1 << (in.bits_stored - 1);
  f.values.resize(need);
  const size_t planes = planar == 1 && in.samples == 3 ? n : 1;  // stride of a sample's plane
  for (size_t i = 0; i < n; ++i)
    for (size_t s = 0; s < static_cast<size_t>(in.samples); ++s) {
      const size_t src = planes == 1 ? i * static_cast<size_t>(in.samples) + s : s * n + i;
      uint32_t v = p8 ? p8[src] : p16[src];
      v = (v >> shift) & mask;
      int32_t x = static_cast<int32_t>(v);
      if (in.is_signed && (x & sign)) x -= 2 * sign;
      f.values[i * static_cast<size_t>(in.samples) + s] = x;
    }
  if (ybr) {  // PS3.3 C.7.6.3.1.2 (YBR_FULL), to RGB
    for (size_t i = 0; i < n; ++i) {
      int32_t* px = &f.values[i * 3];
      const double yy = px[0], cb = px[1] - 128.0, cr = px[2] - 128.0;
      const double rgb[3] = {yy + 1.402 * cr, yy - 0.344136 * cb - 0.714136 * cr, yy + 1.772 * cb};
      for (int k = 0; k < 3; ++k) px[k] = static_cast<int32_t>(std::floor(std::clamp(rgb[k], 0.0, 255.0) + 0.5));
    }
    in.photometric = "RGB";
  }

  if (mono) {
    in.slope = find_number(ds, DCM_RescaleSlope).value_or(1.0);
    in.intercept = find_number(ds, DCM_RescaleIntercept).value_or(0.0);
    if (in.slope == 0) in.slope = 1;  // a zero slope is a broken header, not a black image
    const auto c = find_number(ds, DCM_WindowCenter), w = find_number(ds, DCM_WindowWidth);
    if (c && w && *w >= 1) in.window = DicomWindow{*c, *w};
  }
  return f;
}

void write_dicom(const std::string& path, const DicomFrame& frame, bool rle) {
  init_dcmtk();
  const DicomInfo& in = frame.info;
  LANCET_CHECK((in.samples == 1 || in.samples == 3) && (in.bits_allocated == 8 || in.bits_allocated == 16) &&
                   in.bits_stored >= 1 && in.bits_stored <= in.bits_allocated && in.rows > 0 && in.cols > 0,
               path << ": write_dicom: unsupported frame layout");
  const size_t need = static_cast<size_t>(in.rows) * static_cast<size_t>(in.cols) * static_cast<size_t>(in.samples);
  LANCET_CHECK(frame.values.size() == need, path << ": write_dicom: " << frame.values.size() << " values, need " << need);
  DcmFileFormat ff;
  DcmDataset* ds = ff.getDataset();
  char uid[100];
  ds->putAndInsertString(DCM_SOPClassUID, UID_SecondaryCaptureImageStorage);
  ds->putAndInsertString(DCM_SOPInstanceUID, dcmGenerateUniqueIdentifier(uid, SITE_INSTANCE_UID_ROOT));
  ds->putAndInsertString(DCM_Modality, "OT");
  ds->putAndInsertUint16(DCM_Rows, static_cast<Uint16>(in.rows));
  ds->putAndInsertUint16(DCM_Columns, static_cast<Uint16>(in.cols));
  ds->putAndInsertUint16(DCM_SamplesPerPixel, static_cast<Uint16>(in.samples));
  ds->putAndInsertString(DCM_PhotometricInterpretation, in.photometric.c_str());
  if (in.samples == 3) ds->putAndInsertUint16(DCM_PlanarConfiguration, 0);
  ds->putAndInsertUint16(DCM_BitsAllocated, static_cast<Uint16>(in.bits_allocated));
  ds->putAndInsertUint16(DCM_BitsStored, static_cast<Uint16>(in.bits_stored));
  ds->putAndInsertUint16(DCM_HighBit, static_cast<Uint16>(in.bits_stored - 1));
  ds->putAndInsertUint16(DCM_PixelRepresentation, in.is_signed ? 1 : 0);
  auto ds_string = [](double v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.10g", v);
    return std::string(buf);
  };
  if (in.slope != 1 || in.intercept != 0) {
    ds->putAndInsertString(DCM_RescaleSlope, ds_string(in.slope).c_str());
    ds->putAndInsertString(DCM_RescaleIntercept, ds_string(in.intercept).c_str());
  }
  if (in.window) {
    ds->putAndInsertString(DCM_WindowCenter, ds_string(in.window->centre).c_str());
    ds->putAndInsertString(DCM_WindowWidth, ds_string(in.window->width).c_str());
  }
  const uint32_t mask = (1u << in.bits_stored) - 1u;
  OFCondition st;
  if (in.bits_allocated == 8) {
    std::vector<Uint8> px(need);
    for (size_t i = 0; i < need; ++i) px[i] = static_cast<Uint8>(static_cast<uint32_t>(frame.values[i]) & mask);
    st = ds->putAndInsertUint8Array(DCM_PixelData, px.data(), static_cast<unsigned long>(need));
  } else {
    std::vector<Uint16> px(need);
    for (size_t i = 0; i < need; ++i) px[i] = static_cast<Uint16>(static_cast<uint32_t>(frame.values[i]) & mask);
    st = ds->putAndInsertUint16Array(DCM_PixelData, px.data(), static_cast<unsigned long>(need));
  }
  LANCET_CHECK(st.good(), path << ": cannot build the pixel data: " << one_line(st.text()));
  const E_TransferSyntax xfer = rle ? EXS_RLELossless : EXS_LittleEndianExplicit;
  if (rle) {
    st = ds->chooseRepresentation(xfer, nullptr);
    LANCET_CHECK(st.good() && ds->canWriteXfer(xfer), path << ": RLE encoding failed: " << one_line(st.text()));
  }
  st = ff.saveFile(path.c_str(), xfer);
  LANCET_CHECK(st.good(), path << ": cannot write: " << one_line(st.text()));
}

#endif

}  // namespace lancet
