// data/dicom: real DICOM files from pydicom's test suite (tests/data/real/dicom, SOURCES.md)
// against pydicom's upstream expected stored values — uncompressed little and big endian,
// deflated, RLE, JPEG baseline/extended/lossless, JPEG-LS, multi-frame, RGB and YBR; the
// refused files (JPEG 2000, no pixel data, truncated, 1-bit, palette) with their one-line
// errors; the display transform (modality LUT, window, min-max, MONOCHROME1) on hand-made
// frames; DICOMs written with DCMTK (MONOCHROME1, slope/intercept, RLE); and DICOM class
// folders and manifests through load_image_dataset.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "data/dicom.h"
#include "data/image_folder.h"
#include "tests/expect_error.h"
#include "trainer/config.h"

namespace fs = std::filesystem;
using namespace lancet;
using lancet::testing::expect_error;

namespace {

const std::string kDicomDir = std::string(LANCET_SOURCE_DIR) + "/tests/data/real/dicom/";
std::string real(const std::string& name) { return kDicomDir + name; }

#define REQUIRE_DCMTK() \
  if (!dicom_supported()) GTEST_SKIP() << "this build has no DCMTK (Debian: libdcmtk-dev)"

// values[r, c, s] of a frame; negative r/c count from the end, as in numpy.
int32_t at(const DicomFrame& f, int r, int c, int s = 0) {
  if (r < 0) r += f.info.rows;
  if (c < 0) c += f.info.cols;
  return f.values[(static_cast<size_t>(r) * f.info.cols + c) * f.info.samples + s];
}
std::vector<int32_t> row_span(const DicomFrame& f, int r, int c0, int c1) {
  std::vector<int32_t> v;
  for (int c = c0; c < c1; ++c) v.push_back(at(f, r, c));
  return v;
}
std::vector<int32_t> col_span(const DicomFrame& f, int r0, int r1, int c) {
  std::vector<int32_t> v;
  for (int r = r0; r < r1; ++r) v.push_back(at(f, r, c));
  return v;
}
std::vector<int32_t> rgb(const DicomFrame& f, int r, int c) { return {at(f, r, c, 0), at(f, r, c, 1), at(f, r, c, 2)}; }

DicomFrame mono_frame(int rows, int cols, std::vector<int32_t> values, int bits_stored = 16, bool is_signed = true) {
  DicomFrame f;
  f.info.rows = rows, f.info.cols = cols, f.info.samples = 1;
  f.info.bits_allocated = bits_stored > 8 ? 16 : 8, f.info.bits_stored = bits_stored, f.info.is_signed = is_signed;
  f.info.photometric = "MONOCHROME2";
  f.values = std::move(values);
  return f;
}

class DicomTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / ("lancet_dicom_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& rel) const {
    fs::create_directories((dir_ / rel).parent_path());
    return (dir_ / rel).string();
  }
  fs::path dir_;
};

}  // namespace

// ---- upstream expected values (pydicom tests/pixels/pixels_reference.py) ---------------

TEST(DicomReal, CtSmallSigned16) {
  REQUIRE_DCMTK();
  const DicomFrame f = read_dicom_frame(real("pydicom__CT_small.dcm"));
  EXPECT_EQ(f.info.transfer_syntax, "1.2.840.10008.1.2.1");
  EXPECT_EQ(f.info.rows, 128);
  EXPECT_EQ(f.info.cols, 128);
  EXPECT_EQ(f.info.samples, 1);
  EXPECT_EQ(f.info.bits_stored, 16);
  EXPECT_TRUE(f.info.is_signed);
  EXPECT_EQ(f.info.photometric, "MONOCHROME2");
  EXPECT_EQ(row_span(f, 24, 36, 40), (std::vector<int32_t>{520, 802, 930, 1008}));
  EXPECT_EQ(col_span(f, 40, 45, 40), (std::vector<int32_t>{1138, 1165, 1113, 1088, 1072}));
}

