// data/pack and `lancet prep`: folder / manifest / DICOM / .npz -> pack -> dataset is bit-identical
// to loading the source directly (gray, RGB, with a preprocessing recipe); the content hash
// changes with one pixel and a damaged pack is refused; stale and mismatched recipes and DICOM
// windows; a corrupt source image fails prep naming the file and leaves nothing behind, or is
// skipped and listed (--on-bad-sample skip); a killed prep's temporary files are removed; one
// image per chunk (random access reads one chunk), gzip; progress lines; labels outside the
// classes; declared classes (data.classes) packed and a mismatch refused; load_dataset
// dispatch; sources prep cannot pack (a pack, manifest.csv itself, a manifest without a split
// column or with other split names) say what to do; 16-bit packs (data.bit_depth 16); the CLI.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "data/dicom.h"
#include "data/h5file.h"
#include "data/npz.h"
#include "data/pack.h"
#include "data/synth.h"
#include "tests/cli_util.h"
#include "tests/expect_error.h"

namespace fs = std::filesystem;
using namespace lancet;
using lancet::testing::expect_error;

namespace {

const std::string kReal = std::string(LANCET_SOURCE_DIR) + "/tests/data/real/";

bool same_dataset(const InMemoryDataset& a, const InMemoryDataset& b) {
  return a.images().shape() == b.images().shape() && a.labels() == b.labels() && a.class_names() == b.class_names() &&
         std::memcmp(a.images().raw_data(), b.images().raw_data(), a.images().nbytes()) == 0;
}

std::vector<uint8_t> read_bytes(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

class PackTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / ("lancet_pack_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& rel) const {
    fs::create_directories((dir_ / rel).parent_path());
    return (dir_ / rel).string();
  }
  // A small synthetic chest X-ray folder: train/val class folders of 40x40 PNGs.
  std::string synth(const std::string& name = "cxr", int64_t train = 8, int64_t val = 4) {
    SynthOptions o;
    o.train = train, o.val = val, o.image_size = 40, o.seed = 5;
    write_synthetic_cxr(path(name), o);
    return path(name);
  }
  // Adds a file to the synthetic folder's manifest (which lists its images).
  void add_row(const std::string& folder, const std::string& rel, const std::string& label, const std::string& split) {
    std::ofstream(path(folder + "/manifest.csv"), std::ios::app) << rel << "," << label << "," << split << "\n";
  }
  // Files in the test folder whose names start with `prefix` (a pack or its temporary files).
  std::vector<std::string> leftovers(const std::string& prefix) const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(dir_))
      if (e.path().filename().string().rfind(prefix, 0) == 0) out.push_back(e.path().filename().string());
    return out;
  }
  fs::path dir_;
};

PackOptions pack_options(int size, int channels) {
  PackOptions po;
  po.load.image_size = size, po.load.channels = channels;
  po.block = 3;  // several blocks even for small sets
  return po;
}

}  // namespace

TEST_F(PackTest, FolderPackLoadsBitIdenticalToTheFolder) {
  const std::string src = synth();
  // A DICOM class member too (the RSNA layout): CT_small into train/opacity.
  if (dicom_supported()) {
    fs::copy_file(kReal + "dicom/pydicom__CT_small.dcm", path("cxr/train/opacity/ct.dcm"));
    add_row("cxr", "train/opacity/ct.dcm", "opacity", "train");
  }
  for (int channels : {1, 3}) {
    PackOptions po = pack_options(24, channels);
    const std::string pack = path("p" + std::to_string(channels) + ".h5");
    const auto summary = write_pack(src, pack, po);
    ASSERT_EQ(summary.size(), 2u);
    EXPECT_EQ(summary[0].name, "train");
    EXPECT_EQ(summary[0].count, dicom_supported() ? 9 : 8);
    ImageLoadOptions lo = po.load;
    lo.mean = {0.3f, 0.4f, 0.5f}, lo.std = {0.2f, 0.25f, 0.3f};
    if (channels == 1) lo.mean = {0.3f}, lo.std = {0.2f};
    for (const char* split : {"train", "val"}) {
      std::string note;
      auto from_pack = load_pack_dataset(pack, split, lo, &note);
      auto from_folder = load_image_dataset(src, split, lo);
      EXPECT_TRUE(same_dataset(*from_pack, *from_folder)) << split << " channels " << channels;
      EXPECT_NE(note.find("verified"), std::string::npos) << note;
      // load_dataset dispatches on what the path names.
      EXPECT_TRUE(same_dataset(*load_dataset(pack, split, lo), *from_folder));
      EXPECT_TRUE(same_dataset(*load_dataset(src, split, lo), *from_folder));
    }
  }
}

// A pack records the file each image was made from (/<split>/sources): a pack-trained model's
// per-sample report (lancet eval --predictions) can name the files, cached, streamed or resized.
TEST_F(PackTest, PacksRecordTheirSourceFilesForReports) {
  const std::string src = synth("s", 4, 2);
  const PackOptions po = pack_options(24, 1);
  write_pack(src, path("s.h5"), po);
  for (const char* split : {"train", "val"}) {
    const auto from_src = load_cached_dataset(src, split, po.load);
    for (int size : {24, 16})
      for (bool stream : {false, true}) {
        ImageLoadOptions lo = po.load;
        lo.image_size = size;
        const auto from_pack = load_cached_dataset(path("s.h5"), split, lo, BadSample::error, nullptr, stream);
        ASSERT_EQ(from_pack->size(), from_src->size());
        for (int64_t i = 0; i < from_pack->size(); ++i) {
          EXPECT_EQ(from_pack->origin(i), fs::path(from_src->name(i)).lexically_relative(src).string()) << split << i;
          EXPECT_EQ(from_pack->name(i), path("s.h5") + ":" + split + "[" + std::to_string(i) + "]");
          EXPECT_EQ(from_src->origin(i), from_src->name(i));
        }
      }
  }
  EXPECT_EQ(read_pack_split(path("s.h5"), "val", po.load).sources.size(), 2u);
}

