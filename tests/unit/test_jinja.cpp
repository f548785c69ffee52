// The Jinja engine (src/template): each construct against the output of Python's jinja2 3.1
// under Hugging Face's settings (the expected strings were produced by jinja2), then errors
// and limits. tests/jinja/test_templates.py compares whole chat templates.
#include <gtest/gtest.h>

#include <string>

#include "template/chat_template.h"
#include "template/jinja.h"

namespace {

using kestrel::jinja::Limits;
using nlohmann::ordered_json;

const ordered_json& context() {
  static const ordered_json ctx = ordered_json::parse(R"J(
{"messages": [{"role": "system", "content": " Be nice. "}, {"role": "user", "content": "Hi 世界"}],
 "n": 3, "f": 2.5, "s": "Hello World", "items": [3, 1, 2], "d": {"b": 1, "a": 2}, "none_v": null,
 "users": [{"name": "ann", "age": 30, "tags": ["x"]}, {"name": "Bob", "age": 25}]})J");
  return ctx;
}

std::string render(const std::string& source, const ordered_json& ctx = context(),
                   const Limits& limits = Limits()) {
  auto out = kestrel::jinja::render(source, ctx, limits);
  return out ? *out : "ERROR: " + out.message();
}

// Expects a failure whose message contains every one of `parts`.
void expect_error(const std::string& source, std::initializer_list<const char*> parts,
                  const Limits& limits = Limits()) {
  auto out = kestrel::jinja::render(source, context(), limits);
  ASSERT_FALSE(out.has_value()) << "rendered: " << *out;
  for (const char* p : parts)
    EXPECT_NE(out.message().find(p), std::string::npos) << out.message() << " lacks " << p;
}

struct Case {
  const char* group;
  const char* source;
  const char* expected;
};

// Expected outputs rendered by jinja2 3.1.6 with the context above.
const Case kCases[] = {
#include "test_jinja_cases.inc"
};

TEST(Jinja, MatchesJinja2OnEachConstruct) {
  for (const Case& c : kCases)
    EXPECT_EQ(render(c.source), c.expected) << "[" << c.group << "] " << c.source;
}

TEST(Jinja, MarkupFromSafeEscapesWhatIsAddedToIt) {
  // markupsafe: Markup + str escapes the str; "~" joins plain strings (autoescape is off).
  EXPECT_EQ(render(R"J({{ 'a<'|safe + '<b>' }} {{ '<x>'|e + '&' }} {{ ('x'|safe) ~ '<' }})J"
                   R"J( {{ '<'|safe|trim + '>' }} {{ 'q'|safe is escaped }})J"),
            "a<&lt;b&gt; &lt;x&gt;&amp; x< <&gt; True");
}

TEST(Jinja, SelectAndMapReturnGeneratorsAsInJinja2) {
  EXPECT_EQ(render("{{ [1, 2, 3] | select('odd') | list | length }} {{ [] | map('upper') | list }}"
                   " {{ [3, 1] | unique | list }}{{ ([1] | select)[0] }}|"),
            "2 [] [3, 1]|");
  expect_error("{{ [1] | select('odd') | length }}", {"'generator' has no len()"});
  expect_error("{{ [1] | map('string') | tojson }}", {"generator is not JSON serializable"});
}

TEST(Jinja, NormalizesNewlinesAndDropsOneTrailingNewline) {
  EXPECT_EQ(render("line1\r\nline2\rline3\n\n"), "line1\nline2\nline3\n");
  EXPECT_EQ(render("a\n"), "a");
}

TEST(Jinja, TrimBlocksAndLstripBlocks) {
  EXPECT_EQ(render("{% if true %}\n  yes\n  {% endif %}\nafter"), "  yes\nafter");
  EXPECT_EQ(render("  {{ 'var' }}  "), "  var  ");  // lstrip_blocks leaves {{ }} alone
}

TEST(Jinja, StrftimeNowFormatsTheCurrentDate) {
  std::string year = render("{{ strftime_now('%Y') }}");
  ASSERT_EQ(year.size(), 4u);
  EXPECT_GE(std::stoi(year), 2024);
}

TEST(Jinja, SyntaxErrorsNamePositionAndProblem) {
  expect_error("{% if x %}never closed", {"syntax", "'endif'"});
  expect_error("{% for x in y %}", {"'endfor'"});
  expect_error("{{ 'unclosed", {"1:4", "unterminated string"});
  expect_error("abc\n  {{ x + }}", {"2:", "expected an expression"});
  expect_error("{{ x ", {"1:1", "no closing '}}'"});
  expect_error("{# comment", {"end of comment"});
  expect_error("{% frobnicate %}", {"unknown tag 'frobnicate'"});
  expect_error("{% include 'x.jinja' %}", {"'include' tag is not supported"});
  expect_error("{% break %}", {"'break' outside of a loop"});
  expect_error("{{ 'a' | nosuchfilter }}", {"1:10", "no filter named 'nosuchfilter'"});
  expect_error("{{ 1 is nosuchtest }}", {"no test named 'nosuchtest'"});
  expect_error("{% raw %}never ends", {"endraw"});
  expect_error("{{ a @ b }}", {"unexpected character '@'"});
}

TEST(Jinja, UnknownFilterInsideIfFailsOnlyWhenEvaluated) {
  EXPECT_EQ(render("{% if false %}{{ x | nosuch }}{% endif %}ok"), "ok");
  expect_error("{% if true %}{{ x | nosuch }}{% endif %}", {"no filter named 'nosuch'"});
}

TEST(Jinja, RuntimeErrorsNamePositionAndProblem) {
  expect_error("{{ raise_exception('System role not supported') }}",
               {"render error at 1:", "System role not supported"});
  expect_error("\n{{ missing.attr }}", {"2:", "'missing' is undefined"});
  expect_error("{{ 1 + 'a' }}", {"unsupported operand type(s) for +: 'int' and 'str'"});
  expect_error("{{ 'a' + 1 }}", {"can only concatenate str"});
  expect_error("{{ 1 // 0 }}", {"division or modulo by zero"});
  expect_error("{{ 1 < 'a' }}", {"'<' not supported"});
  expect_error("{{ n(1) }}", {"'int' object is not callable"});
  expect_error("{{ items.append(4) }}", {"'append' of 'list' object is unsafe"});
  expect_error("{% set x = 1 %}{% set x.y = 2 %}", {"non-namespace"});
  expect_error("{% set a, b = [1] %}", {"not enough values to unpack"});
  expect_error("{{ none_v | tojson }}{{ zz | tojson }}", {"Undefined is not JSON serializable"});
  expect_error("{% for x in n %}{% endfor %}", {"'int' object is not iterable"});
  expect_error("{{ 9223372036854775807 + 1 }}", {"integer overflow"});
  expect_error("{% macro m(a) %}{% endmacro %}{{ m(1, 2) }}", {"takes not more than 1"});
}

TEST(Jinja, RunawayTemplatesStopWithAnError) {
  expect_error("{% macro f(k) %}{{ f(k + 1) }}{% endmacro %}{{ f(0) }}", {"nested deeper than"});
  expect_error("{% for i in range(100000000) %}{% endfor %}", {"range() larger than the limit"});
  Limits small;
  small.max_loop_iterations = 1000;
  expect_error("{% for i in range(100) %}{% for j in range(100) %}{% endfor %}{% endfor %}",
               {"loop iterations"}, small);
  small.max_output_bytes = 1000;
  expect_error("{% for i in range(900) %}xx{% endfor %}", {"larger than the limit"}, small);
  expect_error("{{ 'ab' * 100000 }}", {"larger than the limit"}, small);
  std::string deep(5000, '(');
  expect_error("{{ " + deep + "1" + std::string(5000, ')') + " }}", {"nested too deeply"});
  std::string nested;
  for (int i = 0; i < 1000; ++i) nested += "{% if true %}";
  expect_error(nested, {"nested too deeply"});
}

TEST(Jinja, RecursionWithinTheLimitWorks) {
  EXPECT_EQ(render("{% macro f(k) %}{% if k > 0 %}{{ k }}{{ f(k - 1) }}{% endif %}{% endmacro %}"
                   "{{ f(50) | length }}"),
            "91");
}

TEST(Jinja, ContextMustBeAnObject) {
  auto out = kestrel::jinja::render("x", ordered_json::array());
  EXPECT_FALSE(out.has_value());
  auto plain = kestrel::jinja::render("{{ a }}", nlohmann::json{{"a", 1}});
  ASSERT_TRUE(plain.has_value());
  EXPECT_EQ(*plain, "1");
}

// ---- ChatTemplate: the API the CLI uses ----

const char* kQwen2 =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

TEST(ChatTemplate, RendersQwen2) {
  auto t = kestrel::ChatTemplate::parse(kQwen2);
  ASSERT_TRUE(t.has_value()) << t.message();
  kestrel::ChatTemplateInputs in;
  in.messages = {{"user", "Hi"}, {"assistant", "Hello!"}, {"user", "Bye"}};
  auto out = t->render(in);
  ASSERT_TRUE(out.has_value()) << out.message();
  EXPECT_EQ(*out,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
            "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n");
  in.add_generation_prompt = false;
  EXPECT_EQ(t->render(in)->find("<|im_start|>assistant\n", 100), std::string::npos);
}

TEST(ChatTemplate, PassesBosEosAndToolsAsNone) {
  auto t = kestrel::ChatTemplate::parse(
      "{{ bos_token }}{{ tools is none }}{{ documents is none }}{{ messages | length }}"
      "{{ eos_token }}");
  ASSERT_TRUE(t.has_value());
  kestrel::ChatTemplateInputs in;
  in.bos_token = "<s>";
  in.eos_token = "</s>";
  in.messages = {{"user", "x"}};
  EXPECT_EQ(*t->render(in), "<s>TrueTrue1</s>");
}

TEST(ChatTemplate, ErrorsComeBackAsStatus) {
  auto bad = kestrel::ChatTemplate::parse("{% for m in messages %}");
  ASSERT_FALSE(bad.has_value());
  EXPECT_NE(bad.message().find("endfor"), std::string::npos);
  auto t = kestrel::ChatTemplate::parse(
      "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
      "{% endif %}");
  ASSERT_TRUE(t.has_value());
  kestrel::ChatTemplateInputs in;
  in.messages = {{"system", "s"}};
  auto out = t->render(in);
  ASSERT_FALSE(out.has_value());
  EXPECT_NE(out.message().find("System role not supported"), std::string::npos);
}

}  // namespace
