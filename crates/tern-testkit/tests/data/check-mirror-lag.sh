#!/bin/bash
# Script to check mirroring lag for all images in a pool
# Returns non-zero exit code if any image is behind

POOL="${1:-rbd-mirror-pool}"
MAX_LAG_SECONDS="${2:-300}"  # 5 minutes default threshold

echo "Checking mirroring status for pool: $POOL"
echo "Maximum acceptable lag: ${MAX_LAG_SECONDS} seconds"
echo "================================================"

# Get status in JSON format for parsing
STATUS=$(rbd mirror pool status $POOL --format json)

# Parse and check each image
echo "$STATUS" | jq -r '.images[] | "\(.name) \(.state) \(.description)"' | \
while read name state desc; do
    echo "Image: $name"
    echo "  State: $state"
    echo "  Details: $desc"

    # Check for error states
    if [[ "$state" == *"error"* ]]; then
        echo "  WARNING: Image is in error state!"
    fi

    # Check entries behind for journal mirroring
    if [[ "$desc" == *"entries_behind"* ]]; then
        behind=$(echo "$desc" | grep -o '"entries_behind":[0-9]*' | cut -d: -f2)
        if [ "$behind" -gt 0 ]; then
            echo "  WARNING: $behind journal entries behind"
        fi
    fi
    echo ""
done

# Get overall health
HEALTH=$(echo "$STATUS" | jq -r '.summary.health')
echo "Overall Health: $HEALTH"

if [ "$HEALTH" != "OK" ]; then
    exit 1
fi
