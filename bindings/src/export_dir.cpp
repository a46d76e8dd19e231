#include "export_dir.h"

#include <cstdio>
#include <fstream>
#include <sstream>
#include <stdexcept>

#ifdef __linux__
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

namespace relsum::detail {

std::string join(const std::string& dir, const std::string& name) {
  if (dir.empty() || dir.back() == '/') return dir + name;
  return dir + "/" + name;
}

ExportDir::ExportDir(std::string dir) : dir_(std::move(dir)) {
#ifdef __linux__
  fd_ = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd_ < 0) return;  // a missing directory: the first read names the file
  handle_ = "/proc/self/fd/" + std::to_string(fd_);
  struct stat opened {}, seen {};
  // /proc missing or not this process's: read by path.
  if (::fstat(fd_, &opened) != 0 || ::stat(handle_.c_str(), &seen) != 0 || opened.st_dev != seen.st_dev ||
      opened.st_ino != seen.st_ino) {
    ::close(fd_);
    fd_ = -1;
    handle_.clear();
  }
#endif
}

ExportDir::~ExportDir() {
#ifdef __linux__
  if (fd_ >= 0) ::close(fd_);
#endif
}

std::string ExportDir::open_path(const std::string& name) const {
  return handle_.empty() ? path(name) : handle_ + "/" + name;
}

std::string ExportDir::read(const std::string& name) const {
  std::ifstream in(open_path(name), std::ios::binary);
  if (!in)
    throw std::runtime_error("relsum: cannot read " + path(name) + " (is this a `relsum export-ranker` directory?" +
                             (handle_.empty() ? ")" : " Or was it replaced while loading? Then load it again.)"));
  std::ostringstream bytes;
  bytes << in.rdbuf();
  if (in.bad()) throw std::runtime_error("relsum: cannot read " + path(name));
  return std::move(bytes).str();
}

std::vector<std::string> split_lines(const std::string& bytes) {
  std::vector<std::string> lines;
  std::size_t start = 0;
  while (start < bytes.size()) {
    auto end = bytes.find('\n', start);
    if (end == std::string::npos) end = bytes.size();
    auto line = bytes.substr(start, end - start);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    lines.push_back(std::move(line));
    start = end + 1;
  }
  return lines;
}

uint64_t fnv1a64(std::string_view bytes) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (const unsigned char b : bytes) h = (h ^ b) * 0x100000001b3ULL;
  return h;
}

void malformed(const std::string& path, std::size_t line, const std::string& why) {
  throw std::runtime_error("relsum: " + path + ":" + std::to_string(line) + ": " + why);
}

Settings::Settings(const ExportDir& dir) : path_(dir.path("settings.txt")) {
  const auto lines = split_lines(dir.read("settings.txt"));
  for (std::size_t i = 0; i < lines.size(); ++i) {
    const auto& l = lines[i];
    if (l.empty() || l[0] == '#') continue;
    const auto space = l.find(' ');
    if (space == std::string::npos || space == 0) malformed(path_, i + 1, "expected `key value`, got `" + l + "`");
    values_[l.substr(0, space)].push_back(l.substr(space + 1));
  }
  const auto format = integer("format");
  if (format != kFormatVersion)
    throw std::runtime_error("relsum: " + path_ + " is export format " + std::to_string(format) +
                             "; this build reads format " + std::to_string(kFormatVersion) +
                             (format < kFormatVersion ? " (re-export the checkpoint with this relsum's `relsum export-ranker`)"
                                                      : " (build the bindings from the relsum that exported it)"));
}

const std::vector<std::string>& Settings::all(const std::string& key) const {
  static const std::vector<std::string> none;
  const auto it = values_.find(key);
  return it == values_.end() ? none : it->second;
}

const std::string& Settings::text(const std::string& key) const {
  const auto& v = all(key);
  if (v.size() != 1)
    throw std::runtime_error("relsum: " + path_ + ": expected one `" + key + "` line, found " +
                             std::to_string(v.size()));
  return v[0];
}

int64_t Settings::integer(const std::string& key) const {
  const auto& s = text(key);
  std::size_t used = 0;
  int64_t value = 0;
  try {
    value = std::stoll(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (s.empty() || used != s.size()) throw std::runtime_error("relsum: " + path_ + ": `" + key + "` is not an integer: " + s);
  return value;
}

std::size_t Settings::count(const std::string& key, std::size_t min, std::size_t max, const std::string& bound) const {
  const auto v = integer(key);
  // Compared as signed: a negative value must not wrap around to a huge count.
  if (v < 0 || static_cast<std::size_t>(v) < min || static_cast<std::size_t>(v) > max)
    throw std::runtime_error("relsum: " + path_ + ": `" + key + "` is " + std::to_string(v) + ", outside " +
                             std::to_string(min) + ".." + std::to_string(max) + (bound.empty() ? "" : " (" + bound + ")"));
  return static_cast<std::size_t>(v);
}

void Settings::check_file(const ExportDir& dir, const std::string& name, const std::string& bytes) const {
  std::string recorded;
  for (const auto& v : all("fnv1a64"))  // "NAME HEX"
    if (v.size() > name.size() && v.compare(0, name.size() + 1, name + " ") == 0) recorded = v.substr(name.size() + 1);
  if (recorded.empty()) throw std::runtime_error("relsum: " + path_ + ": no `fnv1a64 " + name + "` line");
  char actual[17];
  std::snprintf(actual, sizeof actual, "%016llx", static_cast<unsigned long long>(fnv1a64(bytes)));
  if (recorded != actual)
    throw std::runtime_error("relsum: " + dir.path(name) + " changed while loading, or comes from another export: its "
                             "FNV-1a 64 is " + actual + ", " + path_ + " (export " + export_id() + ") records " +
                             recorded + "; load it again (a hand-edited or copied file: export again)");
}

}  // namespace relsum::detail