TEST_F(PackTest, RgbManifestAndRecipeAndNpz) {
  // A manifest of real images: the fundus photo (RGB JPEG) and a chest X-ray (gray PNG).
  fs::copy_file(kReal + "png_jpeg/napari__fundus_normal_right_eye_600px.jpg", path("m/a.jpg"));
  fs::copy_file(kReal + "png_jpeg/txv__nih_00000001_000.png", path("m/b.png"));
  std::ofstream(path("m/manifest.csv")) << "path,label,split\na.jpg,eye,train\nb.png,cxr,train\na.jpg,eye,val\n";
  PackOptions po = pack_options(20, 3);
  po.load.recipe = std::make_shared<const PreprocessRecipe>(
      PreprocessRecipe::from_json(Json::parse(R"([{"op":"clahe","clip_limit":3.0},{"op":"gamma","gamma":0.8}])")));
  po.gzip = 5;
  const std::string pack = path("rgb.h5");
  write_pack(path("m"), pack, po);
  ImageLoadOptions lo = po.load;
  EXPECT_TRUE(same_dataset(*load_pack_dataset(pack, "train", lo), *load_image_dataset(path("m"), "train", lo)));
  const PackInfo info = read_pack_info(pack);
  EXPECT_EQ(info.classes, (std::vector<std::string>{"cxr", "eye"}));
  EXPECT_EQ(info.recipe_fingerprint, po.load.recipe->fingerprint());
  EXPECT_EQ(info.splits, (std::vector<std::string>{"train", "val"}));
  // One image per chunk, compressed as asked.
  const H5File f = H5File::open_read(pack);
  EXPECT_EQ(f.chunk_of("train/images"), (Shape{1, 20, 20, 3}));
  EXPECT_EQ(f.gzip_of("train/images"), 5);
  // A pack made with one recipe is refused under another (and under none).
  ImageLoadOptions other = lo;
  other.recipe.reset();
  expect_error([&] { load_pack_dataset(pack, "train", other); }, {"rgb.h5", "clahe", "data.preprocess", "lancet prep"});

  // .npz -> pack -> dataset equals the .npz loaded directly.
  const std::string npz = kReal + "npz/medmnist__pneumoniamnist.npz";
  PackOptions pn = pack_options(16, 1);
  pn.splits = {"val"};
  pn.block = 64;
  write_pack(npz, path("pn.h5"), pn);
  EXPECT_TRUE(same_dataset(*load_pack_dataset(path("pn.h5"), "val", pn.load), *load_npz_dataset(npz, "val", pn.load)));
  EXPECT_EQ(read_pack_info(path("pn.h5")).classes, (std::vector<std::string>{"0", "1"}));
  expect_error([&] { load_pack_dataset(path("pn.h5"), "train", pn.load); }, {"pn.h5", "no split 'train'", "val"});
}

TEST_F(PackTest, DeclaredClassesArePackedAndAMismatchIsRefused) {
  const std::string src = synth("cxr", 4, 2);
  PackOptions po = pack_options(16, 1);
  po.load.classes = {"opacity", "normal"};  // not the sorted order
  write_pack(src, path("c.h5"), po);
  EXPECT_EQ(read_pack_info(path("c.h5")).classes, po.load.classes);
  ImageLoadOptions lo = po.load;
  for (const char* split : {"train", "val"}) {
    EXPECT_TRUE(same_dataset(*load_pack_dataset(path("c.h5"), split, lo), *load_image_dataset(src, split, lo)));
    ImageLoadOptions inferred = lo;  // no data.classes: the pack's own list
    inferred.classes.clear();
    EXPECT_EQ(load_pack_dataset(path("c.h5"), split, inferred)->class_names(), po.load.classes);
  }
  // Another order (or other names) would relabel every sample: refused, both lists named,
  // cached and streamed alike.
  lo.classes = {"normal", "opacity"};
  for (bool stream : {false, true})
    expect_error([&] { load_cached_dataset(path("c.h5"), "train", lo, BadSample::error, nullptr, stream); },
                 {"c.h5", "the pack's classes are [opacity, normal] but data.classes is [normal, opacity]",
                  "lancet prep"});
  lo.classes = {"opacity", "normal", "covid"};
  expect_error([&] { load_pack_dataset(path("c.h5"), "val", lo); }, {"c.h5", "[opacity, normal, covid]"});
  // prep refuses a label outside the declared classes naming the manifest line, leaving no pack.
  add_row("cxr", "train/normal/0.png", "pneumonai", "train");
  po.load.classes = {"normal", "opacity"};
  expect_error([&] { write_pack(src, path("bad.h5"), po); },
               {"manifest.csv:", "label 'pneumonai' is not one of the classes [normal, opacity]"});
  EXPECT_TRUE(leftovers("bad.h5").empty());

  // .npz labels are indices: declared names replace "0".."k-1"; too few names are refused.
  const std::string npz = kReal + "npz/medmnist__pneumoniamnist.npz";
  PackOptions pn = pack_options(16, 1);
  pn.splits = {"val"};
  pn.load.classes = {"normal", "pneumonia"};
  write_pack(npz, path("pn.h5"), pn);
  EXPECT_EQ(read_pack_info(path("pn.h5")).classes, pn.load.classes);
  EXPECT_EQ(load_npz_dataset(npz, "val", pn.load)->class_names(), pn.load.classes);
  EXPECT_EQ(load_cached_dataset(npz, "val", pn.load)->class_names(), pn.load.classes);
  pn.load.classes = {"normal"};
  expect_error([&] { load_npz_dataset(npz, "val", pn.load); },
               {"medmnist__pneumoniamnist.npz", "label 1 is not one of the classes [normal]"});
  expect_error([&] { write_pack(npz, path("pn1.h5"), pn); }, {"pneumoniamnist.npz", "label 1"});
}

