// H5File: tensor and attribute round trips, dotted names, listing, errors that name the file,
// atomic creation, and interchange with h5py (skipped when h5py is not installed).
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "data/h5file.h"
#include "tests/expect_error.h"

namespace fs = std::filesystem;
using namespace lancet;
using lancet::testing::expect_error;

namespace {

// A fresh directory per test, removed afterwards.
class H5FileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / ("lancet_h5_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    EXPECT_EQ(h5_open_object_count(), 0) << "leaked HDF5 identifiers";
    fs::remove_all(dir_);
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  std::vector<std::string> dir_entries() const {
    std::vector<std::string> v;
    for (const auto& e : fs::directory_iterator(dir_)) v.push_back(e.path().filename().string());
    std::sort(v.begin(), v.end());
    return v;
  }
  fs::path dir_;
};


Tensor iota_f32(const Shape& s) {
  std::vector<float> v(static_cast<size_t>(shape_numel(s)));
  for (size_t i = 0; i < v.size(); ++i) v[i] = 0.5f * static_cast<float>(i) - 3.25f;
  return Tensor::from_vector(v, s);
}

bool have_h5py() { return std::system("python3 -c 'import h5py' > /dev/null 2>&1") == 0; }

}  // namespace

TEST_F(H5FileTest, RoundTripsTensorsOfEveryDtype) {
  const Tensor f = iota_f32({2, 3, 4});
  const Tensor l = Tensor::from_labels({0, -7, 1LL << 40, 3});
  Tensor u = Tensor::empty({2, 3}, DType::u8);
  for (int i = 0; i < 6; ++i) u.data<uint8_t>()[i] = static_cast<uint8_t>(i * 50);
  Tensor i32 = Tensor::empty({3}, DType::i32);
  for (int i = 0; i < 3; ++i) i32.data<int32_t>()[i] = -i * 100000;
  Tensor scalar = Tensor::empty({}, DType::f32);
  scalar.data<float>()[0] = 2.5f;
  Tensor step = Tensor::empty({}, DType::i64);
  step.data<int64_t>()[0] = 12345;
  Tensor half = Tensor::empty({2}, DType::f16);
  half.data<half_t>()[0] = half_t(1.5f);
  half.data<half_t>()[1] = half_t(-0.25f);
  const Tensor empty = Tensor::empty({0, 3});
  {
    H5File h = H5File::create_atomic(path("t.h5"));
    h.write("/f", f);
    h.write("labels", l);  // no leading '/': the same as "/labels"
    h.write("/g/u8", u);
    h.write("/g/i32", i32);
    h.write("/scalar", scalar);
    h.write("/step", step);
    h.write("/half", half);
    h.write("/empty", empty);
    h.commit();
  }
  const H5File h = H5File::open_read(path("t.h5"));
  EXPECT_EQ(h.shape_of("/f"), (Shape{2, 3, 4}));
  EXPECT_EQ(h.dtype_of("/f"), DType::f32);
  EXPECT_EQ(h.read("/f").to_vector(), f.to_vector());
  const Tensor l2 = h.read("/labels");
  ASSERT_EQ(l2.dtype(), DType::i64);
  EXPECT_EQ(std::vector<int64_t>(l2.data<int64_t>(), l2.data<int64_t>() + 4),
            std::vector<int64_t>(l.data<int64_t>(), l.data<int64_t>() + 4));
  const Tensor u2 = h.read("/g/u8");
  ASSERT_EQ(u2.dtype(), DType::u8);
  EXPECT_EQ(u2.shape(), (Shape{2, 3}));
  for (int i = 0; i < 6; ++i) EXPECT_EQ(u2.data<uint8_t>()[i], i * 50);
  const Tensor i2 = h.read("/g/i32");
  ASSERT_EQ(i2.dtype(), DType::i32);
  EXPECT_EQ(i2.data<int32_t>()[2], -200000);
  const Tensor s2 = h.read("/scalar");
  EXPECT_EQ(s2.shape(), Shape{});
  EXPECT_EQ(s2.numel(), 1);
  EXPECT_EQ(s2.data<float>()[0], 2.5f);
  EXPECT_EQ(h.read("/step").data<int64_t>()[0], 12345);
  EXPECT_EQ(h.dtype_of("/half"), DType::f32);  // float16 is widened on read
  EXPECT_EQ(h.read("/half").to_vector(), (std::vector<float>{1.5f, -0.25f}));
  EXPECT_EQ(h.read("/empty").shape(), (Shape{0, 3}));
}

