#!/usr/bin/python3
"""Reports what the vbd store would make of a disk image, block by block.

    scripts/dataset-stats.py fixtures/large/dataset.img [more images...] [--block-size 4096] [--json]

For every block (default 4 KiB) it counts:
  - zero blocks (never stored by vbd),
  - duplicates: unique non-zero blocks / non-zero blocks (1.0 = no duplicates; lower = more dedup),
  - LZ4 ratio: bytes of the unique non-zero blocks / bytes after LZ4_compress_default per block,
    where a block that does not shrink is stored raw (as the store does); also with compressed
    sizes rounded up to 512-byte sectors (Limits.sectorBytes, the store's packing unit),
  - overall: logical bytes / stored bytes (zero elimination x dedup x compression).
Several images are read as one set, so cross-image dedup shows up.

LZ4 is the system liblz4 (the library VBDCore links) called through ctypes: no Python package is
needed. /usr/bin/python3 is used on purpose (Debian's, not a pyenv shim).
"""
import argparse
import ctypes
import ctypes.util
import hashlib
import json
import sys


def load_lz4():
    name = ctypes.util.find_library("lz4") or "liblz4.so.1"
    lib = ctypes.CDLL(name)
    lib.LZ4_compress_default.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
    lib.LZ4_compress_default.restype = ctypes.c_int
    lib.LZ4_compressBound.argtypes = [ctypes.c_int]
    lib.LZ4_compressBound.restype = ctypes.c_int
    lib.LZ4_versionString.restype = ctypes.c_char_p
    return lib


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="+")
    ap.add_argument("--block-size", type=int, default=4096)
    ap.add_argument("--sector", type=int, default=512, help="packing unit for compressed blocks")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args()
    bs = args.block_size

    lz4 = load_lz4()
    dst = ctypes.create_string_buffer(lz4.LZ4_compressBound(bs))
    zero = bytes(bs)

    total = zeros = 0
    seen = set()
    unique_raw = unique_lz4 = unique_lz4_sectors = incompressible = 0
    for path in args.images:
        with open(path, "rb") as f:
            while True:
                chunk = f.read(bs * 256)
                if not chunk:
                    break
                for off in range(0, len(chunk) - bs + 1, bs):
                    block = chunk[off:off + bs]
                    total += 1
                    if block == zero:
                        zeros += 1
                        continue
                    key = hashlib.blake2b(block, digest_size=16).digest()
                    if key in seen:
                        continue
                    seen.add(key)
                    unique_raw += bs
                    n = lz4.LZ4_compress_default(block, dst, bs, len(dst))
                    if n <= 0 or n >= bs:
                        incompressible += 1
                        unique_lz4 += bs
                        unique_lz4_sectors += bs
                    else:
                        unique_lz4 += n
                        unique_lz4_sectors += min(bs, -(-n // args.sector) * args.sector)

    nonzero = total - zeros
    unique = len(seen)
    stats = {
        "images": args.images,
        "block_bytes": bs,
        "blocks": total,
        "zero_blocks": zeros,
        "zero_ratio": zeros / total if total else 0.0,
        "nonzero_blocks": nonzero,
        "unique_nonzero_blocks": unique,
        "duplicate_ratio_unique_over_nonzero": unique / nonzero if nonzero else 1.0,
        "lz4_version": lz4.LZ4_versionString().decode(),
        "lz4_ratio": unique_raw / unique_lz4 if unique_lz4 else 1.0,
        "lz4_ratio_512_sectors": unique_raw / unique_lz4_sectors if unique_lz4_sectors else 1.0,
        "incompressible_unique_blocks": incompressible,
        "logical_bytes": total * bs,
        "stored_bytes_512_sectors": unique_lz4_sectors,
        "overall_reduction": (total * bs) / unique_lz4_sectors if unique_lz4_sectors else float("inf"),
    }
    if args.json:
        json.dump(stats, sys.stdout, indent=2)
        print()
        return
    mib = 1 << 20
    print(f"images:                {' '.join(args.images)}")
    print(f"block size:            {bs} bytes; {total} blocks ({total * bs / mib:.1f} MiB)")
    print(f"zero blocks:           {zeros} ({stats['zero_ratio']:.1%} of all blocks)")
    print(f"non-zero blocks:       {nonzero}; unique {unique}")
    print(f"duplicate ratio:       {stats['duplicate_ratio_unique_over_nonzero']:.4f} (unique / non-zero; "
          f"dedup saves {1 - stats['duplicate_ratio_unique_over_nonzero']:.1%} of non-zero blocks)")
    print(f"LZ4 ratio:             {stats['lz4_ratio']:.3f} (liblz4 {stats['lz4_version']}, per block, "
          f"raw when it does not shrink; {incompressible} of {unique} unique blocks incompressible)")
    print(f"LZ4 ratio, 512 B sect: {stats['lz4_ratio_512_sectors']:.3f}")
    print(f"overall:               {total * bs / mib:.1f} MiB logical -> {unique_lz4_sectors / mib:.1f} MiB stored "
          f"({stats['overall_reduction']:.2f}x)")


if __name__ == "__main__":
    main()
