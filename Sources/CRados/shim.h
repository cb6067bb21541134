// librados (Ceph's C client library, Debian package librados-dev). Debian ships no pkg-config
// file for it, so the module map links it by name.
#include <rados/librados.h>
