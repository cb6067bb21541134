#ifndef VBD_SYS_H
#define VBD_SYS_H
/* Linux calls that glibc only declares under _GNU_SOURCE, which Swift's Glibc module does not set. */
int vbd_punch_hole(int fd, long long offset, long long length);
#endif
