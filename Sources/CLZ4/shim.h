#include <lz4.h>
#include <stdlib.h>

/* LZ4_compress_default initialises a 16 KiB state on every call (a memset of its hash table,
 * costlier than compressing a 4 KiB block that does not shrink). Here each thread keeps one
 * state and starts every block with LZ4_resetStream_fast, which lz4.h documents as the cheap way
 * to begin an independent block: the output needs no dictionary to decompress. The state lives
 * as long as its thread (vbd's threads live as long as the process). Returns the compressed
 * length, or 0 if it does not fit in `capacity` (or the state could not be allocated). */
static inline int vbd_lz4_compress(const char *source, char *destination, int count, int capacity, int acceleration) {
    static _Thread_local LZ4_stream_t *state = NULL;
    if (state == NULL) {
        state = (LZ4_stream_t *)malloc(sizeof(LZ4_stream_t));
        if (state == NULL || LZ4_initStream(state, sizeof(LZ4_stream_t)) == NULL) {
            free(state);
            state = NULL;
            return LZ4_compress_fast(source, destination, count, capacity, acceleration);
        }
    } else {
        LZ4_resetStream_fast(state);
    }
    return LZ4_compress_fast_continue(state, source, destination, count, capacity, acceleration);
}
