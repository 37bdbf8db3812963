// data/npz: the real PneumoniaMNIST archive (tests/data/real/npz, SOURCES.md: split sizes,
// shapes, class balance; pixel sums computed with numpy), an archive written by numpy's
// savez_compressed (tests/data/npz/make_npz.py), hand-built archives (stored and deflated
// members, ZIP64, every integer label type, RGB), bit-identity with the same pixels loaded
// from PNG files, the one-line errors, and label gaps refused unless data.classes declares them.
#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <string>
#include <vector>

#include "data/image_dataset.h"
#include "data/npz.h"
#include "tests/expect_error.h"

namespace fs = std::filesystem;
using namespace lancet;
using lancet::testing::expect_error;

namespace {

using Bytes = std::vector<uint8_t>;

void put16(Bytes& b, uint32_t v) { b.push_back(v & 0xFF), b.push_back((v >> 8) & 0xFF); }
void put32(Bytes& b, uint32_t v) { put16(b, v & 0xFFFF), put16(b, v >> 16); }
void put64(Bytes& b, uint64_t v) { put32(b, static_cast<uint32_t>(v)), put32(b, static_cast<uint32_t>(v >> 32)); }

// A .npy file image (format 1.0) of raw little-endian bytes.
Bytes npy(const std::string& descr, const std::vector<int64_t>& shape, const Bytes& data,
          const std::string& fortran = "False") {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  s += shape.size() == 1 ? ",)" : ")";
  std::string h = "{'descr': '" + descr + "', 'fortran_order': " + fortran + ", 'shape': " + s + ", }";
  while ((10 + h.size() + 1) % 64) h += ' ';
  h += '\n';
  Bytes b = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0};
  put16(b, static_cast<uint32_t>(h.size()));
  b.insert(b.end(), h.begin(), h.end());
  b.insert(b.end(), data.begin(), data.end());
  return b;
}

template <typename T>
Bytes raw(const std::vector<T>& v) {
  Bytes b(v.size() * sizeof(T));
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

struct Entry {
  std::string key;  // ".npy" is appended
  Bytes data;
  bool deflate = false;
  uint16_t method_override = 0xFFFF;  // to write an unsupported method id
};

Bytes deflate_raw(const Bytes& in) {
  z_stream zs{};
  EXPECT_EQ(deflateInit2(&zs, 6, Z_DEFLATED, -MAX_WBITS, 8, Z_DEFAULT_STRATEGY), Z_OK);
  Bytes out(deflateBound(&zs, static_cast<uLong>(in.size())));
  zs.next_in = const_cast<uint8_t*>(in.data());
  zs.avail_in = static_cast<uInt>(in.size());
  zs.next_out = out.data();
  zs.avail_out = static_cast<uInt>(out.size());
  EXPECT_EQ(deflate(&zs, Z_FINISH), Z_STREAM_END);
  out.resize(zs.total_out);
  deflateEnd(&zs);
  return out;
}

// A zip archive as numpy writes it; `zip64` writes the ZIP64 central directory fields and
// end records that large archives need.
Bytes make_zip(const std::vector<Entry>& entries, bool zip64 = false) {
  Bytes z, cd;
  for (const Entry& e : entries) {
    const std::string name = e.key + ".npy";
    const Bytes body = e.deflate ? deflate_raw(e.data) : e.data;
    const uint16_t method = e.method_override != 0xFFFF ? e.method_override : e.deflate ? 8 : 0;
    const uint32_t crc = static_cast<uint32_t>(crc32(0, e.data.data(), static_cast<uInt>(e.data.size())));
    const uint64_t offset = z.size();
    put32(z, 0x04034b50), put16(z, 20), put16(z, 0), put16(z, method), put32(z, 0), put32(z, crc);
    put32(z, static_cast<uint32_t>(body.size())), put32(z, static_cast<uint32_t>(e.data.size()));
    put16(z, static_cast<uint32_t>(name.size())), put16(z, 0);
    z.insert(z.end(), name.begin(), name.end());
    z.insert(z.end(), body.begin(), body.end());
    put32(cd, 0x02014b50), put16(cd, 45), put16(cd, 45), put16(cd, 0), put16(cd, method), put32(cd, 0), put32(cd, crc);
    put32(cd, zip64 ? 0xFFFFFFFF : static_cast<uint32_t>(body.size()));
    put32(cd, zip64 ? 0xFFFFFFFF : static_cast<uint32_t>(e.data.size()));
    put16(cd, static_cast<uint32_t>(name.size())), put16(cd, zip64 ? 28 : 0), put16(cd, 0), put16(cd, 0), put16(cd, 0);
    put32(cd, 0), put32(cd, zip64 ? 0xFFFFFFFF : static_cast<uint32_t>(offset));
    cd.insert(cd.end(), name.begin(), name.end());
    if (zip64) put16(cd, 1), put16(cd, 24), put64(cd, e.data.size()), put64(cd, body.size()), put64(cd, offset);
  }
  const uint64_t cd_offset = z.size();
  z.insert(z.end(), cd.begin(), cd.end());
  if (zip64) {
    const uint64_t rec = z.size();
    put32(z, 0x06064b50), put64(z, 44), put16(z, 45), put16(z, 45), put32(z, 0), put32(z, 0);
    put64(z, entries.size()), put64(z, entries.size()), put64(z, cd.size()), put64(z, cd_offset);
    put32(z, 0x07064b50), put32(z, 0), put64(z, rec), put32(z, 1);
  }
  put32(z, 0x06054b50), put16(z, 0), put16(z, 0);
  put16(z, zip64 ? 0xFFFF : static_cast<uint32_t>(entries.size()));
  put16(z, zip64 ? 0xFFFF : static_cast<uint32_t>(entries.size()));
  put32(z, zip64 ? 0xFFFFFFFF : static_cast<uint32_t>(cd.size()));
  put32(z, zip64 ? 0xFFFFFFFF : static_cast<uint32_t>(cd_offset));
  put16(z, 0);
  return z;
}

// Deterministic uint8 images [n, h, w(, c)].
Bytes pixels(int64_t n, int h, int w, int c, int seed = 0) {
  Bytes b(static_cast<size_t>(n * h * w * c));
  for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<uint8_t>((i * 37 + seed * 11 + (i / 7) * (i % 5)) % 256);
  return b;
}

const std::string kPneumonia = std::string(LANCET_SOURCE_DIR) + "/tests/data/real/npz/medmnist__pneumoniamnist.npz";

class NpzTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / ("lancet_npz_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string write(const std::string& name, const Bytes& b) {
    const std::string p = (dir_ / name).string();
    std::ofstream(p, std::ios::binary).write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
    return p;
  }
  fs::path dir_;
};

