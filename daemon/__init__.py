"""groupgate: personal API tokens governed by directory group membership.

The public library API is the verifier; everything else is the daemon's own business.
"""

from __future__ import annotations

from daemon.errors import StoreUnavailable
from daemon.verify import Reason, Verifier, VerifyResult, verify

__all__ = ["Reason", "StoreUnavailable", "Verifier", "VerifyResult", "verify"]
__version__ = "0.1.0"