TEST_F(PackTest, HashChangesWithOnePixelAndDamageIsDetected) {
  const std::string a = synth("a", 4, 2);
  fs::copy(a, path("b"), fs::copy_options::recursive);
  // Change one pixel of one image in the copy, by one grey level.
  const std::string victim = path("b/train/normal/" + fs::directory_iterator(path("b/train/normal"))->path().filename().string());
  cv::Mat m = cv::imread(victim, cv::IMREAD_UNCHANGED);
  m.at<uint8_t>(20, 20) = static_cast<uint8_t>(m.at<uint8_t>(20, 20) ^ 1);
  cv::imwrite(victim, m);
  const PackOptions po = pack_options(40, 1);  // no resize: the pixel survives as it is
  const auto sa = write_pack(a, path("a.h5"), po);
  const auto sb = write_pack(path("b"), path("b.h5"), po);
  EXPECT_NE(sa[0].hash, sb[0].hash);
  EXPECT_EQ(sa[1].hash, sb[1].hash);  // val untouched

  // Damage one stored pixel of the pack on disk (uncompressed chunks hold the raw pixels).
  PackReader reader(path("a.h5"));
  const DecodedImage first = reader.image("train", 1);
  std::vector<uint8_t> bytes = read_bytes(path("a.h5"));
  const auto at = std::search(bytes.begin(), bytes.end(), first.pixels.begin(), first.pixels.end());
  ASSERT_NE(at, bytes.end());
  *(at + 700) ^= 0x10;
  std::ofstream(path("a.h5"), std::ios::binary | std::ios::trunc)
      .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  expect_error([&] { load_pack_dataset(path("a.h5"), "train", po.load); },
               {"a.h5", "split 'train' is damaged or was modified", "content hash"});
  EXPECT_NO_THROW(load_pack_dataset(path("a.h5"), "val", po.load));
}

TEST_F(PackTest, RandomAccessReadsOneChunk) {
  const std::string src = synth("s", 10, 2);
  const PackOptions po = pack_options(24, 1);
  write_pack(src, path("r.h5"), po);
  const H5File f = H5File::open_read(path("r.h5"));
  EXPECT_EQ(f.chunk_of("train/images"), (Shape{1, 24, 24}));  // one sample = one chunk
  EXPECT_EQ(f.gzip_of("train/images"), 0);
  EXPECT_EQ(f.shape_of("train/images"), (Shape{10, 24, 24}));
  EXPECT_EQ(f.dtype_of("train/images"), DType::u8);
  PackReader reader(path("r.h5"));
  EXPECT_EQ(reader.size("train"), 10);
  std::vector<std::string> classes;
  const auto items = list_images(src, "train", &classes);
  for (int64_t i : {7, 0, 9}) {
    const DecodedImage img = decode_image_file(items[static_cast<size_t>(i)].file, po.load);
    EXPECT_EQ(reader.image("train", i).pixels, resize_image(img.pixels.data(), img.rows, img.cols, 1, 1, 24)) << i;
    EXPECT_EQ(reader.label("train", i), items[static_cast<size_t>(i)].label);
  }
  expect_error([&] { reader.image("train", 10); }, {"r.h5", "index 10", "train"});
  expect_error([&] { reader.image("test", 0); }, {"r.h5", "no split 'test'"});
}

TEST_F(PackTest, CorruptSourceFailsNamingTheFileAndLeavesNoPack) {
  const std::string src = synth("c", 6, 2);
  std::ofstream(path("c/train/opacity/zz_broken.png"), std::ios::binary) << "\x89PNG\r\n\x1a\n not really a png";
  add_row("c", "train/opacity/zz_broken.png", "opacity", "train");
  expect_error([&] { write_pack(src, path("out.h5"), pack_options(16, 1)); }, {"zz_broken.png", "cannot decode"});
  EXPECT_TRUE(leftovers("out.h5").empty()) << "left behind: " << leftovers("out.h5").front();
  // An existing pack is replaced only by a complete one: a failure in the last split keeps it.
  write_pack(synth("ok", 2, 2), path("out.h5"), pack_options(16, 1));
  const auto before = read_bytes(path("out.h5"));
  std::ofstream(path("ok/val/opacity/zz.png"), std::ios::binary) << "junk";
  add_row("ok", "val/opacity/zz.png", "opacity", "val");
  expect_error([&] { write_pack(path("ok"), path("out.h5"), pack_options(16, 1)); }, {"zz.png"});
  EXPECT_EQ(read_bytes(path("out.h5")), before);
  EXPECT_EQ(leftovers("out.h5"), (std::vector<std::string>{"out.h5"}));
  PackOptions po = pack_options(16, 1);
  po.splits = {"train", "test"};
  expect_error([&] { write_pack(path("ok"), path("out.h5"), po); }, {"ok", "no split 'test'"});
}

