// data/: the synthetic chest X-ray generator, the image-folder loader (manifest and folder
// layouts, errors; a byte-order mark, other split names, rows naming folders or DICOMs without
// .dcm), the class list (integer labels with gaps refused, data.classes: order,
// labels and class folders outside it), the written-PNG == in-memory contract, JPEG and 16-bit PNG decoding
// against OpenCV, truncated JPEGs and unsupported depths, make_batch, and real images.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <numeric>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/dicom.h"
#include "tests/expect_error.h"
#include "data/image_dataset.h"
#include "data/image_folder.h"
#include "data/synth.h"
#include "kernels/parallel.h"
#include "trainer/config.h"

namespace fs = std::filesystem;
using namespace lancet;
using lancet::testing::expect_error;

namespace {

class DataTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / ("lancet_data_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& rel) const { return (dir_ / rel).string(); }
  // A small synthetic dataset on disk to take PNG files from.
  std::string synth_folder(int64_t train = 6, int64_t val = 4, int size = 32) {
    SynthOptions o;
    o.train = train, o.val = val, o.image_size = size, o.seed = 99;
    write_synthetic_cxr(path("synth"), o);
    return path("synth");
  }
  void write_text(const std::string& rel, const std::string& text) {
    fs::create_directories(fs::path(path(rel)).parent_path());
    std::ofstream(path(rel), std::ios::binary) << text;
  }
  void copy(const std::string& from, const std::string& rel) {
    fs::create_directories(fs::path(path(rel)).parent_path());
    fs::copy_file(from, path(rel), fs::copy_options::overwrite_existing);
  }
  fs::path dir_;
};


bool same_tensor(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw_data(), b.raw_data(), a.nbytes()) == 0;
}

double mean_of(const std::vector<uint8_t>& v) { return std::accumulate(v.begin(), v.end(), 0.0) / v.size(); }

}  // namespace

// ---- synthetic data ------------------------------------------------------------------

TEST(Synth, DeterministicFromSeedAndIndex) {
  EXPECT_EQ(synth_cxr_image(64, 1, 7, 3), synth_cxr_image(64, 1, 7, 3));
  EXPECT_NE(synth_cxr_image(64, 1, 7, 3), synth_cxr_image(64, 1, 7, 4));
  EXPECT_NE(synth_cxr_image(64, 1, 7, 3), synth_cxr_image(64, 1, 8, 3));
  // The two labels of one (seed, index) share the anatomy: they differ, but only locally.
  const auto n = synth_cxr_image(64, 0, 7, 3), p = synth_cxr_image(64, 1, 7, 3);
  int big = 0;
  for (size_t i = 0; i < n.size(); ++i) big += std::abs(int(p[i]) - int(n[i])) > 12;
  EXPECT_GT(big, 4) << "no visible opacity";
  EXPECT_LT(big, static_cast<int>(n.size()) / 4) << "the opacity changed most of the image";

  // Parallel generation gives the same tensors as serial generation.
  SynthOptions o;
  o.train = 12, o.val = 3, o.image_size = 48;
  ImageLoadOptions lo;
  lo.image_size = 32;
  const int threads = num_threads();
  set_num_threads(1);
  const auto serial = make_synthetic_cxr(o, "train", lo);
  set_num_threads(std::max(2, threads));
  const auto parallel = make_synthetic_cxr(o, "train", lo);
  set_num_threads(threads);
  EXPECT_TRUE(same_tensor(serial->images(), parallel->images()));
  EXPECT_EQ(serial->labels(), parallel->labels());
  EXPECT_FALSE(same_tensor(serial->images().narrow(0, 3), make_synthetic_cxr(o, "val", lo)->images()))
      << "train and val must be different images";
}

TEST(Synth, ExactClassBalance) {
  for (double f : {0.0, 0.3, 0.5, 0.77, 1.0}) {
    for (int64_t n : {1, 10, 101, 1000}) {
      SynthOptions o;
      o.positive_fraction = f;
      int64_t pos = 0;
      for (int64_t i = 0; i < n; ++i) pos += synth_label(o, i);
      EXPECT_EQ(pos, static_cast<int64_t>(std::ceil(n * f - 0.5))) << "f=" << f << " n=" << n;
    }
  }
  SynthOptions o;
  o.train = 20, o.val = 0, o.image_size = 16;
  const auto ds = make_synthetic_cxr(o, "train", ImageLoadOptions{});
  EXPECT_EQ(std::count(ds->labels().begin(), ds->labels().end(), 1), 10);
  EXPECT_EQ(ds->class_names(), (std::vector<std::string>{"normal", "opacity"}));
  EXPECT_EQ(ds->sample_shape(), (Shape{1, 64, 64}));
}

TEST(Synth, MeanBrightnessDoesNotGiveTheClassAway) {
  const int n = 300;
  std::vector<double> m[2];
  for (int i = 0; i < n; ++i) {
    const int label = i % 2;
    m[label].push_back(mean_of(synth_cxr_image(64, label, 5, i)));
  }
  auto mean = [](const std::vector<double>& v) { return std::accumulate(v.begin(), v.end(), 0.0) / v.size(); };
  auto sd = [&](const std::vector<double>& v) {
    const double mu = mean(v);
    double s = 0;
    for (double x : v) s += (x - mu) * (x - mu);
    return std::sqrt(s / (v.size() - 1));
  };
  const double spread = std::sqrt(0.5 * (sd(m[0]) * sd(m[0]) + sd(m[1]) * sd(m[1])));
  EXPECT_GT(spread, 5.0) << "brightness should vary between images";
  EXPECT_LT(std::abs(mean(m[1]) - mean(m[0])), 0.2 * spread) << "class means differ by more than 0.2 sd";
  // The best single threshold on the mean intensity is close to chance.
  std::vector<std::pair<double, int>> all;
  for (int c = 0; c < 2; ++c)
    for (double x : m[c]) all.push_back({x, c});
  std::sort(all.begin(), all.end());
  int best = 0, below1 = 0;
  for (size_t k = 0; k < all.size(); ++k) {
    below1 += all[k].second;
    const int below0 = static_cast<int>(k + 1) - below1;
    const int acc = below0 + (n / 2 - below1);  // class 0 below the threshold, class 1 above
    best = std::max({best, acc, n - acc});
  }
  EXPECT_LT(best, static_cast<int>(0.62 * n)) << "mean brightness separates the classes";
}

