#!/bin/sh
# Make sure the Debian packages liblinuxshm builds and tests with are here.
# As root with apt-get, install what is missing; otherwise say what to run.
#   sh tools/deps.sh build   what `make` needs (the library and shmping)
#   sh tools/deps.sh         everything, tests and documentation checks too
#   sh tools/deps.sh fuzz    everything, and clang with its sanitizer and
#                            libFuzzer runtime (make fuzz)
# Without dpkg (not Debian), check the headers and name what is missing.
set -u
case "${1:-all}" in
build)
    need="liburing-dev libcap-dev"
    headers="liburing.h sys/capability.h"
    ;;
*)
    need="liburing-dev libcap-dev libcriterion-dev mandoc pkg-config"
    headers="liburing.h sys/capability.h criterion/criterion.h"
    ;;
esac
if [ "${1:-}" = fuzz ]; then
    # The runtime package is named after the clang the distribution defaults to.
    v=$(apt-cache depends clang 2>/dev/null | sed -n 's/.*Depends: clang-\([0-9][0-9]*\)$/\1/p' | head -n 1)
    need="$need clang libclang-rt-${v:-14}-dev"
fi

if ! command -v dpkg-query >/dev/null 2>&1; then
    missing=""
    for h in $headers; do
        echo "#include <$h>" | ${CC:-cc} -E -x c - >/dev/null 2>&1 || missing="$missing $h"
    done
    [ -z "$missing" ] && exit 0
    echo "missing headers:$missing" >&2
    echo "install the development packages of liburing, libcap and Criterion" \
         "(on Debian: apt-get install $need)" >&2
    exit 1
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
