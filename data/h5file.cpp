#include "data/h5file.h"

#include <fcntl.h>
#include <hdf5.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <type_traits>

namespace fs = std::filesystem;

namespace lancet {

static_assert(std::is_same<hid_t, int64_t>::value, "H5File stores hid_t as int64_t (HDF5 >= 1.10)");

namespace {

// The serial HDF5 library is not thread-safe: every entry point below holds this lock.
std::recursive_mutex& h5_mutex() {
  static std::recursive_mutex m;
  return m;
}

// Taken by every public call: serialises HDF5 and keeps its error stack from printing.
struct H5Lock {
  std::lock_guard<std::recursive_mutex> guard{h5_mutex()};
  H5Lock() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }
};

// Owns one HDF5 identifier and closes it with the matching H5?close.
class Handle {
 public:
  using Closer = herr_t (*)(hid_t);
  Handle(hid_t id, Closer close) : id_(id), close_(close) {}
  ~Handle() {
    if (id_ >= 0) close_(id_);
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  Handle(Handle&& o) noexcept : id_(o.id_), close_(o.close_) { o.id_ = -1; }
  Handle& operator=(Handle&& o) noexcept {
    if (this != &o) {
      if (id_ >= 0) close_(id_);
      id_ = o.id_, close_ = o.close_, o.id_ = -1;
    }
    return *this;
  }
  hid_t get() const { return id_; }
  bool ok() const { return id_ >= 0; }

 private:
  hid_t id_;
  Closer close_;
};

// The innermost message on HDF5's error stack (why the last call failed), on one line.
std::string h5_reason() {
  std::string msg;
  auto walk = [](unsigned n, const H5E_error2_t* e, void* out) -> herr_t {
    auto* s = static_cast<std::string*>(out);
    if (n == 0 && e->desc) *s = e->desc;
    return 0;
  };
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, walk, &msg);
  for (char& c : msg)
    if (c == '\n' || c == '\r') c = ' ';
  return msg.empty() ? "unknown HDF5 error" : msg;
}

// "/a/b" for "a/b", "/a/b/" and "/a/b"; "/" for "" and "/".
std::string normalize(const std::string& name) {
  std::string n = name.empty() || name[0] != '/' ? "/" + name : name;
  while (n.size() > 1 && n.back() == '/') n.pop_back();
  return n;
}

// An HDF5 IEEE binary16 type (what h5py uses for numpy float16).
hid_t make_half_type() {
  hid_t t = H5Tcopy(H5T_IEEE_F32LE);
  H5Tset_fields(t, 15, 10, 5, 0, 10);
  H5Tset_size(t, 2);
  H5Tset_ebias(t, 15);
  return t;
}

// Memory type for reading/writing a tensor of `dtype` (a new id the caller closes).
hid_t memory_type(DType dtype) {
  switch (dtype) {
    case DType::f32: return H5Tcopy(H5T_NATIVE_FLOAT);
    case DType::f16: return make_half_type();
    case DType::i64: return H5Tcopy(H5T_NATIVE_INT64);
    case DType::i32: return H5Tcopy(H5T_NATIVE_INT32);
    case DType::u8: return H5Tcopy(H5T_NATIVE_UINT8);
    default: return -1;
  }
}

// The dtype a dataset of file type `t` reads as (see dtype_of); false when unsupported.
bool dtype_for(hid_t t, DType* out) {
  const size_t size = H5Tget_size(t);
  switch (H5Tget_class(t)) {
    case H5T_FLOAT: *out = DType::f32; return true;
    case H5T_INTEGER: {
      const bool is_signed = H5Tget_sign(t) == H5T_SGN_2;
      if (!is_signed && size == 1) *out = DType::u8;
      else if ((is_signed && size <= 4) || (!is_signed && size == 2)) *out = DType::i32;
      else if ((is_signed && size == 8) || (!is_signed && size == 4)) *out = DType::i64;
      else return false;
      return true;
    }
    default: return false;
  }
}

}  // namespace

// ---- lifetime ---------------------------------------------------------------------------

