#!/usr/bin/env bash
# The concurrency checker (issue 12; IntegrationTests/concurrency-checker.py) against a store on
# RADOS (issue 17), in both forms such a store has, on a micro Ceph cluster of its own:
# - chunks in the family's striped data file (`init --rados POOL --namespace NS`);
# - chunks as objects shared in a sharing domain (`init ... --share-chunks-as DOMAIN`).
# NBD clients on volumes, snapshots and shares with snapshot/share/rm/resize/gc/fsck beside them;
# every block of every read is checked, then a SIGTERM handover to a restarted server (which
# takes the lock over cleanly), everything read again, fsck clean. Short load (CHECKER_SECONDS,
# 20 s by default, per form; volumes of 4 MiB, grown up to 6) to keep the suite's time; any option
# after these goes to the checker (e.g. --seed N, --duration S). Without Ceph this fails (the cluster script names the missing
# binary): it never skips for it.
source "$(dirname "$0")/nbd-functions.sh"
requires rados
requires_vbdtool_serve
here=$(cd "$(dirname "$0")" && pwd)

start_micro_cluster
seconds="${CHECKER_SECONDS:-20}"
status=0
for form in data-file chunk-objects; do
    store_args="--rados vbd --ceph-conf $CONF --namespace cc-$form"
    init_args=""
    [ "$form" = chunk-objects ] && init_args="--share-chunks-as cc-domain"
    echo "=== concurrency checker on RADOS, chunks as $form"
    start=$(date +%s%N)
    if bash "$here/concurrency-checker.sh" --store-args "$store_args" --init-args "$init_args" --short \
        --duration "$seconds" --volume-size 4M --max-volume-size 6M --progress 0 "$@"; then rc=0; else rc=$?; fi
    echo "=== $form: exit $rc, $(( ($(date +%s%N) - start) / 1000000 )) ms"
    if [ "$form" = chunk-objects ] && [ $rc -eq 0 ]; then
        # The form really was shared objects: the chunk namespace holds this domain's objects.
        n=$(rados -c "$CONF" -p vbd -N vbd-chunks ls 2>/dev/null | grep -c '^chunk\.cc-domain-' || true)
        # The domain is this store's alone and its volumes share one group: after the clean stop
        # (every free durable, every release run) each object is one of its chunks. More objects
        # than chunks is a leaked reference (an object no record claims).
        # shellcheck disable=SC2086
        chunks=$("$VBDTOOL" stats --store "$TMPDIR_TEST/host" $store_args | sed -n 's/.* in \([0-9]*\) unique blocks.*/\1/p')
        echo "chunk objects of the domain after the run: $n; the store's chunks: $chunks"
        [ "$n" -gt 0 ] || { echo "FAIL: no chunk object of the domain: the store did not keep its chunks as objects"; rc=1; }
        [ -n "$chunks" ] && [ "$n" -le "$chunks" ] || { echo "FAIL: $n chunk objects for ${chunks:-?} chunks: leaked objects"; rc=1; }
    fi
    if [ "$form" = data-file ] && [ $rc -eq 0 ]; then
        n=$(rados -c "$CONF" -p vbd -N "cc-$form" ls 2>/dev/null | grep -c '^stripe\.data\.' || true)
        echo "data file stripes after the run: $n"
        [ "$n" -gt 0 ] || { echo "FAIL: the store's data file has no stripe: the chunks went elsewhere"; rc=1; }
    fi
    [ $rc -eq 0 ] || status=$rc
done
[ $status -eq 0 ] && echo PASS
exit $status