TEST_F(H5FileTest, DotsStayInNamesAndListIsSorted) {
  H5File h = H5File::create_atomic(path("w.h5"));
  h.write("/model/stages.0.0.conv1.weight", iota_f32({4, 1, 3, 3}));
  h.write("/model/stem.0.weight", iota_f32({2}));
  h.write("/model/fc.bias", iota_f32({3}));
  h.write("/optim/exp_avg/fc.bias", iota_f32({3}));
  EXPECT_TRUE(h.has("/model/stages.0.0.conv1.weight"));
  EXPECT_TRUE(h.has("/model"));
  EXPECT_TRUE(h.has("/"));
  EXPECT_FALSE(h.has("/model/stages"));  // no group split on dots
  EXPECT_FALSE(h.has("/model/stages.0"));
  EXPECT_FALSE(h.has("/nothing/here"));
  EXPECT_FALSE(h.has("/model/fc.bias/child"));
  EXPECT_EQ(h.list("/model"), (std::vector<std::string>{"fc.bias", "stages.0.0.conv1.weight", "stem.0.weight"}));
  EXPECT_EQ(h.list("/"), (std::vector<std::string>{"model", "optim"}));
  EXPECT_EQ(h.list("/optim"), (std::vector<std::string>{"exp_avg"}));
  expect_error([&] { h.list("/missing"); }, {path("w.h5"), "/missing"});
  expect_error([&] { h.write("/model/fc.bias", iota_f32({3})); }, {path("w.h5"), "/model/fc.bias", "exists"});
  h.commit();
  const H5File r = H5File::open_read(path("w.h5"));
  EXPECT_EQ(r.shape_of("/model/stages.0.0.conv1.weight"), (Shape{4, 1, 3, 3}));
}

TEST_F(H5FileTest, StringAttributes) {
  const std::string cfg = R"({"name": "medicalcnn", "in_channels": 1, "widths": [16, 32]})";
  const std::string big(200000, 'x');  // beyond HDF5's 64 KiB compact attribute limit for fixed strings
  {
    H5File h = H5File::create_atomic(path("a.h5"));
    h.write("/model/w", iota_f32({2}));
    h.set_attr("/model", "model", "replaced below");
    h.set_attr("/model", "model", cfg);
    h.set_attr("/model/w", "note", "µ-units ✓");
    h.set_attr("/", "big", big);
    h.set_attr("/", "empty", "");
    EXPECT_EQ(h.get_attr("/model", "model"), cfg);
    expect_error([&] { h.set_attr("/nope", "a", "b"); }, {path("a.h5"), "/nope"});
    h.commit();
  }
  const H5File h = H5File::open_read(path("a.h5"));
  EXPECT_EQ(h.get_attr("/model", "model"), cfg);
  EXPECT_EQ(h.get_attr("/model/w", "note"), "µ-units ✓");
  EXPECT_EQ(h.get_attr("/", "big"), big);
  EXPECT_EQ(h.get_attr("/", "empty"), "");
  EXPECT_EQ(h.get_attr("/model", "absent"), std::nullopt);
  expect_error([&] { h.get_attr("/absent", "model"); }, {path("a.h5"), "/absent"});
}