H5File H5File::open_read(const std::string& path) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  LANCET_CHECK(fs::exists(st), "cannot open '" << path << "': no such file");
  LANCET_CHECK(!fs::is_directory(st), "cannot open '" << path << "': is a directory");
  LANCET_CHECK(::access(path.c_str(), R_OK) == 0, "cannot open '" << path << "': " << std::strerror(errno));
  H5Lock lock;
  LANCET_CHECK(H5Fis_hdf5(path.c_str()) > 0, "'" << path << "' is not an HDF5 file (corrupt or wrong format)");
  const hid_t id = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  // The signature matched but the file does not open: typically a truncated file.
  LANCET_CHECK(id >= 0, "'" << path << "' is not an HDF5 file (corrupt or wrong format): " << h5_reason());
  H5File f;
  f.path_ = path;
  f.file_ = id;
  return f;
}

H5File H5File::create_atomic(const std::string& path) {
  static std::atomic<uint64_t> counter{0};
  fs::path dir = fs::path(path).parent_path();
  if (dir.empty()) dir = ".";
  std::error_code ec;
  LANCET_CHECK(fs::is_directory(dir, ec), "cannot create '" << path << "': directory '" << dir.string()
                                                             << "' does not exist");
  LANCET_CHECK(!fs::is_directory(path, ec), "cannot create '" << path << "': is a directory");
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(counter++);
  H5Lock lock;
  Handle fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  // STRONG: H5Fclose in commit() really closes the file before it is renamed.
  H5Pset_fclose_degree(fapl.get(), H5F_CLOSE_STRONG);
  const hid_t id = H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get());
  if (id < 0) {
    const std::string why = h5_reason();
    ::unlink(tmp.c_str());
    LANCET_FAIL("cannot create '" << path << "': " << why);
  }
  H5File f;
  f.path_ = path;
  f.tmp_path_ = tmp;
  f.file_ = id;
  return f;
}

void H5File::commit() {
  H5Lock lock;
  LANCET_CHECK(writable(), path_ << ": commit() on a file that is not open for writing");
  const hid_t id = file_;
  file_ = -1;
  const bool closed = H5Fflush(id, H5F_SCOPE_GLOBAL) >= 0 && H5Fclose(id) >= 0;
  if (!closed) {
    const std::string why = h5_reason();
    close_and_discard();
    LANCET_FAIL("cannot write '" << path_ << "': " << why);
  }
  // The data must be on disk before the rename makes it visible under the final name.
  const int fd = ::open(tmp_path_.c_str(), O_RDONLY);
  const bool synced = fd >= 0 && ::fsync(fd) == 0;
  const int sync_errno = errno;
  if (fd >= 0) ::close(fd);
  if (!synced) {
    close_and_discard();
    LANCET_FAIL("cannot write '" << path_ << "': fsync failed: " << std::strerror(sync_errno));
  }
  if (std::rename(tmp_path_.c_str(), path_.c_str()) != 0) {
    const int e = errno;
    close_and_discard();
    LANCET_FAIL("cannot write '" << path_ << "': rename failed: " << std::strerror(e));
  }
  tmp_path_.clear();
  // Persist the rename itself (best effort: not every filesystem lets a directory be synced).
  fs::path dir = fs::path(path_).parent_path();
  const int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

bool is_dead_writers_temp_file(const std::string& name, std::string* base) {
  const auto at = name.rfind(".tmp-");
  if (at == std::string::npos || at == 0) return false;
  const std::string rest = name.substr(at + 5);  // PID-N, as create_atomic names it
  const auto dash = rest.find('-');
  if (dash == std::string::npos || dash == 0 || dash + 1 == rest.size() ||
      rest.find_first_not_of("0123456789-") != std::string::npos || rest.find('-', dash + 1) != std::string::npos)
    return false;
  const long pid = std::strtol(rest.substr(0, dash).c_str(), nullptr, 10);
  if (pid > 0 && (::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH)) return false;  // alive (or not ours)
  *base = name.substr(0, at);
  return true;
}

std::vector<std::string> remove_dead_writers_temp_files(const std::string& dir,
                                                        const std::function<bool(const std::string&)>& base_ok) {
  std::vector<std::string> removed;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return removed;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    std::string base;
    if (!e.is_regular_file(ec) || !is_dead_writers_temp_file(e.path().filename().string(), &base) || !base_ok(base))
      continue;
    std::error_code rm;
    if (fs::remove(e.path(), rm)) removed.push_back(e.path().string());
  }
  return removed;
}

