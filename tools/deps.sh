#!/bin/sh
# Make sure the Debian packages liblinuxshm builds and tests with are here.
# As root with apt-get, install what is missing; otherwise say what to run.
# `deps.sh fuzz`: also clang and its sanitizer and libFuzzer runtime (make fuzz).
set -u
need="liburing-dev libcap-dev libcriterion-dev mandoc pkg-config"
if [ "${1:-}" = fuzz ]; then
    # The runtime package is named after the clang the distribution defaults to.
    v=$(apt-cache depends clang 2>/dev/null | sed -n 's/.*Depends: clang-\([0-9][0-9]*\)$/\1/p' | head -n 1)
    need="$need clang libclang-rt-${v:-14}-dev"
fi
missing=""
for p in $need; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
        || missing="$missing $p"
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq $missing >/dev/null \
        || { echo "apt-get install failed; run: apt-get install$missing" >&2; exit 1; }
    exit 0
fi
echo "missing packages:$missing" >&2
echo "run: sudo apt-get install$missing" >&2
exit 1
