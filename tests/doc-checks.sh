#!/bin/sh
# Documentation and installation checks, run by `make check` (and `make
# check-docs`) from the top of the tree:
#   - every man page lints clean with mandoc -Tlint -W warning; a page that
#     is a symbolic link names a full page beside it;
#   - every lshm_* symbol exported by the shared library has its man3 page,
#     every man3 page names an exported symbol, and nothing else is exported;
#   - the example program of linuxshm(7) compiles with -Wall -Wextra -Werror
#     and runs to exit status 0, also under tests/noiouring (io_uring refused);
#     the example of README.md compiles;
#   - make install DESTDIR=... gives a tree that a program builds against
#     with pkg-config, and make uninstall leaves no file in it.
# Usage: sh tests/doc-checks.sh [O]    (O: the build flavour, build/default)
# Prints a line per failure and a last line "docs: N passed, M failed";
# exits 1 when anything failed.
set -u
cd "$(dirname "$0")/.." || exit 2
O=${1:-build/default}
CC=${CC:-cc}
MAKE=${MAKE:-make}
SHLIB=lib/liblinuxshm.so.2.0.0
SONAME=liblinuxshm.so.2
VERSION=2.0.0

passed=0
failed=0
pass() { passed=$((passed + 1)); }
fail() { failed=$((failed + 1)); echo "FAIL: $*"; }
# check NAME COMMAND...: a check whose command prints nothing and succeeds.
check() {
    what=$1
    shift
    if out=$("$@" 2>&1) && [ -z "$out" ]; then
        pass
    else
        fail "$what"
        [ -n "$out" ] && printf '%s\n' "$out" | sed 's/^/    /'
    fi
}

tmp=$(mktemp -d) || exit 2
trap 'rm -rf "$tmp"' EXIT
trap 'exit 2' INT TERM

# A child make must not try to use the jobserver of a parent that did not
# hand it over.
MAKEFLAGS=$(printf '%s' "${MAKEFLAGS:-}" | sed 's/--jobserver-[a-z]*=[^ ]*//g')
export MAKEFLAGS