std::vector<std::string> remove_stale_temp_files_of(const std::string& path) {
  fs::path dir = fs::path(path).parent_path();
  if (dir.empty()) dir = ".";
  const std::string file = fs::path(path).filename().string();
  return remove_dead_writers_temp_files(dir.string(), [&](const std::string& base) { return base == file; });
}

void H5File::close_and_discard() noexcept {
  if (file_ >= 0) H5Fclose(file_);
  file_ = -1;
  if (!tmp_path_.empty()) ::unlink(tmp_path_.c_str());
  tmp_path_.clear();
}

H5File::H5File(H5File&& other) noexcept
    : path_(std::move(other.path_)), tmp_path_(std::move(other.tmp_path_)), file_(other.file_) {
  other.file_ = -1;
  other.tmp_path_.clear();
}

H5File& H5File::operator=(H5File&& other) noexcept {
  if (this != &other) {
    {
      std::lock_guard<std::recursive_mutex> guard(h5_mutex());
      close_and_discard();
    }
    path_ = std::move(other.path_);
    tmp_path_ = std::move(other.tmp_path_);
    file_ = other.file_;
    other.file_ = -1;
    other.tmp_path_.clear();
  }
  return *this;
}

H5File::~H5File() {
  if (file_ < 0 && tmp_path_.empty()) return;
  std::lock_guard<std::recursive_mutex> guard(h5_mutex());
  close_and_discard();
}

int64_t H5File::id() const {
  LANCET_CHECK(file_ >= 0, path_ << ": the file is closed" << (path_.empty() ? "" : " (already committed)"));
  return file_;
}

// ---- datasets ---------------------------------------------------------------------------

bool H5File::has(const std::string& name) const {
  H5Lock lock;
  const hid_t f = id();
  const std::string n = normalize(name);
  if (n == "/") return true;
  // H5Lexists fails (rather than returning false) when a parent is missing: walk down.
  for (size_t pos = n.find('/', 1);; pos = n.find('/', pos + 1)) {
    const std::string prefix = n.substr(0, pos);
    if (H5Lexists(f, prefix.c_str(), H5P_DEFAULT) <= 0) return false;
    if (pos == std::string::npos) break;
  }
  return H5Oexists_by_name(f, n.c_str(), H5P_DEFAULT) > 0;  // false for a dangling soft link
}

std::vector<std::string> H5File::list(const std::string& group) const {
  H5Lock lock;
  const std::string n = normalize(group);
  LANCET_CHECK(has(n), path_ << ": no group '" << n << "'");
  Handle g(H5Gopen2(id(), n.c_str(), H5P_DEFAULT), H5Gclose);
  LANCET_CHECK(g.ok(), path_ << ": '" << n << "' is not a group");
  std::vector<std::string> names;
  auto collect = [](hid_t, const char* child, const H5L_info_t*, void* out) -> herr_t {
    static_cast<std::vector<std::string>*>(out)->emplace_back(child);
    return 0;
  };
  LANCET_CHECK(H5Literate(g.get(), H5_INDEX_NAME, H5_ITER_INC, nullptr, collect, &names) >= 0,
               path_ << ": cannot list group '" << n << "': " << h5_reason());
  std::sort(names.begin(), names.end());  // HDF5's name order is already sorted; make it a contract
  return names;
}

namespace {

// Opens dataset `n`, failing with a message naming the file and the dataset.
hid_t open_dataset(const H5File& file, hid_t f, const std::string& n) {
  LANCET_CHECK(file.has(n), file.path() << ": no dataset '" << n << "'");
  const hid_t d = H5Dopen2(f, n.c_str(), H5P_DEFAULT);
  LANCET_CHECK(d >= 0, file.path() << ": '" << n << "' is not a dataset");
  return d;
}

Shape dataset_shape(const std::string& path, const std::string& n, hid_t d) {
  Handle space(H5Dget_space(d), H5Sclose);
  LANCET_CHECK(space.ok() && H5Sget_simple_extent_type(space.get()) != H5S_NULL,
               path << ": dataset '" << n << "' has no dataspace (empty/null dataset)");
  const int nd = H5Sget_simple_extent_ndims(space.get());
  LANCET_CHECK(nd >= 0, path << ": cannot read the shape of '" << n << "': " << h5_reason());
  std::vector<hsize_t> dims(static_cast<size_t>(nd));
  H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr);
  return Shape(dims.begin(), dims.end());
}