TEST(DicomReal, MrSmallAndItsLosslessCompressions) {
  REQUIRE_DCMTK();
  const DicomFrame ref = read_dicom_frame(real("pydicom__MR_small.dcm"));
  EXPECT_EQ(row_span(ref, 0, 31, 34), (std::vector<int32_t>{422, 319, 361}));
  EXPECT_EQ(row_span(ref, 31, 0, 3), (std::vector<int32_t>{366, 363, 322}));
  EXPECT_EQ(row_span(ref, -1, 61, 64), (std::vector<int32_t>{1369, 1129, 862}));
  for (const char* name : {"pydicom__MR_small_RLE.dcm", "pydicom__MR_small_jpeg_ls_lossless.dcm"}) {
    const DicomFrame f = read_dicom_frame(real(name));
    EXPECT_EQ(f.info.rows, 64) << name;
    EXPECT_TRUE(f.info.is_signed) << name;
    EXPECT_EQ(f.values, ref.values) << name << ": decoded pixels differ from MR_small";
  }
  const DicomFrame ls = read_dicom_frame(real("pydicom__MR_small_jpeg_ls_lossless.dcm"));
  EXPECT_EQ(ls.info.transfer_syntax, "1.2.840.10008.1.2.4.80");
  EXPECT_EQ(col_span(ls, 55, 64, 35), (std::vector<int32_t>{170, 193, 191, 373, 1293, 2053, 1879, 1683, 1711}));
}

TEST(DicomReal, MultiFrameRleTakesFrameZero) {
  REQUIRE_DCMTK();
  const DicomFrame f = read_dicom_frame(real("pydicom-data__emri_small_RLE.dcm"));
  EXPECT_EQ(f.info.frames, 10);
  EXPECT_EQ(f.info.bits_stored, 12);
  EXPECT_FALSE(f.info.is_signed);
  EXPECT_EQ(row_span(f, 0, 31, 34), (std::vector<int32_t>{206, 197, 159}));
  EXPECT_EQ(row_span(f, 31, 0, 3), (std::vector<int32_t>{49, 78, 128}));
  EXPECT_EQ(row_span(f, -1, 61, 64), (std::vector<int32_t>{362, 219, 135}));
}

TEST(DicomReal, JpegExtended12BitAndLossless8Bit) {
  REQUIRE_DCMTK();
  const DicomFrame ext = read_dicom_frame(real("pydicom__JPGExtended.dcm"));
  EXPECT_EQ(ext.info.transfer_syntax, "1.2.840.10008.1.2.4.51");
  EXPECT_EQ(ext.info.rows, 1024);
  EXPECT_EQ(ext.info.cols, 256);
  EXPECT_EQ(at(ext, 420, 140), 244);
  EXPECT_EQ(at(ext, 230, 120), 95);
  const DicomFrame ll = read_dicom_frame(real("pydicom-data__JPGLosslessP14SV1_1s_1f_8b.dcm"));
  EXPECT_EQ(ll.info.rows, 768);
  EXPECT_EQ(ll.info.cols, 1024);
  EXPECT_EQ(ll.info.bits_allocated, 8);
  EXPECT_EQ(row_span(ll, 300, 512, 520), (std::vector<int32_t>{26, 26, 25, 22, 19, 16, 14, 15}));
  EXPECT_EQ(row_span(ll, 600, 512, 520), (std::vector<int32_t>{45, 43, 41, 38, 33, 30, 26, 21}));
}

TEST(DicomReal, DeflatedExplicitLittleEndian) {
  REQUIRE_DCMTK();
  const DicomFrame f = read_dicom_frame(real("pydicom__image_dfl.dcm"));
  EXPECT_EQ(f.info.transfer_syntax, "1.2.840.10008.1.2.1.99");
  const auto row10 = row_span(f, 10, 0, 512), row500 = row_span(f, 500, 0, 512);
  EXPECT_EQ(*std::min_element(row10.begin(), row10.end()), 41);
  EXPECT_EQ(*std::max_element(row10.begin(), row10.end()), 255);
  EXPECT_EQ(*std::min_element(row500.begin(), row500.end()), 65);
  EXPECT_EQ(*std::max_element(row500.begin(), row500.end()), 219);
  EXPECT_EQ(row_span(f, 300, 255, 263), (std::vector<int32_t>{138, 65, 65, 65, 65, 35, 35, 35}));
}

TEST(DicomReal, RgbPixelPlanarBigEndianAndOddLength) {
  REQUIRE_DCMTK();
  const DicomFrame odd = read_dicom_frame(real("pydicom__SC_rgb_small_odd.dcm"));
  for (int c = 0; c < 3; ++c) {
    EXPECT_EQ(rgb(odd, 0, c), (std::vector<int32_t>{166, 141, 52}));
    EXPECT_EQ(rgb(odd, 1, c), (std::vector<int32_t>{63, 87, 176}));
    EXPECT_EQ(rgb(odd, 2, c), (std::vector<int32_t>{158, 158, 158}));
  }
  const DicomFrame be = read_dicom_frame(real("pydicom__ExplVR_BigEnd.dcm"));  // planar configuration 1
  EXPECT_EQ(be.info.transfer_syntax, "1.2.840.10008.1.2.2");
  EXPECT_EQ(rgb(be, 9, 3), (std::vector<int32_t>{171, 171, 171}));
  EXPECT_EQ(rgb(be, 9, 4), (std::vector<int32_t>{255, 255, 255}));
  EXPECT_EQ(rgb(be, 9, 5), (std::vector<int32_t>{255, 255, 0}));
  EXPECT_EQ(rgb(be, 58, 8), (std::vector<int32_t>{255, 236, 0}));
  // The display image keeps 8-bit colour as it is.
  const DicomPixels px = read_dicom(real("pydicom__ExplVR_BigEnd.dcm"));
  ASSERT_EQ(px.channels, 3);
  EXPECT_EQ(px.u8[(58 * 80 + 8) * 3 + 1], 236);
}

