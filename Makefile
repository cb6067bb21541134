# vbd: two entry points, both self-contained on a fresh Debian machine (run as root).
#   make serve   install packages, build, create ./vbd-data with a 20G volume "vm0", serve NBD on 127.0.0.1:10809
#   make test    install packages, build, run unit + simulation + real-client integration tests
#   make check-concurrency-long   the concurrency checker for 10 minutes (docs/TESTING.md)
#   make power-cut-long   25 real power cuts of a QEMU guest writing to the store (SEED=N to replay)
STORE ?= $(CURDIR)/vbd-data
SWIFT_BUILD_FLAGS ?=
.PHONY: setup build release serve test unit integration sim sim-mutation bench clean check-concurrency check-concurrency-long power-cut power-cut-long fuzz-long fuzz-short

setup:
	@bash scripts/setup.sh

build: setup
	swift build $(SWIFT_BUILD_FLAGS)

release: setup
	swift build -c release $(SWIFT_BUILD_FLAGS)

serve: release
	@test -e "$(STORE)/superblock" || .build/release/vbdtool init --store "$(STORE)"
	@.build/release/vbdtool info vm0 --store "$(STORE)" >/dev/null 2>&1 || .build/release/vbdtool create vm0 --size 20G --store "$(STORE)"
	.build/release/vbdtool serve --store "$(STORE)" --listen 127.0.0.1:10809

unit: build
	swift test $(SWIFT_BUILD_FLAGS)

integration: build
	bash IntegrationTests/run-all.sh

test: setup
	bash scripts/test.sh

# The concurrency checker (issue 12): short mode (also part of `make test`) and the 10-minute mode.
check-concurrency: build
	bash IntegrationTests/concurrency-checker.sh --short

check-concurrency-long: build
	bash IntegrationTests/concurrency-checker.sh --long

# Real power cuts (issue 18): QEMU (TCG) is killed while the store's crash writer runs in the guest.
# `make test` runs 3 cuts; the long mode 25. SEED=N replays the kill points of a run.
POWER_CUTS ?= 25
power-cut: build
	bash IntegrationTests/test-power-cut.sh $(if $(SEED),--seed $(SEED))

power-cut-long: build
	bash IntegrationTests/test-power-cut.sh --cuts $(POWER_CUTS) $(if $(SEED),--seed $(SEED))

sim: release
	.build/release/vbd-sim --seeds 1000
	.build/release/vbd-sim --concurrent --seeds 2000

# The concurrency simulator must find the stale-reader race with its defences compiled out
# (docs/ARCHITECTURE.md, "Stale readers"); this target fails when it does not.
sim-mutation: setup
	swift build --scratch-path .build/mutation --product vbd-sim -Xswiftc -DVBD_MUTATION_STALE_READS
	! .build/mutation/debug/vbd-sim --concurrent --seeds 300

bench: setup
	cd Benchmarks && swift package --allow-writing-to-package-directory benchmark

clean:
	rm -rf .build

# Fuzzing (issue 13, docs/TESTING.md "Fuzzing"): the libFuzzer targets for 10 million executions
# each, one after another, then the live-socket fuzzer for an hour-equivalent of sessions.
fuzz-long: build
	bash Fuzz/run-fuzzers.sh --long
	bash IntegrationTests/test-fuzz-live.sh --long

fuzz-short: build
	bash IntegrationTests/test-fuzz-short.sh
	bash IntegrationTests/test-fuzz-live.sh
