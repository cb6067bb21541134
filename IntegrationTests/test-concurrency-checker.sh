#!/usr/bin/env bash
# Short mode of the concurrency checker (issue 12): NBD clients on volumes, snapshots and shares
# with snapshot/share/rm/resize/gc/fsck beside them; every block of every read is checked.
# See IntegrationTests/concurrency-checker.py for the consistency model.
exec bash "$(dirname "$0")/concurrency-checker.sh" --short "$@"
