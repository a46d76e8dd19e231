#include "relsum/tokenizer.h"

#include <algorithm>
#include <stdexcept>

#include "export_dir.h"

namespace relsum {
namespace {

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

char32_t parse_code_point(const std::string& hex, const std::string& path, std::size_t line) {
  std::size_t used = 0;
  unsigned long v = 0;
  try {
    v = std::stoul(hex, &used, 16);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != hex.size() || v > 0x10FFFF) detail::malformed(path, line, "bad code point `" + hex + "`");
  return static_cast<char32_t>(v);
}

// A decimal id as export.py writes it (no sign, no leading zeros); SIZE_MAX for anything else.
std::size_t parse_id(const std::string& s) {
  if (s.empty() || s.size() > 18 || (s.size() > 1 && s[0] == '0') ||
      !std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return static_cast<std::size_t>(-1);
  return static_cast<std::size_t>(std::stoull(s));
}

std::vector<std::string> split_tabs(const std::string& s, char sep = '\t') {
  std::vector<std::string> out;
  std::size_t start = 0;
  for (;;) {
    const auto end = s.find(sep, start);
    out.push_back(s.substr(start, end - start));
    if (end == std::string::npos) return out;
    start = end + 1;
  }
}

}  // namespace

std::u32string decode_utf8(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  std::size_t i = 0;
  while (i < s.size()) {
    const auto b0 = static_cast<unsigned char>(s[i]);
    if (b0 < 0x80) {
      out += static_cast<char32_t>(b0);
      ++i;
      continue;
    }
    std::size_t n;
    char32_t cp, min;
    if ((b0 & 0xE0) == 0xC0) {
      n = 2, cp = b0 & 0x1F, min = 0x80;
    } else if ((b0 & 0xF0) == 0xE0) {
      n = 3, cp = b0 & 0x0F, min = 0x800;
    } else if ((b0 & 0xF8) == 0xF0) {
      n = 4, cp = b0 & 0x07, min = 0x10000;
    } else {
      throw std::invalid_argument("relsum: text is not valid UTF-8 (bad lead byte at byte " + std::to_string(i) + ")");
    }
    if (i + n > s.size())
      throw std::invalid_argument("relsum: text is not valid UTF-8 (truncated sequence at byte " + std::to_string(i) + ")");
    for (std::size_t k = 1; k < n; ++k) {
      const auto b = static_cast<unsigned char>(s[i + k]);
      if ((b & 0xC0) != 0x80)
        throw std::invalid_argument("relsum: text is not valid UTF-8 (bad continuation byte at byte " +
                                    std::to_string(i + k) + ")");
      cp = (cp << 6) | (b & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
      throw std::invalid_argument("relsum: text is not valid UTF-8 (overlong, surrogate or out-of-range code point at byte " +
                                  std::to_string(i) + ")");
    out += cp;
    i += n;
  }
  return out;
}

Tokenizer::Tokenizer(const std::string& export_dir) : Tokenizer(detail::ExportDir(export_dir)) {}

Tokenizer::Tokenizer(const detail::ExportDir& dir) {
  const detail::Settings settings(dir);
  const auto vocab_path = dir.path("vocab.txt");
  const auto vocab_bytes = dir.read("vocab.txt");
  settings.check_file(dir, "vocab.txt", vocab_bytes);
  const auto vocab = detail::split_lines(vocab_bytes);
  vocab_size_ = vocab.size();
  // vocab.txt is the WordPiece model's vocabulary, then the added tokens that are not in it: those match
  // only verbatim (below), never as a WordPiece piece, as in the Hugging Face tokenizer.
  const auto model_vocab = settings.count("wordpiece_vocab_size", 1, vocab_size_, "the lines of vocab.txt");
  for (std::size_t i = 0; i < model_vocab; ++i) {
    if (!vocab_.emplace(vocab[i], static_cast<int64_t>(i)).second)
      detail::malformed(vocab_path, i + 1, "token `" + vocab[i] + "` appears twice");
  }
  prefix_ = settings.text("continuing_subword_prefix");
  max_word_chars_ = settings.count("max_input_chars_per_word");
  unk_id_ = static_cast<int64_t>(settings.count("unk_id", 0, model_vocab - 1, "an id of the WordPiece vocabulary"));
  for (const auto& added : settings.all("added_token")) {  // "ID CONTENT"
    const auto space = added.find(' ');
    const auto i = space == std::string::npos ? vocab_size_ : parse_id(added.substr(0, space));
    if (i >= vocab_size_ || vocab[i] != added.substr(space + 1))
      throw std::runtime_error("relsum: " + settings.path() + ": added_token `" + added +
                               "` does not match vocab.txt");
    added_.emplace_back(decode_utf8(vocab[i]), static_cast<int64_t>(i));
  }
  std::stable_sort(added_.begin(), added_.end(),
                   [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });

  const auto rules_path = dir.path("text_rules.tsv");
  const auto rules_bytes = dir.read("text_rules.tsv");
  settings.check_file(dir, "text_rules.tsv", rules_bytes);
  const auto rules = detail::split_lines(rules_bytes);
  for (std::size_t i = 0; i < rules.size(); ++i) {
    if (rules[i].empty() || rules[i][0] == '#') continue;
    const auto f = split_tabs(rules[i]);
    if (f.size() < 4) detail::malformed(rules_path, i + 1, "expected TABLE FIRST LAST KIND [REPLACEMENT]");
    Range r{parse_code_point(f[1], rules_path, i + 1), parse_code_point(f[2], rules_path, i + 1), 0, {}};
    const auto& kind = f[3];
    std::vector<Range>* table = nullptr;
    if (f[0] == "norm") {
      table = &norm_;
      if (kind == "drop") r.kind = 'd';
      else if (kind == "isolate") r.kind = 'i';
      else if (kind == "map" && f.size() == 5) {
        r.kind = 'm';
        for (const auto& hex : split_tabs(f[4], ' ')) r.replace += parse_code_point(hex, rules_path, i + 1);
      }
    } else if (f[0] == "split") {
      table = &split_;
      if (kind == "space") r.kind = 's';
      else if (kind == "punct") r.kind = 'p';
    }
    if (table == nullptr || r.kind == 0) detail::malformed(rules_path, i + 1, "unknown rule `" + f[0] + " " + kind + "`");
    if (r.last < r.first || (!table->empty() && r.first <= table->back().last))
      detail::malformed(rules_path, i + 1, "ranges must be increasing and disjoint");
    table->push_back(std::move(r));
  }
  for (char32_t cp = 0; cp < 128; ++cp) {
    const auto* n = find(norm_, cp);
    const auto* s = find(split_, cp);
    ascii_norm_[cp] = n ? static_cast<int32_t>(n - norm_.data()) : -1;
    ascii_split_[cp] = s ? static_cast<int32_t>(s - split_.data()) : -1;
  }
}

const Tokenizer::Range* Tokenizer::find(const std::vector<Range>& table, char32_t cp) {
  auto it = std::upper_bound(table.begin(), table.end(), cp,
                             [](char32_t c, const Range& r) { return c < r.first; });
  if (it == table.begin()) return nullptr;
  --it;
  return cp <= it->last ? &*it : nullptr;
}

void Tokenizer::wordpiece(const std::u32string& word, std::vector<int64_t>& out) const {
  if (word.empty()) return;
  if (word.size() > max_word_chars_) {
    out.push_back(unk_id_);
    return;
  }
  std::string utf8;
  std::vector<std::size_t> offset{0};  // byte offset of each code point boundary
  for (const auto cp : word) {
    append_utf8(utf8, cp);
    offset.push_back(utf8.size());
  }
  const auto before = out.size();
  std::string piece;
  for (std::size_t start = 0; start < word.size();) {
    std::size_t end = word.size();
    int64_t found = -1;
    for (; end > start; --end) {
      piece.assign(start > 0 ? prefix_ : std::string());
      piece.append(utf8, offset[start], offset[end] - offset[start]);
      const auto it = vocab_.find(piece);
      if (it != vocab_.end()) {
        found = it->second;
        break;
      }
    }
    if (found < 0) {  // no piece fits: the whole word is unknown
      out.resize(before);
      out.push_back(unk_id_);
      return;
    }
    out.push_back(found);
    start = end;
  }
}

void Tokenizer::encode_plain(const std::u32string& text, std::vector<int64_t>& out) const {
  std::u32string normal;
  normal.reserve(text.size());
  for (const auto cp : text) {
    const auto* r = norm_rule(cp);
    if (r == nullptr) {
      normal += cp;
    } else if (r->kind == 'i') {
      normal += U' ';
      normal += cp;
      normal += U' ';
    } else if (r->kind == 'm') {
      normal += r->replace;
    }  // 'd': dropped
  }
  std::u32string word;
  for (const auto cp : normal) {
    const auto* r = split_rule(cp);
    if (r == nullptr) {
      word += cp;
      continue;
    }
    wordpiece(word, out);
    word.clear();
    if (r->kind == 'p') wordpiece(std::u32string(1, cp), out);
  }
  wordpiece(word, out);
}

std::vector<int64_t> Tokenizer::encode(std::string_view utf8) const {
  const auto text = decode_utf8(utf8);
  std::vector<int64_t> out;
  // Added tokens are matched verbatim on the raw text first (leftmost, then longest), and the text
  // between them is tokenised on its own, as the Hugging Face tokenizer does.
  std::size_t plain_start = 0;
  for (std::size_t i = 0; i < text.size();) {
    const std::pair<std::u32string, int64_t>* hit = nullptr;
    for (const auto& a : added_) {
      if (!a.first.empty() && text.compare(i, a.first.size(), a.first) == 0) {
        hit = &a;
        break;  // longest first
      }
    }
    if (hit == nullptr) {
      ++i;
      continue;
    }
    encode_plain(text.substr(plain_start, i - plain_start), out);
    out.push_back(hit->second);
    i += hit->first.size();
    plain_start = i;
  }
  encode_plain(text.substr(plain_start), out);
  return out;
}

}  // namespace relsum
