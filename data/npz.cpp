#include "data/npz.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <mutex>
#include <opencv2/core.hpp>
#include <set>
#include <sstream>

#include "kernels/error.h"
#include "kernels/parallel.h"

namespace lancet {

// ---- .npy ---------------------------------------------------------------------------------

int64_t NpyArray::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string NpyArray::shape_str() const {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << (shape.size() == 1 ? ",)" : ")");
  return os.str();
}

namespace {

uint16_t le16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | p[1] << 8); }
uint32_t le32(const uint8_t* p) { return le16(p) | static_cast<uint32_t>(le16(p + 2)) << 16; }
uint64_t le64(const uint8_t* p) { return le32(p) | static_cast<uint64_t>(le32(p + 4)) << 32; }

// The value text after 'key': in a numpy header dict, up to the next top-level comma or '}'.
std::string dict_value(const std::string& header, const std::string& key, const std::string& where) {
  size_t k = header.find("'" + key + "'");
  if (k == std::string::npos) k = header.find("\"" + key + "\"");
  LANCET_CHECK(k != std::string::npos, where << ": bad .npy header: no '" << key << "' in " << header);
  size_t p = header.find(':', k);
  LANCET_CHECK(p != std::string::npos, where << ": bad .npy header: " << header);
  ++p;
  int depth = 0;
  size_t e = p;
  for (; e < header.size(); ++e) {
    const char c = header[e];
    if (c == '(' || c == '[') ++depth;
    else if (c == ')' || c == ']') --depth;
    else if ((c == ',' || c == '}') && depth == 0) break;
  }
  std::string v = header.substr(p, e - p);
  const size_t b = v.find_first_not_of(" \t"), last = v.find_last_not_of(" \t");
  return b == std::string::npos ? "" : v.substr(b, last - b + 1);
}

}  // namespace

NpyArray parse_npy(const uint8_t* bytes, size_t size, const std::string& where) {
  static const uint8_t magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
  LANCET_CHECK(size >= 10 && std::memcmp(bytes, magic, 6) == 0, where << ": not a .npy array (bad magic)");
  const int major = bytes[6];
  LANCET_CHECK(major >= 1 && major <= 3, where << ": unsupported .npy format version " << major);
  const size_t prefix = major == 1 ? 10 : 12;
  LANCET_CHECK(size >= prefix, where << ": truncated .npy header");
  const size_t hlen = major == 1 ? le16(bytes + 8) : le32(bytes + 8);
  LANCET_CHECK(size >= prefix + hlen, where << ": truncated .npy header");
  const std::string header(reinterpret_cast<const char*>(bytes + prefix), hlen);

  NpyArray a;
  const std::string descr = dict_value(header, "descr", where);
  LANCET_CHECK(descr.size() >= 2 && (descr.front() == '\'' || descr.front() == '"'),
               where << ": structured dtype " << descr << " is not supported (plain numeric arrays only)");
  a.descr = descr.substr(1, descr.size() - 2);
  LANCET_CHECK(a.descr.size() >= 2, where << ": bad dtype '" << a.descr << "'");
  const char order = a.descr[0];
  a.kind = a.descr[1];
  LANCET_CHECK(a.kind != 'O', where << ": object arrays are not supported");
  LANCET_CHECK(order != '>', where << ": big-endian dtype '" << a.descr << "' is not supported (save it little-endian)");
  try {
    a.item_size = std::stoi(a.descr.substr(2));
  } catch (const std::exception&) {
    a.item_size = 0;
  }
  const bool ok = (order == '<' || order == '|' || order == '=') &&
                  ((a.kind == 'b' && a.item_size == 1) ||
                   ((a.kind == 'i' || a.kind == 'u') &&
                    (a.item_size == 1 || a.item_size == 2 || a.item_size == 4 || a.item_size == 8)) ||
                   (a.kind == 'f' && (a.item_size == 4 || a.item_size == 8)));
  LANCET_CHECK(ok, where << ": unsupported dtype '" << a.descr << "' (bool, int8-64, uint8-64, float32/64)");
  const std::string fortran = dict_value(header, "fortran_order", where);
  LANCET_CHECK(fortran == "False", where << ": Fortran-order arrays are not supported (save with C order)");
  std::string shape = dict_value(header, "shape", where);
  LANCET_CHECK(shape.size() >= 2 && shape.front() == '(' && shape.back() == ')', where << ": bad shape " << shape);
  std::istringstream ss(shape.substr(1, shape.size() - 2));
  for (std::string tok; std::getline(ss, tok, ',');) {
    if (tok.find_first_not_of(" \t") == std::string::npos) continue;
    try {
      size_t used = 0;
      const long long d = std::stoll(tok, &used);
      LANCET_CHECK(d >= 0, "");
      a.shape.push_back(d);
    } catch (const std::exception&) {
      LANCET_FAIL(where << ": bad shape " << shape);
    }
  }
  uint64_t nbytes = static_cast<uint64_t>(a.item_size);
  for (int64_t d : a.shape) {  // numel() * item_size, refusing shapes whose size overflows
    LANCET_CHECK(d == 0 || nbytes <= (uint64_t{1} << 62) / static_cast<uint64_t>(d),
                 where << ": shape " << a.shape_str() << " is too large");
    nbytes *= static_cast<uint64_t>(d);
  }
  LANCET_CHECK(size - prefix - hlen >= nbytes, where << ": truncated array data: " << (size - prefix - hlen)
                                                     << " bytes for shape " << a.shape_str() << " of " << a.descr
                                                     << " (" << nbytes << " bytes)");
  a.data.assign(bytes + prefix + hlen, bytes + prefix + hlen + nbytes);
  return a;
}