TEST(DicomReal, RleColourAndYbrJpegConvertedToRgb) {
  REQUIRE_DCMTK();
  const std::vector<std::vector<int32_t>> expected = {{255, 0, 0},     {255, 128, 128}, {0, 255, 0},     {128, 255, 128},
                                                      {0, 0, 255},     {128, 128, 255}, {0, 0, 0},       {64, 64, 64},
                                                      {192, 192, 192}, {255, 255, 255}};
  const DicomFrame rle = read_dicom_frame(real("pydicom__SC_rgb_rle.dcm"));
  const DicomFrame jpg = read_dicom_frame(real("pydicom__SC_rgb_jpeg_dcmtk.dcm"));
  EXPECT_EQ(jpg.info.photometric, "RGB");  // YBR_FULL in the file
  for (size_t k = 0; k < expected.size(); ++k) {
    const int r = 5 + 10 * static_cast<int>(k);
    EXPECT_EQ(rgb(rle, r, 50), expected[k]) << "row " << r;
    for (int s = 0; s < 3; ++s)  // lossy JPEG: close to the lossless colours
      EXPECT_NEAR(at(jpg, r, 50, s), expected[k][s], 8) << "row " << r << " sample " << s;
  }
}

TEST(DicomReal, RefusedFilesGiveOneLineErrors) {
  REQUIRE_DCMTK();
  expect_error([] { read_dicom_frame(real("pydicom__JPEG2000.dcm")); },
               {"pydicom__JPEG2000.dcm", "JPEG 2000", "1.2.840.10008.1.2.4.91", "not supported"});
  expect_error([] { read_dicom_frame(real("pydicom__MR_small_jp2klossless.dcm")); },
               {"MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90"});
  expect_error([] { read_dicom(real("pydicom__rtplan.dcm")); }, {"pydicom__rtplan.dcm", "no pixel data"});
  expect_error([] { read_dicom(real("pydicom__MR_truncated.dcm")); }, {"pydicom__MR_truncated.dcm", "truncated"});
  expect_error([] { read_dicom(real("pydicom__no_meta.dcm")); }, {"pydicom__no_meta.dcm", "corrupt"});
  expect_error([] { read_dicom(real("pydicom__liver_1frame.dcm")); },
               {"pydicom__liver_1frame.dcm", "unsupported bit depth", "1 bits allocated"});
  expect_error([] { read_dicom(real("pydicom-data__OT-PAL-8-face.dcm")); },
               {"OT-PAL-8-face.dcm", "unsupported photometric interpretation", "PALETTE COLOR"});
  expect_error([] { read_dicom(real("nonexistent.dcm")); }, {"nonexistent.dcm", "no such file"});
  const fs::path folder = fs::temp_directory_path() / ("lancet_dicom_" + std::to_string(::getpid()) + "_dir.dcm");
  fs::create_directories(folder);
  expect_error([&] { read_dicom(folder.string()); }, {folder.string(), "a directory, not a DICOM file"});
  fs::remove(folder);
  const std::string png = std::string(LANCET_SOURCE_DIR) + "/tests/data/real/png_jpeg/txv__nih_00000001_000.png";
  expect_error([&] { read_dicom(png); }, {"txv__nih_00000001_000.png"});
}

// ---- the display transform -------------------------------------------------------------