int64_t sum(const NpyArray& a) {
  int64_t s = 0;
  for (uint8_t v : a.data) s += v;
  return s;
}

}  // namespace

TEST(NpzReal, PneumoniaMnist) {
  const NpzFile z = NpzFile::open(kPneumonia);
  EXPECT_EQ(z.keys(), (std::vector<std::string>{"train_images", "val_images", "test_images", "train_labels",
                                                 "val_labels", "test_labels"}));
  EXPECT_EQ(npz_splits(z), (std::vector<std::string>{"train", "val", "test"}));
  // SOURCES.md: |u1 (2428, 28, 28), (270, 28, 28), (468, 28, 28); labels |u1 (N, 1).
  const std::vector<std::pair<std::string, int64_t>> splits = {{"train", 2428}, {"val", 270}, {"test", 468}};
  // Pixel sums as numpy computes them: int(x.astype(np.int64).sum()).
  const std::vector<int64_t> sums = {273679017, 30537618, 52669370};
  int64_t per_class[2] = {0, 0};
  ImageLoadOptions lo;
  lo.image_size = 28, lo.mean = {0.0f}, lo.std = {1.0f};
  for (size_t k = 0; k < splits.size(); ++k) {
    const auto& [name, n] = splits[k];
    const NpyArray x = z.read(name + "_images");
    EXPECT_EQ(x.descr, "|u1");
    EXPECT_EQ(x.shape, (std::vector<int64_t>{n, 28, 28}));
    EXPECT_EQ(sum(x), sums[k]) << name;
    const NpyArray y = z.read(name + "_labels");
    EXPECT_EQ(y.shape, (std::vector<int64_t>{n, 1}));

    auto ds = load_npz_dataset(kPneumonia, name, lo);
    ASSERT_EQ(ds->size(), n);
    EXPECT_EQ(ds->class_names(), (std::vector<std::string>{"0", "1"}));
    EXPECT_EQ(ds->sample_shape(), (Shape{1, 28, 28}));
    int64_t c[2] = {0, 0};
    for (int64_t l : ds->labels()) ++c[l];
    EXPECT_EQ(c[0], c[1]) << name << ": the author's subset is class-balanced in every split";
    per_class[0] += c[0], per_class[1] += c[1];
    // Unresized, mean 0 / std 1: each sample is pixel / 255.
    const float* s0 = ds->images().data<float>();
    for (int i = 0; i < 28 * 28; ++i) ASSERT_EQ(s0[i], static_cast<float>(x.data[static_cast<size_t>(i)]) / 255.0f);
  }
  EXPECT_EQ(per_class[0], 1583);  // README upstream: 1583 normal + 1583 pneumonia
  EXPECT_EQ(per_class[1], 1583);
}