std::vector<int64_t> npy_to_int64(const NpyArray& a, const std::string& where) {
  LANCET_CHECK(a.kind == 'i' || a.kind == 'u' || a.kind == 'b',
               where << ": expected an integer array, got dtype '" << a.descr << "'");
  const size_t n = static_cast<size_t>(a.numel());
  std::vector<int64_t> out(n);
  const uint8_t* p = a.data.data();
  for (size_t i = 0; i < n; ++i, p += a.item_size) {
    uint64_t u = 0;
    for (int b = a.item_size - 1; b >= 0; --b) u = u << 8 | p[b];
    if (a.kind == 'i' && a.item_size < 8 && (u >> (8 * a.item_size - 1)) & 1) u |= ~0ull << (8 * a.item_size);
    LANCET_CHECK(a.kind != 'u' || a.item_size < 8 || u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()),
                 where << ": value " << u << " at index " << i << " does not fit int64");
    out[i] = static_cast<int64_t>(u);
  }
  return out;
}

// ---- zip ----------------------------------------------------------------------------------

namespace {

// Reads `n` bytes at `offset`; throws "<path>: truncated ..." when the file is shorter.
std::vector<uint8_t> read_at(std::ifstream& f, const std::string& path, uint64_t offset, uint64_t n, const char* what) {
  std::vector<uint8_t> buf(static_cast<size_t>(n));
  f.clear();
  f.seekg(static_cast<std::streamoff>(offset));
  f.read(reinterpret_cast<char*>(buf.data()), static_cast<std::streamsize>(n));
  LANCET_CHECK(f.good() || (n == 0), path << ": truncated archive (cannot read " << what << ")");
  return buf;
}

std::ifstream open_binary(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  LANCET_CHECK(f, path << ": cannot read: " << std::strerror(errno));
  return f;
}

}  // namespace