TEST_F(PackTest, NotAPackAndStalePacks) {
  {  // an HDF5 file that is not a pack
    H5File f = H5File::create_atomic(path("w.h5"));
    f.write("/model/x", Tensor::zeros({2}));
    f.commit();
  }
  expect_error([&] { read_pack_info(path("w.h5")); }, {"w.h5", "not a lancet pack"});
  {  // a pack whose recipe fingerprint was computed by another version of the ops
    H5File f = H5File::create_atomic(path("stale.h5"));
    for (const auto& [k, v] : std::vector<std::pair<std::string, std::string>>{
             {"format", "lancet-pack"}, {"version", "2"}, {"classes", "[\"a\"]"}, {"image_size", "8"},
             {"channels", "1"}, {"dtype", "uint8"}, {"recipe", "[]"}, {"recipe_fingerprint", "pp0-0123456789abcdef"},
             {"dicom_window", "[]"}, {"dicom_files", "0"}})
      f.set_attr("/", k, v);
    f.commit();
  }
  expect_error([&] { read_pack_info(path("stale.h5")); }, {"stale.h5", "stale pack", "pp0-0123456789abcdef"});
  {  // a version 1 pack (before the DICOM window was recorded)
    H5File f = H5File::create_atomic(path("v1.h5"));
    f.set_attr("/", "format", "lancet-pack");
    f.set_attr("/", "version", "1");
    f.commit();
  }
  expect_error([&] { read_pack_info(path("v1.h5")); }, {"v1.h5", "pack version 1 is not supported", "lancet prep again"});
  std::ofstream(path("x.txt")) << "hello";
  expect_error([&] { load_dataset(path("x.txt"), "train", ImageLoadOptions{}); }, {"x.txt", "not a dataset"});
  expect_error([&] { load_dataset(path("nothing"), "train", ImageLoadOptions{}); }, {"nothing", "no such dataset"});
}

// What lancet prep cannot pack says what to do: a pack as the source, a manifest.csv named
// instead of its folder, a manifest without a split column or with other split names.
TEST_F(PackTest, UnpackableSourcesSayWhatToDo) {
  const std::string src = synth("s", 4, 2);
  const PackOptions po = pack_options(16, 1);
  write_pack(src, path("p.h5"), po);
  expect_error([&] { write_pack(path("p.h5"), path("q.h5"), po); }, {"p.h5", "a pack from lancet prep already"});
  expect_error([&] { write_pack(src + "/manifest.csv", path("q.h5"), po); },
               {"manifest.csv", "read from its folder", "(" + src + ")"});
  expect_error([&] { load_dataset(src + "/manifest.csv", "train", po.load); }, {"read from its folder"});
  EXPECT_EQ(source_kind(src), SourceKind::folder);
  EXPECT_EQ(source_kind(path("p.h5")), SourceKind::pack);

  std::ifstream in(src + "/manifest.csv");
  std::string line, no_split = "path,label\n", renamed = "path,label,split\n";
  std::getline(in, line);
  while (std::getline(in, line)) {
    const size_t c = line.rfind(',');
    no_split += line.substr(0, c) + "\n";
    renamed += line.substr(0, c) + (line.substr(c + 1) == "train" ? ",Training\n" : ",Validation\n");
  }
  for (const auto& [name, text] : std::vector<std::pair<std::string, std::string>>{{"n", no_split}, {"r", renamed}})
    std::ofstream(path(name + "/manifest.csv")) << text;
  fs::copy(src + "/train", path("n/train"), fs::copy_options::recursive);
  fs::copy(src + "/val", path("n/val"), fs::copy_options::recursive);
  fs::copy(src + "/train", path("r/train"), fs::copy_options::recursive);
  fs::copy(src + "/val", path("r/val"), fs::copy_options::recursive);
  EXPECT_TRUE(manifest_splits(path("n")).empty());
  EXPECT_EQ(manifest_splits(path("r")), (std::vector<std::string>{"Training", "Validation"}));
  expect_error([&] { write_pack(path("n"), path("q.h5"), po); },
               {path("n/manifest.csv"), "no split column", "add a split column (path,label,split)"});
  expect_error([&] { write_pack(path("r"), path("q.h5"), po); },
               {"no train, val or test split", "split column has [Training, Validation]", "--splits"});
  PackOptions named = po;
  named.splits = {"Training", "Validation"};
  write_pack(path("r"), path("r.h5"), named);
  EXPECT_EQ(read_pack_info(path("r.h5")).splits, (std::vector<std::string>{"Training", "Validation"}));
  EXPECT_TRUE(leftovers("q.h5").empty());
}

