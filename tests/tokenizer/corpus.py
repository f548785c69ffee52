"""Hard texts for tokenizer tests: several scripts, emoji, whitespace runs, digits, code."""

HARD_TEXTS = [
    "Hello world",
    " Hello world",
    "Hello  world!  ",
    "   leading and trailing   ",
    "\n\n\nthree newlines\n\n",
    "tabs\tand\t\tmixed \t \n whitespace\r\n",
    "안녕하세요, 세계! 한국어 토큰화는 어렵습니다.",
    "こんにちは世界。日本語のテキスト、カタカナ、ひらがな。",
    "你好，世界！这是一个中文句子。",
    "Привет, мир! Ёжик в тумане.",
    "مرحبا بالعالم! هذا نص عربي.",
    "שלום עולם",
    "नमस्ते दुनिया",
    "Ελληνικά κείμενα με τόνους: άέήίόύώ",
    "emoji: 😀😃😄 👨‍👩‍👧‍👦 🏳️‍🌈 🇰🇷 🦙 ✨",
    "mixed 한국어 and English and 日本語 and 🦙 in one line",
    "digits 1 12 123 1234 12345 123456 3.14159 -42 1,000,000 0x1F",
    "2024-11-25T00:04:19Z and 10:30pm and 1st 2nd 3rd",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot\n",
    "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>",
    "I'm sure they'll say it's what we've done, won't they? I'D SAY YOU'RE RIGHT.",
    "Äpfel über Straße, naïve café, façade, jalapeño, Øresund",
    "ied 4 ½ months, ¼ cup, ∑ x² ≤ ∞, ∂f/∂x, √2",
    "   \u00a0non-breaking\u2003em-space\u200bzero-width\ufeffbom",
    "a" * 300,
    "ab " * 120,
    "🦙" * 20,
    "!!!???...,,,;;;:::",
    "$$$ %%% ^^^ &&& *** ((( ))) ___ +++ === {{{ }}} ||| ~~~ ```",
    "\u3000ideographic\u3000space",
    "mathematics: ∀x∈ℝ, ∃y: y>x; 𝔸𝔹ℂ 𝒜ℬ",
    "url https://example.com/path?q=1&r=two#frag email a.b@c.de",
    # Decomposed (NFD) text: Qwen2 normalizes to NFC first, the others keep it as it is.
    "\u1112\u1161\u11ab\u1100\u116e\u11a8\u110b\u1165 cafe\u0301 A\u030a \u212b",
    "control \x00 \x01 \x16 \x1b[0m \x7f characters",
    "",
]

# For vocabularies with chat tokens: special-token text inside a prompt.
SPECIAL_TEXTS = [
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi 😀<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|im_start|><|im_end|><|im_start|>",
    "text<|endoftext|>more text",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>",
]
