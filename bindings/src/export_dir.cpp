#include "export_dir.h"

#include <fstream>
#include <stdexcept>

namespace relsum::detail {

std::string join(const std::string& dir, const std::string& name) {
  if (dir.empty() || dir.back() == '/') return dir + name;
  return dir + "/" + name;
}

std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("relsum: cannot read " + path + " (is this a `relsum export-ranker` directory?)");
  std::vector<std::string> lines;
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    lines.push_back(std::move(line));
  }
  return lines;
}

void malformed(const std::string& path, std::size_t line, const std::string& why) {
  throw std::runtime_error("relsum: " + path + ":" + std::to_string(line) + ": " + why);
}

Settings::Settings(const std::string& export_dir) : path_(join(export_dir, "settings.txt")) {
  const auto lines = read_lines(path_);
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

}  // namespace relsum::detail
