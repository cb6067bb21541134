#ifndef VBD_SYS_H
#define VBD_SYS_H
#include <stddef.h>
#include <stdint.h>
/* Linux calls that glibc only declares under _GNU_SOURCE, which Swift's Glibc module does not set. */
int vbd_punch_hole(int fd, long long offset, long long length);
/* Starts the write-back of a range of dirty pages (sync_file_range); with `wait`, first waits for
   what is already being written back there and then for the range's own write-back. Makes nothing
   durable by itself (no metadata, no disk cache flush). 0 or -1 with errno. */
int vbd_write_back(int fd, long long offset, long long length, int wait);
/* malloc tuning (malloc.h is not part of Swift's Glibc module): large allocations up to
   mmap_threshold bytes come from the heap, which is trimmed only past trim_threshold free bytes. */
void vbd_tune_allocator(int mmap_threshold, int trim_threshold, int arena_max);
/* Asks the kernel's EEVDF scheduler (Linux 6.12 and later) for a time slice of `nanos` for the
   calling thread, keeping its policy and nice value. A thread that sleeps most of the time and
   asks for a short slice preempts CPU-bound threads sooner when it wakes. 0, or -1 with errno
   (older kernels ignore the value or refuse it). */
int vbd_request_time_slice(unsigned long long nanos);
/* What malloc holds (mallinfo2): bytes the program has allocated (heap and mmapped), and bytes
   free inside malloc's heap, kept for reuse rather than returned. */
void vbd_malloc_figures(size_t *in_use, size_t *free_in_heap);

/* vhost-user: file descriptors passed with SCM_RIGHTS (the CMSG_* macros are not callable from Swift).
   Receives up to len bytes and at most max_fds descriptors (close-on-exec); *fd_count is how many
   arrived, *control_truncated is 1 when the sender passed more than max_fds (those were dropped by
   the kernel). Returns the bytes received, 0 at end of stream, -1 with errno. */
long vbd_recv_with_fds(int socket, void *buffer, size_t len, int *fds, int max_fds, int *fd_count,
                       int *control_truncated);
/* Sends len bytes and fd_count descriptors in one message (tests play the front end with it). */
long vbd_send_with_fds(int socket, const void *buffer, size_t len, const int *fds, int fd_count);
int vbd_eventfd(unsigned int initial, int nonblocking);
int vbd_memfd_create(const char *name);
/* Seals a memfd's size (F_SEAL_SHRINK | F_SEAL_GROW); 0 or -1 with errno. */
int vbd_seal_size(int fd);
/* 1 when the file cannot shrink (a memfd with F_SEAL_SHRINK), else 0. */
int vbd_sealed_against_shrinking(int fd);
/* Adds O_NONBLOCK to the open file description; 0 or -1 with errno. */
int vbd_set_nonblocking(int fd);

/* The virtio ring's shared-memory accesses (virtio 1.2 section 2.7.13): the guest runs on other CPUs
   and reads or writes the same memory, so index loads acquire, index stores release, and the
   notification decision is ordered after the used-index store by a full fence. */
uint16_t vbd_load_acquire_u16(const void *address);
void vbd_store_release_u16(void *address, uint16_t value);
void vbd_fence_seq_cst(void);
#endif
