#!/bin/bash
# failover.sh - Automated Ceph RBD failover script
# Usage: ./failover.sh <pool-name> [--force]

set -e

POOL="${1:-rbd-mirror-pool}"
FORCE="${2:-}"
LOG_FILE="/var/log/ceph/failover-$(date +%Y%m%d-%H%M%S).log"

log() {
    echo "[$(date '+%Y-%m-%d %H:%M:%S')] $1" | tee -a "$LOG_FILE"
}

check_prerequisites() {
    log "Checking prerequisites..."

    # Verify we can connect to local cluster
    if ! ceph status &>/dev/null; then
        log "ERROR: Cannot connect to local Ceph cluster"
        exit 1
    fi

    # Check if pool exists
    if ! ceph osd pool stats "$POOL" &>/dev/null; then
        log "ERROR: Pool $POOL does not exist"
        exit 1
    fi

    log "Prerequisites check passed"
}

promote_images() {
    log "Starting image promotion for pool: $POOL"

    # Get list of all mirrored images
    IMAGES=$(rbd mirror pool status "$POOL" --format json | jq -r '.images[].name')

    FAILED=0
    PROMOTED=0

    for image in $IMAGES; do
        log "Promoting image: $image"

        if [ "$FORCE" == "--force" ]; then
            if rbd mirror image promote --force "$POOL/$image" 2>>"$LOG_FILE"; then
                log "SUCCESS: Promoted $image (forced)"
                PROMOTED=$((PROMOTED + 1))  # CHANGED (bash bug): ((PROMOTED++)) is false when PROMOTED is 0, and set -e exits
            else
                log "ERROR: Failed to promote $image"
                FAILED=$((FAILED + 1))  # CHANGED (bash bug): ((FAILED++)) is false when FAILED is 0, and set -e exits
            fi
        else
            if rbd mirror image promote "$POOL/$image" 2>>"$LOG_FILE"; then
                log "SUCCESS: Promoted $image"
                PROMOTED=$((PROMOTED + 1))  # CHANGED (bash bug): ((PROMOTED++)) is false when PROMOTED is 0, and set -e exits
            else
                log "ERROR: Failed to promote $image"
                FAILED=$((FAILED + 1))  # CHANGED (bash bug): ((FAILED++)) is false when FAILED is 0, and set -e exits
            fi
        fi
    done

    log "Promotion complete: $PROMOTED succeeded, $FAILED failed"

    return $FAILED
}

verify_promotion() {
    log "Verifying promotion status..."

    # Check pool status
    STATUS=$(rbd mirror pool status "$POOL" --format json)
    HEALTH=$(echo "$STATUS" | jq -r '.summary.health')

    log "Pool health: $HEALTH"

    # List all image states
    echo "$STATUS" | jq -r '.images[] | "  \(.name): \(.state)"' | while read line; do
        log "$line"
    done
}

main() {
    log "=========================================="
    log "Ceph RBD Failover Script Started"
    log "Pool: $POOL"
    log "Force mode: ${FORCE:-disabled}"
    log "=========================================="

    check_prerequisites
    promote_images
    verify_promotion

    log "=========================================="
    log "Failover complete"
    log "Log file: $LOG_FILE"
    log "=========================================="
}

main
