#!/usr/bin/env bash
# Packs what the bare GPU machine lacks into the git-ignored folder .gpu-deps/ (carry it with
# the working tree; scripts/gpu-check.sh uses it):
#
#   .gpu-deps/include/{pcre2.h,utf8proc.h}
#   .gpu-deps/lib/{libpcre2-8.a,libutf8proc.a}           static: no runtime .so needed there
#   .gpu-deps/lib/pkgconfig/{libpcre2-8.pc,libutf8proc.pc} relocatable (prefix=${pcfiledir}/../..)
#   .gpu-deps/wheels/gguf-0.19.0-py3-none-any.whl         pure Python; needs numpy, pyyaml,
#                                                         requests, tqdm (all on the GPU machine)
#   .gpu-deps/llama.cpp-src.tar.gz                        llama.cpp's sources (the peer that
#       scripts/gpu-check.sh --peer builds and races), from llama-cpp-python's source distribution
#       on PyPI (vendor/llama.cpp without models/, docs/, examples/, tests/, media/, tools/ui/);
#       --no-llama-cpp skips it
#   .gpu-deps/vocab/ggml-vocab-llama-{spm,bpe}.gguf       Llama 2's and Llama 3's vocabularies
#       (the same source distribution's models/): the benchmark models are synthesized with them so
#       that llama.cpp loads them too (it refuses the synthesizer's placeholder vocabulary)
#
# The libraries come from Debian's -dev packages (apt-get download + dpkg -x; the installed
# files when the download fails). Static libraries built on glibc 2.36 link on 2.39.
#
#   bash scripts/pack-gpu-deps.sh [--force] [--no-llama-cpp]
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=.gpu-deps
GGUF_VERSION=0.19.0
LLAMA_CPP_PYTHON_VERSION=0.3.36
LLAMA_CPP=1
for a in "$@"; do
  case "$a" in
    --force) rm -rf "$DEST" ;;
    --no-llama-cpp) LLAMA_CPP=0 ;;
    *) echo "pack: unknown option $a" >&2; exit 2 ;;
  esac
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$DEST/include" "$DEST/lib/pkgconfig" "$DEST/wheels"

# --- the Debian -dev packages: headers and static libraries ----------------------------------
root="$work/root"
mkdir -p "$root"
for pkg in libpcre2-dev libutf8proc-dev; do
  if (cd "$work" && apt-get download "$pkg" >/dev/null 2>&1); then
    dpkg -x "$work"/"$pkg"_*.deb "$root"
    echo "pack: $pkg from $(basename "$work"/"$pkg"_*.deb)"
  elif dpkg -s "$pkg" >/dev/null 2>&1; then
    echo "pack: apt-get download $pkg failed; copying the installed files"
    dpkg -L "$pkg" | while read -r f; do
      if [[ -f "$f" ]]; then
        mkdir -p "$root$(dirname "$f")"
        cp -L "$f" "$root$f"
      fi
    done
  else
    echo "pack: cannot get $pkg (apt-get download failed and it is not installed)" >&2
    exit 1
  fi
done

multiarch=$(find "$root/usr/lib" -name libpcre2-8.a -printf '%h\n' | head -n1)
for f in pcre2.h utf8proc.h; do
  install -m 644 "$root/usr/include/$f" "$DEST/include/$f"
done
for f in libpcre2-8.a libutf8proc.a; do
  install -m 644 "$multiarch/$f" "$DEST/lib/$f"
done

# Versions from the packages' own .pc files (utf8proc's Debian .pc may lag the package).
pc_version() { sed -n 's/^Version: *//p' "$multiarch/pkgconfig/$1.pc"; }
pcre2_version=$(pc_version libpcre2-8)
utf8proc_version=$(sed -n 's/^#define UTF8PROC_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\).*/\2/p' \
                   "$DEST/include/utf8proc.h" | paste -sd.)
[[ -n "$utf8proc_version" ]] || utf8proc_version=$(pc_version libutf8proc)

cat >"$DEST/lib/pkgconfig/libpcre2-8.pc" <<EOF
# Packed by scripts/pack-gpu-deps.sh from Debian's libpcre2-dev (static library only).
prefix=\${pcfiledir}/../..
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: libpcre2-8
Description: PCRE2 - Perl compatible regular expressions C library (2nd API) with 8 bit character support
Version: $pcre2_version
Libs: -L\${libdir} -lpcre2-8
Cflags: -I\${includedir}
Cflags.private: -DPCRE2_STATIC
EOF