TEST_F(H5FileTest, ErrorsNameTheFileAndTheDataset) {
  expect_error([&] { H5File::open_read(path("missing.h5")); }, {"cannot open", path("missing.h5"), "no such file"});
  {
    std::ofstream(path("garbage.h5"), std::ios::binary) << "this is not an HDF5 file at all\n" << std::string(4096, '\x7f');
  }
  expect_error([&] { H5File::open_read(path("garbage.h5")); }, {path("garbage.h5"), "not an HDF5 file"});
  {
    H5File h = H5File::create_atomic(path("ok.h5"));
    h.write("/images", iota_f32({64, 64}));
    h.commit();
  }
  // A truncated file keeps a valid signature but is still rejected with the same message.
  fs::copy_file(path("ok.h5"), path("trunc.h5"));
  fs::resize_file(path("trunc.h5"), fs::file_size(path("trunc.h5")) / 2);
  expect_error([&] { H5File::open_read(path("trunc.h5")); }, {path("trunc.h5"), "not an HDF5 file"});

  H5File r = H5File::open_read(path("ok.h5"));
  expect_error([&] { r.read("/labels"); }, {path("ok.h5"), "/labels"});
  expect_error([&] { r.shape_of("/labels"); }, {path("ok.h5"), "/labels"});
  expect_error([&] { r.write("/x", iota_f32({1})); }, {path("ok.h5"), "read-only"});
  expect_error([&] { r.set_attr("/", "a", "b"); }, {path("ok.h5"), "read-only"});
  expect_error([&] { r.commit(); }, {path("ok.h5")});
  expect_error([&] { H5File::create_atomic(path("no/such/dir/x.h5")); }, {path("no/such/dir/x.h5"), "does not exist"});
  H5File w = H5File::create_atomic(path("bf.h5"));
  expect_error([&] { w.write("/x", Tensor::empty({2}, DType::bf16)); }, {path("bf.h5"), "/x", "bf16"});
  w.commit();
  expect_error([&] { w.write("/y", iota_f32({1})); }, {path("bf.h5"), "closed"});
}

TEST_F(H5FileTest, CreateAtomicWithoutCommitLeavesNothing) {
  {
    H5File h = H5File::create_atomic(path("new.h5"));
    h.write("/a", iota_f32({10}));
  }
  EXPECT_TRUE(dir_entries().empty()) << "left behind: " << (dir_entries().empty() ? "" : dir_entries()[0]);

  {
    H5File h = H5File::create_atomic(path("keep.h5"));
    h.write("/version", iota_f32({1}));
    h.commit();
  }
  const auto before = fs::file_size(path("keep.h5"));
  // A writer that fails half way (an exception) leaves the existing file as it was.
  EXPECT_THROW(
      {
        H5File h = H5File::create_atomic(path("keep.h5"));
        h.write("/other", iota_f32({1000}));
        h.read("/missing");
      },
      Error);
  EXPECT_EQ(dir_entries(), std::vector<std::string>{"keep.h5"});
  EXPECT_EQ(fs::file_size(path("keep.h5")), before);
  EXPECT_FALSE(H5File::open_read(path("keep.h5")).has("/other"));

  {  // commit replaces it
    H5File h = H5File::create_atomic(path("keep.h5"));
    h.write("/other", iota_f32({3}));
    h.commit();
  }
  const H5File r = H5File::open_read(path("keep.h5"));
  EXPECT_TRUE(r.has("/other"));
  EXPECT_FALSE(r.has("/version"));
  EXPECT_EQ(dir_entries(), std::vector<std::string>{"keep.h5"});
}

TEST_F(H5FileTest, MoveTransfersOwnership) {
  H5File a = H5File::create_atomic(path("m.h5"));
  a.write("/x", iota_f32({2}));
  H5File b = std::move(a);
  b.write("/y", iota_f32({2}));
  b.commit();
  EXPECT_EQ(H5File::open_read(path("m.h5")).list("/"), (std::vector<std::string>{"x", "y"}));
  H5File d = H5File::create_atomic(path("n.h5"));
  d.write("/z", iota_f32({2}));
  d = H5File::open_read(path("m.h5"));  // move-assignment discards the uncommitted n.h5
  EXPECT_TRUE(d.has("/x"));
  EXPECT_EQ(dir_entries(), std::vector<std::string>{"m.h5"});
}