NpzFile NpzFile::open(const std::string& path) {
  std::ifstream f = open_binary(path);
  f.seekg(0, std::ios::end);
  const uint64_t size = static_cast<uint64_t>(f.tellg());
  NpzFile z;
  z.path_ = path;
  z.file_size_ = size;
  // End of central directory: 22 bytes plus a comment of up to 65535 bytes, at the end.
  LANCET_CHECK(size >= 22, path << ": not a zip archive (.npz): " << size << " bytes");
  const uint64_t tail_len = std::min<uint64_t>(size, 22 + 65535);
  const std::vector<uint8_t> tail = read_at(f, path, size - tail_len, tail_len, "the end of central directory");
  int64_t eocd = -1;
  for (int64_t i = static_cast<int64_t>(tail_len) - 22; i >= 0; --i)
    if (le32(&tail[static_cast<size_t>(i)]) == 0x06054b50) {
      eocd = i;
      break;
    }
  LANCET_CHECK(eocd >= 0, path << ": not a zip archive (.npz) or truncated: no end of central directory record");
  const uint8_t* e = &tail[static_cast<size_t>(eocd)];
  uint64_t entries = le16(e + 10), cd_size = le32(e + 12), cd_offset = le32(e + 16);
  if (entries == 0xFFFF || cd_size == 0xFFFFFFFF || cd_offset == 0xFFFFFFFF) {
    // ZIP64: the locator sits just before the end record and points at the ZIP64 end record.
    const int64_t loc = eocd - 20;
    LANCET_CHECK(loc >= 0 && le32(&tail[static_cast<size_t>(loc)]) == 0x07064b50,
                 path << ": corrupt zip archive: ZIP64 end of central directory locator missing");
    const uint64_t z64 = le64(&tail[static_cast<size_t>(loc) + 8]);
    LANCET_CHECK(z64 + 56 <= size, path << ": truncated archive (ZIP64 end of central directory)");
    const std::vector<uint8_t> r = read_at(f, path, z64, 56, "the ZIP64 end of central directory");
    LANCET_CHECK(le32(r.data()) == 0x06064b50, path << ": corrupt zip archive: bad ZIP64 end of central directory");
    entries = le64(&r[32]), cd_size = le64(&r[40]), cd_offset = le64(&r[48]);
  }
  LANCET_CHECK(cd_offset + cd_size <= size, path << ": truncated archive: the central directory (" << cd_size
                                                 << " bytes at " << cd_offset << ") lies beyond the end (" << size
                                                 << " bytes)");
  const std::vector<uint8_t> cd = read_at(f, path, cd_offset, cd_size, "the central directory");
  size_t p = 0;
  for (uint64_t k = 0; k < entries; ++k) {
    LANCET_CHECK(p + 46 <= cd.size() && le32(&cd[p]) == 0x02014b50,
                 path << ": corrupt zip archive: bad central directory entry " << k);
    const uint8_t* c = &cd[p];
    Member m;
    m.flags = le16(c + 8), m.method = le16(c + 10), m.crc = le32(c + 16);
    m.compressed = le32(c + 20), m.uncompressed = le32(c + 24), m.local_offset = le32(c + 42);
    const size_t name_len = le16(c + 28), extra_len = le16(c + 30), comment_len = le16(c + 32);
    LANCET_CHECK(p + 46 + name_len + extra_len + comment_len <= cd.size(),
                 path << ": corrupt zip archive: central directory entry " << k << " overruns");
    m.name.assign(reinterpret_cast<const char*>(c + 46), name_len);
    // ZIP64 extended information: the 64-bit values of the fields that are saturated.
    for (size_t x = 46 + name_len; x + 4 <= 46 + name_len + extra_len;) {
      const uint16_t id = le16(c + x), len = le16(c + x + 2);
      if (id == 0x0001) {
        size_t q = x + 4;
        auto take = [&](uint64_t& field) {
          if (field == 0xFFFFFFFF && q + 8 <= x + 4 + len) field = le64(c + q), q += 8;
        };
        take(m.uncompressed);
        take(m.compressed);
        take(m.local_offset);
      }
      x += 4 + len;
    }
    m.order = static_cast<size_t>(k);
    std::string key = m.name;
    if (key.size() > 4 && key.compare(key.size() - 4, 4, ".npy") == 0) key.resize(key.size() - 4);
    z.members_[key] = m;
    p += 46 + name_len + extra_len + comment_len;
  }
  return z;
}

std::vector<std::string> NpzFile::keys() const {
  std::vector<std::pair<size_t, std::string>> v;
  for (const auto& [k, m] : members_) v.emplace_back(m.order, k);
  std::sort(v.begin(), v.end());
  std::vector<std::string> out;
  for (auto& [o, k] : v) out.push_back(k);
  return out;
}