TEST(DicomDisplay, ModalityLutWindowAndMonochrome1) {
  // Hounsfield units through slope 2, intercept -1024: m = 2 v - 1024.
  DicomFrame f = mono_frame(1, 6, {0, 512, 532, 531, 732, 2000});  // m = -1024, 0, 40, 38, 440, 2976
  f.info.slope = 2, f.info.intercept = -1024;
  DicomOptions o;
  o.window = DicomWindow{40, 400};  // [-160, 240]: c - 0.5 = 39.5, (w - 1) / 2 = 199.5
  DicomPixels px = dicom_to_display(f, o);
  // 40 -> ((40 - 39.5) / 399 + 0.5) * 255 = 127.82; 38 -> 126.54
  EXPECT_EQ(px.u8, (std::vector<uint8_t>{0, 102, 128, 127, 255, 255}));  // 0 -> (39.5/399 ... ) = 102.26
  // The file's window is used when none is configured; a configured one wins.
  f.info.window = DicomWindow{0, 2};  // m <= -1 -> 0, m > 0 -> 255, else ((m + 0.5) / 1 + 0.5) * 255
  EXPECT_EQ(dicom_to_display(f, {}).u8, (std::vector<uint8_t>{0, 255, 255, 255, 255, 255}));
  EXPECT_EQ(dicom_to_display(f, o).u8, px.u8);
  // No window anywhere: min-max of the modality values, 16-bit output.
  f.info.window.reset();
  DicomOptions o16;
  o16.bits = 16;
  const DicomPixels mm = dicom_to_display(f, o16);
  ASSERT_EQ(mm.u16.size(), 6u);
  EXPECT_EQ(mm.u16.front(), 0);
  EXPECT_EQ(mm.u16.back(), 65535);
  EXPECT_EQ(mm.u16[1], static_cast<uint16_t>(1024.0 / 4000.0 * 65535 + 0.5));
  // MONOCHROME1: the same mapping, inverted.
  f.info.photometric = "MONOCHROME1";
  const DicomPixels inv = dicom_to_display(f, o);
  for (size_t i = 0; i < 6; ++i) EXPECT_EQ(inv.u8[i], 255 - px.u8[i]);
  // A constant frame under min-max is 0 (MONOCHROME2).
  EXPECT_EQ(dicom_to_display(mono_frame(1, 3, {7, 7, 7}), {}).u8, (std::vector<uint8_t>{0, 0, 0}));
  o.window = DicomWindow{40, 0.5};
  expect_error([&] { dicom_to_display(f, o); }, {"window width", "0.5"});
  DicomOptions bad;
  bad.bits = 12;
  expect_error([&] { dicom_to_display(f, bad); }, {"8 or 16", "12"});
}

TEST(DicomDisplay, RealMonochrome1RadiographIsInverted) {
  REQUIRE_DCMTK();
  const std::string file = real("pydicom__dicomdirtests_CR1_6154.dcm");
  const DicomFrame f = read_dicom_frame(file);
  EXPECT_EQ(f.info.photometric, "MONOCHROME1");
  EXPECT_EQ(f.info.bits_stored, 12);
  ASSERT_TRUE(f.info.window.has_value());
  // With the file's window: MONOCHROME1 display = 255 - MONOCHROME2 display of the same frame.
  DicomFrame as_mono2 = f;
  as_mono2.info.photometric = "MONOCHROME2";
  const DicomPixels m1 = read_dicom(file), m2 = dicom_to_display(as_mono2, {});
  ASSERT_EQ(m1.u8.size(), 256u);
  for (size_t i = 0; i < m1.u8.size(); ++i) EXPECT_EQ(m1.u8[i], 255 - m2.u8[i]);
  // The highest stored value is the darkest pixel.
  const size_t brightest_stored = std::max_element(f.values.begin(), f.values.end()) - f.values.begin();
  EXPECT_EQ(m1.u8[brightest_stored], *std::min_element(m1.u8.begin(), m1.u8.end()));
}

// ---- DICOMs written with DCMTK ---------------------------------------------------------

TEST_F(DicomTest, WrittenFilesRoundTripIncludingRle) {
  REQUIRE_DCMTK();
  // 12-bit signed MONOCHROME1 with rescale and a window.
  std::vector<int32_t> v(24 * 17);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<int32_t>(i * 37 % 4096) - 2048;
  DicomFrame f = mono_frame(24, 17, v, 12, true);
  f.info.photometric = "MONOCHROME1";
  f.info.slope = 0.5, f.info.intercept = -100;
  f.info.window = DicomWindow{-120, 700};
  for (bool rle : {false, true}) {
    const std::string file = path(rle ? "m1_rle.dcm" : "m1.dcm");
    write_dicom(file, f, rle);
    const DicomFrame back = read_dicom_frame(file);
    EXPECT_EQ(back.info.transfer_syntax, rle ? "1.2.840.10008.1.2.5" : "1.2.840.10008.1.2.1");
    EXPECT_EQ(back.values, f.values) << (rle ? "RLE" : "native");
    EXPECT_EQ(back.info.photometric, "MONOCHROME1");
    EXPECT_DOUBLE_EQ(back.info.slope, 0.5);
    EXPECT_DOUBLE_EQ(back.info.intercept, -100);
    ASSERT_TRUE(back.info.window.has_value());
    EXPECT_DOUBLE_EQ(back.info.window->width, 700);
    EXPECT_EQ(read_dicom(file).u8, dicom_to_display(f, {}).u8);
  }
  // 8-bit RGB.
  DicomFrame c;
  c.info.rows = 5, c.info.cols = 7, c.info.samples = 3, c.info.bits_allocated = 8, c.info.bits_stored = 8;
  c.info.photometric = "RGB";
  for (int i = 0; i < 5 * 7 * 3; ++i) c.values.push_back(i * 7 % 256);
  write_dicom(path("rgb.dcm"), c, true);
  EXPECT_EQ(read_dicom_frame(path("rgb.dcm")).values, c.values);
}

