#ifndef VBD_SYS_H
#define VBD_SYS_H
/* Linux calls that glibc only declares under _GNU_SOURCE, which Swift's Glibc module does not set. */
int vbd_punch_hole(int fd, long long offset, long long length);
/* malloc tuning (malloc.h is not part of Swift's Glibc module): large allocations up to
   mmap_threshold bytes come from the heap, which is trimmed only past trim_threshold free bytes. */
void vbd_tune_allocator(int mmap_threshold, int trim_threshold, int arena_max);
#endif
