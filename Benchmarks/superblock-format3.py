# Rewrites a store's superblock slots from format 4 to format 3 (drops the free-space summary),
# so that a format-3 vbdtool opens a copy of a store a format-4 vbdtool filled (Benchmarks/open-ab.sh).
# Benchmark use only: python3 Benchmarks/superblock-format3.py STORE_DIR
import sys, struct, ctypes
lib = ctypes.CDLL('libxxhash.so.0'); lib.XXH3_64bits.restype = ctypes.c_uint64
lib.XXH3_64bits.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
def xxh3(b): return lib.XXH3_64bits(b, len(b))
path = sys.argv[1] + "/superblock"
b = bytearray(open(path, "rb").read())
for k in range(2):
    at = k * 4096
    if len(b) < at + 179 or not any(b[at:at + 8]): continue
    ver = struct.unpack_from("<I", b, at + 8)[0]
    if ver != 4: print("slot", k, "version", ver); continue
    assert struct.unpack_from('<Q', b, at + 171)[0] == xxh3(bytes(b[at:at + 171])), 'checksum check failed'
    body = bytearray(b[at:at + 155]); struct.pack_into("<I", body, 8, 3)
    slot = body + struct.pack("<Q", xxh3(bytes(body)))
    b[at:at + 4096] = slot + bytes(4096 - len(slot))
    print("slot", k, "-> version 3")
open(path, "wb").write(b)
