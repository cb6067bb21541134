#!/usr/bin/env python3
"""Converts an nbdkit log-filter log into a compact VBD cache trace, and describes such a trace.

Trace format (little-endian), read by VBDCache's `CacheTrace`:
  magic        8 bytes  b"VBDTRACE"
  version      u32      1
  blockBytes   u32      4096
  deviceBlocks u32      blocks in the device
  chunkCount   u32      distinct non-zero block contents
  recordCount  u32
  blockChunk   deviceBlocks x u32   content id of each block's final contents: 0 = all zeroes,
                                    1...chunkCount otherwise; equal contents share one id (dedup)
  chunkLZ4     chunkCount x u16     LZ4_compress_default size of content id 1, 2, ...
  records      recordCount x (u32 firstBlock, u32 blockCount << 1 | isWrite)
Requests are mapped to the 4 KiB blocks they touch; Zero/Trim requests are dropped (zero blocks are
never stored or cached). Reads include NBD CACHE requests (they load the range into the cache).
"""
import argparse, ctypes, hashlib, re, struct, sys

BLOCK = 4096
LINE = re.compile(r"connection=\d+ (Read|Write|Cache) id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+)")


def lz4_sizes(image):
    lz4 = ctypes.CDLL("liblz4.so.1")
    bound = lz4.LZ4_compressBound(BLOCK)
    dst = ctypes.create_string_buffer(bound)
    ids, sizes, block_chunk = {}, [], []
    with open(image, "rb") as f:
        while True:
            block = f.read(BLOCK)
            if not block:
                break
            block = block.ljust(BLOCK, b"\0")
            if block.count(0) == BLOCK:
                block_chunk.append(0)
                continue
            digest = hashlib.sha256(block).digest()
            if digest not in ids:
                n = lz4.LZ4_compress_default(block, dst, BLOCK, bound)
                assert 0 < n <= 0xFFFF
                sizes.append(n)
                ids[digest] = len(sizes)
            block_chunk.append(ids[digest])
    return block_chunk, sizes


def convert(args):
    block_chunk, sizes = lz4_sizes(args.image)
    records = []
    with open(args.log) as log:
        for line in log:
            m = LINE.search(line)  # request lines only: completion lines carry no offset
            if not m:
                continue
            op, offset, count = m.group(1), int(m.group(2), 16), int(m.group(3), 16)
            if count == 0:
                continue
            first, last = offset // BLOCK, (offset + count - 1) // BLOCK
            n = last - first + 1
            assert n < (1 << 31) and last < len(block_chunk)
            records.append((first, (n << 1) | (1 if op == "Write" else 0)))
    with open(args.output, "wb") as out:
        out.write(b"VBDTRACE")
        out.write(struct.pack("<5I", 1, BLOCK, len(block_chunk), len(sizes), len(records)))
        out.write(struct.pack(f"<{len(block_chunk)}I", *block_chunk))
        out.write(struct.pack(f"<{len(sizes)}H", *sizes))
        for r in records:
            out.write(struct.pack("<2I", *r))


def describe(args):
    data = open(args.trace, "rb").read()
    assert data[:8] == b"VBDTRACE", "not a VBD trace"
    version, block, blocks, chunks, nrec = struct.unpack_from("<5I", data, 8)
    off = 28 + 4 * blocks + 2 * chunks
    reads = writes = read_blocks = write_blocks = 0
    for i in range(nrec):
        first, v = struct.unpack_from("<2I", data, off + 8 * i)
        if v & 1:
            writes += 1; write_blocks += v >> 1
        else:
            reads += 1; read_blocks += v >> 1
    sizes = struct.unpack_from(f"<{chunks}H", data, 28 + 4 * blocks)
    ratio = chunks * block / max(1, sum(sizes))
    print(f"{args.trace}: {len(data)} bytes, version {version}, {blocks} blocks of {block} B, "
          f"{chunks} distinct contents (LZ4 ratio {ratio:.2f}), {reads} reads ({read_blocks} blocks), "
          f"{writes} writes ({write_blocks} blocks)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert")
    c.add_argument("--log", required=True)
    c.add_argument("--image", required=True)
    c.add_argument("--output", required=True)
    d = sub.add_parser("describe")
    d.add_argument("trace")
    args = parser.parse_args()
    convert(args) if args.command == "convert" else describe(args)


if __name__ == "__main__":
    sys.exit(main())
