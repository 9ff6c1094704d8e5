#!/usr/bin/env bash
# Placeholder: the demo (two Dovecot instances replicating through Tandem) is coming.
set -euo pipefail
echo "tandem demo: coming soon"
exit 0
