"""retrogen service package."""

from retrogen.lazy import require_namespace

require_namespace(__name__, "retrogen.service")