# ---- pages --------------------------------------------------------------
# A page that documents a call of another page is a symbolic link to it
# in the same directory (mandoc calls .so fragile and suggests ln(1)).
stub_target() {
    [ -L "$1" ] || return 1
    t=$(readlink "$1")
    case "$t" in
    */*) echo "bad-link/$t" ;;
    *) echo "$(basename "$(dirname "$1")")/$t" ;;
    esac
}

pages=$(ls man/man1/*.1 man/man3/*.3 man/man7/*.7 2>/dev/null)
[ -n "$pages" ] || fail "no man pages under man/"
if ! command -v mandoc >/dev/null 2>&1; then
    fail "mandoc is not installed (make deps installs it)"
else
    for page in $pages; do
        target=$(stub_target "$page")
        if [ -n "$target" ]; then
            if [ -f "man/$target" ] && [ -z "$(stub_target "man/$target")" ]; then
                pass
            else
                fail "$page: links to man/$target, which is not a full page"
            fi
        else
            check "$page: mandoc -Tlint -W warning" mandoc -Tlint -W warning "$page"
        fi
    done
fi

# Every full man3 page has the sections a library page needs, and names
# the function of each page that leads to it in its NAME section.
for page in man/man3/*.3; do
    [ -f "$page" ] || continue
    name=$(basename "$page" .3)
    target=$(stub_target "$page")
    full=${target:+man/$target}
    full=${full:-$page}
    if [ -z "$target" ]; then
        missing=""
        for sec in NAME SYNOPSIS DESCRIPTION "RETURN VALUE" ERRORS "SEE ALSO"; do
            grep -q "^\.SH \"\{0,1\}$sec\"\{0,1\}\$" "$page" || missing="$missing [$sec]"
        done
        grep -q '^\.B #include <linuxshm.h>$' "$page" || missing="$missing [#include]"
        grep -q '^\.IR \\-llinuxshm \.$' "$page" || missing="$missing [Link with -llinuxshm]"
        if [ -z "$missing" ]; then pass; else fail "$page: missing$missing"; fi
        # A copy of another page goes stale: that page is linked instead.
        th=$(sed -n 's/^\.TH \([^ ]*\) .*/\1/p' "$page" | head -n 1)
        if [ "$th" = "$name" ]; then
            pass
        else
            fail "$page: is the page of $th (.TH), not a symbolic link to $th.3"
        fi
    fi
    if [ -f "$full" ] && sed -n '/^\.SH NAME/,/^\.SH/p' "$full" | grep -q "\\b$name\\b"; then
        pass
    else
        fail "$page: $name is not in the NAME section of $full"
    fi
done

# ---- exported symbols ---------------------------------------------------
if [ ! -f "$SHLIB" ]; then
    fail "$SHLIB is not built"
else
    nm -D --defined-only "$SHLIB" | awk '{ print $NF }' | sed 's/@.*//' | sort -u > "$tmp/dynsyms"
    grep '^lshm_' "$tmp/dynsyms" > "$tmp/exported"
    ls man/man3/*.3 2>/dev/null | sed 's|.*/||; s|\.3$||' | sort > "$tmp/pages"
    [ -s "$tmp/exported" ] || fail "$SHLIB exports no lshm_* symbol"
    for sym in $(comm -23 "$tmp/exported" "$tmp/pages"); do
        fail "exported symbol $sym has no man/man3/$sym.3"
    done
    for sym in $(comm -12 "$tmp/exported" "$tmp/pages"); do pass; done
    for page in $(comm -13 "$tmp/exported" "$tmp/pages"); do
        if grep -q "\\b$page(" lib/linuxshm.h; then
            fail "man/man3/$page.3: $page is declared in linuxshm.h but not exported by $SHLIB"
        else
            fail "man/man3/$page.3: $page is not a function of liblinuxshm"
        fi
    done
    # The ABI: only lshm_* in version node LINUXSHM_2.0, soname of major 2.
    others=$(grep -v -e '^lshm_' -e '^LINUXSHM_2\.0$' "$tmp/dynsyms" | tr '\n' ' ')
    if [ -z "$others" ]; then pass; else fail "$SHLIB exports more than lshm_*: $others"; fi
    unversioned=$(nm -D --defined-only "$SHLIB" | awk '$NF ~ /^lshm_/ && $NF !~ /@@LINUXSHM_2\.0$/ { print $NF }' | tr '\n' ' ')
    if [ -z "$unversioned" ]; then pass; else fail "symbols outside LINUXSHM_2.0: $unversioned"; fi
    if readelf -d "$SHLIB" | grep -q "SONAME.*\[$SONAME\]"; then
        pass
    else
        fail "$SHLIB: soname is not $SONAME"
    fi
fi

# ---- the example of linuxshm(7) -----------------------------------------
# Between ".\" example-begin" and ".\" example-end", with the roff escapes
# of the page undone.
sed -n '/^\.\\" example-begin$/,/^\.\\" example-end$/p' man/man7/linuxshm.7 |
    sed -e '1d' -e '$d' \
        -e 's/^\\&//' -e "s/\\\\(aq/'/g" -e 's/\\-/-/g' -e 's/\\e/\\/g' > "$tmp/example.c"
if ! grep -q 'int main(' "$tmp/example.c"; then
    fail "linuxshm(7): no example program between example-begin and example-end"
else
    check "linuxshm(7) example compiles" \
        "$CC" -Wall -Wextra -Werror -Ilib -c -o "$tmp/example.o" "$tmp/example.c"
    if [ -f "$tmp/example.o" ]; then
        check "linuxshm(7) example links" \
            "$CC" -o "$tmp/example" "$tmp/example.o" -Llib -llinuxshm
    fi
    if [ -x "$tmp/example" ]; then
        if out=$(LD_LIBRARY_PATH=$PWD/lib timeout 20 "$tmp/example" 2>&1); then
            pass
        else
            fail "linuxshm(7) example exits with status $?"
            printf '%s\n' "$out" | sed 's/^/    /'
        fi
        # Unchanged where io_uring is refused, as in a container.
        if [ ! -x "$O/tests/noiouring" ]; then
            fail "linuxshm(7) example not run without io_uring: no $O/tests/noiouring"
        elif out=$(LD_LIBRARY_PATH=$PWD/lib timeout 20 "$O/tests/noiouring" "$tmp/example" 2>&1)
        then
            pass
        else
            fail "linuxshm(7) example exits with status $? where io_uring is refused"
            printf '%s\n' "$out" | sed 's/^/    /'
        fi
    else
        fail "linuxshm(7) example not run: it did not build"
    fi
fi

# ---- the example of README.md ------------------------------------------
# The first C block under "## A short example": a function that uses
# use(iov, niov), given here, compiles warning-free as it is.
awk '/^## A short example/ { on = 1; next } on && /^```c/ { p = 1; next }
     p && /^```/ { exit } p' README.md > "$tmp/readme.c"
if ! grep -q 'lshm_' "$tmp/readme.c"; then
    fail "README.md: no C example under \"## A short example\""
else
    { echo '#include <linuxshm.h>'
      echo 'static void use(const struct lshm_iov *iov, unsigned int n) { (void)iov; (void)n; }'
      grep -v '^#include <linuxshm.h>' "$tmp/readme.c"
      echo 'int main(void) { return request("/nonexistent/lshm", "x", 1) == -ENOENT ? 0 : 1; }'
    } > "$tmp/readme-prog.c"
    check "README.md example compiles" \
        "$CC" -Wall -Wextra -Werror -Ilib \
        -include errno.h -o "$tmp/readme" "$tmp/readme-prog.c" -Llib -llinuxshm
fi

# ---- make install / uninstall -------------------------------------------
dest=$tmp/dest
mkdir -p "$dest"
if out=$($MAKE --no-print-directory install O="$O" DESTDIR="$dest" PREFIX=/usr/local 2>&1); then
    pass
    libdir=$dest/usr/local/lib
    for f in "$libdir/liblinuxshm.so.$VERSION" "$libdir/liblinuxshm.a" \
             "$dest/usr/local/include/linuxshm.h" "$libdir/pkgconfig/linuxshm.pc" \
             "$dest/usr/local/bin/shmping"; do
        if [ -f "$f" ]; then pass; else fail "install: ${f#"$dest"} missing"; fi
    done
    if [ "$(readlink "$libdir/$SONAME")" = "liblinuxshm.so.$VERSION" ] &&
       [ "$(readlink "$libdir/liblinuxshm.so")" = "$SONAME" ]; then
        pass
    else
        fail "install: the symlinks $SONAME and liblinuxshm.so are wrong"
    fi
    npages=$(ls man/man1/*.1 man/man3/*.3 man/man7/*.7 | wc -l)
    ninst=$(ls "$dest/usr/local/share/man/man1" "$dest/usr/local/share/man/man3" \
               "$dest/usr/local/share/man/man7" 2>/dev/null | grep -c '\.[137]$')
    if [ "$npages" -eq "$ninst" ]; then pass; else fail "install: $ninst of $npages man pages"; fi

    # A program built the way a user builds one: pkg-config, nothing else.
    cat > "$tmp/user.c" <<'PROG'
#include <linuxshm.h>
#include <stdio.h>
#include <string.h>

int main(void)
{
    char want[32];

    snprintf(want, sizeof(want), "%d.%d.%d", LSHM_VERSION_MAJOR,
             LSHM_VERSION_MINOR, LSHM_VERSION_PATCH);
    if (strcmp(lshm_version(), want) != 0)
        return 1;
    puts(lshm_version());
    return 0;
}
PROG
    export PKG_CONFIG_PATH="$libdir/pkgconfig"
    export PKG_CONFIG_SYSROOT_DIR="$dest"
    if [ "$(pkg-config --modversion linuxshm 2>&1)" = "$VERSION" ]; then
        pass
    else
        fail "pkg-config --modversion linuxshm: $(pkg-config --modversion linuxshm 2>&1)"
    fi
    if flags=$(pkg-config --cflags --libs linuxshm 2>&1) &&
       out=$("$CC" -Wall -Wextra -Werror -o "$tmp/user" "$tmp/user.c" $flags 2>&1); then
        pass
        if [ "$(LD_LIBRARY_PATH=$libdir "$tmp/user" 2>&1)" = "$VERSION" ] &&
           LD_LIBRARY_PATH=$libdir ldd "$tmp/user" | grep -q "=> $libdir/$SONAME"; then
            pass
        else
            fail "a program built with pkg-config does not run against the installed library"
        fi
    else
        fail "a program does not build with pkg-config --cflags --libs linuxshm"
        printf '%s\n%s\n' "$flags" "${out:-}" | sed 's/^/    /'
    fi
    # Static: the archive, whole, with what pkg-config --static adds.
    if sflags=$(pkg-config --static --libs linuxshm 2>&1) &&
       out=$("$CC" -o "$tmp/user-static" "$tmp/user.c" $(pkg-config --cflags linuxshm) \
             -Wl,--whole-archive "$libdir/liblinuxshm.a" -Wl,--no-whole-archive \
             $(printf '%s\n' $sflags | grep -v '^-llinuxshm$') 2>&1) &&
       [ "$("$tmp/user-static")" = "$VERSION" ]; then
        pass
    else
        fail "the static library does not link with pkg-config --static --libs linuxshm"
        printf '%s\n%s\n' "$sflags" "${out:-}" | sed 's/^/    /'
    fi
    unset PKG_CONFIG_PATH PKG_CONFIG_SYSROOT_DIR
else
    fail "make install DESTDIR=$dest"
    printf '%s\n' "$out" | tail -n 5 | sed 's/^/    /'
fi
if out=$($MAKE --no-print-directory uninstall O="$O" DESTDIR="$dest" PREFIX=/usr/local 2>&1); then
    left=$(find "$dest" -type f -o -type l)
    if [ -z "$left" ]; then
        pass
    else
        fail "make uninstall left files behind:"
        printf '%s\n' "$left" | sed "s|^$dest|    |"
    fi
else
    fail "make uninstall DESTDIR=$dest"
    printf '%s\n' "$out" | tail -n 5 | sed 's/^/    /'
fi

echo "docs: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
