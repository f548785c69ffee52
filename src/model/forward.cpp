#include "model/forward.h"

#include <array>
#include <cmath>
#include <string>

namespace kestrel::model {

using backend::Backend;
using backend::Tensor;
using quant::DType;

namespace {

// The profile's name of a matmul: by weight type, where prompt time mostly goes, with the
// output head apart. Names are built once, so the unprofiled path builds no strings.
std::string_view matmul_kind(const backend::Weight& w, bool head = false) {
  static const auto names = [] {
    std::array<std::array<std::string, 64>, 2> a;
    for (int i = 0; i < 64; ++i) {
      const std::string type = quant::type_name(static_cast<DType>(i));
      a[0][i] = "matmul " + type;
      a[1][i] = "matmul head " + type;
    }
    return a;
  }();
  const int i = static_cast<int>(w.type);
  return i >= 0 && i < 64 ? std::string_view(names[head][i]) : std::string_view("matmul");
}

}  // namespace

// One backend op, timed under `kind` when a profiler is attached (Forward::op).
#define OP(be, kind, expr) KESTREL_TRY(op(be, kind, [&] { return (expr); }))

Expected<std::unique_ptr<Forward>> Forward::create(const Model& model, int max_tokens) {
  if (max_tokens <= 0) return error("micro-batch size %d must be positive", max_tokens);
  std::unique_ptr<Forward> f(new Forward(model, max_tokens));
  // Recorded passes need every op on one backend: placement is fixed, so this is known now.
  f->one_backend_ = model.head_backend() == model.input_backend();
  for (int il = 0; il < model.config().n_layer; ++il)
    f->one_backend_ = f->one_backend_ && model.layer(il).backend == model.input_backend();
  for (Backend* be : model.backends()) KESTREL_TRY(f->alloc_scratch(be));
  return f;
}

Forward::~Forward() {
  for (auto& [be, s] : scratch_)
    for (Tensor* t : {&s.x, &s.h, &s.q, &s.k, &s.v, &s.att, &s.proj, &s.gate, &s.up})
      if (*t) be->free(*t);
  if (head_in_) head_in_.owner->free(head_in_);
  if (logits_) logits_.owner->free(logits_);
}

Status Forward::alloc_scratch(Backend* be) {
  const Config& c = model_.config();
  Scratch& s = scratch_[be];
  const int T = max_tokens_;
  KESTREL_ASSIGN_OR_RETURN(s.x, be->alloc(DType::F32, T, c.n_embd, "activations"));
  KESTREL_ASSIGN_OR_RETURN(s.h, be->alloc(DType::F32, T, c.n_embd, "activations"));
  KESTREL_ASSIGN_OR_RETURN(s.q, be->alloc(DType::F32, T, c.q_dim(), "activations"));
  KESTREL_ASSIGN_OR_RETURN(s.k, be->alloc(DType::F32, T, c.kv_dim(), "activations"));
  KESTREL_ASSIGN_OR_RETURN(s.v, be->alloc(DType::F32, T, c.kv_dim(), "activations"));
  KESTREL_ASSIGN_OR_RETURN(s.att, be->alloc(DType::F32, T, c.q_dim(), "activations"));
  KESTREL_ASSIGN_OR_RETURN(s.proj, be->alloc(DType::F32, T, c.n_embd, "activations"));
  KESTREL_ASSIGN_OR_RETURN(s.gate, be->alloc(DType::F32, T, c.n_ff, "activations"));
  KESTREL_ASSIGN_OR_RETURN(s.up, be->alloc(DType::F32, T, c.n_ff, "activations"));
  return Status::ok();
}

// Activations cross devices once, at a placement boundary, through host memory.
Status Forward::move_residual(Backend* from, Backend* to, int n) {
  const Config& c = model_.config();
  host_x_.resize(static_cast<size_t>(n) * c.n_embd);
  OP(*from, "copy between devices", from->download(scratch_[from].x, 0, n, host_x_.data()));
  OP(*to, "copy between devices", to->upload(scratch_[to].x, 0, n, host_x_.data()));
  return Status::ok();
}

Status Forward::run(const int32_t* tokens, int n, int32_t pos0, kv::KvCache& cache,
                    const int32_t* logit_rows, int n_logit_rows, float* logits, bool overlap) {
  const Config& c = model_.config();
  if (n <= 0 || n > max_tokens_)
    return error("batch of %d tokens does not fit the micro-batch size %d", n, max_tokens_);
  if (pos0 < 0 || pos0 + n > cache.n_ctx())
    return error("positions %d..%d do not fit the context of %d tokens: raise -c", pos0,
                 pos0 + n - 1, cache.n_ctx());
  // (Checked here, not only by the embedding op: a replayed pass may not run the op's checks.)
  const int64_t n_vocab = model_.token_embd().n_out;
  for (int t = 0; t < n; ++t)
    if (tokens[t] < 0 || tokens[t] >= n_vocab)
      return error("token id %d is outside the vocabulary of %lld tokens", tokens[t],
                   static_cast<long long>(n_vocab));
  for (int i = 0; i < n_logit_rows; ++i)
    if (logit_rows[i] < 0 || logit_rows[i] >= n)
      return error("logits requested for row %d of a batch of %d tokens", logit_rows[i], n);
  positions_.resize(n);
  for (int t = 0; t < n; ++t) positions_[t] = pos0 + t;
  KESTREL_TRY(ensure_head_buffers(n_logit_rows));

  // A pass of a few tokens with every op on one backend may be recorded and replayed (CUDA
  // graphs): the key names what fixes its kernels -- the shape of the batch, whether attention
  // stays on its few-token path, what the backend's record_bucket says of the keys, and the
  // buffers it works on.
  Backend* in = model_.input_backend();
  if (!profiler_ && one_backend_ && n <= kRecordMaxTokens) {
    const bool short_context = pos0 + n <= kRecordMaxContext;
    uint64_t key = static_cast<uint64_t>(n) | static_cast<uint64_t>(n_logit_rows) << 16 |
                   static_cast<uint64_t>(short_context) << 32 |
                   static_cast<uint64_t>(in->record_bucket(pos0 + n) & 0xff) << 33;
    key ^= std::hash<const void*>{}(cache.k(0).data) * 31 +
           std::hash<const void*>{}(scratch_[in].x.data);
    // Everything the pass uploads: a replay may take these without walking the pass.
    const backend::RecordInput inputs[] = {
        {tokens, n}, {positions_.data(), n}, {logit_rows, n_logit_rows}};
    KESTREL_TRY(in->run_recorded(key, inputs, static_cast<int>(std::size(inputs)), [&] {
      return enqueue(tokens, n, cache, logit_rows, n_logit_rows);
    }));
  } else {
    KESTREL_TRY(enqueue(tokens, n, cache, logit_rows, n_logit_rows));
  }
  if (overlap && n_logit_rows == 0 && !one_backend_ && !profiler_) return Status::ok();
  Backend& last = n_logit_rows > 0 ? *model_.head_backend() : *model_.layer(c.n_layer - 1).backend;
  // A download waits for the ops before it (in order): without a profiler the logits' copy is
  // queued behind the pass instead of issued after a wait for it.
  if (n_logit_rows == 0 || profiler_) KESTREL_TRY(last.synchronize());
  if (n_logit_rows > 0)
    OP(last, "copy logits to host", last.download(logits_, 0, n_logit_rows, logits));
  return Status::ok();
}

// The ops of one pass, enqueued without waiting (the caller synchronizes).
Status Forward::enqueue(const int32_t* tokens, int n, kv::KvCache& cache, const int32_t* logit_rows,
                        int n_logit_rows) {
  const Config& c = model_.config();
  Backend* where = model_.input_backend();
  OP(*where, "embed", where->embed(model_.token_embd(), tokens, n, scratch_[where].x));  // x[T][E]
  Pending pending = Pending::kNothing;  // what the last layer left to do
  for (int il = 0; il < c.n_layer; ++il) {
    Backend* be = model_.layer(il).backend;
    if (be != where) {
      KESTREL_TRY(flush_add(where, n, pending));
      KESTREL_TRY(move_residual(where, be, n));
      where = be;
    }
    KESTREL_TRY(run_layer(il, n, positions_.data(), cache, pending));
  }
  KESTREL_TRY(flush_add(where, n, pending));
  if (n_logit_rows == 0) return Status::ok();
  if (where != model_.head_backend()) {
    KESTREL_TRY(move_residual(where, model_.head_backend(), n));
  }
  return run_head(n_logit_rows, logit_rows);
}

// Matmuls of one input: one group when the weights share a type (so that the profile's kind,
// which names the type, stays true), else one matmul each.
Status Forward::matmul_group(Backend& be, const backend::Tensor& x, int n,
                             std::span<const backend::MatmulOut> outs) {
  bool same = true;
  for (const backend::MatmulOut& m : outs) same = same && m.w->type == outs[0].w->type;
  if (same) {
    OP(be, matmul_kind(*outs[0].w),
       be.matmul_group(x, n, outs.data(), static_cast<int>(outs.size())));
    return Status::ok();
  }
  for (const backend::MatmulOut& m : outs)
    OP(be, matmul_kind(*m.w), be.matmul(*m.w, x, n, *m.out, m.bias));
  return Status::ok();
}

Status Forward::flush_add(Backend* be, int n, Pending& pending) {
  // (kNormedInput is left only for a next layer on the same backend, which takes it.)
  if (pending != Pending::kAdd) return Status::ok();
  pending = Pending::kNothing;
  Scratch& s = scratch_[be];
  OP(*be, "add", be->add(s.x, s.proj, n));  // x += proj
  return Status::ok();
}

Status Forward::ensure_head_buffers(int n_rows) {
  if (n_rows == 0 || (logits_ && logits_.rows >= n_rows)) return Status::ok();
  const Config& c = model_.config();
  Backend& be = *model_.head_backend();
  if (head_in_) be.free(head_in_);
  if (logits_) be.free(logits_);
  KESTREL_ASSIGN_OR_RETURN(head_in_, be.alloc(DType::F32, n_rows, c.n_embd, "head input"));
  KESTREL_ASSIGN_OR_RETURN(logits_, be.alloc(DType::F32, n_rows, c.n_vocab, "logits"));
  return Status::ok();
}

// Layer il's weights, the decode token's cache row and this backend's scratch, for
// Backend::decode_layer.
backend::DecodeLayer Forward::decode_layer_args(int il, int32_t pos, kv::KvCache& cache,
                                                bool pending_add) {
  const Config& c = model_.config();
  const LayerWeights& L = model_.layer(il);
  Scratch& s = scratch_[L.backend];
  const bool bias = c.qkv_bias;
  return {
      .x = &s.x,
      .proj = &s.proj,
      .pending_add = pending_add,
      .attn_norm = &L.attn_norm,
      .ffn_norm = &L.ffn_norm,
      .rms_eps = c.rms_eps,
      .wq = L.wq.get(),
      .wk = L.wk.get(),
      .wv = L.wv.get(),
      .wo = L.wo.get(),
      .w_gate = L.w_gate.get(),
      .w_up = L.w_up.get(),
      .w_down = L.w_down.get(),
      .bq = bias ? &L.bq : nullptr,
      .bk = bias ? &L.bk : nullptr,
      .bv = bias ? &L.bv : nullptr,
      .rope_q = {c.n_head, c.head_dim, c.rope_base, c.rope_layout},
      .rope_k = {c.n_head_kv, c.head_dim, c.rope_base, c.rope_layout},
      .attn = {c.n_head, c.n_head_kv, c.head_dim, 1.0f / std::sqrt(static_cast<float>(c.head_dim))},
      .k_cache = &cache.k(il),
      .v_cache = &cache.v(il),
      .pos = pos,
      .h = &s.h,
      .q = &s.q,
      .k = &s.k,
      .v = &s.v,
      .att = &s.att,
      .gate = &s.gate,
      .up = &s.up};
}

Status Forward::run_layer(int il, int n, const int32_t* pos, kv::KvCache& cache, Pending& pending) {
  const Config& c = model_.config();
  const LayerWeights& L = model_.layer(il);
  Backend& be = *L.backend;
  Scratch& s = scratch_[&be];
  // The layer's tensors and parameters as the fused op takes them (RoPE, attention, biases).
  const backend::DecodeLayer d = decode_layer_args(il, pos[0], cache, pending == Pending::kAdd);
  const backend::RopeParams &rope_q = d.rope_q, &rope_k = d.rope_k;
  const backend::AttentionParams& attn = d.attn;
  const bool bias = c.qkv_bias;

  if (n == 1 && pending != Pending::kNormedInput && be.fuses_decode_layer(d)) {  // one op
    OP(be, "decode_layer", be.decode_layer(d));
    pending = Pending::kNothing;  // x holds the whole layer's output
    return Status::ok();
  }

  // Attention block.
  if (pending == Pending::kAdd)  // x += proj of the previous layer, then h = norm(x)
    OP(be, "add_rms_norm", be.add_rms_norm(s.x, s.proj, n, L.attn_norm, c.rms_eps, s.h));
  else if (pending == Pending::kNothing)
    OP(be, "rms_norm", be.rms_norm(s.x, n, L.attn_norm, c.rms_eps, s.h));  // h[T][E]
  pending = Pending::kNothing;
  const backend::MatmulOut qkv[] = {{L.wq.get(), &s.q, bias ? &L.bq : nullptr},   // q[T][q_dim]
                                    {L.wk.get(), &s.k, bias ? &L.bk : nullptr},   // k[T][kv_dim]
                                    {L.wv.get(), &s.v, bias ? &L.bv : nullptr}};  // v[T][kv_dim]
  const backend::Tensor &kc = cache.k(il), &vc = cache.v(il);
  if (be.fuses_rope_kv_attention(n, kc, vc)) {  // att[T][q_dim]
    KESTREL_TRY(matmul_group(be, s.h, n, qkv));
    OP(be, "rope+kv_store+attention",
       be.rope_kv_attention(s.q, s.k, s.v, n, pos, rope_q, rope_k, cache.k(il), cache.v(il), attn,
                            s.att));
  } else {
    if (be.fuses_matmul_rope_kv_store(*L.wq, n, kc, vc)) {  // q, k rotated; cache rows pos[t]
      OP(be, "matmul+rope+kv_store",
         be.matmul_rope_kv_store(s.h, n, qkv, pos, rope_q, rope_k, cache.k(il), cache.v(il)));
    } else {
      KESTREL_TRY(matmul_group(be, s.h, n, qkv));
      if (be.fuses_rope_kv_store(kc, vc)) {
        OP(be, "rope+kv_store",
           be.rope_kv_store(s.q, s.k, s.v, n, pos, rope_q, rope_k, cache.k(il), cache.v(il)));
      } else {
        OP(be, "rope", be.rope_qk(s.q, s.k, n, pos, rope_q, rope_k));
        OP(be, "kv_store", be.kv_store(s.k, s.v, n, pos, cache.k(il), cache.v(il)));  // rows pos[t]
      }
    }
    OP(be, "attention",
       be.attention(s.q, n, pos, cache.k(il), cache.v(il), attn, s.att));  // att[T][q_dim]
  }
  // proj[T][E] = att . wo^T; x += proj, then h = norm(x) (h[T][E]).
  const backend::Weight* ffn_in[] = {L.w_gate.get(), L.w_up.get()};
  if (be.fuses_matmul_add_rms_norm(*L.wo, n, ffn_in, 2)) {
    OP(be, "matmul+add_rms_norm",
       be.matmul_add_rms_norm(*L.wo, s.att, n, s.proj, s.x, L.ffn_norm, c.rms_eps, s.h));
  } else {
    OP(be, matmul_kind(*L.wo), be.matmul(*L.wo, s.att, n, s.proj, nullptr));
    OP(be, "add_rms_norm", be.add_rms_norm(s.x, s.proj, n, L.ffn_norm, c.rms_eps, s.h));
  }
  return run_ffn(il, n, pos, cache, pending);
}

Status Forward::run_ffn(int il, int n, const int32_t* pos, kv::KvCache& cache, Pending& pending) {
  const Config& c = model_.config();
  const LayerWeights& L = model_.layer(il);
  Backend& be = *L.backend;
  Scratch& s = scratch_[&be];
  if (be.fuses_matmul_swiglu(*L.w_gate, *L.w_up, n)) {  // gate[T][F] = silu(h.Wg^T) * h.Wu^T
    OP(be, "matmul+swiglu", be.matmul_swiglu(s.h, n, *L.w_gate, *L.w_up, s.gate, s.up));
  } else {
    const backend::MatmulOut gate_up[] = {{L.w_gate.get(), &s.gate, nullptr},  // gate[T][F]
                                          {L.w_up.get(), &s.up, nullptr}};     // up[T][F]
    KESTREL_TRY(matmul_group(be, s.h, n, gate_up));
    if (be.fuses_swiglu_matmul(*L.w_down, n)) {  // proj[T][E] = (silu(gate)*up) . w_down^T
      OP(be, "swiglu+matmul", be.swiglu_matmul(s.gate, s.up, n, *L.w_down, s.proj));
      pending = Pending::kAdd;  // x += proj: in the next layer's first norm, or flush_add
      return Status::ok();
    }
    OP(be, "swiglu", be.swiglu(s.gate, s.up, n, s.gate));  // gate = silu(gate)*up
  }
  // proj[T][E] = gate . w_down^T; x += proj in the next layer's first norm (or flush_add), or
  // here with that norm when the backend fuses the three and the next layer runs its op sequence.
  if (il + 1 < c.n_layer && model_.layer(il + 1).backend == &be) {
    const LayerWeights& next = model_.layer(il + 1);
    const backend::Weight* qkv_in[] = {next.wq.get(), next.wk.get(), next.wv.get()};
    if (be.fuses_matmul_add_rms_norm(*L.w_down, n, qkv_in, 3) &&
        !(n == 1 && be.fuses_decode_layer(decode_layer_args(il + 1, pos[0], cache, true)))) {
      OP(be, "matmul+add_rms_norm",
         be.matmul_add_rms_norm(*L.w_down, s.gate, n, s.proj, s.x, next.attn_norm, c.rms_eps, s.h));
      pending = Pending::kNormedInput;
      return Status::ok();
    }
  }
  OP(be, matmul_kind(*L.w_down), be.matmul(*L.w_down, s.gate, n, s.proj, nullptr));  // proj[T][E]
  pending = Pending::kAdd;
  return Status::ok();
}

Status Forward::run_head(int n_rows, const int32_t* rows) {
  const Config& c = model_.config();
  Backend& be = *model_.head_backend();
  Scratch& s = scratch_[&be];
  OP(be, "get_rows", be.get_rows(s.x, rows, n_rows, s.h));  // h[R][E]
  OP(be, "rms_norm", be.rms_norm(s.h, n_rows, model_.output_norm(), c.rms_eps, head_in_));
  OP(be, matmul_kind(model_.output(), /*head=*/true),
     be.matmul(model_.output(), head_in_, n_rows, logits_, nullptr));  // [R][V]
  return Status::ok();
}

}  // namespace kestrel::model
