# liblinuxshm: see README.md.  `make` builds, `make test` runs every test,
# `make run` runs shmping; each first installs the Debian packages that are
# missing (as root) or names them (tools/deps.sh).

VERSION    := 2.0.0
SOMAJOR    := 2

PREFIX     ?= /usr/local
BINDIR     ?= $(PREFIX)/bin
LIBDIR     ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
MANDIR     ?= $(PREFIX)/share/man
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig

CC         ?= cc
CFLAGS     ?= -O2 -g
# Objects of each build flavour (default, asan, tsan) live apart.
O          ?= build/default
SAN        ?=

WARN       := -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wno-unused-parameter
BASE_CFLAGS := -std=gnu11 -D_GNU_SOURCE -fPIC -fvisibility=hidden -Ilib $(WARN) $(SAN)
LIBS       := -luring -lcap -lpthread
TEST_LIBS  := -lcriterion

LIB_SRC    := $(wildcard lib/*.c)
LIB_HDR    := $(wildcard lib/*.h)
LIB_OBJ    := $(LIB_SRC:%.c=$(O)/%.o)
# tests/noiouring.c is the launcher of the suite's second pass, not a test.
TEST_SRC   := $(filter-out tests/noiouring.c,$(wildcard tests/*.c))
TEST_HDR   := $(wildcard tests/*.h)
TOOL_SRC   := $(wildcard tools/*.c)

SONAME     := liblinuxshm.so.$(SOMAJOR)
SHLIB      := lib/liblinuxshm.so.$(VERSION)
STLIB      := lib/liblinuxshm.a
MAPFILE    := lib/linuxshm.map

.PHONY: all test check asan tsan run deps install uninstall clean bench fuzz fuzz-deps fuzz-seeds soak
all: $(SHLIB) lib/$(SONAME) lib/liblinuxshm.so $(STLIB) tools/shmping

# What the build needs is checked once, before the first compiler run:
# installed as root, or named, instead of an error inside a header.
DEPS_BUILD := build/.deps-build
DEPS_ALL   := build/.deps-all
$(DEPS_BUILD): tools/deps.sh
	@sh tools/deps.sh build
	@mkdir -p $(dir $@) && touch $@
$(DEPS_ALL): tools/deps.sh
	@sh tools/deps.sh
	@mkdir -p $(dir $@) && touch $@

$(O)/lib/%.o: lib/%.c $(LIB_HDR) | $(DEPS_BUILD)
	@mkdir -p $(dir $@)
	$(CC) $(BASE_CFLAGS) $(CFLAGS) -c -o $@ $<

$(O)/liblinuxshm.a: $(LIB_OBJ)
	@rm -f $@
	$(AR) rcs $@ $^

$(SHLIB): $(LIB_OBJ) $(MAPFILE)
	$(CC) $(CFLAGS) $(SAN) -shared -Wl,-soname,$(SONAME) -Wl,-z,defs \
	    -Wl,--version-script=$(MAPFILE) -o $@ $(LIB_OBJ) $(LIBS)

lib/$(SONAME): $(SHLIB)
	ln -sf $(notdir $(SHLIB)) $@
lib/liblinuxshm.so: lib/$(SONAME)
	ln -sf $(SONAME) $@

$(STLIB): $(O)/liblinuxshm.a
	cp $< $@

$(O)/tools/shmping: $(TOOL_SRC) lib/linuxshm.h $(O)/liblinuxshm.a
	@mkdir -p $(dir $@)
	$(CC) $(BASE_CFLAGS) $(CFLAGS) -o $@ $(TOOL_SRC) $(O)/liblinuxshm.a $(LIBS) -lm

tools/shmping: $(O)/tools/shmping
	cp $< $@

# TEST_INC/TEST_RUNNER: under TSan the suite runs on tests/tsan (see there).
TEST_INC    ?=
TEST_RUNNER ?=
# The tests share the tool's payload pattern and random numbers.
TEST_SHARED := tools/pattern.c

# The independent protocol peer is built on its own, without the library's
# include path: the compiler sees to it that nothing of the library's leaks in.
PEER_SRC   := $(wildcard tests/interop/*.c)
PEER_OBJ   := $(PEER_SRC:%.c=$(O)/%.o)
PEER_CFLAGS := $(filter-out -Ilib,$(BASE_CFLAGS)) -Itools

$(O)/tests/interop/%.o: tests/interop/%.c $(wildcard tests/interop/*.h) tools/pattern.h
	@mkdir -p $(dir $@)
	$(CC) $(PEER_CFLAGS) $(CFLAGS) -c -o $@ $<

$(O)/tests/run: $(TEST_SRC) $(TEST_HDR) $(TEST_SHARED) tools/pattern.h $(PEER_OBJ) $(TEST_RUNNER) \
	    $(LIB_HDR) $(O)/liblinuxshm.a | $(DEPS_ALL)
	@mkdir -p $(dir $@)
	$(CC) $(BASE_CFLAGS) $(CFLAGS) $(TEST_INC) -Itests -Itests/interop -Itools -o $@ \
	    $(TEST_SRC) $(TEST_SHARED) $(PEER_OBJ) $(TEST_RUNNER) $(O)/liblinuxshm.a \
	    $(LIBS) $(TEST_LIBS) -lm

$(O)/tests/noiouring: tests/noiouring.c
	@mkdir -p $(dir $@)
	$(CC) $(BASE_CFLAGS) $(CFLAGS) -o $@ $<

# The Criterion suite, run against the objects of flavour $(O): once as it
# comes, once where io_uring is refused as under a container's default
# seccomp profile (contexts then run on the epoll carrier).
check: $(O)/tests/run $(O)/tools/shmping $(O)/tests/noiouring all
	LSHM_SHMPING=$(CURDIR)/$(O)/tools/shmping LSHM_TOP=$(CURDIR) \
	    $(O)/tests/run $(TEST_ARGS)
	LSHM_SHMPING=$(CURDIR)/$(O)/tools/shmping LSHM_TOP=$(CURDIR) \
	    $(O)/tests/noiouring $(O)/tests/run $(TEST_ARGS)
	sh tests/layers.sh $(O)
	sh tests/doc-checks.sh $(O)

deps:
	@sh tools/deps.sh
	@mkdir -p build && touch $(DEPS_BUILD) $(DEPS_ALL)

test: deps
	$(MAKE) check

asan: deps
	$(MAKE) O=build/asan SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all" \
	    build/asan/tests/run build/asan/tools/shmping build/asan/tests/noiouring
	for pass in "" build/asan/tests/noiouring; do \
	    ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	    LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan.supp \
	    LSHM_SHMPING=$(CURDIR)/build/asan/tools/shmping LSHM_TOP=$(CURDIR) LSHM_SANITIZER=asan \
	    $$pass build/asan/tests/run $(TEST_ARGS) || exit 1; done

tsan: deps
	$(MAKE) O=build/tsan SAN="-fsanitize=thread -fno-omit-frame-pointer" \
	    TEST_INC=-Itests/tsan TEST_RUNNER=tests/tsan/runner.c TEST_LIBS= \
	    build/tsan/tests/run build/tsan/tools/shmping build/tsan/tests/noiouring
	for pass in "" build/tsan/tests/noiouring; do \
	    TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 \
	    LSHM_SHMPING=$(CURDIR)/build/tsan/tools/shmping LSHM_TOP=$(CURDIR) LSHM_SANITIZER=tsan \
	    $$pass build/tsan/tests/run $(TEST_ARGS) || exit 1; done

run: deps
	$(MAKE) all
	./tools/shmping --bench

# ---- fuzzing: libFuzzer targets tests/fuzz/fuzz_<name>.c (clang) ----
# `make fuzz` builds them in build/fuzz; `make fuzz FUZZ_S=N` then runs each
# for N seconds from its seed corpus tests/fuzz/corpus/<name> (see
# tests/fuzz/run.sh: FUZZ_DIR, FUZZ_JOBS).  A new target: its file, its name
# here, its corpus directory.
FUZZ_TARGETS := wire port segment ring
FUZZ_S       ?= 0
FUZZ_SAN     := -fsanitize=fuzzer-no-link,address,undefined -fno-omit-frame-pointer \
                -fno-sanitize-recover=all
FUZZ_BINS    := $(FUZZ_TARGETS:%=build/fuzz/fuzz-%)

build/fuzz/fuzz-%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz.c tests/fuzz/fuzz.h lib/linuxshm.h \
                   $(LIB_HDR) build/fuzz/liblinuxshm.a
	$(CC) $(BASE_CFLAGS) $(CFLAGS) -fsanitize=fuzzer -Itests/fuzz -o $@ $< tests/fuzz/fuzz.c \
	    build/fuzz/liblinuxshm.a $(LIBS)

fuzz-deps:
	@sh tools/deps.sh fuzz

# Rewrite the seed corpora (they are in the tree; see tests/fuzz/seeds.c).
build/fuzz/seeds: tests/fuzz/seeds.c $(LIB_HDR) $(O)/liblinuxshm.a
	@mkdir -p $(dir $@)
	$(CC) $(BASE_CFLAGS) $(CFLAGS) -o $@ $< $(O)/liblinuxshm.a $(LIBS)

fuzz-seeds: build/fuzz/seeds
	mkdir -p $(FUZZ_TARGETS:%=tests/fuzz/corpus/%)
	build/fuzz/seeds man/man7/linuxshm-protocol.7 tests/fuzz/corpus

fuzz: fuzz-deps
	$(MAKE) O=build/fuzz CC=clang SAN="$(FUZZ_SAN)" $(FUZZ_BINS)
	@if [ "$(FUZZ_S)" != 0 ]; then sh tests/fuzz/run.sh $(FUZZ_S) $(FUZZ_TARGETS); fi

# ---- soak: minutes of clients killed at random (tests/soak/soak.c) ----
SOAK_ARGS  ?=
$(O)/tests/soak: tests/soak/soak.c lib/linuxshm.h $(O)/liblinuxshm.a
	@mkdir -p $(dir $@)
	$(CC) $(BASE_CFLAGS) $(CFLAGS) -o $@ $< $(O)/liblinuxshm.a $(LIBS)

soak: deps
	$(MAKE) $(O)/tests/soak
	$(O)/tests/soak $(SOAK_ARGS)

clean:
	rm -rf build lib/*.so* lib/*.a tools/shmping

# ---- install, uninstall, pkg-config, documentation checks ----
# `make install` honours PREFIX, DESTDIR and the directories at the top;
# `make uninstall` with the same values removes exactly what it installed.
MAN1       := $(wildcard man/man1/*.1)
MAN3       := $(wildcard man/man3/*.3)
MAN7       := $(wildcard man/man7/*.7)
PC         := $(O)/linuxshm.pc
INSTALL    ?= install

INSTALLED  := $(LIBDIR)/$(notdir $(SHLIB)) $(LIBDIR)/$(SONAME) $(LIBDIR)/liblinuxshm.so \
              $(LIBDIR)/liblinuxshm.a $(INCLUDEDIR)/linuxshm.h $(PKGCONFIGDIR)/linuxshm.pc \
              $(BINDIR)/shmping $(addprefix $(MANDIR)/,$(patsubst man/%,%,$(MAN1) $(MAN3) $(MAN7)))

# In linuxshm.pc, a directory under PREFIX is written ${prefix}/...
pc_dir = $(patsubst $(PREFIX)/%,$${prefix}/%,$(1))

.PHONY: check-docs check-layers pc-always
pc-always:
# Rewritten every time: PREFIX, LIBDIR and INCLUDEDIR can change between calls.
$(PC): lib/linuxshm.pc.in pc-always
	@mkdir -p $(dir $@)
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(call pc_dir,$(LIBDIR))|' \
	    -e 's|@INCLUDEDIR@|$(call pc_dir,$(INCLUDEDIR))|' -e 's|@VERSION@|$(VERSION)|' \
	    lib/linuxshm.pc.in > $@

install: $(SHLIB) lib/$(SONAME) lib/liblinuxshm.so $(STLIB) $(PC) $(if $(TOOL_SRC),tools/shmping)
	@test -f tools/shmping || { echo "make install: tools/shmping is missing," \
	    "and there is no tools/*.c to build it from" >&2; exit 1; }
	$(INSTALL) -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(PKGCONFIGDIR) $(DESTDIR)$(INCLUDEDIR) \
	    $(DESTDIR)$(BINDIR) $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man3 \
	    $(DESTDIR)$(MANDIR)/man7
	$(INSTALL) -m 755 $(SHLIB) $(DESTDIR)$(LIBDIR)/
	ln -sf $(notdir $(SHLIB)) $(DESTDIR)$(LIBDIR)/$(SONAME)
	ln -sf $(SONAME) $(DESTDIR)$(LIBDIR)/liblinuxshm.so
	$(INSTALL) -m 644 $(STLIB) $(DESTDIR)$(LIBDIR)/
	$(INSTALL) -m 644 lib/linuxshm.h $(DESTDIR)$(INCLUDEDIR)/
	$(INSTALL) -m 644 $(PC) $(DESTDIR)$(PKGCONFIGDIR)/linuxshm.pc
	$(INSTALL) -m 644 $(MAN1) $(DESTDIR)$(MANDIR)/man1/
	$(INSTALL) -m 644 $(MAN3) $(DESTDIR)$(MANDIR)/man3/
	$(INSTALL) -m 644 $(MAN7) $(DESTDIR)$(MANDIR)/man7/
	$(INSTALL) -m 755 tools/shmping $(DESTDIR)$(BINDIR)/

uninstall:
	rm -f $(addprefix $(DESTDIR),$(INSTALLED))

# The layer check alone (make check runs it too): no file of lib/ calls upwards.
check-layers: $(LIB_OBJ)
	sh tests/layers.sh $(O)

# The checks of tests/doc-checks.sh alone (make check runs them too).
check-docs: $(SHLIB) lib/$(SONAME) lib/liblinuxshm.so $(STLIB) $(O)/tests/noiouring
	sh tests/doc-checks.sh $(O)
