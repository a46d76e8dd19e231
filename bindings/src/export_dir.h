// Reading an export directory's plain-text files (internal to the bindings).
#pragma once

#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <vector>

namespace relsum::detail {

inline constexpr int kFormatVersion = 3;  // relsum_core/export.py FORMAT_VERSION

std::string join(const std::string& dir, const std::string& name);

// A file's lines (without the line break); throws std::runtime_error naming a file it cannot read.
std::vector<std::string> read_lines(const std::string& path);

[[noreturn]] void malformed(const std::string& path, std::size_t line, const std::string& why);

// settings.txt: "key value" lines, the value the rest of the line after the first space (possibly empty:
// continuing_subword_prefix); a key may repeat (added_token).  Checks the format version.
class Settings {
 public:
  explicit Settings(const std::string& export_dir);
  const std::string& text(const std::string& key) const;  // the single value of key
  int64_t integer(const std::string& key) const;
  // An integer in [min, max] (a count, size or id: never negative); `bound` says where max comes from.
  std::size_t count(const std::string& key, std::size_t min = 0,
                    std::size_t max = std::numeric_limits<int64_t>::max(), const std::string& bound = "") const;
  const std::vector<std::string>& all(const std::string& key) const;  // every value (may be empty)
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::map<std::string, std::vector<std::string>> values_;
};

}  // namespace relsum::detail