TEST_F(PackTest, DicomWindowIsPartOfThePack) {
  if (!dicom_supported()) GTEST_SKIP() << "built without DCMTK";
  const std::string src = synth("d", 4, 2);
  fs::copy_file(kReal + "dicom/pydicom__CT_small.dcm", path("d/train/opacity/ct.dcm"));
  add_row("d", "train/opacity/ct.dcm", "opacity", "train");
  PackOptions po = pack_options(24, 1);
  po.load.dicom_window = {40, 400};
  write_pack(src, path("w.h5"), po);
  const PackInfo info = read_pack_info(path("w.h5"));
  EXPECT_EQ(info.dicom_window, (std::vector<double>{40, 400}));
  EXPECT_EQ(info.dicom_files, 1);
  // The pack gives what the folder gives under the same window...
  ImageLoadOptions lo = po.load;
  std::string note;
  EXPECT_TRUE(same_dataset(*load_pack_dataset(path("w.h5"), "train", lo, &note), *load_image_dataset(src, "train", lo)));
  EXPECT_NE(note.find("DICOM window [40.0,400.0]"), std::string::npos) << note;
  // ...and is refused, naming both windows, under another window or none (the files' own).
  lo.dicom_window.clear();
  expect_error([&] { load_pack_dataset(path("w.h5"), "train", lo); },
               {"w.h5", "data.dicom.window [40.0,400.0]", "data.dicom.window is null (each file's own window",
                "lancet prep"});
  expect_error([&] { load_cached_dataset(path("w.h5"), "val", lo); }, {"w.h5", "[40.0,400.0]", "null"});
  lo.dicom_window = {50, 400};
  expect_error([&] { load_pack_dataset(path("w.h5"), "train", lo); }, {"[40.0,400.0]", "is [50.0,400.0]"});
  // A pack made without a window is refused under one.
  po.load.dicom_window.clear();
  write_pack(src, path("own.h5"), po);
  EXPECT_TRUE(read_pack_info(path("own.h5")).dicom_window.empty());
  expect_error([&] { load_pack_dataset(path("own.h5"), "val", lo); }, {"own.h5", "null (each file's own", "[50.0,400.0]"});
  // Without DICOM images the window changes nothing, so it is not checked.
  write_pack(synth("png", 2, 2), path("png.h5"), po);
  EXPECT_EQ(read_pack_info(path("png.h5")).dicom_files, 0);
  EXPECT_NO_THROW(load_pack_dataset(path("png.h5"), "train", lo));
  // prep --set data.dicom.window=[40,400] records it; training without it is refused.
  const auto cli = lancet::testing::run_lancet("prep --data " + src + " --out " + path("cli.h5") +
                                               " --image-size 16 --threads 1 --set 'data.dicom.window=[40,400]'");
  ASSERT_EQ(cli.status, 0) << cli.output;
  EXPECT_NE(cli.output.find("1 DICOM, window [40.0,400.0]"), std::string::npos) << cli.output;
  ImageLoadOptions at16 = pack_options(16, 1).load;
  expect_error([&] { load_cached_dataset(path("cli.h5"), "train", at16); }, {"cli.h5", "[40.0,400.0]"});
}