TEST(NpzReal, WrittenByNumpySavezCompressed) {
  const std::string file = std::string(LANCET_SOURCE_DIR) + "/tests/data/npz/numpy_compressed.npz";
  const NpzFile z = NpzFile::open(file);
  const NpyArray x = z.read("train_images");
  ASSERT_EQ(x.shape, (std::vector<int64_t>{5, 6, 7, 3}));
  size_t j = 0;
  for (int i = 0; i < 5; ++i)
    for (int r = 0; r < 6; ++r)
      for (int c = 0; c < 7; ++c)
        for (int k = 0; k < 3; ++k) ASSERT_EQ(x.data[j++], (i * 31 + r * 7 + c * 3 + k) % 256);
  EXPECT_EQ(npy_to_int64(z.read("train_labels"), "l"), (std::vector<int64_t>{0, 1, 2, 0, 1}));
  EXPECT_EQ(z.read("train_labels").descr, "<i2");
  EXPECT_EQ(npy_to_int64(z.read("val_labels"), "l"), (std::vector<int64_t>{0, 1}));
  ImageLoadOptions lo;
  lo.channels = 3, lo.image_size = 8;
  auto ds = load_npz_dataset(file, "val", lo);
  EXPECT_EQ(ds->size(), 2);
  EXPECT_EQ(ds->class_names(), (std::vector<std::string>{"0", "1", "2"}));  // from every split's labels
}

TEST_F(NpzTest, StoredDeflatedZip64AndLabelTypes) {
  const Bytes img = pixels(4, 5, 6, 1);
  const std::vector<std::pair<std::string, Bytes>> labels = {
      {"|i1", raw(std::vector<int8_t>{0, 1, 2, 1})},       {"|u1", raw(std::vector<uint8_t>{0, 1, 2, 1})},
      {"<i2", raw(std::vector<int16_t>{0, 1, 2, 1})},      {"<u2", raw(std::vector<uint16_t>{0, 1, 2, 1})},
      {"<i4", raw(std::vector<int32_t>{0, 1, 2, 1})},      {"<u4", raw(std::vector<uint32_t>{0, 1, 2, 1})},
      {"<i8", raw(std::vector<int64_t>{0, 1, 2, 1})},      {"<u8", raw(std::vector<uint64_t>{0, 1, 2, 1})}};
  ImageLoadOptions lo;
  lo.image_size = 5;
  std::unique_ptr<InMemoryDataset> first;
  int v = 0;
  for (const auto& [descr, lab] : labels)
    for (bool deflate : {false, true})
      for (bool zip64 : {false, true}) {
        const bool column = (v++ % 2) == 0;  // labels (N, 1) and (N,)
        const std::string f = write("a.npz", make_zip({{"train_images", npy("|u1", {4, 5, 6}, img), deflate},
                                                       {"train_labels", npy(descr, column ? std::vector<int64_t>{4, 1} : std::vector<int64_t>{4}, lab), deflate}},
                                                      zip64));
        auto ds = load_npz_dataset(f, "train", lo);
        EXPECT_EQ(ds->labels(), (std::vector<int64_t>{0, 1, 2, 1})) << descr << " deflate " << deflate << " zip64 " << zip64;
        if (!first) first = std::move(ds);
        else EXPECT_EQ(std::memcmp(first->images().data<float>(), ds->images().data<float>(), first->images().nbytes()), 0);
      }
  // Bool labels, and gray images stored as (N, H, W, 1).
  const std::string f = write("b.npz", make_zip({{"train_images", npy("|u1", {4, 5, 6, 1}, img)},
                                                 {"train_labels", npy("|b1", {4}, Bytes{0, 1, 1, 0})}}));
  auto ds = load_npz_dataset(f, "train", lo);
  EXPECT_EQ(ds->labels(), (std::vector<int64_t>{0, 1, 1, 0}));
  EXPECT_EQ(std::memcmp(first->images().data<float>(), ds->images().data<float>(), first->images().nbytes()), 0);
}

