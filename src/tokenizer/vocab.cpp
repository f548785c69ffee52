#include "tokenizer/vocab.h"

#include <algorithm>

#include "tokenizer/pretokenizer.h"

namespace kestrel::tok {

namespace {

Status read_token_id(const gguf::File& f, const char* key, int32_t n_vocab, int32_t* out) {
  const gguf::Value* v = f.find(key);
  if (!v) return Status::ok();
  if (!v->is_integer()) return error("%s: expected an integer token id", key);
  const int64_t id = v->as_int();
  // Some converters write -1 or n_vocab for "none"; treat anything out of range that way
  // only when it is exactly -1, and reject the rest.
  if (id == -1) return Status::ok();
  if (id < 0 || id >= n_vocab)
    return error(
        "%s = %lld is outside the vocabulary (0..%d): the GGUF's tokenizer metadata is "
        "broken",
        key, static_cast<long long>(id), n_vocab - 1);
  *out = static_cast<int32_t>(id);
  return Status::ok();
}

Status read_numeric_array(const gguf::File& f, const char* key, size_t n,
                          std::vector<double>* out) {
  const gguf::Value* v = f.find(key);
  if (!v) return Status::ok();
  if (v->type != gguf::ValueType::ARRAY || v->arr.size() != n)
    return error("%s: expected an array of %zu numbers (one per token)", key, n);
  out->reserve(n);
  for (const auto& e : v->arr) {
    if (!e.is_number()) return error("%s: expected numbers", key);
    out->push_back(e.as_double());
  }
  return Status::ok();
}

Status load_merges(const gguf::File& f, Vocab* v) {
  const gguf::Value* m = f.find("tokenizer.ggml.merges");
  if (!m || m->type != gguf::ValueType::ARRAY || m->elem_type != gguf::ValueType::STRING)
    return error(
        "tokenizer.ggml.merges is missing: a gpt2 (BPE) vocabulary needs its merges; "
        "reconvert the model with a current convert_hf_to_gguf.py");
  v->merge_rank.reserve(m->strs.size());
  for (size_t i = 0; i < m->strs.size(); ++i) {
    const std::string& s = m->strs[i];
    const size_t sp = s.find(' ', 1);
    if (sp == std::string::npos || sp + 1 >= s.size())
      return error("tokenizer.ggml.merges[%zu] = '%s' is not of the form 'left right'", i,
                   s.c_str());
    v->merge_rank.emplace(s, static_cast<int32_t>(i));  // first occurrence wins
  }
  return Status::ok();
}

void collect_end_of_generation(Vocab* v) {
  for (int32_t id : {v->eos, v->eot, v->eom})
    if (id != kNoToken) v->end_of_generation.push_back(id);
  // Chat models end a turn with one of these control tokens even when the GGUF names
  // another token as EOS.
  static const char* kEndOfTurn[] = {"<|eot_id|>",    "<|im_end|>",    "<|end|>",
                                     "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
                                     "<|eom_id|>",    "<|return|>"};
  for (const char* t : kEndOfTurn) {
    const int32_t id = v->find(t);
    if (id != kNoToken && v->type[id] == TokenType::Control) v->end_of_generation.push_back(id);
  }
  std::sort(v->end_of_generation.begin(), v->end_of_generation.end());
  v->end_of_generation.erase(std::unique(v->end_of_generation.begin(), v->end_of_generation.end()),
                             v->end_of_generation.end());
}

}  // namespace

Expected<Vocab> load_vocab(const gguf::File& f) {
  Vocab v;
  const gguf::Value* model = f.find("tokenizer.ggml.model");
  if (!model || model->type != gguf::ValueType::STRING)
    return error(
        "tokenizer.ggml.model is missing: '%s' carries no vocabulary, so text cannot "
        "be tokenized (pass token ids with --tokens instead)",
        f.path().c_str());
  v.model_name = model->str;
  if (v.model_name == "llama")
    v.kind = VocabKind::Spm;
  else if (v.model_name == "gpt2")
    v.kind = VocabKind::Bpe;
  else
    return error("tokenizer.ggml.model '%s' is not supported (supported: llama, gpt2)",
                 v.model_name.c_str());

  const gguf::Value* tokens = f.find("tokenizer.ggml.tokens");
  if (!tokens || tokens->type != gguf::ValueType::ARRAY ||
      tokens->elem_type != gguf::ValueType::STRING || tokens->strs.empty())
    return error("tokenizer.ggml.tokens is missing or empty: the GGUF's vocabulary is broken");
  if (tokens->strs.size() > INT32_MAX) return error("tokenizer.ggml.tokens is too large");
  v.text = tokens->strs;
  const size_t n = v.text.size();
  const auto n_vocab = static_cast<int32_t>(n);

  std::vector<double> scores, types;
  KESTREL_TRY(read_numeric_array(f, "tokenizer.ggml.scores", n, &scores));
  KESTREL_TRY(read_numeric_array(f, "tokenizer.ggml.token_type", n, &types));
  v.score.assign(n, 0.0f);
  v.type.assign(n, TokenType::Normal);
  for (size_t i = 0; i < scores.size(); ++i) v.score[i] = static_cast<float>(scores[i]);
  for (size_t i = 0; i < types.size(); ++i) {
    const double t = types[i];
    if (t < 0 || t > 6) return error("tokenizer.ggml.token_type[%zu] = %g is unknown", i, t);
    v.type[i] = static_cast<TokenType>(static_cast<int32_t>(t));
  }
  if (v.kind == VocabKind::Spm && scores.empty())
    return error(
        "tokenizer.ggml.scores is missing: a llama (SentencePiece) vocabulary needs "
        "its scores");
  v.id_of.reserve(n);
  for (int32_t i = 0; i < n_vocab; ++i) v.id_of.emplace(v.text[i], i);  // first id wins
  if (v.kind == VocabKind::Bpe) KESTREL_TRY(load_merges(f, &v));

  KESTREL_TRY(read_token_id(f, "tokenizer.ggml.bos_token_id", n_vocab, &v.bos));
  KESTREL_TRY(read_token_id(f, "tokenizer.ggml.eos_token_id", n_vocab, &v.eos));
  KESTREL_TRY(read_token_id(f, "tokenizer.ggml.eot_token_id", n_vocab, &v.eot));
  KESTREL_TRY(read_token_id(f, "tokenizer.ggml.eom_token_id", n_vocab, &v.eom));
  KESTREL_TRY(read_token_id(f, "tokenizer.ggml.unknown_token_id", n_vocab, &v.unk));
  KESTREL_TRY(read_token_id(f, "tokenizer.ggml.padding_token_id", n_vocab, &v.pad));
  const bool spm = v.kind == VocabKind::Spm;
  v.pre = f.get_string("tokenizer.ggml.pre", "default");
  bool bos_by_default = spm;
  if (!spm) {
    KESTREL_ASSIGN_OR_RETURN(PreTokenizerSpec pre, pre_tokenizer_spec(v.pre));
    bos_by_default = pre.add_bos;
  }
  v.add_bos = f.get_bool("tokenizer.ggml.add_bos_token", bos_by_default);
  v.add_eos = f.get_bool("tokenizer.ggml.add_eos_token", false);
  v.add_space_prefix = f.get_bool("tokenizer.ggml.add_space_prefix", spm);
  if (v.add_bos && v.bos == kNoToken)
    return error("tokenizer.ggml.add_bos_token is set but the vocabulary has no BOS token id");
  if (v.add_eos && v.eos == kNoToken)
    return error("tokenizer.ggml.add_eos_token is set but the vocabulary has no EOS token id");
  if (spm && v.unk == kNoToken) v.unk = v.find("<unk>");

  for (int b = 0; b < 256; ++b) {
    v.byte_token[b] = kNoToken;
    if (!spm) continue;
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    v.byte_token[b] = v.find(name);
  }
  collect_end_of_generation(&v);
  return v;
}

}  // namespace kestrel::tok
