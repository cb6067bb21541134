#define _GNU_SOURCE
#include <fcntl.h>
#include "vbd_sys.h"

int vbd_punch_hole(int fd, long long offset, long long length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
}

#include <malloc.h>

void vbd_tune_allocator(int mmap_threshold, int trim_threshold, int arena_max) {
    mallopt(M_MMAP_THRESHOLD, mmap_threshold);
    mallopt(M_TRIM_THRESHOLD, trim_threshold);
    mallopt(M_ARENA_MAX, arena_max);
}
