// Reading an export directory's plain-text files (internal to the bindings).
#pragma once

#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace relsum::detail {

inline constexpr int kFormatVersion = 4;  // relsum_core/export.py FORMAT_VERSION

std::string join(const std::string& dir, const std::string& name);

// An export directory, opened once.  `relsum export-ranker` replaces a directory by swapping in a new
// one: files read by path one after another could come from two exports.  On Linux every file is read
// through the one handle (/proc/self/fd/N/NAME), which keeps the directory that was opened; elsewhere,
// or without /proc, by path (settings.txt's export_id and checksums then catch a mix).
class ExportDir {
 public:
  explicit ExportDir(std::string dir);
  ~ExportDir();
  ExportDir(const ExportDir&) = delete;
  ExportDir& operator=(const ExportDir&) = delete;
  std::string path(const std::string& name) const { return join(dir_, name); }  // for messages
  std::string open_path(const std::string& name) const;                          // for opening
  // A file's bytes; throws std::runtime_error naming path(name) if it cannot be read.
  std::string read(const std::string& name) const;

 private:
  std::string dir_;
  std::string handle_;  // "/proc/self/fd/N", or empty: read by path
  int fd_ = -1;
};

// Lines without the line break (a trailing '\r' dropped too).
std::vector<std::string> split_lines(const std::string& bytes);

// FNV-1a 64, as settings.txt records the other text files (relsum_core/export.py fnv1a64).
uint64_t fnv1a64(std::string_view bytes);

[[noreturn]] void malformed(const std::string& path, std::size_t line, const std::string& why);

// settings.txt: "key value" lines, the value the rest of the line after the first space (possibly empty:
// continuing_subword_prefix); a key may repeat (added_token).  Checks the format version.
class Settings {
 public:
  explicit Settings(const ExportDir& dir);
  const std::string& text(const std::string& key) const;  // the single value of key
  int64_t integer(const std::string& key) const;
  // An integer in [min, max] (a count, size or id: never negative); `bound` says where max comes from.
  std::size_t count(const std::string& key, std::size_t min = 0,
                    std::size_t max = std::numeric_limits<int64_t>::max(), const std::string& bound = "") const;
  const std::vector<std::string>& all(const std::string& key) const;  // every value (may be empty)
  const std::string& path() const { return path_; }
  const std::string& export_id() const { return text("export_id"); }
  // Throws unless `bytes` (file `name` of `dir`) has the FNV-1a 64 that its `fnv1a64 NAME HEX` line records.
  void check_file(const ExportDir& dir, const std::string& name, const std::string& bytes) const;

 private:
  std::string path_;
  std::map<std::string, std::vector<std::string>> values_;
};

}  // namespace relsum::detail
