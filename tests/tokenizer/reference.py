"""Independent reference tokenizers built from a GGUF vocabulary: Hugging Face `tokenizers`
for byte-level BPE ("gpt2") and Google's `sentencepiece` for SentencePiece ("llama").
Neither shares code with Kestrel; both read only the GGUF's tokenizer.ggml.* keys."""
import gguf

TYPE_CONTROL, TYPE_USER_DEFINED = 3, 4

# The models' tokenizer.json expressions for the pre-tokenizers that use a Split step.
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
             r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
            r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


class GGUFVocab:
    def __init__(self, path):
        r = gguf.GGUFReader(path)
        self.fields = r.fields
        self.model = self.string("tokenizer.ggml.model")
        self.pre = self.string("tokenizer.ggml.pre") or "default"
        self.tokens = self.strings("tokenizer.ggml.tokens")
        self.types = self.numbers("tokenizer.ggml.token_type") or [1] * len(self.tokens)
        self.scores = self.numbers("tokenizer.ggml.scores") or [0.0] * len(self.tokens)
        self.merges = self.strings("tokenizer.ggml.merges") or []

    def string(self, key):
        f = self.fields.get(key)
        return bytes(f.parts[f.data[0]]).decode() if f else None

    def strings(self, key):
        f = self.fields.get(key)
        if not f:
            return None
        return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]

    def numbers_one(self, key):
        f = self.fields[key]
        return int(f.parts[f.data[0]][0])

    def numbers(self, key):
        f = self.fields.get(key)
        return [f.parts[i][0].item() for i in f.data] if f else None


class HFBpe:
    """tokenizers.Tokenizer assembled the way the model's tokenizer.json describes it."""

    def __init__(self, v: GGUFVocab):
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
        from tokenizers import pre_tokenizers as pt
        vocab = {}
        for i, t in enumerate(v.tokens):
            vocab.setdefault(t, i)
        merges = [tuple(m.split(" ", 1)) for m in v.merges]
        llama3 = v.pre in ("llama3", "llama-v3", "llama-bpe")
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=llama3))
        byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=False)
        if v.pre in ("default", "gpt-2", "gpt2"):
            steps = [pt.ByteLevel(add_prefix_space=False, use_regex=True)]
        elif v.pre in ("smollm", "starcoder", "refact", "command-r"):
            steps = [pt.Digits(individual_digits=True),
                     pt.ByteLevel(add_prefix_space=False, use_regex=True)]
        elif llama3:
            steps = [pt.Split(Regex(LLAMA3_RE), "isolated"), byte_level]
        elif v.pre == "qwen2":
            tk.normalizer = normalizers.NFC()
            steps = [pt.Split(Regex(QWEN2_RE), "isolated"), byte_level]
        else:
            raise ValueError(f"no reference for pre-tokenizer {v.pre}")
        tk.pre_tokenizer = pt.Sequence(steps)
        tk.decoder = decoders.ByteLevel()
        special = [AddedToken(t, special=True, normalized=False)
                   for t, ty in zip(v.tokens, v.types) if ty == TYPE_CONTROL and t]
        added = [AddedToken(t, special=False, normalized=False)
                 for t, ty in zip(v.tokens, v.types) if ty == TYPE_USER_DEFINED and t]
        tk.add_special_tokens(special)
        tk.add_tokens(added)
        self.tk = tk

    def encode(self, text, parse_special):
        self.tk.encode_special_tokens = not parse_special
        return self.tk.encode(text, add_special_tokens=False).ids


class SentencePiece:
    """sentencepiece.SentencePieceProcessor from a model proto holding the GGUF's pieces."""

    def __init__(self, v: GGUFVocab):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb
        m = pb.ModelProto()
        m.trainer_spec.model_type = pb.TrainerSpec.BPE
        m.trainer_spec.byte_fallback = True
        m.trainer_spec.vocab_size = len(v.tokens)
        m.normalizer_spec.name = "identity"
        m.normalizer_spec.add_dummy_prefix = True
        m.normalizer_spec.remove_extra_whitespaces = False
        m.normalizer_spec.escape_whitespaces = True
        for t, s, ty in zip(v.tokens, v.scores, v.types):
            p = m.pieces.add()
            p.piece, p.score, p.type = t, s, int(ty)
        self.sp = spm.SentencePieceProcessor(model_proto=m.SerializeToString())

    def encode(self, text, parse_special):
        assert not parse_special, "sentencepiece does not parse control tokens in text"
        return self.sp.encode(text)


def reference_for(path):
    v = GGUFVocab(path)
    return (SentencePiece(v) if v.model == "llama" else HFBpe(v)), v
