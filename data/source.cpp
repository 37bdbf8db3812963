// source_kind and load_dataset (declared in image_folder.h): one entry point for every kind of
// source.
#include <filesystem>

#include "data/image_folder.h"
#include "data/npz.h"
#include "data/pack.h"
#include "kernels/error.h"

namespace lancet {

SourceKind source_kind(const std::string& source) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(source, ec)) return SourceKind::folder;
  LANCET_CHECK(fs::exists(source, ec), source << ": no such dataset (a folder, an .npz or a pack .h5)");
  if (is_pack_path(source)) return SourceKind::pack;
  const fs::path parent = fs::path(source).parent_path();
  LANCET_CHECK(fs::path(source).filename() != "manifest.csv",
               source << ": a manifest is read from its folder: name the folder ("
                      << (parent.empty() ? "." : parent.string()) << ") as the dataset");
  LANCET_CHECK(fs::path(source).extension() == ".npz",
               source << ": not a dataset (expected a folder, a MedMNIST-style .npz or a pack .h5 from lancet prep)");
  return SourceKind::npz;
}

std::unique_ptr<InMemoryDataset> load_dataset(const std::string& source, const std::string& split,
                                              const ImageLoadOptions& opt, std::string* note) {
  switch (source_kind(source)) {
    case SourceKind::folder: return load_image_dataset(source, split, opt);
    case SourceKind::pack: return load_pack_dataset(source, split, opt, note);
    case SourceKind::npz: break;
  }
  return load_npz_dataset(source, split, opt);
}

}  // namespace lancet