DType dataset_dtype(const std::string& path, const std::string& n, hid_t d) {
  Handle t(H5Dget_type(d), H5Tclose);
  DType dt = DType::f32;
  LANCET_CHECK(t.ok() && dtype_for(t.get(), &dt),
               path << ": dataset '" << n << "' has an unsupported element type (expected float or integer)");
  return dt;
}

}  // namespace

Shape H5File::shape_of(const std::string& name) const {
  H5Lock lock;
  const std::string n = normalize(name);
  Handle d(open_dataset(*this, id(), n), H5Dclose);
  return dataset_shape(path_, n, d.get());
}

DType H5File::dtype_of(const std::string& name) const {
  H5Lock lock;
  const std::string n = normalize(name);
  Handle d(open_dataset(*this, id(), n), H5Dclose);
  return dataset_dtype(path_, n, d.get());
}

Tensor H5File::read(const std::string& name) const {
  H5Lock lock;
  const std::string n = normalize(name);
  Handle d(open_dataset(*this, id(), n), H5Dclose);
  const Shape shape = dataset_shape(path_, n, d.get());
  const DType dt = dataset_dtype(path_, n, d.get());
  Tensor t = Tensor::empty(shape, dt);
  if (t.numel() == 0) return t;
  Handle mtype(memory_type(dt), H5Tclose);  // HDF5 converts (e.g. float64 -> float32) on read
  LANCET_CHECK(H5Dread(d.get(), mtype.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, t.raw_data()) >= 0,
               path_ << ": cannot read dataset '" << n << "': " << h5_reason());
  return t;
}

void H5File::write(const std::string& name, const Tensor& t) {
  H5Lock lock;
  const hid_t f = id();
  const std::string n = normalize(name);
  LANCET_CHECK(writable(), path_ << ": cannot write '" << n << "': the file is open read-only");
  LANCET_CHECK(n != "/", path_ << ": cannot write a dataset named '/'");
  LANCET_CHECK(t.defined(), path_ << ": cannot write '" << n << "': undefined tensor");
  LANCET_CHECK(t.device().is_cpu(), path_ << ": cannot write '" << n << "': tensor is on " << t.device().str()
                                          << " (copy it to the CPU first)");
  LANCET_CHECK(t.format() == MemoryFormat::nchw,
               path_ << ": cannot write '" << n << "': channels_last tensor (convert to NCHW first)");
  Handle mtype(memory_type(t.dtype()), H5Tclose);
  LANCET_CHECK(mtype.ok(), path_ << ": cannot write '" << n << "': dtype " << dtype_name(t.dtype())
                                 << " is not supported (f32, f16, i64, i32, u8)");
  LANCET_CHECK(!has(n), path_ << ": cannot write '" << n << "': it already exists");
  // Stored little-endian whatever the host, as h5py/numpy would on x86.
  hid_t std_type = H5T_IEEE_F32LE;
  if (t.dtype() == DType::i64) std_type = H5T_STD_I64LE;
  if (t.dtype() == DType::i32) std_type = H5T_STD_I32LE;
  if (t.dtype() == DType::u8) std_type = H5T_STD_U8LE;
  Handle ftype(t.dtype() == DType::f16 ? make_half_type() : H5Tcopy(std_type), H5Tclose);
  const std::vector<hsize_t> dims(t.shape().begin(), t.shape().end());
  Handle space(dims.empty() ? H5Screate(H5S_SCALAR) : H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr),
               H5Sclose);
  Handle lcpl(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
  H5Pset_create_intermediate_group(lcpl.get(), 1);
  H5Pset_char_encoding(lcpl.get(), H5T_CSET_UTF8);
  Handle d(H5Dcreate2(f, n.c_str(), ftype.get(), space.get(), lcpl.get(), H5P_DEFAULT, H5P_DEFAULT), H5Dclose);
  LANCET_CHECK(d.ok(), path_ << ": cannot create dataset '" << n << "': " << h5_reason());
  if (t.numel() > 0) {
    LANCET_CHECK(H5Dwrite(d.get(), mtype.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, t.raw_data()) >= 0,
                 path_ << ": cannot write dataset '" << n << "': " << h5_reason());
  }
}

