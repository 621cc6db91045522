#!/bin/bash
# failback.sh - Automated Ceph RBD failback script
# Performs graceful failback from DR site to primary

set -e

PRIMARY_POOL="${1:-rbd-mirror-pool}"
LOG_FILE="/var/log/ceph/failback-$(date +%Y%m%d-%H%M%S).log"

log() {
    echo "[$(date '+%Y-%m-%d %H:%M:%S')] $1" | tee -a "$LOG_FILE"
}

wait_for_sync() {
    local image=$1
    local max_wait=3600  # 1 hour timeout
    local waited=0

    log "Waiting for $image to complete sync..."

    while [ $waited -lt $max_wait ]; do
        STATUS=$(rbd mirror image status "$PRIMARY_POOL/$image" --format json 2>/dev/null)
        # CHANGED (script bug): the image is primary on this (DR) site, so its own
        # .state is always up+stopped; the sync to wait for is the peer site's.
        STATE=$(echo "$STATUS" | jq -r '.peer_sites[0].state')

        if [[ "$STATE" == *"replaying"* ]]; then
            # Check if caught up
            # CHANGED (script bug): the peer's description, and the key is
            # entries_behind_primary (the pattern never matched, so it never waited).
            ENTRIES_BEHIND=$(echo "$STATUS" | jq -r '.peer_sites[0].description' | grep -o 'entries_behind_primary":[0-9]*' | cut -d: -f2 || echo "0")
            if [ "$ENTRIES_BEHIND" == "0" ] || [ -z "$ENTRIES_BEHIND" ]; then
                log "$image is fully synced"
                return 0
            fi
            log "$image has $ENTRIES_BEHIND entries behind, waiting..."
        elif [[ "$STATE" == *"syncing"* ]]; then
            PROGRESS=$(echo "$STATUS" | jq -r '.peer_sites[0].description')  # CHANGED: as above
            log "$image sync progress: $PROGRESS"
        else
            log "$image state: $STATE"
        fi

        sleep 10
        ((waited+=10))
    done

    log "ERROR: Timeout waiting for $image to sync"
    return 1
}

perform_failback() {
    local image=$1

    log "Starting failback for $image"

    # Demote on DR site (this script runs on DR site)
    log "Demoting $image on DR site..."
    rbd mirror image demote "$PRIMARY_POOL/$image"

    # Wait a moment for the state to propagate
    sleep 5

    log "$image demoted on DR site, promote on primary site"
}

main() {
    log "=========================================="
    log "Ceph RBD Failback Script Started"
    log "Pool: $PRIMARY_POOL"
    log "=========================================="

    # Get list of images
    IMAGES=$(rbd mirror pool status "$PRIMARY_POOL" --format json | jq -r '.images[].name')

    # First verify all images are synced
    log "Phase 1: Verifying all images are synced"
    for image in $IMAGES; do
        if ! wait_for_sync "$image"; then
            log "ERROR: Cannot proceed, $image is not synced"
            exit 1
        fi
    done

    # Perform failback
    log "Phase 2: Performing failback"
    for image in $IMAGES; do
        perform_failback "$image"
    done

    log "=========================================="
    log "Failback initiated on DR site"
    log "Now promote images on primary site"
    log "Log file: $LOG_FILE"
    log "=========================================="
}

main
