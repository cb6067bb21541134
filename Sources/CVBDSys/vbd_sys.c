#define _GNU_SOURCE
#include <fcntl.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "vbd_sys.h"

int vbd_punch_hole(int fd, long long offset, long long length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
}

int vbd_write_back(int fd, long long offset, long long length, int wait) {
    unsigned int flags = SYNC_FILE_RANGE_WRITE;
    if (wait) flags |= SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WAIT_AFTER;
    return sync_file_range(fd, (off_t)offset, (off_t)length, flags);
}

#include <malloc.h>

void vbd_tune_allocator(int mmap_threshold, int trim_threshold, int arena_max) {
    mallopt(M_MMAP_THRESHOLD, mmap_threshold);
    mallopt(M_TRIM_THRESHOLD, trim_threshold);
    mallopt(M_ARENA_MAX, arena_max);
}

/* The kernel's struct sched_attr (include/uapi/linux/sched/types.h), not in glibc's headers. */
struct vbd_sched_attr {
    uint32_t size;
    uint32_t sched_policy;
    uint64_t sched_flags;
    int32_t sched_nice;
    uint32_t sched_priority;
    uint64_t sched_runtime;
    uint64_t sched_deadline;
    uint64_t sched_period;
    uint32_t sched_util_min;
    uint32_t sched_util_max;
};

int vbd_request_time_slice(unsigned long long nanos) {
    struct vbd_sched_attr attr;
    memset(&attr, 0, sizeof attr);
    if (syscall(SYS_sched_getattr, 0, &attr, sizeof attr, 0) != 0) return -1;
    attr.size = sizeof attr;
    attr.sched_runtime = nanos;
    return (int)syscall(SYS_sched_setattr, 0, &attr, 0);
}

void vbd_malloc_figures(size_t *in_use, size_t *free_in_heap) {
    struct mallinfo2 info = mallinfo2();
    *in_use = info.uordblks + info.hblkhd;
    *free_in_heap = info.fordblks;
}

#define VBD_FDS_MAX 64

long vbd_recv_with_fds(int socket, void *buffer, size_t len, int *fds, int max_fds, int *fd_count,
                       int *control_truncated) {
    union { char raw[CMSG_SPACE(sizeof(int) * VBD_FDS_MAX)]; struct cmsghdr align; } control;
    struct iovec iov = { .iov_base = buffer, .iov_len = len };
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.raw;
    msg.msg_controllen = sizeof control.raw;
    *fd_count = 0;
    *control_truncated = 0;
    long received = recvmsg(socket, &msg, MSG_CMSG_CLOEXEC);
    if (received < 0) return received;
    if (msg.msg_flags & MSG_CTRUNC) *control_truncated = 1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int *passed = (int *)CMSG_DATA(c);
        for (int i = 0; i < n; i++) {
            if (*fd_count < max_fds) fds[(*fd_count)++] = passed[i];
            else { close(passed[i]); *control_truncated = 1; }   /* never leak what we cannot hold */
        }
    }
    return received;
}

long vbd_send_with_fds(int socket, const void *buffer, size_t len, const int *fds, int fd_count) {
    union { char raw[CMSG_SPACE(sizeof(int) * VBD_FDS_MAX)]; struct cmsghdr align; } control;
    struct iovec iov = { .iov_base = (void *)buffer, .iov_len = len };
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (fd_count > 0) {
        if (fd_count > VBD_FDS_MAX) return -1;
        memset(control.raw, 0, sizeof control.raw);
        msg.msg_control = control.raw;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * fd_count);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * fd_count);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * fd_count);
    }
    return sendmsg(socket, &msg, MSG_NOSIGNAL);
}

int vbd_eventfd(unsigned int initial, int nonblocking) {
    return eventfd(initial, EFD_CLOEXEC | (nonblocking ? EFD_NONBLOCK : 0));
}

int vbd_memfd_create(const char *name) { return memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING); }

int vbd_seal_size(int fd) { return fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW); }

int vbd_sealed_against_shrinking(int fd) {
    int seals = fcntl(fd, F_GET_SEALS);
    return seals >= 0 && (seals & F_SEAL_SHRINK) != 0;
}

int vbd_set_nonblocking(int fd) {
    int flags = fcntl(fd, F_GETFL);
    return flags < 0 ? -1 : fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

uint16_t vbd_load_acquire_u16(const void *address) {
    return __atomic_load_n((const uint16_t *)address, __ATOMIC_ACQUIRE);
}

void vbd_store_release_u16(void *address, uint16_t value) {
    __atomic_store_n((uint16_t *)address, value, __ATOMIC_RELEASE);
}

void vbd_fence_seq_cst(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