// ---- chunked datasets ------------------------------------------------------------------

namespace {

hid_t elem_memory_type(H5File::Elem e) { return e == H5File::Elem::u8 ? H5T_NATIVE_UINT8 : H5T_NATIVE_UINT16; }

// The dataspace selection rows [first, first + count) of dataset d (shape `shape`), and the
// matching memory space; throws when out of range.
void select_rows(const std::string& path, const std::string& n, hid_t d, int64_t first, int64_t count, Handle* file_space,
                 Handle* mem_space) {
  const Shape shape = dataset_shape(path, n, d);
  LANCET_CHECK(!shape.empty() && first >= 0 && count >= 0 && first + count <= shape[0],
               path << ": rows [" << first << ", " << first + count << ") are outside dataset '" << n << "' of "
                    << (shape.empty() ? 0 : shape[0]) << " rows");
  std::vector<hsize_t> start(shape.size(), 0), dims(shape.begin(), shape.end());
  start[0] = static_cast<hsize_t>(first);
  dims[0] = static_cast<hsize_t>(count);
  *file_space = Handle(H5Dget_space(d), H5Sclose);
  H5Sselect_hyperslab(file_space->get(), H5S_SELECT_SET, start.data(), nullptr, dims.data(), nullptr);
  *mem_space = Handle(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
}

}  // namespace

void H5File::create_chunked(const std::string& name, Elem elem, const Shape& dims, const Shape& chunk, int gzip) {
  H5Lock lock;
  const hid_t f = id();
  const std::string n = normalize(name);
  LANCET_CHECK(writable(), path_ << ": cannot write '" << n << "': the file is open read-only");
  LANCET_CHECK(!dims.empty() && chunk.size() == dims.size(), path_ << ": cannot create '" << n << "': chunk rank "
                                                                    << chunk.size() << " for " << dims.size() << " dims");
  for (size_t i = 0; i < dims.size(); ++i)
    LANCET_CHECK(chunk[i] >= 1 && chunk[i] <= std::max<int64_t>(dims[i], 1),
                 path_ << ": cannot create '" << n << "': chunk dimension " << i << " is " << chunk[i]);
  LANCET_CHECK(gzip >= 0 && gzip <= 9, path_ << ": gzip level must be 0-9, got " << gzip);
  LANCET_CHECK(gzip == 0 || H5Zfilter_avail(H5Z_FILTER_DEFLATE) > 0,
               path_ << ": this HDF5 library has no gzip (deflate) filter");
  LANCET_CHECK(!has(n), path_ << ": cannot write '" << n << "': it already exists");
  const std::vector<hsize_t> d(dims.begin(), dims.end()), c(chunk.begin(), chunk.end());
  Handle space(H5Screate_simple(static_cast<int>(d.size()), d.data(), nullptr), H5Sclose);
  Handle dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
  H5Pset_chunk(dcpl.get(), static_cast<int>(c.size()), c.data());
  if (gzip > 0) H5Pset_deflate(dcpl.get(), static_cast<unsigned>(gzip));
  Handle lcpl(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
  H5Pset_create_intermediate_group(lcpl.get(), 1);
  H5Pset_char_encoding(lcpl.get(), H5T_CSET_UTF8);
  Handle ds(H5Dcreate2(f, n.c_str(), elem == Elem::u8 ? H5T_STD_U8LE : H5T_STD_U16LE, space.get(), lcpl.get(),
                       dcpl.get(), H5P_DEFAULT),
            H5Dclose);
  LANCET_CHECK(ds.ok(), path_ << ": cannot create dataset '" << n << "': " << h5_reason());
}

void H5File::write_rows(const std::string& name, int64_t first, int64_t count, Elem elem, const void* data) {
  H5Lock lock;
  const std::string n = normalize(name);
  LANCET_CHECK(writable(), path_ << ": cannot write '" << n << "': the file is open read-only");
  Handle d(open_dataset(*this, id(), n), H5Dclose);
  Handle fs_(-1, H5Sclose), ms(-1, H5Sclose);
  select_rows(path_, n, d.get(), first, count, &fs_, &ms);
  if (count == 0) return;
  LANCET_CHECK(H5Dwrite(d.get(), elem_memory_type(elem), ms.get(), fs_.get(), H5P_DEFAULT, data) >= 0,
               path_ << ": cannot write rows of '" << n << "': " << h5_reason());
}

void H5File::read_rows(const std::string& name, int64_t first, int64_t count, Elem elem, void* data) const {
  H5Lock lock;
  const std::string n = normalize(name);
  Handle d(open_dataset(*this, id(), n), H5Dclose);
  Handle fs_(-1, H5Sclose), ms(-1, H5Sclose);
  select_rows(path_, n, d.get(), first, count, &fs_, &ms);
  if (count == 0) return;
  LANCET_CHECK(H5Dread(d.get(), elem_memory_type(elem), ms.get(), fs_.get(), H5P_DEFAULT, data) >= 0,
               path_ << ": cannot read rows of '" << n << "' (corrupt file?): " << h5_reason());
}

void H5File::shrink_rows(const std::string& name, int64_t rows) {
  H5Lock lock;
  const std::string n = normalize(name);
  LANCET_CHECK(writable(), path_ << ": cannot resize '" << n << "': the file is open read-only");
  Handle d(open_dataset(*this, id(), n), H5Dclose);
  const Shape shape = dataset_shape(path_, n, d.get());
  LANCET_CHECK(!shape.empty() && rows >= 0 && rows <= shape[0],
               path_ << ": cannot shrink '" << n << "' to " << rows << " rows (it has " << (shape.empty() ? 0 : shape[0])
                     << ")");
  std::vector<hsize_t> dims(shape.begin(), shape.end());
  dims[0] = static_cast<hsize_t>(rows);
  LANCET_CHECK(H5Dset_extent(d.get(), dims.data()) >= 0, path_ << ": cannot resize '" << n << "': " << h5_reason());
}

Shape H5File::chunk_of(const std::string& name) const {
  H5Lock lock;
  const std::string n = normalize(name);
  Handle d(open_dataset(*this, id(), n), H5Dclose);
  Handle dcpl(H5Dget_create_plist(d.get()), H5Pclose);
  if (H5Pget_layout(dcpl.get()) != H5D_CHUNKED) return {};
  hsize_t c[32];
  const int rank = H5Pget_chunk(dcpl.get(), 32, c);
  LANCET_CHECK(rank > 0, path_ << ": cannot read the chunking of '" << n << "': " << h5_reason());
  return Shape(c, c + rank);
}

int H5File::gzip_of(const std::string& name) const {
  H5Lock lock;
  const std::string n = normalize(name);
  Handle d(open_dataset(*this, id(), n), H5Dclose);
  Handle dcpl(H5Dget_create_plist(d.get()), H5Pclose);
  const int nf = H5Pget_nfilters(dcpl.get());
  for (int i = 0; i < nf; ++i) {
    unsigned flags = 0, values[8];
    size_t nv = 8;
    if (H5Pget_filter2(dcpl.get(), static_cast<unsigned>(i), &flags, &nv, values, 0, nullptr, nullptr) ==
            H5Z_FILTER_DEFLATE)
      return nv > 0 ? static_cast<int>(values[0]) : 1;
  }
  return 0;
}

int H5File::element_size_of(const std::string& name) const {
  H5Lock lock;
  const std::string n = normalize(name);
  Handle d(open_dataset(*this, id(), n), H5Dclose);
  Handle t(H5Dget_type(d.get()), H5Tclose);
  LANCET_CHECK(t.ok() && H5Tget_class(t.get()) == H5T_INTEGER, path_ << ": '" << n << "' is not an integer dataset");
  return static_cast<int>(H5Tget_size(t.get()));
}

// ---- attributes -------------------------------------------------------------------------

void H5File::create_group(const std::string& name) {
  H5Lock lock;
  const hid_t f = id();
  const std::string n = normalize(name);
  LANCET_CHECK(writable(), path_ << ": cannot create group '" << n << "': the file is open read-only");
  if (has(n)) return;
  Handle lcpl(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
  H5Pset_create_intermediate_group(lcpl.get(), 1);
  H5Pset_char_encoding(lcpl.get(), H5T_CSET_UTF8);
  Handle g(H5Gcreate2(f, n.c_str(), lcpl.get(), H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
  LANCET_CHECK(g.ok(), path_ << ": cannot create group '" << n << "': " << h5_reason());
}

void H5File::set_attr(const std::string& object, const std::string& attr, const std::string& value) {
  H5Lock lock;
  const hid_t f = id();
  const std::string n = normalize(object);
  LANCET_CHECK(writable(), path_ << ": cannot set attribute '" << attr << "' on '" << n << "': the file is open read-only");
  LANCET_CHECK(has(n), path_ << ": cannot set attribute '" << attr << "': no object '" << n << "'");
  const htri_t exists = H5Aexists_by_name(f, n.c_str(), attr.c_str(), H5P_DEFAULT);
  if (exists > 0) H5Adelete_by_name(f, n.c_str(), attr.c_str(), H5P_DEFAULT);
  Handle type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type.get(), H5T_VARIABLE);
  H5Tset_cset(type.get(), H5T_CSET_UTF8);
  Handle space(H5Screate(H5S_SCALAR), H5Sclose);
  Handle a(H5Acreate_by_name(f, n.c_str(), attr.c_str(), type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
           H5Aclose);
  LANCET_CHECK(a.ok(), path_ << ": cannot create attribute '" << attr << "' on '" << n << "': " << h5_reason());
  const char* p = value.c_str();
  LANCET_CHECK(H5Awrite(a.get(), type.get(), &p) >= 0,
               path_ << ": cannot write attribute '" << attr << "' on '" << n << "': " << h5_reason());
}

std::optional<std::string> H5File::get_attr(const std::string& object, const std::string& attr) const {
  H5Lock lock;
  const hid_t f = id();
  const std::string n = normalize(object);
  LANCET_CHECK(has(n), path_ << ": cannot read attribute '" << attr << "': no object '" << n << "'");
  const htri_t exists = H5Aexists_by_name(f, n.c_str(), attr.c_str(), H5P_DEFAULT);
  LANCET_CHECK(exists >= 0, path_ << ": cannot read attribute '" << attr << "' of '" << n << "': " << h5_reason());
  if (exists == 0) return std::nullopt;
  Handle a(H5Aopen_by_name(f, n.c_str(), attr.c_str(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  Handle ftype(a.ok() ? H5Aget_type(a.get()) : -1, H5Tclose);
  Handle space(a.ok() ? H5Aget_space(a.get()) : -1, H5Sclose);
  LANCET_CHECK(ftype.ok() && space.ok(), path_ << ": cannot open attribute '" << attr << "' of '" << n << "': " << h5_reason());
  LANCET_CHECK(H5Tget_class(ftype.get()) == H5T_STRING,
               path_ << ": attribute '" << attr << "' of '" << n << "' is not a string");
  LANCET_CHECK(H5Sget_simple_extent_npoints(space.get()) == 1,
               path_ << ": attribute '" << attr << "' of '" << n << "' is an array, expected one string");
  // Read with a memory type of the same kind and character set: HDF5 does not convert
  // between variable- and fixed-length strings.
  Handle mtype(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_cset(mtype.get(), H5Tget_cset(ftype.get()));
  std::string value;
  herr_t rc;
  if (H5Tis_variable_str(ftype.get()) > 0) {
    H5Tset_size(mtype.get(), H5T_VARIABLE);
    char* buf = nullptr;
    rc = H5Aread(a.get(), mtype.get(), &buf);
    if (rc >= 0 && buf) value = buf;
    if (buf) H5free_memory(buf);
  } else {
    const size_t size = H5Tget_size(ftype.get());
    H5Tset_size(mtype.get(), size);
    H5Tset_strpad(mtype.get(), H5T_STR_NULLPAD);
    std::vector<char> buf(size + 1, '\0');
    rc = H5Aread(a.get(), mtype.get(), buf.data());
    value.assign(buf.data(), strnlen(buf.data(), size));
  }
  LANCET_CHECK(rc >= 0, path_ << ": cannot read attribute '" << attr << "' of '" << n << "': " << h5_reason());
  return value;
}

int64_t h5_open_object_count() {
  H5Lock lock;
  return static_cast<int64_t>(H5Fget_obj_count(H5F_OBJ_ALL, H5F_OBJ_ALL));
}

}  // namespace lancet
