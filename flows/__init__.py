"""Prefect orchestration of the bicro-clean stages (the only package that imports Prefect)."""

import os

# Prefect's in-process (ephemeral) API gets 20 s to start by default; on a loaded 2-core machine that is not
# always enough and the run fails before doing any work. Users can still set their own value.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