TEST_F(PackTest, SixteenBitPacksAreBitIdenticalToTheSourceAtSixteenBits) {
  // A folder of 16-bit gray PNGs with fine grey levels, an 8-bit PNG and (with DCMTK) a CT
  // DICOM, packed at data.bit_depth 16 with a 16-bit recipe (CLAHE, gamma).
  for (int k = 0; k < 6; ++k) {
    cv::Mat g(30 + k, 34, CV_16UC1);
    cv::randu(g, cv::Scalar(1000 * k), cv::Scalar(20000 + 1000 * k));
    ASSERT_TRUE(cv::imwrite(path(std::string("src/") + (k < 4 ? "train/" : "val/") + (k % 2 ? "a" : "b") + "/g" +
                                 std::to_string(k) + ".png"),
                            g));
  }
  cv::Mat g8(20, 20, CV_8UC1);
  cv::randu(g8, cv::Scalar(0), cv::Scalar(255));
  ASSERT_TRUE(cv::imwrite(path("src/train/a/eight.png"), g8));
  if (dicom_supported()) fs::copy_file(kReal + "dicom/pydicom__CT_small.dcm", path("src/train/b/ct.dcm"));
  PackOptions po = pack_options(24, 1);
  po.load.bit_depth = 16;
  po.load.recipe = std::make_shared<const PreprocessRecipe>(PreprocessRecipe::from_json(
      Json::parse(R"([{"op":"clahe","clip_limit":2.0,"tile_grid":4},{"op":"gamma","gamma":0.8}])")));
  const auto summary = write_pack(path("src"), path("p16.h5"), po);
  ASSERT_EQ(summary.size(), 2u);
  EXPECT_EQ(summary[0].count, dicom_supported() ? 6 : 5);
  const PackInfo info = read_pack_info(path("p16.h5"));
  EXPECT_EQ(info.bit_depth, 16);
  {
    const H5File f = H5File::open_read(path("p16.h5"));
    EXPECT_EQ(f.get_attr("/", "dtype").value_or(""), "uint16");
    EXPECT_EQ(f.element_size_of("train/images"), 2);
  }
  // The pack keeps more than 8 bits: not every stored value is a multiple of 257.
  const DecodedImage first = PackReader(path("p16.h5")).image("train", 0);
  ASSERT_EQ(first.bits, 16);
  std::vector<uint16_t> v(first.pixels.size() / 2);
  std::memcpy(v.data(), first.pixels.data(), first.pixels.size());
  EXPECT_TRUE(std::any_of(v.begin(), v.end(), [](uint16_t x) { return x % 257 != 0; }));

  // Every way of loading the pack gives bit for bit what the folder gives at 16 bits: the
  // float tensors, the cache (pixels and samples), streaming, and another image size.
  ImageLoadOptions lo = po.load;
  lo.mean = {0.3f}, lo.std = {0.2f};
  for (const char* split : {"train", "val"}) {
    std::string note;
    EXPECT_TRUE(same_dataset(*load_pack_dataset(path("p16.h5"), split, lo, &note),
                             *load_image_dataset(path("src"), split, lo)))
        << split;
    EXPECT_NE(note.find("24x24x1 uint16"), std::string::npos) << note;
    const auto from_src = load_cached_dataset(path("src"), split, lo);
    for (bool stream : {false, true}) {
      const auto from_pack = load_cached_dataset(path("p16.h5"), split, lo, BadSample::error, nullptr, stream);
      ASSERT_EQ(from_pack->size(), from_src->size());
      std::vector<float> a(24 * 24), b(24 * 24);
      for (int64_t i = 0; i < from_src->size(); ++i) {
        EXPECT_EQ(from_pack->image(i), from_src->image(i)) << split << " " << i;
        from_pack->get(i, a.data()), from_src->get(i, b.data());
        EXPECT_EQ(a, b) << split << " " << i;
      }
    }
    // At another size the pack's images are resized again (at 16 bits), the same way by
    // the float loader and the cache.
    ImageLoadOptions at16 = lo;
    at16.image_size = 16;
    const auto f16 = load_pack_dataset(path("p16.h5"), split, at16);
    const auto c16 = load_cached_dataset(path("p16.h5"), split, at16);
    EXPECT_EQ(c16->image(0).size(), 16u * 16u * 2u);
    std::vector<float> x(16 * 16);
    for (int64_t i = 0; i < c16->size(); ++i) {
      c16->get(i, x.data());
      EXPECT_EQ(0, std::memcmp(x.data(), f16->images().data<float>() + i * 256, x.size() * sizeof(float))) << i;
    }
  }
  // Read only at the depth it was made at, either way round.
  ImageLoadOptions at8 = lo;
  at8.bit_depth = 8;
  expect_error([&] { load_pack_dataset(path("p16.h5"), "train", at8); },
               {"p16.h5", "16-bit images (dtype uint16) but data.bit_depth is 8", "set data.bit_depth 16",
                "lancet prep again with data.bit_depth 8"});
  po.load.bit_depth = 8;
  write_pack(path("src"), path("p8.h5"), po);
  EXPECT_EQ(read_pack_info(path("p8.h5")).bit_depth, 8);
  expect_error([&] { load_cached_dataset(path("p8.h5"), "val", lo); },
               {"p8.h5", "8-bit images (dtype uint8) but data.bit_depth is 16"});
  // One changed sample in a 16-bit pack is caught by the content hash.
  {
    std::vector<uint8_t> bytes = read_bytes(path("p16.h5"));
    const auto at = std::search(bytes.begin(), bytes.end(), first.pixels.begin(), first.pixels.end());
    ASSERT_NE(at, bytes.end());
    *(at + 301) ^= 0x01;  // the high byte of one sample: a change no 8-bit pack could hold
    std::ofstream(path("p16.h5"), std::ios::binary | std::ios::trunc)
        .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  }
  expect_error([&] { load_pack_dataset(path("p16.h5"), "train", lo); }, {"p16.h5", "damaged or was modified"});

  // The command line: prep --bit-depth 16, then training from the pack at 16 bits; without
  // --bit-depth 16 training is refused naming the pack's depth.
  const auto prep = lancet::testing::run_lancet("prep --data " + path("src") + " --out " + path("cli16.h5") +
                                                " --image-size 16 --bit-depth 16 --threads 1");
  ASSERT_EQ(prep.status, 0) << prep.output;
  EXPECT_NE(prep.output.find("16x16x1 uint16"), std::string::npos) << prep.output;
  const std::string train = "train --data " + path("cli16.h5") +
                            " --image-size 16 --epochs 1 --batch-size 4 --threads 1 --set data.workers=1 --set "
                            "train.tensorboard=false --out " +
                            path("run");
  const auto refused = lancet::testing::run_lancet(train);
  EXPECT_NE(refused.status, 0);
  EXPECT_NE(refused.output.find("16-bit images (dtype uint16) but data.bit_depth is 8"), std::string::npos)
      << refused.output;
  const auto trained = lancet::testing::run_lancet(train + " --bit-depth 16");
  ASSERT_EQ(trained.status, 0) << trained.output;
  EXPECT_NE(trained.output.find("uint16"), std::string::npos) << trained.output;
  EXPECT_TRUE(fs::exists(path("run/final.h5")));
}

