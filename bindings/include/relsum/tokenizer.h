// relsum C++ API: the ranker's WordPiece tokenizer, driven by the tables `relsum export-ranker` writes.
//
// No libtorch here: a front end can tokenise (and cache ids) without the model.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace relsum {
namespace detail {
class ExportDir;
}

// A BERT WordPiece tokenizer equal, id for id, to the Hugging Face fast tokenizer it was exported
// from: verbatim added tokens ([CLS], [SEP], ...) are matched first, then each code point is
// normalised by the exported table (cleaning, lower-casing, accent stripping, CJK isolation), the text
// is split at whitespace and punctuation, and each word is cut greedily into the longest pieces of the
// WordPiece vocabulary ([UNK] for a word that has none, or more than `max_input_chars_per_word` code
// points).  Added tokens outside that vocabulary only ever match verbatim, never as a piece.
class Tokenizer {
 public:
  // Reads vocab.txt, text_rules.tsv and settings.txt from an export directory.  Throws
  // std::runtime_error naming the file (and line) of anything missing, malformed or out of range, and
  // for a vocab.txt or text_rules.tsv other than the one settings.txt records (from another export,
  // or the export replaced while loading).
  explicit Tokenizer(const std::string& export_dir);
  explicit Tokenizer(const detail::ExportDir& dir);  // internal: the Ranker's already open directory

  // Token ids without special tokens.  Throws std::invalid_argument (with the byte offset) for text
  // that is not valid UTF-8.
  std::vector<int64_t> encode(std::string_view utf8) const;

  std::size_t vocab_size() const { return vocab_size_; }

 private:
  struct Range {
    char32_t first, last;
    char kind;              // norm: 'd' drop, 'i' isolate, 'm' map; split: 's' space, 'p' punct
    std::u32string replace;  // for 'm'
  };
  static const Range* find(const std::vector<Range>& table, char32_t cp);
  const Range* norm_rule(char32_t cp) const { return cp < 128 ? rule_at(norm_, ascii_norm_[cp]) : find(norm_, cp); }
  const Range* split_rule(char32_t cp) const { return cp < 128 ? rule_at(split_, ascii_split_[cp]) : find(split_, cp); }
  static const Range* rule_at(const std::vector<Range>& table, int32_t i) { return i < 0 ? nullptr : &table[i]; }
  void wordpiece(const std::u32string& word, std::vector<int64_t>& out) const;
  void encode_plain(const std::u32string& text, std::vector<int64_t>& out) const;

  std::unordered_map<std::string, int64_t> vocab_;  // the WordPiece vocabulary: no added-only tokens
  std::size_t vocab_size_ = 0;                       // every id, added tokens included
  std::vector<Range> norm_, split_;
  // Most text is ASCII: its rules by index (indices, not pointers, so copies stay valid).
  std::array<int32_t, 128> ascii_norm_{}, ascii_split_{};
  std::vector<std::pair<std::u32string, int64_t>> added_;  // longest first
  std::string prefix_ = "##";
  std::size_t max_word_chars_ = 100;
  int64_t unk_id_ = 0;
};

// UTF-8 -> code points; throws std::invalid_argument naming the byte offset of a bad sequence.
std::u32string decode_utf8(std::string_view utf8);

}  // namespace relsum