// The same pixels as PNG class folders and as an .npz give bit-identical tensors (gray and RGB,
// with a resize).
TEST_F(NpzTest, BitIdenticalToTheSamePixelsFromPngs) {
  for (int c : {1, 3}) {
    const int64_t n = 6;
    const Bytes img = pixels(n, 23, 19, c, c);
    const std::vector<uint8_t> lab = {0, 1, 0, 1, 1, 0};
    const std::vector<int64_t> shape = c == 1 ? std::vector<int64_t>{n, 23, 19} : std::vector<int64_t>{n, 23, 19, 3};
    const std::string f = write("x" + std::to_string(c) + ".npz",
                                make_zip({{"train_images", npy("|u1", shape, img), true},
                                          {"train_labels", npy("|u1", {n, 1}, raw(lab))}}));
    const fs::path folder = dir_ / ("png" + std::to_string(c));
    for (int64_t i = 0; i < n; ++i) {
      cv::Mat m(23, 19, CV_8UC(c), const_cast<uint8_t*>(img.data()) + i * 23 * 19 * c);
      if (c == 3) cv::cvtColor(m, m, cv::COLOR_RGB2BGR);  // imwrite takes BGR
      fs::create_directories(folder / "train" / std::to_string(lab[i]));
      cv::imwrite((folder / "train" / std::to_string(lab[i]) / ("img" + std::to_string(i) + ".png")).string(), m);
    }
    for (int channels : {1, 3}) {
      ImageLoadOptions lo;
      lo.channels = channels, lo.image_size = 11, lo.mean = {0.4f}, lo.std = {0.3f};
      auto a = load_npz_dataset(f, "train", lo);
      auto b = load_image_dataset(folder.string(), "train", lo);
      // The folder loader orders by class, then file name: reorder the npz samples to match.
      std::vector<int64_t> order;
      for (int k = 0; k < 2; ++k)
        for (int64_t i = 0; i < n; ++i)
          if (lab[i] == k) order.push_back(i);
      const int64_t per = channels * 11 * 11;
      for (int64_t j = 0; j < n; ++j)
        EXPECT_EQ(std::memcmp(a->images().data<float>() + order[j] * per, b->images().data<float>() + j * per,
                              per * sizeof(float)),
                  0)
            << "c " << c << " channels " << channels << " sample " << order[j];
    }
  }
}

TEST_F(NpzTest, Errors) {
  const Bytes img = npy("|u1", {2, 3, 3}, pixels(2, 3, 3, 1));
  const Bytes lab = npy("|u1", {2}, Bytes{0, 1});
  ImageLoadOptions lo;
  lo.image_size = 3;
  const std::string good = write("good.npz", make_zip({{"train_images", img, true}, {"train_labels", lab}}));
  expect_error([&] { load_npz_dataset(good, "val", lo); }, {"good.npz", "no split 'val'", "splits present: train"});
  expect_error([&] { NpzFile::open(good).read("test_images"); },
               {"good.npz", "no array 'test_images'", "train_images, train_labels"});
  expect_error([&] { NpzFile::open((dir_ / "missing.npz").string()); }, {"missing.npz", "cannot read"});
  expect_error([&] { NpzFile::open(write("text.npz", Bytes(100, 'x'))); }, {"text.npz", "not a zip archive"});

  // Truncated: cut anywhere (the end records are lost), or keep the directory but drop data.
  Bytes full = make_zip({{"train_images", img, true}, {"train_labels", lab}});
  const std::string cut = write("cut.npz", Bytes(full.begin(), full.begin() + static_cast<long>(full.size() / 2)));
  expect_error([&] { load_npz_dataset(cut, "train", lo); }, {"cut.npz", "truncated"});

  // Corrupt bytes: in a stored member -> CRC mismatch; in a deflated one -> zlib or CRC error.
  Bytes bad_stored = make_zip({{"train_images", img}, {"train_labels", lab}});
  bad_stored[30 + 17 + 128 + 5] ^= 0xFF;  // a pixel of train_images (after header and name)
  expect_error([&] { load_npz_dataset(write("crc.npz", bad_stored), "train", lo); }, {"crc.npz", "train_images.npy", "CRC-32"});
  Bytes bad_deflate = make_zip({{"train_images", img, true}, {"train_labels", lab}});
  for (size_t i = 30 + 17 + 2; i < 30 + 17 + 12; ++i) bad_deflate[i] ^= 0x5A;
  expect_error([&] { load_npz_dataset(write("dfl.npz", bad_deflate), "train", lo); }, {"dfl.npz", "train_images.npy"});

  // Refused arrays and members.
  auto refuse = [&](const std::string& name, const Bytes& images, const std::vector<std::string>& parts) {
    const std::string f = write(name, make_zip({{"train_images", images}, {"train_labels", lab}}));
    expect_error([&] { load_npz_dataset(f, "train", lo); }, parts);
  };
  refuse("be.npz", npy(">u2", {2, 3, 3}, Bytes(36)), {"be.npz", "big-endian", ">u2"});
  refuse("fortran.npz", npy("|u1", {2, 3, 3}, Bytes(18), "True"), {"fortran.npz", "Fortran"});
  refuse("object.npz", npy("|O", {2, 3, 3}, Bytes(18 * 8)), {"object.npz", "object arrays"});
  refuse("complex.npz", npy("<c8", {2, 3, 3}, Bytes(18 * 8)), {"complex.npz", "unsupported dtype", "<c8"});
  refuse("float.npz", npy("<f4", {2, 3, 3}, Bytes(18 * 4)), {"float.npz", "images must be uint8", "<f4"});
  refuse("shape.npz", npy("|u1", {2, 3, 3, 2}, Bytes(36)), {"shape.npz", "(N, H, W)", "(2, 3, 3, 2)"});
  refuse("short.npz", npy("|u1", {2, 3, 3}, Bytes(10)), {"short.npz", "truncated array data"});
  const std::string f = write("method.npz", make_zip({{"train_images", img, false, 12}, {"train_labels", lab}}));
  expect_error([&] { load_npz_dataset(f, "train", lo); }, {"method.npz", "compression method 12"});
  auto labels = [&](const std::string& name, const Bytes& l, const std::vector<std::string>& parts) {
    const std::string p = write(name, make_zip({{"train_images", img}, {"train_labels", l}}));
    expect_error([&] { load_npz_dataset(p, "train", lo); }, parts);
  };
  labels("multi.npz", npy("|u1", {2, 14}, Bytes(28)), {"multi.npz", "(2, 14)", "multi-label"});
  labels("count.npz", npy("|u1", {3}, Bytes{0, 1, 0}), {"count.npz", "2 images but 3 labels"});
  labels("neg.npz", npy("|i1", {2}, Bytes{0, 0xFF}), {"neg.npz", "label -1", "negative"});
  labels("flt.npz", npy("<f4", {2}, Bytes(8)), {"flt.npz", "integer array", "<f4"});
}