NpyArray NpzFile::read(const std::string& key) const {
  const auto it = members_.find(key);
  if (it == members_.end()) {
    std::string have;
    for (const auto& k : keys()) have += (have.empty() ? "" : ", ") + k;
    LANCET_FAIL(path_ << ": no array '" << key << "' (the archive has: " << (have.empty() ? "nothing" : have) << ")");
  }
  const Member& m = it->second;
  const std::string where = path_ + ":" + m.name;
  LANCET_CHECK(!(m.flags & 1), where << ": encrypted members are not supported");
  LANCET_CHECK(m.method == 0 || m.method == 8,
               where << ": compression method " << m.method << " is not supported (stored and deflate are)");
  LANCET_CHECK(m.local_offset + 30 <= file_size_, where << ": truncated archive (local header beyond the end)");
  std::ifstream f = open_binary(path_);
  const std::vector<uint8_t> lh = read_at(f, path_, m.local_offset, 30, "a local header");
  LANCET_CHECK(le32(lh.data()) == 0x04034b50, where << ": corrupt zip archive: bad local header");
  const uint64_t data_offset = m.local_offset + 30 + le16(&lh[26]) + le16(&lh[28]);
  LANCET_CHECK(data_offset + m.compressed <= file_size_,
               where << ": truncated archive: member data (" << m.compressed << " bytes at " << data_offset
                     << ") beyond the end of the file (" << file_size_ << " bytes)");
  std::vector<uint8_t> raw = read_at(f, path_, data_offset, m.compressed, "member data");
  std::vector<uint8_t> bytes;
  if (m.method == 0) {
    LANCET_CHECK(m.compressed == m.uncompressed, where << ": corrupt zip archive: stored sizes differ");
    bytes = std::move(raw);
  } else {
    bytes.resize(static_cast<size_t>(m.uncompressed));
    z_stream zs{};
    LANCET_CHECK(inflateInit2(&zs, -MAX_WBITS) == Z_OK, where << ": zlib inflateInit failed");
    // Inflate in pieces: z_stream counts in 32-bit unsigned ints.
    const size_t piece = size_t{1} << 30;
    size_t in_pos = 0, out_pos = 0;
    int rc = Z_OK;
    while (rc == Z_OK) {
      zs.next_in = raw.data() + in_pos;
      zs.avail_in = static_cast<uInt>(std::min(piece, raw.size() - in_pos));
      zs.next_out = bytes.data() + out_pos;
      zs.avail_out = static_cast<uInt>(std::min(piece, bytes.size() - out_pos));
      const uInt in0 = zs.avail_in, out0 = zs.avail_out;
      rc = inflate(&zs, Z_NO_FLUSH);
      in_pos += in0 - zs.avail_in;
      out_pos += out0 - zs.avail_out;
      if (rc == Z_OK && in0 == zs.avail_in && out0 == zs.avail_out) rc = Z_BUF_ERROR;  // no progress
    }
    const std::string why = zs.msg ? zs.msg : rc == Z_BUF_ERROR ? "data ends early" : "zlib error";
    inflateEnd(&zs);
    LANCET_CHECK(rc == Z_STREAM_END && out_pos == bytes.size(), where << ": corrupt deflate data (" << why << ")");
  }
  uLong crc = crc32(0L, Z_NULL, 0);
  for (size_t off = 0; off < bytes.size();) {
    const size_t n = std::min<size_t>(bytes.size() - off, size_t{1} << 30);
    crc = crc32(crc, bytes.data() + off, static_cast<uInt>(n));
    off += n;
  }
  LANCET_CHECK(crc == m.crc, where << ": CRC-32 mismatch (corrupt archive)");
  return parse_npy(bytes.data(), bytes.size(), where);
}

// ---- MedMNIST datasets ----------------------------------------------------------------------

std::vector<std::string> npz_splits(const NpzFile& npz) {
  std::vector<std::string> out;
  for (const char* s : {"train", "val", "test"})
    if (npz.has(std::string(s) + "_images") && npz.has(std::string(s) + "_labels")) out.push_back(s);
  for (const auto& k : npz.keys()) {
    if (k.size() <= 7 || k.compare(k.size() - 7, 7, "_images") != 0) continue;
    const std::string s = k.substr(0, k.size() - 7);
    if (npz.has(s + "_labels") && std::find(out.begin(), out.end(), s) == out.end()) out.push_back(s);
  }
  return out;
}

namespace {

// Labels [N] or [N, 1] as int64 >= 0.
std::vector<int64_t> read_labels(const NpzFile& npz, const std::string& key) {
  const NpyArray a = npz.read(key);
  const std::string where = npz.path() + ":" + key;
  LANCET_CHECK(a.shape.size() == 1 || (a.shape.size() == 2 && a.shape[1] == 1),
               where << ": labels must have shape (N,) or (N, 1), got " << a.shape_str()
                     << (a.shape.size() == 2 ? " (multi-label sets are not supported)" : ""));
  std::vector<int64_t> v = npy_to_int64(a, where);
  for (size_t i = 0; i < v.size(); ++i)
    LANCET_CHECK(v[i] >= 0, where << ": label " << v[i] << " of sample " << i << " is negative");
  return v;
}

}  // namespace

NpyArray read_npz_images(const NpzFile& npz, const std::string& split) {
  NpyArray images = npz.read(split + "_images");
  const std::string where = npz.path() + ":" + split + "_images";
  LANCET_CHECK(images.descr == "|u1" || images.descr == "<u1",
               where << ": images must be uint8, got dtype '" << images.descr << "'");
  const auto& sh = images.shape;
  LANCET_CHECK((sh.size() == 3 || (sh.size() == 4 && (sh[3] == 1 || sh[3] == 3))) && sh[1] > 0 && sh[2] > 0,
               where << ": images must have shape (N, H, W) or (N, H, W, 3), got " << images.shape_str());
  return images;
}