TEST_F(DicomTest, FoldersAndManifestsOfDicoms) {
  REQUIRE_DCMTK();
  // A class-folder layout of DICOMs (RSNA-like), real files and written ones, 8 and 16 bits.
  fs::copy_file(real("pydicom__CT_small.dcm"), path("train/normal/a.dcm"));
  fs::copy_file(real("pydicom__MR_small_RLE.dcm"), path("train/normal/b.DCM"));
  fs::copy_file(real("pydicom__dicomdirtests_CR1_6154.dcm"), path("train/opacity/c.dicom"));
  fs::copy_file(real("pydicom-data__JPGLosslessP14SV1_1s_1f_8b.dcm"), path("train/opacity/d.dcm"));
  ImageLoadOptions lo;
  lo.image_size = 16;
  auto ds = load_image_dataset(dir_.string(), "train", lo);
  ASSERT_EQ(ds->size(), 4);
  EXPECT_EQ(ds->class_names(), (std::vector<std::string>{"normal", "opacity"}));
  EXPECT_EQ(ds->labels(), (std::vector<int64_t>{0, 0, 1, 1}));
  // Each sample equals read_dicom + preprocess_image of the same file.
  const std::vector<std::string> files = {"train/normal/a.dcm", "train/normal/b.DCM", "train/opacity/c.dicom",
                                          "train/opacity/d.dcm"};
  std::vector<float> want(16 * 16);
  for (size_t i = 0; i < files.size(); ++i) {
    const DicomPixels px = read_dicom(path(files[i]));
    preprocess_image(px.u8.data(), px.rows, px.cols, px.channels, lo, want.data());
    EXPECT_EQ(std::memcmp(want.data(), ds->images().data<float>() + i * 256, 256 * sizeof(float)), 0) << files[i];
  }
  // A configured window changes the CT sample; RGB conversion of DICOMs for 3 channels works.
  ImageLoadOptions win = lo;
  win.dicom_window = {40, 400};
  auto dw = load_image_dataset(dir_.string(), "train", win);
  EXPECT_NE(std::memcmp(dw->images().data<float>(), ds->images().data<float>(), 256 * sizeof(float)), 0);
  ImageLoadOptions bad = lo;
  bad.dicom_window = {40, 0};
  expect_error([&] { load_image_dataset(dir_.string(), "train", bad); }, {"DICOM window", "width"});

  // Manifest layout, with a colour DICOM loaded as RGB.
  std::ofstream(path("m/manifest.csv")) << "path,label\nx.dcm,0\ny.dcm,1\n";
  fs::copy_file(real("pydicom__SC_rgb_rle.dcm"), path("m/x.dcm"));
  fs::copy_file(real("pydicom__ExplVR_BigEnd.dcm"), path("m/y.dcm"));
  ImageLoadOptions rgb3 = lo;
  rgb3.channels = 3;
  auto mds = load_image_dataset(path("m"), "", rgb3);
  EXPECT_EQ(mds->size(), 2);
  EXPECT_EQ(mds->sample_shape(), (Shape{3, 16, 16}));

  // A refused DICOM in a folder fails the load naming the file.
  fs::copy_file(real("pydicom__rtplan.dcm"), path("train/opacity/e.dcm"));
  expect_error([&] { load_image_dataset(dir_.string(), "train", lo); }, {"e.dcm", "no pixel data"});
}

TEST(DicomConfig, WindowSetting) {
  Json c = default_config();
  EXPECT_TRUE(data_config(c).dicom_window.empty());
  apply_override(c, "data.dicom.window=[40, 400]");
  EXPECT_EQ(data_config(c).dicom_window, (std::vector<double>{40, 400}));
  Json bad = default_config();
  apply_override(bad, "data.dicom.window=[40]");
  expect_error([&] { data_config(bad); }, {"data.dicom.window", "[40]"});
}