TEST_F(DataTest, WrittenFolderLoadsToTheInMemoryTensors) {
  SynthOptions o;
  o.train = 14, o.val = 6, o.image_size = 96, o.seed = 42;
  const std::string d = path("cxr");
  write_synthetic_cxr(d, o);
  EXPECT_TRUE(fs::exists(d + "/train/normal/0.png"));
  EXPECT_TRUE(fs::exists(d + "/train/opacity/1.png"));
  EXPECT_TRUE(fs::exists(d + "/val/opacity/5.png"));
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir_)) names.push_back(e.path().filename().string());
  EXPECT_EQ(names, std::vector<std::string>{"cxr"}) << "temporary folder left behind";
  std::ifstream m(d + "/manifest.csv");
  std::string header;
  std::getline(m, header);
  EXPECT_EQ(header, "path,label,split");

  ImageLoadOptions gray;  // 96 -> 64: the resize-on-load path
  ImageLoadOptions rgb;
  rgb.channels = 3, rgb.image_size = 40, rgb.mean = {0.4f, 0.5f, 0.6f}, rgb.std = {0.2f, 0.25f, 0.3f};
  for (const auto& lo : {gray, rgb}) {
    for (const char* split : {"train", "val"}) {
      const auto disk = load_image_dataset(d, split, lo);
      const auto mem = make_synthetic_cxr(o, split, lo);
      EXPECT_TRUE(same_tensor(disk->images(), mem->images())) << split << " channels=" << lo.channels;
      EXPECT_EQ(disk->labels(), mem->labels());
      EXPECT_EQ(disk->class_names(), mem->class_names());
    }
  }
  EXPECT_EQ(load_image_dataset(d, "", gray)->size(), 20);

  expect_error([&] { write_synthetic_cxr(d, o); }, {d, "not empty"});
  o.train = 4, o.val = 2;
  write_synthetic_cxr(d, o, /*overwrite=*/true);
  EXPECT_EQ(load_image_dataset(d, "train", gray)->size(), 4);
  EXPECT_FALSE(fs::exists(d + "/train/normal/6.png")) << "the old dataset was not replaced";
}

// ---- loader layouts and errors ----------------------------------------------------------