std::vector<int64_t> read_npz_labels(const NpzFile& npz, const std::string& split,
                                     const std::vector<std::string>& declared, std::vector<std::string>* classes) {
  std::set<int64_t> seen;
  std::vector<int64_t> labels;
  for (const auto& s : npz_splits(npz)) {
    std::vector<int64_t> l = read_labels(npz, s + "_labels");
    seen.insert(l.begin(), l.end());
    if (s == split) labels = std::move(l);
  }
  const int64_t max_label = seen.empty() ? -1 : *seen.rbegin();
  // As for a manifest's integer labels (image_folder.h): an index without a sample in any split
  // would be a model output that never trains, unless data.classes declares it.
  const int64_t n_missing = max_label + 1 - static_cast<int64_t>(seen.size());
  if (declared.empty() && n_missing > 0) {
    std::string missing;
    int64_t listed = 0;
    for (int64_t k = 0; k <= max_label && listed < 10; ++k)
      if (!seen.count(k)) missing += (listed++ ? ", " : "") + std::to_string(k);
    LANCET_FAIL(npz.path() << ": labels are class indices 0-" << max_label << ", but " << n_missing
                           << " of them have no sample in any split (" << missing << (n_missing > 10 ? ", ..." : "")
                           << "): a class without images is a model output that never trains; relabel 0-"
                           << seen.size() - 1 << ", or declare every class in data.classes");
  }
  *classes = index_class_names(npz.path(), max_label + 1, declared);
  return labels;
}

DecodedImage npz_image(const NpyArray& images, int64_t i, const ImageLoadOptions& opt) {
  const int h = static_cast<int>(images.shape[1]), w = static_cast<int>(images.shape[2]);
  const int c = images.shape.size() == 4 ? static_cast<int>(images.shape[3]) : 1;
  const size_t per = static_cast<size_t>(h) * static_cast<size_t>(w) * static_cast<size_t>(c);
  const uint8_t* p = images.data.data() + static_cast<size_t>(i) * per;
  DecodedImage out;
  if (opt.recipe && !opt.recipe->empty()) {
    cv::Mat m(h, w, CV_8UC(c), const_cast<uint8_t*>(p));  // apply() never writes its input
    opt.recipe->apply(m);
    if (!m.isContinuous()) m = m.clone();
    out.rows = m.rows, out.cols = m.cols, out.channels = m.channels();
    out.pixels.assign(m.ptr<uint8_t>(), m.ptr<uint8_t>() + m.total() * m.elemSize());
  } else {
    out.rows = h, out.cols = w, out.channels = c;
    out.pixels.assign(p, p + per);
  }
  return opt.bit_depth == 16 ? widen_to_16_bits(std::move(out)) : out;
}

std::unique_ptr<InMemoryDataset> load_npz_dataset(const std::string& path, const std::string& split,
                                                  const ImageLoadOptions& opt) {
  check_load_options(opt);
  const NpzFile npz = NpzFile::open(path);
  const std::vector<std::string> splits = npz_splits(npz);
  LANCET_CHECK(std::find(splits.begin(), splits.end(), split) != splits.end(),
               path << ": no split '" << split << "' (needs members " << split << "_images and " << split
                    << "_labels; splits present: " << [&] {
                         std::string s;
                         for (const auto& x : splits) s += (s.empty() ? "" : ", ") + x;
                         return s.empty() ? std::string("none") : s;
                       }() << ")");
  std::vector<std::string> classes;
  std::vector<int64_t> labels = read_npz_labels(npz, split, opt.classes, &classes);
  const NpyArray images = read_npz_images(npz, split);
  const std::string where = path + ":" + split + "_images";
  const auto& sh = images.shape;
  LANCET_CHECK(sh[0] == static_cast<int64_t>(labels.size()),
               path << ": " << sh[0] << " images but " << labels.size() << " labels in split '" << split << "'");
  const int64_t n = sh[0];
  const int64_t s = opt.image_size;
  const int64_t per = opt.channels * s * s;
  Tensor t = Tensor::empty({n, opt.channels, s, s});
  float* base = t.data<float>();
  cv::setNumThreads(0);  // one image per task across lancet's threads, as load_image_dataset does
  std::mutex mu;
  int64_t first_bad = n;
  std::string first_error;
  parallel_for(n, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      try {
        const DecodedImage img = npz_image(images, i, opt);
        preprocess_image_bytes(img.pixels.data(), img.bits, img.rows, img.cols, img.channels, opt, base + i * per);
      } catch (const std::exception& ex) {  // exceptions must not escape an OpenMP region
        std::lock_guard<std::mutex> lock(mu);
        if (i < first_bad) first_bad = i, first_error = where + "[" + std::to_string(i) + "]: " + ex.what();
      }
    }
  });
  if (first_bad < n) throw Error(first_error);
  return std::make_unique<InMemoryDataset>(std::move(t), std::move(labels), std::move(classes));
}

}  // namespace lancet
