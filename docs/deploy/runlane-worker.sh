#!/bin/sh
# Launch a Runlane worker from a container entrypoint, systemd unit or process manager.
# `exec` replaces this shell with the worker, so SIGTERM from a deploy reaches Python directly: the worker
# stops claiming, lets running attempts finish within RUNLANE_SHUTDOWN_TIMEOUT and hands the rest back to
# pending without using up an attempt. Without `exec` the shell swallows the signal and the worker is
# killed later, leaving its runs to come back only after their lease expires.
set -eu
: "${RUNLANE_APP:?set RUNLANE_APP to module:attribute, e.g. tasks:app}"
exec "${PYTHON:-python}" -m runlane worker "$RUNLANE_APP" "$@"