TEST_F(H5FileTest, InterchangeWithH5py) {
  if (!have_h5py()) GTEST_SKIP() << "h5py is not installed (pip install h5py) — skipping the interchange test";
  const std::string from_py = path("from_py.h5"), from_us = path("from_us.h5");
  const std::string write_py =
      "import h5py, numpy as np\n"
      "with h5py.File('" + from_py + "', 'w') as f:\n"
      "    g = f.create_group('model')\n"
      "    g['stages.0.0.conv1.weight'] = np.arange(24, dtype=np.float64).reshape(2, 3, 2, 2) / 4\n"
      "    g['fc.weight'] = np.arange(6, dtype=np.float32).reshape(2, 3)\n"
      "    g['bn.num_batches_tracked'] = np.int64(7)\n"
      "    g['half'] = np.array([0.5, -2.0], dtype=np.float16)\n"
      "    g.attrs['model'] = '{\"name\": \"medicalcnn\", \"note\": \"é\"}'\n"
      "    g.attrs['fixed'] = np.bytes_(b'fixed-length')\n"
      "    g.attrs['number'] = 3\n"
      "    f['images'] = np.full((2, 1, 4, 4), 0.25, dtype=np.float32)\n"
      "    f['labels'] = np.array([1, 0], dtype=np.int64)\n"
      "    f['mask'] = np.array([[0, 255]], dtype=np.uint8)\n";
  std::ofstream(path("w.py")) << write_py;
  ASSERT_EQ(std::system(("python3 " + path("w.py")).c_str()), 0);
  const H5File h = H5File::open_read(from_py);
  EXPECT_EQ(h.list("/model"),
            (std::vector<std::string>{"bn.num_batches_tracked", "fc.weight", "half", "stages.0.0.conv1.weight"}));
  EXPECT_EQ(h.dtype_of("/model/stages.0.0.conv1.weight"), DType::f32);
  const Tensor w = h.read("/model/stages.0.0.conv1.weight");
  EXPECT_EQ(w.shape(), (Shape{2, 3, 2, 2}));
  EXPECT_EQ(w.to_vector()[23], 23.0f / 4);
  EXPECT_EQ(h.read("/model/fc.weight").to_vector()[5], 5.0f);
  const Tensor nbt = h.read("/model/bn.num_batches_tracked");
  EXPECT_EQ(nbt.shape(), Shape{});
  EXPECT_EQ(nbt.data<int64_t>()[0], 7);
  EXPECT_EQ(h.read("/model/half").to_vector(), (std::vector<float>{0.5f, -2.0f}));
  EXPECT_EQ(h.get_attr("/model", "model"), "{\"name\": \"medicalcnn\", \"note\": \"é\"}");
  EXPECT_EQ(h.get_attr("/model", "fixed"), "fixed-length");
  expect_error([&] { h.get_attr("/model", "number"); }, {from_py, "number", "not a string"});
  EXPECT_EQ(h.read("/labels").data<int64_t>()[0], 1);
  EXPECT_EQ(h.read("/mask").data<uint8_t>()[1], 255);
  EXPECT_EQ(h.read("/images").shape(), (Shape{2, 1, 4, 4}));

  {
    H5File o = H5File::create_atomic(from_us);
    o.write("/logits", iota_f32({2, 3}));
    o.write("/grads/stages.0.0.conv1.weight", iota_f32({2, 1, 1, 1}));
    Tensor loss = Tensor::empty({});
    loss.data<float>()[0] = 0.75f;
    o.write("/loss", loss);
    o.write("/labels", Tensor::from_labels({3, 4}));
    o.set_attr("/", "model", "{\"name\": \"medicalcnn\"}");
    o.commit();
  }
  const std::string read_py =
      "import h5py, numpy as np\n"
      "with h5py.File('" + from_us + "', 'r') as f:\n"
      "    x = f['logits'][()]\n"
      "    assert x.dtype == np.float32 and x.shape == (2, 3), x\n"
      "    assert np.array_equal(x.ravel(), np.arange(6, dtype=np.float32) * 0.5 - 3.25), x\n"
      "    assert list(f['grads'].keys()) == ['stages.0.0.conv1.weight'], list(f['grads'].keys())\n"
      "    l = f['loss'][()]\n"
      "    assert f['loss'].shape == () and float(l) == 0.75, l\n"
      "    assert f['labels'].dtype == np.int64 and list(f['labels'][()]) == [3, 4]\n"
      "    m = f.attrs['model']\n"
      "    assert m == '{\"name\": \"medicalcnn\"}', repr(m)\n";
  std::ofstream(path("r.py")) << read_py;
  EXPECT_EQ(std::system(("python3 " + path("r.py")).c_str()), 0);
}