// Class indices without a sample in any split (labels {0, 5}; or {1, 2}, no 0) are refused as a
// manifest's integer labels are: those outputs would never train. Declared, they are wanted.
TEST_F(NpzTest, LabelGapsAreRefusedUnlessDeclared) {
  const Bytes img = npy("|u1", {2, 3, 3}, pixels(2, 3, 3, 1));
  ImageLoadOptions lo;
  lo.image_size = 3;
  // A gap in train is filled by val: the class list is every split's.
  const std::string filled = write("filled.npz", make_zip({{"train_images", img},
                                                           {"train_labels", npy("|u1", {2}, Bytes{0, 2})},
                                                           {"val_images", img},
                                                           {"val_labels", npy("|u1", {2}, Bytes{1, 0})}}));
  EXPECT_EQ(load_npz_dataset(filled, "train", lo)->class_names(), (std::vector<std::string>{"0", "1", "2"}));
  const std::string gap = write("gap.npz", make_zip({{"train_images", img},
                                                     {"train_labels", npy("|u1", {2}, Bytes{0, 5})},
                                                     {"val_images", img},
                                                     {"val_labels", npy("|u1", {2}, Bytes{5, 0})}}));
  for (const char* split : {"train", "val"}) {
    expect_error([&] { load_npz_dataset(gap, split, lo); },
                 {"gap.npz", "class indices 0-5", "4 of them have no sample in any split (1, 2, 3, 4)", "data.classes"});
    expect_error([&] { load_cached_dataset(gap, split, lo); }, {"gap.npz", "(1, 2, 3, 4)"});
  }
  const std::string no_zero =
      write("nozero.npz", make_zip({{"train_images", img}, {"train_labels", npy("|u1", {2}, Bytes{1, 2})}}));
  expect_error([&] { load_npz_dataset(no_zero, "train", lo); }, {"nozero.npz", "1 of them have no sample", "(0)"});
  lo.classes = {"c0", "c1", "c2", "c3", "c4", "c5"};
  const auto ds = load_npz_dataset(gap, "train", lo);
  EXPECT_EQ(ds->class_names(), lo.classes);
  EXPECT_EQ(ds->labels(), (std::vector<int64_t>{0, 5}));
}