TEST_F(PackTest, PrepSkipsBadImagesWhenAskedAndListsThem) {
  const std::string src = synth("s", 6, 4);
  std::ofstream(path("s/train/normal/zz_bad.png"), std::ios::binary) << "\x89PNG\r\n\x1a\n not a png";
  add_row("s", "train/normal/zz_bad.png", "normal", "train");
  std::ofstream(path("s/val/opacity/aa_empty.jpg"), std::ios::binary) << "";
  add_row("s", "val/opacity/aa_empty.jpg", "opacity", "val");
  PackOptions po = pack_options(16, 1);
  expect_error([&] { write_pack(src, path("s.h5"), po); }, {"zz_bad.png", "cannot decode"});  // default: error
  po.on_bad = BadSample::skip;
  std::ostringstream log;
  po.log = &log;
  const auto summary = write_pack(src, path("s.h5"), po);
  ASSERT_EQ(summary.size(), 2u);
  EXPECT_EQ(summary[0].count, 6);
  ASSERT_EQ(summary[0].skipped.size(), 1u);
  EXPECT_NE(summary[0].skipped[0].find("zz_bad.png: cannot decode"), std::string::npos) << summary[0].skipped[0];
  EXPECT_EQ(summary[1].count, 4);
  ASSERT_EQ(summary[1].skipped.size(), 1u);
  EXPECT_NE(summary[1].skipped[0].find("aa_empty.jpg: empty file"), std::string::npos) << summary[1].skipped[0];
  EXPECT_NE(log.str().find("train: 6 images (normal 3, opacity 3), hash " + summary[0].hash + "; 1 bad image(s) skipped"),
            std::string::npos) << log.str();
  EXPECT_NE(log.str().find("--on-bad-sample skip: 2 bad image(s) left out of the pack:"), std::string::npos) << log.str();
  EXPECT_NE(log.str().find("  val: " + path("s/val/opacity/aa_empty.jpg") + ": empty file"), std::string::npos)
      << log.str();
  // The split's attributes record them; the pack holds exactly the good images, hashed.
  const H5File f = H5File::open_read(path("s.h5"));
  EXPECT_EQ(f.get_attr("train", "skipped"), std::optional<std::string>("1"));
  EXPECT_EQ(Json::parse(*f.get_attr("train", "skipped_files")).get<std::vector<std::string>>(), summary[0].skipped);
  EXPECT_EQ(f.get_attr("val", "skipped"), std::optional<std::string>("1"));
  EXPECT_EQ(f.shape_of("train/images"), (Shape{6, 16, 16}));
  for (const char* split : {"train", "val"}) {
    std::string note;  // training from the pack says that prep left images out
    const auto from_pack = load_cached_dataset(path("s.h5"), split, po.load, BadSample::error, &note);
    EXPECT_NE(note.find("1 bad source image(s) left out by lancet prep"), std::string::npos) << note;
    const auto from_src = load_cached_dataset(src, split, po.load, BadSample::skip);
    ASSERT_EQ(from_pack->size(), from_src->size()) << split;
    EXPECT_EQ(from_pack->labels(), from_src->labels()) << split;
    for (int64_t i = 0; i < from_src->size(); ++i) EXPECT_EQ(from_pack->image(i), from_src->image(i)) << split << " " << i;
  }
  // A split with no readable image is refused.
  fs::create_directories(path("b/train/x"));
  std::ofstream(path("b/train/x/a.png")) << "junk";
  std::ofstream(path("b/train/x/b.png")) << "junk";
  expect_error([&] { write_pack(path("b"), path("b.h5"), po); },
               {"split 'train' has no readable image", "2 skipped", "a.png"});
  EXPECT_TRUE(leftovers("b.h5").empty());
  // The command line: --on-bad-sample skip is honoured and reported.
  const auto cli = lancet::testing::run_lancet("prep --data " + src + " --out " + path("cli.h5") +
                                               " --image-size 16 --threads 1 --on-bad-sample skip");
  ASSERT_EQ(cli.status, 0) << cli.output;
  EXPECT_NE(cli.output.find("2 bad image(s) left out of the pack"), std::string::npos) << cli.output;
  EXPECT_NE(cli.output.find("zz_bad.png: cannot decode"), std::string::npos) << cli.output;
}

TEST_F(PackTest, PrepRemovesTempFilesOfKilledPrepsOnly) {
  // A writer that has exited (its pid is free again, not reused within this test in practice).
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) ::_exit(0);
  ASSERT_EQ(::waitpid(child, nullptr, 0), child);
  const std::string dead = std::to_string(child), live = std::to_string(::getppid());
  const std::vector<std::string> temps = {"out.h5.tmp-" + dead + "-0", "out.h5.tmp-" + dead + "-3",
                                          "out.h5.tmp-" + live + "-0", "other.h5.tmp-" + dead + "-0",
                                          "out.h5.tmp-notapid"};
  for (const std::string& name : temps)
    std::ofstream(path(name)) << "half a pack";
  PackOptions po = pack_options(16, 1);
  std::ostringstream log;
  po.log = &log;
  write_pack(synth("src", 2, 2), path("out.h5"), po);
  std::vector<std::string> left = leftovers("out.h5");
  std::sort(left.begin(), left.end());
  EXPECT_EQ(left, (std::vector<std::string>{"out.h5", "out.h5.tmp-" + live + "-0", "out.h5.tmp-notapid"}));
  EXPECT_TRUE(fs::exists(path("other.h5.tmp-" + dead + "-0"))) << "another pack's file is not prep's to remove";
  EXPECT_NE(log.str().find("prep: removed " + path("out.h5.tmp-" + dead + "-0") + " (left by a killed prep)"),
            std::string::npos) << log.str();
  EXPECT_TRUE(remove_stale_temp_files_of(path("out.h5")).empty());
  EXPECT_EQ(remove_stale_temp_files_of(path("other.h5")), (std::vector<std::string>{path("other.h5.tmp-" + dead + "-0")}));
  EXPECT_TRUE(remove_stale_temp_files_of(path("nowhere/x.h5")).empty());
}

