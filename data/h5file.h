// h5file.h — tensors and string attributes in HDF5 files (the interchange format, see
// ../shared/spec/interchange.md), readable and writable by h5py and any HDF5 tool.
//
// Contracts:
// - Names are HDF5 paths ("/model/stem.0.weight", "/images"; a missing leading '/' means the
//   same). Only '/' makes groups; dots are ordinary characters of a dataset name.
// - Every failure throws lancet::Error with one line naming the file (and the dataset or
//   attribute); HDF5's own error-stack printing is switched off.
// - HDF5 handles never leak, on any path; the HDF5 build is serial, so every call here holds
//   one process-wide lock (files may be used from any thread, one call at a time).
// - Datasets are in C (row-major) order: a tensor of shape [a, b, c] is a dataset of dims
//   (a, b, c); a 0-d tensor (shape {}) is a scalar dataset. write() makes contiguous,
//   uncompressed datasets; create_chunked() chunked, optionally gzip-compressed ones.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "kernels/tensor.h"

namespace lancet {

class H5File {
 public:
  // Opens an existing file read-only. Errors: "cannot open '<path>': no such file",
  // "'<path>' is not an HDF5 file (corrupt or wrong format)".
  static H5File open_read(const std::string& path);
  // Writes to a temporary file beside `path`; commit() flushes, closes, fsyncs and renames it
  // onto `path`. Destroyed without commit(): the temporary file is deleted and `path` is
  // untouched (never half written). The directory of `path` must exist.
  static H5File create_atomic(const std::string& path);
  // After commit() the object is closed: every further call except path() throws.
  void commit();

  H5File(H5File&& other) noexcept;
  H5File& operator=(H5File&& other) noexcept;
  H5File(const H5File&) = delete;
  H5File& operator=(const H5File&) = delete;
  ~H5File();

  const std::string& path() const { return path_; }
  bool writable() const { return !tmp_path_.empty(); }

  // True when `name` names a group or dataset ("/" always exists).
  bool has(const std::string& name) const;
  // Names (not paths) of the direct children — datasets and groups — of `group`, sorted.
  std::vector<std::string> list(const std::string& group) const;
  Shape shape_of(const std::string& name) const;
  // The dtype read() returns: f32 for every floating-point dataset (float16/float64 are
  // converted to float32 on read), i64 for int64 and uint32, i32 for int8/int16/int32/uint16,
  // u8 for uint8. Other types (uint64, strings, compounds) throw.
  DType dtype_of(const std::string& name) const;
  // The whole dataset as a new CPU tensor of shape_of(name) and dtype_of(name).
  Tensor read(const std::string& name) const;
  // Creates the dataset (and any missing intermediate groups) from a CPU, NCHW-ordered
  // tensor of dtype f32, f16 (IEEE half, h5py float16), i64, i32 or u8. Fails when `name`
  // already exists.
  void write(const std::string& name, const Tensor& t);
  // Chunked datasets, for packs of images that are read a sample at a time (lancet prep):
  // unsigned little-endian integers of 1 or 2 bytes, shape `dims`, chunks of `chunk` (same
  // rank, each in [1, dims[i]]), gzip-compressed at `gzip` 1-9 (0: uncompressed). Fails when
  // `name` exists. Written and read a block of rows (along dimension 0) at a time.
  enum class Elem { u8, u16 };
  void create_chunked(const std::string& name, Elem elem, const Shape& dims, const Shape& chunk, int gzip);
  // Rows [first, first + count) of dataset `name`: `data` holds count x (elements per row)
  // values of `elem` (HDF5 converts to and from the stored integer type). Throws when the rows
  // are outside the dataset.
  void write_rows(const std::string& name, int64_t first, int64_t count, Elem elem, const void* data);
  void read_rows(const std::string& name, int64_t first, int64_t count, Elem elem, void* data) const;
  // Shrinks dimension 0 of a chunked dataset to `rows` (at most its rows when created), e.g.
  // when fewer rows were written than reserved. Throws otherwise.
  void shrink_rows(const std::string& name, int64_t rows);
  // The chunk shape of a dataset (empty when contiguous) and its gzip level (0: none).
  Shape chunk_of(const std::string& name) const;
  int gzip_of(const std::string& name) const;
  // Bytes per element of an integer dataset as stored (1 for uint8, 2 for uint16).
  int element_size_of(const std::string& name) const;

  // Creates the group (and missing intermediate groups) unless it exists already.
  void create_group(const std::string& name);

  // A string attribute on a group or dataset, stored as h5py stores str: a scalar,
  // variable-length UTF-8 string. Replaces an existing attribute of that name.
  void set_attr(const std::string& object, const std::string& attr, const std::string& value);
  // The attribute's value (variable- or fixed-length strings, ASCII or UTF-8); nullopt when
  // the object has no such attribute. Throws when the object is missing or the attribute is
  // not a string.
  std::optional<std::string> get_attr(const std::string& object, const std::string& attr) const;

 private:
  H5File() = default;
  int64_t id() const;  // the open file's hid_t; throws when closed
  void close_and_discard() noexcept;

  std::string path_;
  std::string tmp_path_;  // non-empty for a writable file until commit()
  int64_t file_ = -1;     // hid_t (int64_t in HDF5 >= 1.10; checked in h5file.cpp)
};

// Whether the file name `name` is a temporary file of create_atomic (BASE.tmp-PID-N) whose
// writer, process PID, no longer exists on this host (what a writer killed before commit()
// leaves); BASE is stored in *base.
bool is_dead_writers_temp_file(const std::string& name, std::string* base);
// Removes those of `dir`'s regular files that are dead writers' temporary files and whose BASE
// `base_ok` accepts; a live writer's file is left alone. Returns the removed paths.
std::vector<std::string> remove_dead_writers_temp_files(const std::string& dir,
                                                        const std::function<bool(const std::string&)>& base_ok);
// The temporary files of create_atomic(path) itself (BASE = path's file name).
std::vector<std::string> remove_stale_temp_files_of(const std::string& path);

// The number of HDF5 identifiers (files, groups, datasets, types, ...) open in the process:
// 0 whenever no H5File is alive. For leak tests.
int64_t h5_open_object_count();

}  // namespace lancet
