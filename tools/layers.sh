#!/bin/sh
# shmping's files call downwards only: each file may use functions of the
# files listed before it in the layer list of tools/shmping.h, never of a
# file after it.  Compiles each tools/*.c alone and compares the objects'
# undefined symbols with the others' definitions (nm).  Exits 1 on an upward
# call or on a file missing from the list, naming both files and the symbol.
# usage: sh tools/layers.sh [CC]
set -u
cd "$(dirname "$0")/.." || exit 2
cc=${1:-${CC:-cc}}
tmp=$(mktemp -d) || exit 2
trap 'rm -rf "$tmp"' EXIT

# The list: lines " *   name.c  ..." of the comment in shmping.h, in order.
sed -n 's/^ \*   \([a-z_]*\)\.c .*/\1/p' tools/shmping.h > "$tmp/order"
[ -s "$tmp/order" ] || { echo "layers: no layer list in tools/shmping.h" >&2; exit 2; }

bad=0
for f in tools/*.c; do
    b=$(basename "$f" .c)
    grep -qx "$b" "$tmp/order" || { echo "layers: $f is not in the list of tools/shmping.h"; bad=1; }
    $cc -std=gnu11 -D_GNU_SOURCE -Ilib -c -o "$tmp/$b.o" "$f" || exit 2
    nm --defined-only "$tmp/$b.o" | awk '$2 ~ /^[TDBR]$/ { print $3 }' > "$tmp/$b.def"
    nm --undefined-only "$tmp/$b.o" | awk '{ print $2 }' > "$tmp/$b.use"
done
rank() { grep -nx "$1" "$tmp/order" | cut -d: -f1; }
for use in "$tmp"/*.use; do
    b=$(basename "$use" .use)
    rb=$(rank "$b")
    for def in "$tmp"/*.def; do
        d=$(basename "$def" .def)
        [ "$d" = "$b" ] && continue
        rd=$(rank "$d")
        [ -n "$rb" ] && [ -n "$rd" ] && [ "$rd" -lt "$rb" ] && continue
        for sym in $(grep -Fxf "$def" "$use"); do
            echo "layers: tools/$b.c calls $sym of tools/$d.c, which is not below it"
            bad=1
        done
    done
done
[ $bad -eq 0 ] && echo "layers: $(wc -l < "$tmp/order") files, every call downwards"
exit $bad
