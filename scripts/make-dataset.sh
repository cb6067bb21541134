#!/usr/bin/env bash
# Builds the benchmark data sets: ext4 images made from real files on this machine.
#
#   scripts/make-dataset.sh            # both: fixtures/large/dataset.img (1 GiB, git-ignored)
#                                      #   and fixtures/small/dataset-small.img (8 MiB, committed)
#   scripts/make-dataset.sh large      # only the large one
#   scripts/make-dataset.sh small      # only the small one
#
# File selection is deterministic for a given machine: for each source tree, in a fixed order, the
# regular files smaller than 16 MiB are sorted by path (LC_ALL=C) and taken first-fit in that order
# within the tree's byte budget (each tree of a group gets the group's budget). Inode times are
# pinned, so the same files give a byte-identical image. The chosen list is written next to the image (*.manifest, with
# sizes) and its SHA-256 printed, so two runs can be compared. mkfs.ext4 gets a fixed UUID, hash
# seed and time (E2FSPROGS_FAKE_TIME). Another machine has other files in /usr, so other images:
# compare data sets by their dataset-stats numbers, not by bytes.
#
# The mix is what a VM root disk holds: shared libraries and compiler runtimes (compressible,
# ~2:1), documentation and scripts (text, highly compressible), already-compressed man pages and
# icons (incompressible), message catalogues, and free space (zero blocks).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
which="${1:-all}"
command -v mkfs.ext4 >/dev/null || { echo "make-dataset: mkfs.ext4 missing (apt-get install e2fsprogs)" >&2; exit 1; }

work="$(mktemp -d /tmp/vbd-dataset.XXXXXX)"
cleanup() { rm -rf "$work"; }
trap cleanup EXIT

# select_files BUDGET_BYTES ROOT... -> appends "size path" lines to $work/list, BUDGET per ROOT
select_files() {
    local budget=$1; shift
    local root
    for root in "$@"; do
        [ -d "$root" ] || { echo "make-dataset: skipping missing $root" >&2; continue; }
        find "$root" -xdev -type f -readable -size -16M -printf '%s %p\n' 2>/dev/null \
            | LC_ALL=C sort -k2 \
            | awk -v budget="$budget" '{ if (used + $1 <= budget) { used += $1; print } }' \
            >> "$work/list"
    done
}

# build NAME IMAGE_BYTES OUT_DIR "BUDGET:ROOT1,ROOT2"...: the budget applies to each root on its own
# (first fit in path order: a file that does not fit is skipped, later smaller ones may still fit).
build() {
    local name=$1 image_bytes=$2 out_dir=$3; shift 3
    : > "$work/list"
    local spec
    for spec in "$@"; do
        local budget=${spec%%:*} roots=${spec#*:}
        # shellcheck disable=SC2086
        select_files "$budget" ${roots//,/ }
    done
    local stage="$work/stage-$name"
    mkdir -p "$stage" "$out_dir"
    # Paths relative to / for tar; a file listed twice (overlapping roots) is copied once.
    awk '{ sub(/^[0-9]+ \//, ""); print }' "$work/list" | LC_ALL=C sort -u > "$work/paths"
    tar -C / --no-recursion -cf - -T "$work/paths" 2>/dev/null | tar -C "$stage" -xf -
    local files bytes
    files=$(wc -l < "$work/paths")
    bytes=$(awk '{ s += $1 } END { print s + 0 }' "$work/list")
    LC_ALL=C sort -k2 -u "$work/list" > "$out_dir/$name.manifest"
    local image="$out_dir/$name.img"
    rm -f "$image"
    truncate -s "$image_bytes" "$image"
    # Journal: none on the small image (ext4 journals are at least 4 MiB: half of it); default otherwise.
    local journal=()
    [ "$image_bytes" -le $((64 << 20)) ] && journal=(-O ^has_journal)
    E2FSPROGS_FAKE_TIME=1700000000 mkfs.ext4 -q -F -b 4096 -m 0 "${journal[@]}" -L "vbd-${name:0:12}" \
        -U 5eed0a6c-15d6-4000-8000-000000000001 -E hash_seed=5eed0a6c-15d6-4000-8000-000000000002,root_owner=0:0 \
        -d "$stage" "$image"
    # Pin every inode's times so that the same files give a byte-identical image: mke2fs -d copies
    # atime/mtime/ctime from the staging copy, whose ctime is "now". Inodes are allocated in order,
    # so the in-use ones are 2 (root) and 11 .. 11+count.
    local inodes
    inodes=$(( $(find "$stage" | wc -l) + 12 ))
    {
        for ino in 2 $(seq 11 "$inodes"); do
            for field in atime mtime ctime crtime; do echo "set_inode_field <$ino> $field 20231114221320"; done
        done
    } > "$work/debugfs.cmd"
    E2FSPROGS_FAKE_TIME=1700000000 debugfs -w -f "$work/debugfs.cmd" "$image" >/dev/null 2>&1
    echo "make-dataset: $image: $((image_bytes >> 20)) MiB image, $files files, $((bytes >> 20)) MiB of file data," \
         "manifest sha256 $(sha256sum < "$out_dir/$name.manifest" | cut -c1-16)"
    rm -rf "$stage"
}

if [ "$which" = all ] || [ "$which" = large ]; then
    M=$((1 << 20))
    build dataset $((1024 * M)) "$repo/fixtures/large" \
        "$((64 * M)):/usr/share/doc" \
        "$((40 * M)):/usr/share/man" \
        "$((48 * M)):/usr/share/locale" \
        "$((16 * M)):/usr/share/perl,/usr/share/vim,/usr/share/i18n,/usr/share/zoneinfo,/usr/share/mime" \
        "$((16 * M)):/usr/share/icons,/usr/share/fonts" \
        "$((200 * M)):/usr/lib/x86_64-linux-gnu" \
        "$((56 * M)):/usr/lib/python3.11,/usr/lib/python3" \
        "$((64 * M)):/usr/lib/gcc" \
        "$((24 * M)):/usr/lib/git-core,/usr/lib/file,/usr/lib/systemd"
fi

if [ "$which" = all ] || [ "$which" = small ]; then
    K=1024
    build dataset-small $((8 * 1024 * K)) "$repo/fixtures/small" \
        "$((700 * K)):/usr/share/doc" \
        "$((400 * K)):/usr/share/man" \
        "$((400 * K)):/usr/share/locale" \
        "$((300 * K)):/usr/share/zoneinfo" \
        "$((2000 * K)):/usr/lib/x86_64-linux-gnu" \
        "$((600 * K)):/usr/lib/python3.11"
fi