cat >"$DEST/lib/pkgconfig/libutf8proc.pc" <<EOF
# Packed by scripts/pack-gpu-deps.sh from Debian's libutf8proc-dev (static library only).
prefix=\${pcfiledir}/../..
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: libutf8proc
Description: UTF8 processing
Version: $utf8proc_version
Libs: -L\${libdir} -lutf8proc
Cflags: -I\${includedir}
Cflags.private: -DUTF8PROC_STATIC
EOF

# --- the gguf wheel ----------------------------------------------------------------------------
wheel="$DEST/wheels/gguf-$GGUF_VERSION-py3-none-any.whl"
if [[ ! -f "$wheel" ]]; then
  python3 -m pip download --quiet --no-deps --only-binary=:all: "gguf==$GGUF_VERSION" -d "$DEST/wheels"
fi
# Its requirements (besides the optional GUI extra) must be on the GPU machine already.
unzip -p "$wheel" "gguf-$GGUF_VERSION.dist-info/METADATA" | sed -n 's/^Requires-Dist: //p' \
  | grep -v 'extra ==' | sed 's/^/pack: gguf requires /'

# --- llama.cpp's sources, for the same-run race on the GPU machine --------------------------------
peer="$DEST/llama.cpp-src.tar.gz"
if ((LLAMA_CPP)) && [[ ! -f "$peer" || ! -f "$DEST/vocab/ggml-vocab-llama-bpe.gguf" ]]; then
  sdist="$work/sdist"
  if python3 -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
       "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$sdist" 2>/dev/null ||
     python3 -m pip download --quiet --no-deps --no-binary :all: \
       "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$sdist"; then
    tar -xzf "$sdist"/llama_cpp_python-*.tar.gz -C "$work"
    src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
    mkdir -p "$DEST/vocab"
    cp "$src/models/ggml-vocab-llama-spm.gguf" "$src/models/ggml-vocab-llama-bpe.gguf" "$DEST/vocab/"
    tar -czf "$peer" -C "$(dirname "$src")" --exclude=llama.cpp/models --exclude=llama.cpp/docs \
      --exclude=llama.cpp/examples --exclude=llama.cpp/tests --exclude=llama.cpp/media \
      --exclude=llama.cpp/tools/ui --exclude=llama.cpp/.git llama.cpp
    echo "pack: llama.cpp sources from llama-cpp-python $LLAMA_CPP_PYTHON_VERSION: $(du -h "$peer" | cut -f1)"
  else
    echo "pack: warning: cannot download llama-cpp-python's sources; gpu-check.sh --peer will not race llama.cpp" >&2
  fi
fi

# --- checks ------------------------------------------------------------------------------------
# The .pc files resolve from any directory, and nothing in .gpu-deps needs a shared library.
flags=$(PKG_CONFIG_PATH="$PWD/$DEST/lib/pkgconfig" PKG_CONFIG_LIBDIR=/nonexistent \
        pkg-config --cflags --libs --static libpcre2-8 libutf8proc | sed 's/ *$//')
echo "pack: pkg-config --cflags --libs --static: $flags"
lite=$(PKG_CONFIG_PATH="$PWD/$DEST/lib/pkgconfig" python3 scripts/pkg-config-lite.py \
       --cflags --libs --static libpcre2-8 libutf8proc)
[[ "$lite" == "$flags" ]] || echo "pack: warning: scripts/pkg-config-lite.py gives '$lite'" >&2
# Objects with absolute 32-bit relocations cannot go into a PIE executable (gcc's default).
for a in "$DEST"/lib/*.a; do
  if readelf -r "$a" 2>/dev/null | grep -q 'R_X86_64_32S\? '; then
    echo "pack: $a has non-PIC relocations: it will not link into a PIE executable" >&2
    exit 1
  fi
done

# A program that uses both libraries, linked against .gpu-deps only (static).
cat >"$work/t.c" <<'EOF'
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>
#include <stdlib.h>
#include <string.h>
int main(void) {
  int err; PCRE2_SIZE off;
  pcre2_code *re = pcre2_compile((PCRE2_SPTR)"\\p{L}+", PCRE2_ZERO_TERMINATED, PCRE2_UTF, &err, &off, NULL);
  utf8proc_uint8_t *n = utf8proc_NFC((const utf8proc_uint8_t *)"e\xcc\x81");
  int ok = re != NULL && n != NULL && strcmp((const char *)n, "\xc3\xa9") == 0;
  pcre2_code_free(re); free(n);
  return ok ? 0 : 1;
}
EOF
# shellcheck disable=SC2086  # $flags is a list of compiler flags
cc -o "$work/t" "$work/t.c" $flags
"$work/t"
echo "pack: a test program links statically against .gpu-deps and runs"

du -sh "$DEST"
find "$DEST" -type f | sort
