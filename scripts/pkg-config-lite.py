#!/usr/bin/env python3
"""A minimal pkg-config for machines without one (scripts/gpu-check.sh uses it when neither
pkg-config nor pkgconf is installed): reads .pc files from $PKG_CONFIG_PATH and answers what
CMake's FindPkgConfig asks (--version, --exists, --modversion, --variable=NAME, --cflags,
--cflags-only-I, --cflags-only-other, --libs, --libs-only-l, --libs-only-L, --libs-only-other,
--static). Requires:/Requires.private: are followed; version constraints are ignored.

    PKG_CONFIG_PATH=.gpu-deps/lib/pkgconfig scripts/pkg-config-lite.py --cflags --libs libpcre2-8
"""
from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path


def find_pc(name: str) -> Path | None:
    dirs = [d for d in os.environ.get("PKG_CONFIG_PATH", "").split(os.pathsep) if d]
    dirs += [d for d in os.environ.get("PKG_CONFIG_LIBDIR", "").split(os.pathsep) if d]
    for d in dirs:
        p = Path(d) / f"{name}.pc"
        if p.is_file():
            return p
    return None


def parse_pc(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(variables, fields) with ${var} expanded; pcfiledir is the file's directory."""
    variables = {"pcfiledir": str(path.parent)}
    fields: dict[str, str] = {}

    def expand(s: str) -> str:
        for _ in range(20):
            t = re.sub(r"\$\{(\w+)\}", lambda m: variables.get(m.group(1), ""), s)
            if t == s:
                break
            s = t
        return s

    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        m = re.match(r"^([\w.]+)\s*([:=])\s*(.*)$", line)
        if not m:
            continue
        key, sep, value = m.groups()
        if sep == "=":
            variables[key] = expand(value)
        else:
            fields[key] = expand(value)
    return variables, fields


def requires(fields: dict[str, str], static: bool) -> list[str]:
    text = fields.get("Requires", "") + ("," + fields.get("Requires.private", "") if static else "")
    text = re.sub(r"[<>=!]+\s*\S+", "", text)
    return [n for n in re.split(r"[,\s]+", text) if n]


def main(argv: list[str]) -> int:
    opts = [a for a in argv if a.startswith("--")]
    names = [a for a in argv if not a.startswith("--")]
    if "--version" in opts:
        print("0.29.2")
        return 0
    static = "--static" in opts
    pkgs: list[tuple[dict[str, str], dict[str, str]]] = []
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop(0)
        if name in seen:
            continue
        seen.add(name)
        path = find_pc(name)
        if path is None:
            if "--print-errors" in opts or "--exists" not in opts:
                print(f"Package {name} was not found in the pkg-config search path.", file=sys.stderr)
            return 1
        variables, fields = parse_pc(path)
        pkgs.append((variables, fields))
        todo += requires(fields, static)
    if "--exists" in opts:
        return 0
    top = pkgs[:len(names)]
    out: list[str] = []
    for o in opts:
        if o.startswith("--variable="):
            var = o.split("=", 1)[1]
            out += [v.get(var, "") for v, _ in top]
    if "--modversion" in opts:
        out += [f.get("Version", "") for _, f in top]
        print("\n".join(out))
        return 0
    cflags: list[str] = []
    libs: list[str] = []
    for _, f in pkgs:
        cflags += shlex.split(f.get("Cflags", "")) + (shlex.split(f.get("Cflags.private", "")) if static else [])
        libs += shlex.split(f.get("Libs", "")) + (shlex.split(f.get("Libs.private", "")) if static else [])

    def dedup(xs: list[str]) -> list[str]:
        res: list[str] = []
        for x in xs:
            if x not in res:
                res.append(x)
        return res

    cflags, libs = dedup(cflags), dedup(libs)
    is_i = [c for c in cflags if c.startswith("-I")]
    if "--cflags" in opts:
        out += cflags
    if "--cflags-only-I" in opts:
        out += is_i
    if "--cflags-only-other" in opts:
        out += [c for c in cflags if not c.startswith("-I")]
    if "--libs" in opts:
        out += libs
    if "--libs-only-L" in opts:
        out += [x for x in libs if x.startswith("-L")]
    if "--libs-only-l" in opts:
        out += [x for x in libs if x.startswith("-l")]
    if "--libs-only-other" in opts:
        out += [x for x in libs if not x.startswith(("-l", "-L"))]
    print(" ".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
