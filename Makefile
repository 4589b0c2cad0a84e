# liblinuxshm: see README.md.  `make` builds, `make test` installs what is
# missing (Debian) and runs every test, `make run` runs shmping.

VERSION    := 1.0.0
SOMAJOR    := 1

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
TEST_SRC   := $(wildcard tests/*.c)
TEST_HDR   := $(wildcard tests/*.h)
TOOL_SRC   := $(wildcard tools/*.c)

SONAME     := liblinuxshm.so.$(SOMAJOR)
SHLIB      := lib/liblinuxshm.so.$(VERSION)
STLIB      := lib/liblinuxshm.a
MAPFILE    := lib/linuxshm.map

.PHONY: all test check asan tsan run deps install uninstall clean bench
all: $(SHLIB) lib/$(SONAME) lib/liblinuxshm.so $(STLIB) tools/shmping

$(O)/lib/%.o: lib/%.c $(LIB_HDR)
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

$(O)/tests/run: $(TEST_SRC) $(TEST_HDR) $(LIB_HDR) $(O)/liblinuxshm.a
	@mkdir -p $(dir $@)
	$(CC) $(BASE_CFLAGS) $(CFLAGS) -Itests -o $@ $(TEST_SRC) $(O)/liblinuxshm.a \
	    $(LIBS) $(TEST_LIBS) -lm

# The Criterion suite, run against the objects of flavour $(O).
check: $(O)/tests/run $(O)/tools/shmping all
	LSHM_SHMPING=$(CURDIR)/$(O)/tools/shmping LSHM_TOP=$(CURDIR) \
	    $(O)/tests/run $(TEST_ARGS)

deps:
	@sh tools/deps.sh

test: deps
	$(MAKE) check

asan: deps
	$(MAKE) O=build/asan SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all" \
	    ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	    build/asan/tests/run build/asan/tools/shmping
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	    LSHM_SHMPING=$(CURDIR)/build/asan/tools/shmping LSHM_TOP=$(CURDIR) LSHM_SANITIZER=asan \
	    build/asan/tests/run $(TEST_ARGS)

tsan: deps
	$(MAKE) O=build/tsan SAN="-fsanitize=thread -fno-omit-frame-pointer" \
	    build/tsan/tests/run build/tsan/tools/shmping
	TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 \
	    LSHM_SHMPING=$(CURDIR)/build/tsan/tools/shmping LSHM_TOP=$(CURDIR) LSHM_SANITIZER=tsan \
	    build/tsan/tests/run $(TEST_ARGS)

run: deps
	$(MAKE) all
	./tools/shmping --bench

clean:
	rm -rf build lib/*.so* lib/*.a tools/shmping