TEST_F(PackTest, ProgressLinesArePlainUnlessATerminal) {
  const std::string src = synth("p", 10, 2);
  PackOptions po = pack_options(16, 1);
  po.progress_every = 4;  // blocks of 3: after 6 and 9 of the 10 train images
  std::ostringstream log;
  po.log = &log;
  write_pack(src, path("p.h5"), po);
  const std::string s = log.str();
  EXPECT_NE(s.find("prep: train: 6/10 images (60%), "), std::string::npos) << s;
  EXPECT_NE(s.find("prep: train: 9/10 images (90%), "), std::string::npos) << s;
  EXPECT_EQ(s.find("prep: train: 3/10"), std::string::npos) << s;
  EXPECT_NE(s.find(" images/s\n"), std::string::npos) << s;
  EXPECT_NE(s.find("prep: train: 10 images in "), std::string::npos) << s;
  EXPECT_EQ(s.find('\r'), std::string::npos) << "no carriage returns in a log file";
  EXPECT_EQ(s.find("prep: val: 2/"), std::string::npos) << "val has fewer images than the interval";
  std::ostringstream tty;
  po.log = &tty, po.progress_tty = true;
  write_pack(src, path("p.h5"), po);
  EXPECT_NE(tty.str().find("\r\033[Kprep: train: 6/10 images (60%), "), std::string::npos);
  po.progress_every = 0;
  std::ostringstream quiet;
  po.log = &quiet;
  write_pack(src, path("p.h5"), po);
  EXPECT_EQ(quiet.str().find("/10 images"), std::string::npos) << quiet.str();
}

TEST_F(PackTest, LabelOutsideTheClassesIsRefused) {
  // A hand-made pack, consistent except for one label (its hash covers the bad label too).
  const std::vector<int64_t> labels = {0, 5};
  std::vector<uint8_t> pixels(2 * 8 * 8);
  for (size_t i = 0; i < pixels.size(); ++i) pixels[i] = static_cast<uint8_t>(i * 7);
  uint64_t h = fnv1a64(pixels.data(), pixels.size());
  for (int64_t l : labels) {
    uint8_t b[8];
    for (int k = 0; k < 8; ++k) b[k] = static_cast<uint8_t>(static_cast<uint64_t>(l) >> (8 * k));
    h = fnv1a64(b, 8, h);
  }
  char hash[17];
  std::snprintf(hash, sizeof hash, "%016llx", static_cast<unsigned long long>(h));
  {
    H5File f = H5File::create_atomic(path("l.h5"));
    f.create_chunked("train/images", H5File::Elem::u8, {2, 8, 8}, {1, 8, 8}, 0);
    f.write_rows("train/images", 0, 2, H5File::Elem::u8, pixels.data());
    Tensor lt = Tensor::empty({2}, DType::i64);
    std::copy(labels.begin(), labels.end(), lt.data<int64_t>());
    f.write("train/labels", lt);
    f.set_attr("train", "hash", hash);
    for (const auto& [k, v] : std::vector<std::pair<std::string, std::string>>{
             {"format", "lancet-pack"}, {"version", "2"}, {"classes", "[\"a\", \"b\"]"}, {"image_size", "8"},
             {"channels", "1"}, {"dtype", "uint8"}, {"recipe", PreprocessRecipe().to_json().dump()},
             {"recipe_fingerprint", PreprocessRecipe().fingerprint()}, {"dicom_window", "[]"}, {"dicom_files", "0"}})
      f.set_attr("/", k, v);
    f.commit();
  }
  ImageLoadOptions lo = pack_options(8, 1).load;
  expect_error([&] { load_pack_dataset(path("l.h5"), "train", lo); },
               {"l.h5", "label 5 of train sample 1 is outside the 2 classes"});
  expect_error([&] { load_cached_dataset(path("l.h5"), "train", lo, BadSample::skip); }, {"l.h5", "label 5"});
}

TEST_F(PackTest, PrepCommandLine) {
  const std::string src = synth("cli", 4, 2);
  const auto ok = lancet::testing::run_lancet("prep --data " + src + " --out " + path("cli.h5") +
                                              " --image-size 16 --compress 3 --threads 1");
  ASSERT_EQ(ok.status, 0) << ok.output;
  EXPECT_NE(ok.output.find("train: 4 images (normal 2, opacity 2), hash"), std::string::npos) << ok.output;
  EXPECT_EQ(H5File::open_read(path("cli.h5")).gzip_of("val/images"), 3);
  std::ofstream(path("cli/val/normal/bad.png")) << "junk";
  add_row("cli", "val/normal/bad.png", "normal", "val");
  const auto bad = lancet::testing::run_lancet("prep --data " + src + " --out " + path("bad.h5") + " --image-size 16");
  EXPECT_EQ(bad.status, 1);
  EXPECT_NE(bad.output.find("lancet prep: error: "), std::string::npos) << bad.output;
  EXPECT_NE(bad.output.find("bad.png"), std::string::npos) << bad.output;
  EXPECT_TRUE(leftovers("bad.h5").empty());
}
