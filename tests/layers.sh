#!/bin/sh
# The layer check: every file of lib/ calls only the files below it.
#
# The order is the table under "## Layout" in README.md: its rows that name a
# lib/*.c file, lowest layer first.  For each object of $1/lib (default
# build/default) the check reads, with nm, the symbols it defines and the
# ones it uses, and fails when a file uses a symbol that a file at its own
# row or a later one defines, when a lib/*.c file has no row, or when a row
# names a file that does not exist.  Ends with "layers: N passed, M failed".
set -u

O=${1:-build/default}
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top" || exit 1
tmp=$(mktemp -d) || exit 1
trap 'rm -rf "$tmp"' EXIT INT TERM
pass=0
fail=0

ok() { pass=$((pass + 1)); }
bad() { fail=$((fail + 1)); printf 'layers: FAIL %s\n' "$*"; }

# The rows of the layout table that name a lib/*.c file, in order.
awk '/^## Layout/ { on = 1; next } on && /^## / { on = 0 }
     on && /^\|/ { if (match($0, /`lib\/[a-z_0-9]+\.c`/))
                       print substr($0, RSTART + 1, RLENGTH - 2) }' README.md > "$tmp/order"
if [ ! -s "$tmp/order" ]; then
    bad "README.md: no lib/*.c row in the table under \"## Layout\""
    printf 'layers: %d passed, %d failed\n' "$pass" "$fail"
    exit 1
fi

# Every lib/*.c has a row, every row a file, and no file two rows.
for f in lib/*.c; do
    if grep -qx "$f" "$tmp/order"; then ok; else bad "$f has no row in README.md's layout table"; fi
done
while read -r f; do
    [ -f "$f" ] || bad "README.md's layout table names $f, which does not exist"
done < "$tmp/order"
dups=$(sort "$tmp/order" | uniq -d)
[ -z "$dups" ] || bad "README.md's layout table names $dups twice"

# symbol -> layer and file of its definition
n=0
while read -r f; do
    n=$((n + 1))
    obj="$O/${f%.c}.o"
    [ -f "$f" ] || continue
    if [ ! -f "$obj" ]; then
        bad "$obj is missing (build first)"
        continue
    fi
    nm -g --defined-only "$obj" | awk -v n="$n" -v f="$f" 'NF == 3 { print $3, n, f }' \
        >> "$tmp/defs"
    echo "$n $f $obj" >> "$tmp/objs"
done < "$tmp/order"
touch "$tmp/defs" "$tmp/objs"

# Each file: every symbol it uses that lib/ defines comes from a lower row.
while read -r n f obj; do
    nm -u "$obj" | awk '{ print $NF }' > "$tmp/uses"
    awk -v n="$n" -v f="$f" 'NR == FNR { def[$1] = $2; file[$1] = $3; next }
        ($1 in def) && def[$1] >= n {
            printf "%s uses %s of %s, which is not below it\n", f, $1, file[$1] }' \
        "$tmp/defs" "$tmp/uses" > "$tmp/up"
    if [ -s "$tmp/up" ]; then
        while read -r line; do bad "$line"; done < "$tmp/up"
    else
        ok
    fi
done < "$tmp/objs"

printf 'layers: %d passed, %d failed\n' "$pass" "$fail"
[ "$fail" -eq 0 ]
