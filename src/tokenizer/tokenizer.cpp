#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <queue>

#include "tokenizer/byte_level.h"
#include "core/utf8.h"

namespace kestrel::tok {

namespace {

const char* const kSpmSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's visible space

// Merges adjacent symbols of `word` (initially its characters) by priority, lowest first and
// leftmost on ties, until no adjacent pair has a priority. `priority(left, right, &p)` says
// whether the pair may merge. Both tokenizers are this loop: SentencePiece ranks a pair by
// the score of the merged token, BPE by the rank of the merge rule.
template <typename Priority>
std::vector<std::string_view> merge_symbols(std::string_view word, Priority&& priority) {
  struct Symbol {
    size_t start, len;
    int prev, next;
  };
  std::vector<Symbol> sym;
  for_each_char(word, [&](std::string_view c) {
    const int i = static_cast<int>(sym.size());
    sym.push_back({static_cast<size_t>(c.data() - word.data()), c.size(), i - 1, i + 1});
  });
  if (sym.empty()) return {};
  sym.back().next = -1;

  struct Candidate {
    double priority;
    int left;
    size_t len;  // combined length when queued: a stale candidate no longer matches it
    bool operator>(const Candidate& o) const {
      return priority != o.priority ? priority > o.priority : left > o.left;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  auto try_pair = [&](int left) {
    if (left < 0 || sym[left].next < 0) return;
    const Symbol& a = sym[left];
    const Symbol& b = sym[a.next];
    double p = 0;
    if (priority(word.substr(a.start, a.len), word.substr(b.start, b.len), &p))
      queue.push({p, left, a.len + b.len});
  };
  for (int i = 0; i + 1 < static_cast<int>(sym.size()); ++i) try_pair(i);

  while (!queue.empty()) {
    const Candidate c = queue.top();
    queue.pop();
    Symbol& a = sym[c.left];
    if (a.len == 0 || a.next < 0 || a.len + sym[a.next].len != c.len) continue;  // stale
    Symbol& b = sym[a.next];
    a.len += b.len;
    b.len = 0;
    a.next = b.next;
    if (a.next >= 0) sym[a.next].prev = c.left;
    try_pair(a.prev);
    try_pair(c.left);
  }
  std::vector<std::string_view> out;
  for (int i = 0; i >= 0; i = sym[i].next) out.push_back(word.substr(sym[i].start, sym[i].len));
  return out;
}

}  // namespace

Expected<std::unique_ptr<Tokenizer>> Tokenizer::load(const gguf::File& file) {
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  KESTREL_ASSIGN_OR_RETURN(t->vocab_, load_vocab(file));
  if (t->vocab_.kind == VocabKind::Bpe) {
    KESTREL_ASSIGN_OR_RETURN(PreTokenizerSpec spec, pre_tokenizer_spec(t->vocab_.pre));
    KESTREL_ASSIGN_OR_RETURN(PreTokenizer pre, PreTokenizer::create(spec.regexes));
    t->pre_ = std::make_unique<PreTokenizer>(std::move(pre));
    t->ignore_merges_ = spec.ignore_merges;
    t->nfc_ = spec.nfc;
  }
  const Vocab& v = t->vocab_;
  for (int32_t id = 0; id < v.size(); ++id) {
    const TokenType ty = v.type[id];
    if (v.text[id].empty()) continue;
    if (ty == TokenType::Control || ty == TokenType::UserDefined || ty == TokenType::Unknown)
      t->special_by_byte_[static_cast<uint8_t>(v.text[id][0])].push_back(id);
  }
  for (auto& list : t->special_by_byte_)
    std::stable_sort(list.begin(), list.end(),
                     [&](int32_t a, int32_t b) { return v.text[a].size() > v.text[b].size(); });
  return t;
}

// Cuts the text at special and added tokens, leftmost first and longest at one position.
// Control tokens are matched only when `parse_special`; added (user-defined) ones always.
std::vector<Tokenizer::Fragment> Tokenizer::partition_special(std::string_view text,
                                                              bool parse_special) const {
  std::vector<Fragment> out;
  size_t raw_start = 0, pos = 0;
  while (pos < text.size()) {
    int32_t match = kNoToken;
    for (int32_t id : special_by_byte_[static_cast<uint8_t>(text[pos])]) {
      if (!parse_special && vocab_.type[id] != TokenType::UserDefined) continue;
      const std::string& s = vocab_.text[id];
      if (text.compare(pos, s.size(), s) == 0) {
        match = id;
        break;
      }
    }
    if (match == kNoToken) {
      ++pos;
      continue;
    }
    if (pos > raw_start) out.push_back({text.substr(raw_start, pos - raw_start), kNoToken});
    out.push_back({{}, match});
    pos += vocab_.text[match].size();
    raw_start = pos;
  }
  if (raw_start < text.size()) out.push_back({text.substr(raw_start), kNoToken});
  return out;
}

void Tokenizer::encode_spm(std::string_view text, std::vector<int32_t>& out) const {
  std::string escaped;
  for (char c : text) {
    if (c == ' ')
      escaped += kSpmSpace;
    else
      escaped += c;
  }
  auto priority = [&](std::string_view a, std::string_view b, double* p) {
    std::string joined;
    joined.reserve(a.size() + b.size());
    joined.append(a).append(b);
    const int32_t id = vocab_.find(joined);
    if (id == kNoToken) return false;
    *p = -static_cast<double>(vocab_.score[id]);  // higher score merges first
    return true;
  };
  for (std::string_view piece : merge_symbols(escaped, priority)) {
    const int32_t id = vocab_.find(std::string(piece));
    if (id != kNoToken) {
      out.push_back(id);
      continue;
    }
    for (char c : piece) {  // byte fallback
      const int32_t b = vocab_.byte_token[static_cast<uint8_t>(c)];
      if (b != kNoToken)
        out.push_back(b);
      else if (vocab_.unk != kNoToken)
        out.push_back(vocab_.unk);
    }
  }
}

void Tokenizer::encode_bpe_word(std::string_view word, std::vector<int32_t>& out) const {
  std::string mapped;
  bytes_to_byte_level(word, mapped);
  if (ignore_merges_) {
    const int32_t id = vocab_.find(mapped);
    if (id != kNoToken) {
      out.push_back(id);
      return;
    }
  }
  std::string key;
  auto priority = [&](std::string_view a, std::string_view b, double* p) {
    key.assign(a).append(" ").append(b);
    auto it = vocab_.merge_rank.find(key);
    if (it == vocab_.merge_rank.end()) return false;
    *p = it->second;
    return true;
  };
  for (std::string_view piece : merge_symbols(mapped, priority)) {
    const int32_t id = vocab_.find(std::string(piece));
    if (id != kNoToken) {
      out.push_back(id);
      continue;
    }
    // A piece missing from the vocabulary: its characters one by one. A byte whose character
    // is not in the vocabulary at all is dropped, as Hugging Face's BPE without an unknown
    // token (the byte-level models' setting) and llama.cpp do.
    for_each_char(piece, [&](std::string_view c) {
      const int32_t cid = vocab_.find(std::string(c));
      if (cid != kNoToken) out.push_back(cid);
    });
  }
}

Expected<std::vector<int32_t>> Tokenizer::encode(std::string_view text,
                                                 const EncodeOptions& opts) const {
  const size_t bad = utf8_invalid_offset(text);
  if (bad != std::string_view::npos)
    return error(
        "the text is not valid UTF-8 (byte %zu of %zu, value 0x%02X): convert it to "
        "UTF-8 first",
        bad, text.size(), static_cast<unsigned>(static_cast<uint8_t>(text[bad])));
  std::vector<int32_t> out;
  if (opts.add_special && vocab_.add_bos) out.push_back(vocab_.bos);
  bool prev_special = true;  // SentencePiece puts a space before text that starts a span
  for (const Fragment& f : partition_special(text, opts.parse_special)) {
    if (f.token != kNoToken) {
      out.push_back(f.token);
      prev_special = true;
      continue;
    }
    if (vocab_.kind == VocabKind::Spm) {
      if (vocab_.add_space_prefix && prev_special)
        encode_spm(std::string(" ").append(f.text), out);
      else
        encode_spm(f.text, out);
    } else {
      const std::string normalized = nfc_ ? nfc_normalize(f.text) : std::string();
      const std::string_view text = nfc_ ? std::string_view(normalized) : f.text;
      for (std::string_view word : pre_->split(text)) encode_bpe_word(word, out);
    }
    prev_special = false;
  }
  if (opts.add_special && vocab_.add_eos) out.push_back(vocab_.eos);
  return out;
}

std::string Tokenizer::token_bytes(int32_t id, bool render_special) const {
  if (id < 0 || id >= vocab_.size()) return {};
  const std::string& text = vocab_.text[id];
  std::string out;
  switch (vocab_.type[id]) {
    case TokenType::Control:
    case TokenType::Unknown:
      return render_special ? text : std::string();
    case TokenType::Unused:
      return {};
    case TokenType::Byte:
      if (vocab_.kind == VocabKind::Spm && text.size() == 6 && text.rfind("<0x", 0) == 0)
        return std::string(1, static_cast<char>(std::stoi(text.substr(3, 2), nullptr, 16)));
      break;
    default:
      break;
  }
  if (vocab_.kind == VocabKind::Bpe) {
    byte_level_to_bytes(text, out);
    return out;
  }
  for (size_t pos = 0; pos < text.size();) {  // SentencePiece: visible space back to ' '
    if (text.compare(pos, 3, kSpmSpace) == 0) {
      out += ' ';
      pos += 3;
    } else {
      out += text[pos++];
    }
  }
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool render_special) const {
  Detokenizer d(*this, /*at_text_start=*/true, render_special);
  std::string out;
  for (int32_t id : ids) out += d.push(id);
  return out + d.flush();
}

bool Tokenizer::is_end_of_generation(int32_t id) const {
  return std::binary_search(vocab_.end_of_generation.begin(), vocab_.end_of_generation.end(), id);
}

std::string Detokenizer::push(int32_t id) {
  std::string bytes = tok_.token_bytes(id, render_special_);
  if (strip_space_ && !bytes.empty()) {
    if (bytes[0] == ' ') bytes.erase(0, 1);
    strip_space_ = false;
  }
  pending_ += bytes;
  const size_t cut = utf8_complete_prefix(pending_);
  std::string out = pending_.substr(0, cut);
  pending_.erase(0, cut);
  return out;
}

std::string Detokenizer::flush() {
  std::string out;
  out.swap(pending_);
  return out;
}

}  // namespace kestrel::tok
