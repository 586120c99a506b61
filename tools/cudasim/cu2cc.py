#!/usr/bin/env python3
"""cu2cc.py IN.cu OUT.cc - rewrites a CUDA source for cudasim (tools/cudasim/README.md).

Two rewrites, each within its line so that line numbers stay those of IN.cu:
  k<<<g, b, smem, s>>>(args)
      -> k | ::pd_sim::cfg_at(__FILE__, __LINE__, g, b, smem, s) | ::pd_sim::args(args)
  extern __shared__ [__align__(N)] T name[];
      -> T *name = reinterpret_cast<T *>(::pd_sim::dyn_smem());
Everything else compiles as C++ against tools/cudasim/include."""
import re
import sys


def convert(src):
    src = src.replace("<<<", " | ::pd_sim::cfg_at(__FILE__, __LINE__, ")
    src, n = re.subn(r">>>\s*\(", ") | ::pd_sim::args(", src)
    if src.count("::pd_sim::cfg_at(") != n:
        raise SystemExit("cu2cc: a <<< without its >>>(")

    def shared(m):
        t, name = m.group(1).strip(), m.group(2)
        return f"{t} *{name} = reinterpret_cast<{t} *>(::pd_sim::dyn_smem());"

    return re.sub(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([A-Za-z_][\w ]*?)\s+"
                  r"(\w+)\s*\[\s*\]\s*(?:__align__\(\d+\)\s*)?;", shared, src)


def main():
    if len(sys.argv) != 3:
        raise SystemExit("usage: cu2cc.py IN.cu OUT.cc")
    with open(sys.argv[1]) as f:
        src = f.read()
    out = f'#line 1 "{sys.argv[1]}"\n' + convert(src)
    with open(sys.argv[2], "w") as f:
        f.write(out)


if __name__ == "__main__":
    main()