TEST_F(DataTest, ManifestLayout) {
  const std::string s = synth_folder();
  // Class names, split column in another position, quoted path, an extra column; the
  // class list comes from all rows, so "val" (only class "b") still has classes {a, b, c}.
  write_text("m/manifest.csv",
             "split,path,note,label\n"
             "train,\"img/x, 1.png\",first,c\n"
             "train,img/y.png,,a\n"
             "val,img/z.png,,b\n"
             "\n"
             "train,img/w.png,,a\r\n");
  copy(s + "/train/normal/0.png", "m/img/x, 1.png");
  copy(s + "/train/opacity/1.png", "m/img/y.png");
  copy(s + "/val/normal/0.png", "m/img/z.png");
  copy(s + "/train/normal/2.png", "m/img/w.png");
  ImageLoadOptions lo;
  lo.image_size = 16;
  const auto train = load_image_dataset(path("m"), "train", lo);
  EXPECT_EQ(train->class_names(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(train->labels(), (std::vector<int64_t>{2, 0, 0}));
  const auto val = load_image_dataset(path("m"), "val", lo);
  EXPECT_EQ(val->class_names(), train->class_names());
  EXPECT_EQ(val->labels(), std::vector<int64_t>{1});
  EXPECT_EQ(load_image_dataset(path("m"), "", lo)->size(), 4);
  expect_error([&] { load_image_dataset(path("m"), "test", lo); }, {"manifest.csv", "no rows", "test"});

  // Integer labels are class indices; no split column.
  write_text("n/manifest.csv", "path,label\n" + s + "/train/normal/0.png,1\n" + s + "/val/normal/0.png,0\n");
  const auto n = load_image_dataset(path("n"), "", lo);
  EXPECT_EQ(n->labels(), (std::vector<int64_t>{1, 0}));
  EXPECT_EQ(n->class_names(), (std::vector<std::string>{"0", "1"}));
  expect_error([&] { load_image_dataset(path("n"), "train", lo); }, {"manifest.csv", "no split column"});

  write_text("bad/manifest.csv", "file,class\na.png,x\n");
  expect_error([&] { load_image_dataset(path("bad"), "", lo); }, {"manifest.csv", "path,label"});
  write_text("missing/manifest.csv", "path,label\nnot_there.png,x\n");
  expect_error([&] { load_image_dataset(path("missing"), "", lo); }, {path("missing/not_there.png")});
}

TEST_F(DataTest, ClassFolderLayouts) {
  const std::string s = synth_folder();
  // <dir>/<class>/...: classes sorted, files in name order; non-image files ignored.
  copy(s + "/train/opacity/1.png", "f/sick/b.PNG");
  copy(s + "/train/opacity/3.png", "f/sick/a.png");
  copy(s + "/train/normal/0.png", "f/healthy/z.png");
  write_text("f/healthy/readme.txt", "not an image");
  ImageLoadOptions lo;
  lo.image_size = 20;
  const auto ds = load_image_dataset(path("f"), "", lo);
  EXPECT_EQ(ds->class_names(), (std::vector<std::string>{"healthy", "sick"}));
  EXPECT_EQ(ds->labels(), (std::vector<int64_t>{0, 1, 1}));
  const auto direct = make_synthetic_cxr([] {
    SynthOptions o;
    o.train = 6, o.val = 4, o.image_size = 32, o.seed = 99;
    return o;
  }(), "train", lo);
  std::vector<float> a(20 * 20), b(20 * 20);
  ds->get(1, a.data());  // sick/a.png = train image 3
  direct->get(3, b.data());
  EXPECT_EQ(a, b);

  // With a split: <dir>/<split>/<class>/... (the synthetic folder minus its manifest).
  fs::remove(s + "/manifest.csv");
  const auto val = load_image_dataset(s, "val", lo);
  EXPECT_EQ(val->size(), 4);
  EXPECT_EQ(val->class_names(), (std::vector<std::string>{"normal", "opacity"}));
  expect_error([&] { load_image_dataset(s, "test", lo); }, {s, "test"});
  expect_error([&] { load_image_dataset(path("nowhere"), "", lo); }, {path("nowhere"), "no such directory"});
  // Read without a split, the split folders would be classes without images: the error says so.
  expect_error([&] { load_image_dataset(s, "", lo); },
               {s + "/train", "no images, only the sub-folders [normal, opacity]", "if 'train' is a split of", "--split"});
}

// ---- the class list: inferred or declared (data.classes) ----------------------------------

TEST_F(DataTest, IntegerLabelsWithGapsAreRefusedNamingTheMissingClasses) {
  const std::string s = synth_folder();
  const std::string a = s + "/train/normal/0.png", b = s + "/train/opacity/1.png";
  ImageLoadOptions lo;
  lo.image_size = 16;
  // Labels {0, 5}: classes 1-4 would be model outputs that never see an image.
  write_text("g/manifest.csv", "path,label,split\n" + a + ",0,train\n" + b + ",5,train\n" + a + ",0,val\n");
  for (const char* split : {"train", "val"})  // the class list is the whole manifest's
    expect_error([&] { load_image_dataset(path("g"), split, lo); },
                 {path("g/manifest.csv"), "class indices 0-5", "4 of them have no row (1, 2, 3, 4)", "data.classes"});
  expect_error([&] { load_cached_dataset(path("g"), "train", lo, BadSample::skip); }, {"(1, 2, 3, 4)"});
  // A huge index is refused the same way, without a class list of that size.
  write_text("h/manifest.csv", "path,label\n" + a + ",0\n" + b + ",999999999\n");
  expect_error([&] { load_image_dataset(path("h"), "", lo); },
               {"999999998 of them have no row (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ...)"});
  // Declared, the empty classes are wanted: six outputs, labels as written.
  lo.classes = {"c0", "c1", "c2", "c3", "c4", "c5"};
  const auto ds = load_image_dataset(path("g"), "train", lo);
  EXPECT_EQ(ds->class_names(), lo.classes);
  EXPECT_EQ(ds->labels(), (std::vector<int64_t>{0, 5}));
}

TEST_F(DataTest, DeclaredClassesOrderAndCheckManifestLabels) {
  const std::string s = synth_folder();
  const std::string a = s + "/train/normal/0.png", b = s + "/train/opacity/1.png";
  write_text("m/manifest.csv", "path,label,split\n" + a + ",normal,train\n" + b + ",pneumonia,train\n" + a +
                                   ",normal,val\n");
  ImageLoadOptions lo;
  lo.image_size = 16;
  const auto inferred = load_image_dataset(path("m"), "train", lo);
  EXPECT_EQ(inferred->class_names(), (std::vector<std::string>{"normal", "pneumonia"}));
  // The declared order decides the indices; the pixels are the same.
  lo.classes = {"pneumonia", "normal", "covid"};  // covid: declared, no images (allowed)
  const auto declared = load_image_dataset(path("m"), "train", lo);
  EXPECT_EQ(declared->class_names(), lo.classes);
  EXPECT_EQ(declared->labels(), (std::vector<int64_t>{1, 0}));
  EXPECT_TRUE(same_tensor(declared->images(), inferred->images()));
  const auto cached = load_cached_dataset(path("m"), "train", lo);
  EXPECT_EQ(cached->class_names(), lo.classes);
  EXPECT_EQ(cached->labels(), declared->labels());
  std::vector<std::string> classes;
  EXPECT_EQ(list_images(path("m"), "val", &classes, lo.classes).front().label, 1);
  EXPECT_EQ(classes, lo.classes);

  // A typo is not a new class: the manifest line and the class list are named, whatever the
  // split asked for (and in the cached loader with skip too: it is not one bad sample).
  write_text("t/manifest.csv", "path,label,split\n" + a + ",normal,train\n" + b + ",pneumonai,val\n");
  lo.classes = {"normal", "pneumonia"};
  for (const char* split : {"train", "val"})
    expect_error([&] { load_image_dataset(path("t"), split, lo); },
                 {path("t/manifest.csv") + ":3: label 'pneumonai' is not one of the classes [normal, pneumonia]"});
  expect_error([&] { load_cached_dataset(path("t"), "train", lo, BadSample::skip); }, {"t/manifest.csv:3", "pneumonai"});
  lo.classes.clear();  // inferred, the typo is a class of its own, as before
  EXPECT_EQ(load_image_dataset(path("t"), "train", lo)->class_names(), (std::vector<std::string>{"normal", "pneumonai"}));

  // Integer labels under declared names are indices below their count.
  write_text("i/manifest.csv", "path,label\n" + a + ",0\n" + b + ",1\n");
  lo.classes = {"normal", "pneumonia"};
  const auto idx = load_image_dataset(path("i"), "", lo);
  EXPECT_EQ(idx->class_names(), lo.classes);
  EXPECT_EQ(idx->labels(), (std::vector<int64_t>{0, 1}));
  write_text("i/manifest.csv", "path,label\n" + a + ",0\n" + b + ",1\n" + a + ",2\n");
  expect_error([&] { load_image_dataset(path("i"), "", lo); },
               {path("i/manifest.csv") + ":4: label '2' is not one of the classes [normal, pneumonia]",
                "class indices 0-1"});
  // Names that are digits match as names first: "1" is the class named "1", index 0.
  lo.classes = {"1", "0"};
  write_text("i/manifest.csv", "path,label\n" + a + ",0\n" + b + ",1\n");
  EXPECT_EQ(load_image_dataset(path("i"), "", lo)->labels(), (std::vector<int64_t>{1, 0}));

  // A declared list with an empty or repeated name is refused.
  lo.classes = {"a", "a"};
  expect_error([&] { load_image_dataset(path("i"), "", lo); }, {"data.classes [a, a]", "more than once"});
  lo.classes = {"a", ""};
  expect_error([&] { load_image_dataset(path("i"), "", lo); }, {"data.classes", "empty class name"});
}

TEST_F(DataTest, DeclaredClassesCheckClassFolders) {
  const std::string s = synth_folder();
  copy(s + "/train/opacity/1.png", "f/sick/a.png");
  copy(s + "/train/normal/0.png", "f/healthy/z.png");
  copy(s + "/train/normal/2.png", "f/healthy/y.png");
  ImageLoadOptions lo;
  lo.image_size = 16;
  const auto inferred = load_image_dataset(path("f"), "", lo);  // healthy y, z; sick a
  lo.classes = {"sick", "healthy", "unseen"};
  const auto declared = load_image_dataset(path("f"), "", lo);  // sick a; healthy y, z
  EXPECT_EQ(declared->class_names(), lo.classes);
  EXPECT_EQ(declared->labels(), (std::vector<int64_t>{0, 1, 1}));
  const int64_t per = 16 * 16;
  EXPECT_EQ(std::memcmp(declared->images().data<float>(), inferred->images().data<float>() + 2 * per,
                        per * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(declared->images().data<float>() + per, inferred->images().data<float>(),
                        2 * per * sizeof(float)), 0);
  EXPECT_EQ(load_cached_dataset(path("f"), "", lo)->labels(), declared->labels());

  lo.classes = {"sick"};
  expect_error([&] { load_image_dataset(path("f"), "", lo); },
               {path("f") + ": class folder 'healthy' is not one of data.classes [sick]"});
  // With a split: the split's folder is named.
  fs::remove(s + "/manifest.csv");
  lo.classes = {"normal"};
  expect_error([&] { load_cached_dataset(s, "val", lo, BadSample::skip); },
               {s + "/val: class folder 'opacity' is not one of data.classes [normal]"});
  // An existing class folder without images is still refused, declared or not.
  fs::create_directories(path("f/unseen"));
  lo.classes = {"sick", "healthy", "unseen"};
  expect_error([&] { load_image_dataset(path("f"), "", lo); }, {path("f/unseen"), "empty class folder"});
}

TEST_F(DataTest, DataClassesConfigKey) {
  Json c = default_config();
  EXPECT_TRUE(data_config(c).classes.empty());
  apply_override(c, "data.classes=[normal, pneumonia]");
  EXPECT_EQ(data_config(c).classes, (std::vector<std::string>{"normal", "pneumonia"}));
  apply_override(c, "data.classes=[0, 1]");  // YAML numbers: their decimal names
  EXPECT_EQ(data_config(c).classes, (std::vector<std::string>{"0", "1"}));
  apply_override(c, "data.classes=[a, a]");
  expect_error([&] { data_config(c); }, {"data.classes", "'a' twice"});
  apply_override(c, "data.classes=[a, 1.5]");
  expect_error([&] { data_config(c); }, {"data.classes must be a list of class names"});
  apply_override(c, "data.classes=[a, '']");
  expect_error([&] { data_config(c); }, {"data.classes[1]", "empty"});
}

// YAML needs a space after a colon: --set 'data.preprocess=[{op:clahe}]' is one key "op:clahe"
// with no value, and the error says so.
TEST_F(DataTest, PreprocessOpWrittenWithoutTheSpaceYamlNeedsSaysSo) {
  Json c = default_config();
  apply_override(c, "data.preprocess=[{op:clahe}]");
  expect_error([&] { data_config(c); },
               {"data.preprocess[0].op: missing", "YAML reads 'op:clahe' as one key", "space after the colon"});
  apply_override(c, "data.preprocess=[{op: clahe, clip_limit:2.0}]");
  expect_error([&] { data_config(c); }, {"clip_limit:2.0: unknown key for clahe", "YAML reads 'clip_limit:2.0'"});
  apply_override(c, "data.preprocess=[{op: clahe, clip_limit: 2.0}]");
  EXPECT_NO_THROW(data_config(c));
}

TEST_F(DataTest, BadFilesAreNamed) {
  const std::string s = synth_folder();
  ImageLoadOptions lo;
  copy(s + "/train/normal/0.png", "e/a/0.png");
  fs::create_directories(path("e/b"));
  expect_error([&] { load_image_dataset(path("e"), "", lo); }, {path("e/b"), "empty class folder"});

  copy(s + "/train/normal/0.png", "c/a/0.png");
  copy(s + "/train/normal/2.png", "c/a/1.png");
  write_text("c/b/broken.png", std::string("\x89PNG\r\n\x1a\n", 8) + "garbage that is not a PNG stream");
  expect_error([&] { load_image_dataset(path("c"), "", lo); }, {path("c/b/broken.png"), "cannot decode"});
  fs::remove(path("c/b/broken.png"));
  write_text("c/b/empty.jpg", "");
  expect_error([&] { load_image_dataset(path("c"), "", lo); }, {path("c/b/empty.jpg"), "empty file"});

  lo.channels = 2;
  expect_error([&] { load_image_dataset(s, "train", lo); }, {"channels"});
  lo.channels = 3, lo.mean = {0.1f, 0.2f};
  expect_error([&] { load_image_dataset(s, "train", lo); }, {"mean"});
}

// A manifest row naming a folder, and a DICOM file named without .dcm (exported series often
// are: IM0001, or UIDs), are refused saying so rather than "cannot read" or "cannot decode".
TEST_F(DataTest, ManifestRowsNamingFoldersOrUnnamedDicomsSaySo) {
  const std::string s = synth_folder();
  ImageLoadOptions lo;
  lo.image_size = 16;
  fs::create_directories(path("m/scans/x.png"));
  fs::create_directories(path("m/scans/y.dcm"));
  copy(std::string(LANCET_SOURCE_DIR) + "/tests/data/real/dicom/pydicom__CT_small.dcm", "m/scans/1.2.840.113619.2.55");
  for (const std::string rel : {"scans/x.png", "scans/y.dcm", "scans"}) {
    write_text("m/manifest.csv", "path,label\n" + s + "/train/normal/0.png,a\n" + rel + ",b\n");
    expect_error([&] { load_image_dataset(path("m"), "", lo); }, {path("m/" + rel), "a directory, not"});
    // --on-bad-sample skip lists it as any other bad file.
    const auto cached = load_cached_dataset(path("m"), "", lo, BadSample::skip);
    EXPECT_EQ(cached->size(), 1);
    ASSERT_EQ(cached->skipped().size(), 1u);
    EXPECT_NE(cached->skipped()[0].find(path("m/" + rel) + ": a directory"), std::string::npos) << cached->skipped()[0];
  }
  write_text("m/manifest.csv", "path,label\n" + s + "/train/normal/0.png,a\nscans/1.2.840.113619.2.55,b\n");
  expect_error([&] { load_image_dataset(path("m"), "", lo); },
               {path("m/scans/1.2.840.113619.2.55"), "a DICOM file without the .dcm or .dicom extension"});
}

// Manifests as spreadsheets write them: a UTF-8 byte-order mark before the header (Excel's
// "CSV UTF-8"); split names other than train/val are listed when the configured one has no
// rows; a manifest without a split column says how to select its rows.
TEST_F(DataTest, ManifestWithByteOrderMarkAndOtherSplitNames) {
  const std::string s = synth_folder();
  const std::string a = s + "/train/normal/0.png", b = s + "/train/opacity/1.png";
  ImageLoadOptions lo;
  lo.image_size = 16;
  write_text("m/manifest.csv", "\xEF\xBB\xBFpath,label,split\r\n" + a + ",normal,Training\r\n" + b +
                                   ",opacity,Training\r\n" + a + ",normal,Validation\r\n");
  const auto train = load_image_dataset(path("m"), "Training", lo);
  EXPECT_EQ(train->labels(), (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(train->class_names(), (std::vector<std::string>{"normal", "opacity"}));
  EXPECT_EQ(manifest_splits(path("m")), (std::vector<std::string>{"Training", "Validation"}));
  expect_error([&] { load_image_dataset(path("m"), "train", lo); },
               {path("m/manifest.csv"), "no rows with split 'train'", "its split column has [Training, Validation]"});
  // Quoted header names after the mark too.
  write_text("q/manifest.csv", "\xEF\xBB\xBF\"path\",\"label\"\n\"" + a + "\",\"x\"\n");
  EXPECT_EQ(load_image_dataset(path("q"), "", lo)->size(), 1);
  EXPECT_TRUE(manifest_splits(path("q")).empty());
  expect_error([&] { load_image_dataset(path("q"), "train", lo); },
               {path("q/manifest.csv"), "no split column", "add a split column (path,label,split)",
                "empty split name"});
}

namespace {
// A 48x64 colour test card: gradients and a few edges, so that any lost rows show.
cv::Mat test_card(int depth) {
  cv::Mat m(48, 64, CV_MAKETYPE(depth, 3));
  const double top = depth == CV_16U ? 65535 : 255;
  for (int y = 0; y < m.rows; ++y)
    for (int x = 0; x < m.cols; ++x)
      for (int c = 0; c < 3; ++c) {
        const double v = ((x * (c + 1) + y * (3 - c)) % 97) / 96.0 * top;
        if (depth == CV_16U) m.at<cv::Vec3w>(y, x)[c] = static_cast<uint16_t>(v);
        else m.at<cv::Vec3b>(y, x)[c] = static_cast<uint8_t>(v);
      }
  return m;
}
std::vector<uint8_t> encode(const cv::Mat& m, const std::string& ext, std::vector<int> params = {}) {
  std::vector<uint8_t> out;
  EXPECT_TRUE(cv::imencode(ext, m, out, params)) << ext;
  return out;
}
void write_bytes(const std::string& file, const std::vector<uint8_t>& b) {
  fs::create_directories(fs::path(file).parent_path());
  std::ofstream(file, std::ios::binary)
      .write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}
bool write_image(const std::string& file, const cv::Mat& m) {
  fs::create_directories(fs::path(file).parent_path());
  return cv::imwrite(file, m);
}
// Sample i of `ds` de-normalised (mean 0, std 1: the floats are v / 255) back to 8-bit values.
std::vector<int> sample_values(const InMemoryDataset& ds, int64_t i) {
  const int64_t per = shape_numel(ds.sample_shape());
  std::vector<int> out(static_cast<size_t>(per));
  const float* x = ds.images().data<float>() + i * per;
  for (int64_t k = 0; k < per; ++k) out[static_cast<size_t>(k)] = static_cast<int>(std::lround(x[k] * 255.0f));
  return out;
}
// An 8-bit image (gray or RGB order) as the CHW values the loader gives at its own size.
std::vector<int> chw_values(const cv::Mat& m) {
  std::vector<int> out;
  for (int c = 0; c < m.channels(); ++c)
    for (int y = 0; y < m.rows; ++y)
      for (int x = 0; x < m.cols; ++x) out.push_back(m.ptr<uint8_t>(y)[x * m.channels() + c]);
  return out;
}
ImageLoadOptions raw_options(int channels, int size) {  // mean 0, std 1: floats = v / 255
  ImageLoadOptions lo;
  lo.channels = channels, lo.image_size = size, lo.mean = {0.0f}, lo.std = {1.0f};
  return lo;
}
}  // namespace

TEST_F(DataTest, TruncatedJpegIsRefusedNamingTheFileOrSkipped) {
  const cv::Mat card = test_card(CV_8U);
  const std::vector<uint8_t> jpg = encode(card, ".jpg", {cv::IMWRITE_JPEG_QUALITY, 90});
  ASSERT_GT(jpg.size(), 100u);
  ASSERT_EQ(jpg[jpg.size() - 2], 0xFF);
  ASSERT_EQ(jpg.back(), 0xD9);
  write_bytes(path("t/a/whole.jpg"), jpg);
  // Trailing zero padding after the end-of-image marker is fine.
  std::vector<uint8_t> padded = jpg;
  padded.insert(padded.end(), 64, 0);
  write_bytes(path("t/a/padded.jpg"), padded);
  const ImageLoadOptions lo = raw_options(3, 64);
  ASSERT_EQ(load_image_dataset(path("t"), "", lo)->size(), 2);
  // Cut at 40%, just before the marker, and cut then padded with zeros (a partly written file).
  std::vector<uint8_t> cut40(jpg.begin(), jpg.begin() + static_cast<std::ptrdiff_t>(jpg.size() * 4 / 10));
  std::vector<uint8_t> no_eoi(jpg.begin(), jpg.end() - 2);
  std::vector<uint8_t> cut_padded = cut40;
  cut_padded.insert(cut_padded.end(), 4096, 0);
  ASSERT_FALSE(cv::imdecode(cut40, cv::IMREAD_COLOR).empty()) << "OpenCV decodes a truncated JPEG without an error";
  for (const auto& [name, bytes] : std::vector<std::pair<std::string, std::vector<uint8_t>>>{
           {"cut40.jpg", cut40}, {"no_eoi.jpg", no_eoi}, {"cut_padded.jpg", cut_padded}}) {
    const std::string file = path("t/b/" + name);
    write_bytes(file, bytes);
    expect_error([&] { load_image_dataset(path("t"), "", lo); }, {file, "truncated JPEG (no end-of-image marker)"});
    expect_error([&] { decode_image_file(file, lo); }, {file, "truncated JPEG"});
    fs::remove(file);
  }
  // A thumbnail's own end-of-image marker inside an APP1 segment does not count: a JPEG that
  // carries one and is cut after it is still truncated.
  const std::vector<uint8_t> thumb = encode(card(cv::Rect(0, 0, 8, 8)).clone(), ".jpg");
  std::vector<uint8_t> exif = {0xFF, 0xD8, 0xFF, 0xE1};
  const size_t app1 = 2 + 6 + thumb.size();
  exif.push_back(static_cast<uint8_t>(app1 >> 8)), exif.push_back(static_cast<uint8_t>(app1 & 0xFF));
  exif.insert(exif.end(), {'E', 'x', 'i', 'f', 0, 0});
  exif.insert(exif.end(), thumb.begin(), thumb.end());
  exif.insert(exif.end(), jpg.begin() + 2, jpg.end());
  write_bytes(path("t/a/exif.jpg"), exif);
  EXPECT_EQ(decode_image_file(path("t/a/exif.jpg"), lo).pixels, decode_image_file(path("t/a/whole.jpg"), lo).pixels);
  exif.resize(exif.size() - jpg.size() / 2);
  write_bytes(path("t/a/exif.jpg"), exif);
  expect_error([&] { decode_image_file(path("t/a/exif.jpg"), lo); }, {path("t/a/exif.jpg"), "truncated JPEG"});
  fs::remove(path("t/a/exif.jpg"));
  // The real fundus photo cut to 40% of its bytes.
  const std::string fundus =
      std::string(LANCET_SOURCE_DIR) + "/tests/data/real/png_jpeg/napari__fundus_normal_right_eye_600px.jpg";
  if (fs::exists(fundus)) {
    std::ifstream in(fundus, std::ios::binary);
    std::vector<uint8_t> b((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    EXPECT_NO_THROW(decode_image_file(fundus, lo));
    b.resize(b.size() * 4 / 10);
    write_bytes(path("t/b/fundus.jpg"), b);
    expect_error([&] { load_image_dataset(path("t"), "", lo); }, {path("t/b/fundus.jpg"), "truncated JPEG"});
    // --on-bad-sample skip leaves it out and lists it, like any other bad file.
    const auto cached = load_cached_dataset(path("t"), "", lo, BadSample::skip);
    EXPECT_EQ(cached->size(), 2);
    ASSERT_EQ(cached->skipped().size(), 1u);
    EXPECT_NE(cached->skipped()[0].find(path("t/b/fundus.jpg") + ": truncated JPEG"), std::string::npos)
        << cached->skipped()[0];
  }
  // A truncated PNG is refused by libpng already (missing IDAT data or IEND).
  const std::vector<uint8_t> png = encode(card, ".png");
  write_bytes(path("p/a/cut.png"),
              std::vector<uint8_t>(png.begin(), png.begin() + static_cast<std::ptrdiff_t>(png.size() * 4 / 10)));
  expect_error([&] { load_image_dataset(path("p"), "", lo); }, {path("p/a/cut.png"), "cannot decode"});
  write_bytes(path("p/a/cut.png"), std::vector<uint8_t>(png.begin(), png.end() - 12));
  expect_error([&] { load_image_dataset(path("p"), "", lo); }, {path("p/a/cut.png"), "cannot decode"});
}

TEST_F(DataTest, JpegAnd16BitPngsLoadAsOpenCVDecodesThem) {
  // Colour: an 8-bit JPEG and a 16-bit PNG (BGR in OpenCV, RGB in lancet).
  const cv::Mat card8 = test_card(CV_8U), card16 = test_card(CV_16U);
  ASSERT_TRUE(write_image(path("c/a/card.jpg"), card8));
  ASSERT_TRUE(write_image(path("c/b/card16.png"), card16));
  // Gray: an 8-bit JPEG and a 16-bit PNG with values around every 257-step.
  cv::Mat gray8, gray16(48, 64, CV_16UC1);
  cv::cvtColor(card8, gray8, cv::COLOR_BGR2GRAY);
  for (int y = 0; y < gray16.rows; ++y)
    for (int x = 0; x < gray16.cols; ++x) gray16.at<uint16_t>(y, x) = static_cast<uint16_t>((y * 64 + x) * 21);
  gray16.at<uint16_t>(0, 0) = 65535, gray16.at<uint16_t>(0, 1) = 128, gray16.at<uint16_t>(0, 2) = 129;
  ASSERT_TRUE(write_image(path("g/a/gray.jpg"), gray8));
  ASSERT_TRUE(write_image(path("g/b/gray16.png"), gray16));
  ASSERT_EQ(cv::imread(path("c/b/card16.png"), cv::IMREAD_UNCHANGED).type(), CV_16UC3);
  ASSERT_EQ(cv::imread(path("g/b/gray16.png"), cv::IMREAD_UNCHANGED).type(), CV_16UC1);

  // decode_image_file (before the loader's resize to a square) against the direct decode.
  auto expected8 = [](const std::string& file) {  // the direct OpenCV decode, in RGB order, 16 bits -> v / 257
    cv::Mat m = cv::imread(file, cv::IMREAD_UNCHANGED);
    if (m.channels() == 3) cv::cvtColor(m, m, cv::COLOR_BGR2RGB);
    if (m.depth() == CV_16U) {
      cv::Mat r(m.size(), CV_8UC(m.channels()));
      const uint16_t* src = m.ptr<uint16_t>();
      for (size_t k = 0; k < m.total() * m.channels(); ++k) r.data[k] = static_cast<uint8_t>(std::lround(src[k] / 257.0));
      m = r;
    }
    return m;
  };
  for (const std::string rel : {"c/a/card.jpg", "c/b/card16.png", "g/a/gray.jpg", "g/b/gray16.png"}) {
    const cv::Mat want = expected8(path(rel));
    const DecodedImage got = decode_image_file(path(rel), raw_options(want.channels(), 48));
    ASSERT_EQ(got.rows, 48) << rel;
    ASSERT_EQ(got.cols, 64) << rel;
    ASSERT_EQ(got.channels, want.channels()) << rel;
    EXPECT_EQ(got.pixels, std::vector<uint8_t>(want.data, want.data + want.total() * want.elemSize())) << rel;
  }
  // The 16-bit rule on known values: 65535 -> 255, 128 -> 0, 129 -> 1.
  const DecodedImage g16 = decode_image_file(path("g/b/gray16.png"), raw_options(1, 48));
  EXPECT_EQ(g16.pixels[0], 255);
  EXPECT_EQ(g16.pixels[1], 0);
  EXPECT_EQ(g16.pixels[2], 1);

  // Through the image-folder source: the decode above, resized with INTER_AREA, divided by 255.
  for (const auto& [folder, channels] : std::vector<std::pair<std::string, int>>{{"c", 3}, {"g", 1}}) {
    const auto ds = load_image_dataset(path(folder), "", raw_options(channels, 32));
    ASSERT_EQ(ds->size(), 2);
    const std::vector<std::string> files = folder == "c" ? std::vector<std::string>{"c/a/card.jpg", "c/b/card16.png"}
                                                         : std::vector<std::string>{"g/a/gray.jpg", "g/b/gray16.png"};
    for (int64_t i = 0; i < 2; ++i) {
      cv::Mat want;
      cv::resize(expected8(path(files[static_cast<size_t>(i)])), want, cv::Size(32, 32), 0, 0, cv::INTER_AREA);
      EXPECT_EQ(sample_values(*ds, i), chw_values(want)) << files[static_cast<size_t>(i)];
    }
  }
}

TEST_F(DataTest, BitDepth16KeepsSixteenBitsFromDecodeToTheTensor) {
  // A 16-bit gray PNG whose left and right halves differ by less than one 8-bit step: 8 bits
  // merge them (both 100 after v / 257), 16 bits keep them apart.
  cv::Mat g(40, 40, CV_16UC1);
  for (int y = 0; y < g.rows; ++y)
    for (int x = 0; x < g.cols; ++x) g.at<uint16_t>(y, x) = static_cast<uint16_t>(x < 20 ? 257 * 100 : 257 * 100 + 100);
  g.at<uint16_t>(0, 0) = 65535, g.at<uint16_t>(0, 1) = 1;
  ASSERT_TRUE(write_image(path("g/a/g16.png"), g));
  cv::Mat g8 = test_card(CV_8U);
  cv::cvtColor(g8, g8, cv::COLOR_BGR2GRAY);
  ASSERT_TRUE(write_image(path("g/b/g8.png"), g8));
  ASSERT_TRUE(write_image(path("g/b/rgb8.png"), test_card(CV_8U)));

  ImageLoadOptions lo = raw_options(1, 40);
  lo.bit_depth = 16;
  // decode_image_file: the 16-bit file as stored, the 8-bit ones widened exactly (v * 257).
  const DecodedImage d16 = decode_image_file(path("g/a/g16.png"), lo);
  ASSERT_EQ(d16.bits, 16);
  ASSERT_EQ(d16.pixels.size(), 40u * 40u * 2u);
  std::vector<uint16_t> v16(40 * 40);
  std::memcpy(v16.data(), d16.pixels.data(), d16.pixels.size());
  EXPECT_EQ(v16, std::vector<uint16_t>(g.ptr<uint16_t>(), g.ptr<uint16_t>() + g.total()));
  const DecodedImage d8 = decode_image_file(path("g/b/g8.png"), lo);
  ASSERT_EQ(d8.bits, 16);
  cv::Mat want8;
  g8.convertTo(want8, CV_16U, 257.0);
  EXPECT_EQ(0, std::memcmp(d8.pixels.data(), want8.data, d8.pixels.size()));
  EXPECT_EQ(widen_to_16_bits(decode_image_file(path("g/b/g8.png"), raw_options(1, 40))).pixels, d8.pixels);

  // Through the folder source: gray conversion and INTER_AREA resize at 16 bits, then / 65535.
  lo.image_size = 24;
  const auto ds = load_image_dataset(path("g"), "", lo);
  ASSERT_EQ(ds->size(), 3);
  const std::vector<std::string> files = {"g/a/g16.png", "g/b/g8.png", "g/b/rgb8.png"};
  for (size_t i = 0; i < files.size(); ++i) {
    cv::Mat m = cv::imread(path(files[i]), cv::IMREAD_UNCHANGED);
    if (m.channels() == 3) cv::cvtColor(m, m, cv::COLOR_BGR2RGB);
    if (m.depth() == CV_8U) m.convertTo(m, CV_16U, 257.0);
    if (m.channels() == 3) cv::cvtColor(m, m, cv::COLOR_RGB2GRAY);
    cv::resize(m, m, cv::Size(24, 24), 0, 0, cv::INTER_AREA);
    const float* x = ds->images().data<float>() + static_cast<int64_t>(i) * 24 * 24;
    for (int k = 0; k < 24 * 24; ++k)
      ASSERT_EQ(x[k], static_cast<float>(m.ptr<uint16_t>()[k]) / 65535.0f) << files[i] << " pixel " << k;
  }
  // The halves: apart at 16 bits, one value at 8.
  const float* x16 = ds->images().data<float>();
  EXPECT_NE(x16[12 * 24 + 2], x16[12 * 24 + 21]);
  const auto ds8 = load_image_dataset(path("g"), "", raw_options(1, 24));
  EXPECT_EQ(ds8->images().data<float>()[12 * 24 + 2], ds8->images().data<float>()[12 * 24 + 21]);
  // The cached dataset (the trainer's) keeps 16-bit pixels and gives the same tensors,
  // augmentation (a flip) included.
  const auto cached = load_cached_dataset(path("g"), "", lo);
  EXPECT_EQ(cached->bits(), 16);
  EXPECT_EQ(cached->image(0).size(), 24u * 24u * 2u);
  std::vector<float> one(24 * 24), flipped(24 * 24);
  for (int64_t i = 0; i < 3; ++i) {
    cached->get(i, one.data());
    EXPECT_EQ(0, std::memcmp(one.data(), ds->images().data<float>() + i * 24 * 24, one.size() * sizeof(float))) << i;
  }
  AugmentConfig flip;
  flip.hflip = 1.0;
  cached->get_augmented(0, flip, 7, 0, false, flipped.data());
  for (int y = 0; y < 24; ++y)
    for (int x = 0; x < 24; ++x) ASSERT_EQ(flipped[y * 24 + x], x16[y * 24 + 23 - x]) << y << "," << x;

  // Bad settings, by name.
  ImageLoadOptions bad = lo;
  bad.bit_depth = 12;
  expect_error([&] { load_image_dataset(path("g"), "", bad); }, {"data.bit_depth must be 8 or 16, got 12"});
  bad.bit_depth = 16, bad.channels = 3;
  expect_error([&] { load_cached_dataset(path("g"), "", bad); }, {"data.bit_depth 16 is for grayscale"});
}

TEST_F(DataTest, BitDepth16DicomsAreWindowedTo16Bits) {
  if (!dicom_supported()) GTEST_SKIP() << "built without DCMTK";
  const std::string real = std::string(LANCET_SOURCE_DIR) + "/tests/data/real/dicom/";
  ImageLoadOptions lo = raw_options(1, 32);
  lo.bit_depth = 16;
  // Monochrome (CT, 16-bit signed, with a window; MR; MONOCHROME1 CR): read_dicom at 16 bits.
  for (const char* name : {"pydicom__CT_small.dcm", "pydicom__MR_small.dcm", "pydicom__dicomdirtests_CR1_6154.dcm"}) {
    DicomOptions dopt;
    dopt.bits = 16;
    const DicomPixels px = read_dicom(real + name, dopt);
    const DecodedImage d = decode_image_file(real + name, lo);
    ASSERT_EQ(d.bits, 16) << name;
    ASSERT_EQ(d.pixels.size(), px.u16.size() * 2) << name;
    EXPECT_EQ(0, std::memcmp(d.pixels.data(), px.u16.data(), d.pixels.size())) << name;
  }
  // With a configured window too.
  lo.dicom_window = {40, 400};
  DicomOptions w;
  w.bits = 16, w.window = DicomWindow{40, 400};
  const DicomPixels ct = read_dicom(real + "pydicom__CT_small.dcm", w);
  EXPECT_EQ(0, std::memcmp(decode_image_file(real + "pydicom__CT_small.dcm", lo).pixels.data(), ct.u16.data(),
                           ct.u16.size() * 2));
  // Colour DICOMs go through the recipe at 8 bits, then are widened like any 8-bit image.
  const std::string rgb = real + "pydicom__SC_rgb_rle.dcm";
  EXPECT_EQ(decode_image_file(rgb, lo).pixels, widen_to_16_bits(decode_image_file(rgb, raw_options(3, 32))).pixels);
}

TEST_F(DataTest, PaddingIsTheSameGreyForEightAndSixteenBitFilesAtEitherDepth) {
  // At data.bit_depth 16 an 8-bit file goes through the recipe at 8 bits and a 16-bit one (or
  // a DICOM) at 16: a keep_aspect resize's pad_value 255 must be white for both, at either
  // depth (it padded 16-bit images with 255 / 65535, black).
  cv::Mat g16(40, 60, CV_16UC1, cv::Scalar(30000)), g8(40, 60, CV_8UC1, cv::Scalar(117));
  ASSERT_TRUE(write_image(path("p/a/g16.png"), g16));
  ASSERT_TRUE(write_image(path("p/b/g8.png"), g8));
  for (int bits : {8, 16}) {
    ImageLoadOptions lo = raw_options(1, 60);
    lo.bit_depth = bits;
    lo.recipe = std::make_shared<const PreprocessRecipe>(
        PreprocessRecipe::from_json(Json::parse(R"([{"op":"resize","size":60,"keep_aspect":true,"pad_value":255}])")));
    const auto ds = load_cached_dataset(path("p"), "", lo);
    ASSERT_EQ(ds->size(), 2);
    for (int64_t i = 0; i < 2; ++i) {
      const std::vector<uint8_t> img = ds->image(i);
      const int corner = bits == 8 ? img[0] : img[0] | img[1] << 8;  // little-endian uint16
      EXPECT_EQ(corner, bits == 8 ? 255 : 65535) << ds->name(i) << " at " << bits << " bits";
    }
  }
}

TEST_F(DataTest, UnsupportedPixelDepthIsRefusedNamingTheFile) {
  cv::Mat f(16, 16, CV_32FC1, cv::Scalar(0.5));
  ASSERT_TRUE(write_image(path("f/a/float.tiff"), f));
  ASSERT_EQ(cv::imread(path("f/a/float.tiff"), cv::IMREAD_UNCHANGED).depth(), CV_32F);
  expect_error([&] { load_image_dataset(path("f"), "", ImageLoadOptions{}); },
               {path("f/a/float.tiff"), "unsupported pixel depth"});
  // And a 16-bit TIFF loads like the 16-bit PNG (8 bits: v / 257).
  cv::Mat w(16, 16, CV_16UC1, cv::Scalar(257 * 200));
  ASSERT_TRUE(write_image(path("w/a/w.tiff"), w));
  const auto ds = load_image_dataset(path("w"), "", raw_options(1, 16));
  EXPECT_EQ(sample_values(*ds, 0), std::vector<int>(256, 200));
}

// ---- batches ---------------------------------------------------------------------------

TEST(MakeBatch, GathersSamplesAndLabels) {
  const int64_t n = 50, c = 2, h = 3, w = 4, per = c * h * w;
  std::vector<float> v(static_cast<size_t>(n * per));
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i);
  std::vector<int64_t> labels(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) labels[static_cast<size_t>(i)] = i % 3;
  const InMemoryDataset ds(Tensor::from_vector(v, {n, c, h, w}), labels, {"a", "b", "c"});
  EXPECT_EQ(ds.num_classes(), 3);
  EXPECT_EQ(ds.sample_shape(), (Shape{c, h, w}));
  std::vector<int64_t> idx;
  for (int k = 0; k < 40; ++k) idx.push_back((k * 17 + 3) % n);
  idx.push_back(idx.front());  // repeats are allowed
  const int64_t b = static_cast<int64_t>(idx.size());
  Tensor x = Tensor::empty({b, c, h, w});
  Tensor y = Tensor::empty({b}, DType::i64);
  make_batch(ds, idx, x, y);
  for (int64_t j = 0; j < b; ++j) {
    const int64_t i = idx[static_cast<size_t>(j)];
    EXPECT_EQ(y.data<int64_t>()[j], i % 3);
    for (int64_t e = 0; e < per; ++e) ASSERT_EQ(x.data<float>()[j * per + e], static_cast<float>(i * per + e));
  }
  Tensor small = Tensor::empty({2, c, h, w});
  Tensor y2 = Tensor::empty({2}, DType::i64);
  expect_error([&] { make_batch(ds, idx, small, y2); }, {"make_batch"});
  expect_error([&] { make_batch(ds, {0, n}, small, y2); }, {"index", std::to_string(n)});
  expect_error([&] { InMemoryDataset(Tensor::zeros({2, 1, 2, 2}), {0, 3}, {"a", "b"}); }, {"label 3"});
  expect_error([&] { InMemoryDataset(Tensor::zeros({2, 1, 2, 2}), {0}, {"a"}); }, {"1 labels for 2 images"});
}

// ---- real images ------------------------------------------------------------------------

TEST_F(DataTest, RealChestXraysAndFundusPhoto) {
  const fs::path real = std::string(LANCET_SOURCE_DIR) + "/tests/data/real/png_jpeg";
  const fs::path x1 = real / "txv__nih_00000001_000.png", x2 = real / "txv__nih_00027426_000.png",
                 fundus = real / "napari__fundus_normal_right_eye_600px.jpg";
  if (!fs::exists(x1) || !fs::exists(x2) || !fs::exists(fundus))
    GTEST_SKIP() << "real sample images not found under " << real;
  copy(x1.string(), "r/xray/a.png");
  copy(x2.string(), "r/xray/b.png");
  copy(fundus.string(), "r/fundus/c.jpg");

  ImageLoadOptions gray;  // mean 0.5, std 0.25: values in [-2, 2]
  const auto g = load_image_dataset(path("r"), "", gray);
  EXPECT_EQ(g->images().shape(), (Shape{3, 1, 64, 64}));
  EXPECT_EQ(g->class_names(), (std::vector<std::string>{"fundus", "xray"}));
  EXPECT_EQ(g->labels(), (std::vector<int64_t>{0, 1, 1}));
  for (int64_t i = 0; i < 3; ++i) {
    const std::vector<float> v(g->images().data<float>() + i * 64 * 64, g->images().data<float>() + (i + 1) * 64 * 64);
    const auto [lo, hi] = std::minmax_element(v.begin(), v.end());
    EXPECT_GE(*lo, -2.0f);
    EXPECT_LE(*hi, 2.0f);
    EXPECT_GT(*hi - *lo, 1.5f) << "image " << i << " has almost no contrast";
  }

  ImageLoadOptions rgb;
  rgb.channels = 3, rgb.image_size = 96, rgb.mean = {0.485f, 0.456f, 0.406f}, rgb.std = {0.229f, 0.224f, 0.225f};
  const auto c = load_image_dataset(path("r"), "", rgb);
  EXPECT_EQ(c->images().shape(), (Shape{3, 3, 96, 96}));
  const float* p = c->images().data<float>();
  const int64_t plane = 96 * 96;
  auto pixel = [&](int64_t i, int ch, int64_t k) { return p[(i * 3 + ch) * plane + k] * rgb.std[ch] + rgb.mean[ch]; };
  double red = 0, blue = 0;
  for (int64_t k = 0; k < plane; ++k) {
    for (int ch = 0; ch < 3; ++ch) {
      for (int64_t i = 0; i < 3; ++i) {
        ASSERT_GE(pixel(i, ch, k), -1e-5f);
        ASSERT_LE(pixel(i, ch, k), 1 + 1e-5f);
      }
    }
    // Gray X-rays are replicated into three equal channels.
    ASSERT_NEAR(pixel(1, 0, k), pixel(1, 2, k), 1e-5f);
    ASSERT_NEAR(pixel(2, 1, k), pixel(2, 2, k), 1e-5f);
    red += pixel(0, 0, k), blue += pixel(0, 2, k);
  }
  EXPECT_GT(red, 2 * blue) << "the fundus photo should be red-dominant (RGB order)";
}
